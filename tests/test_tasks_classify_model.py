"""Classifier head, collate, missing inputs as the model sees them, merged == adapted, head files, defaults."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mora_retrieval.errors import TrainingError
from mora_retrieval.model.encode import ordered_loader
from mora_retrieval.model.heads import CLIPClassifier, LinearHead
from mora_retrieval.tasks.classify.model import (ClassifyCollate, ClassifyModule, classification_loss, evaluate_classifier,
                                           predict_logits)
from mora_retrieval.tasks.classify.settings import (ClassifySettings, default_adapter_config, default_train_config,
                                                 read_run_config, scenario_data)

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest single-threaded (and do not fight other test processes for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _memes_fixture(root, n: int = 12) -> None:
    """A hand-written Hateful-Memes-format root: ``img/<id>.png`` + ``{train,dev_seen,test_seen}.jsonl``."""
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "dev_seen", "test_seen"):
        rows = []
        for i in range(n):
            meme = f"{split[:2]}{i:03d}"
            Image.fromarray(rng.integers(0, 255, (20, 28, 3), dtype=np.uint8)).save(root / "img" / f"{meme}.png")
            rows.append(json.dumps({"id": meme, "img": f"img/{meme}.png", "label": i % 2, "text": f"meme number {i}"}))
        (root / f"{split}.jsonl").write_text("\n".join(rows) + "\n")


def _memes_settings(tmp_path, n: int = 12, missing: str = "none", **kwargs) -> ClassifySettings:
    """Settings of a mora-tiny run on a fresh :func:`_memes_fixture` under ``tmp_path / "memes"``."""
    _memes_fixture(tmp_path / "memes", n=n)
    return ClassifySettings(**{"dataset": "hateful_memes", "data_root": str(tmp_path / "memes"), "arch": "mora-tiny",
                               "pretrained": None, "missing": missing, "missing_store": str(tmp_path / "store"),
                               **kwargs})


def _classifier(tiny_model, method: str = "mora", out: int = 2, seed: int = 0):
    import copy

    from mora_retrieval.adapters import add_adapters

    model = copy.deepcopy(tiny_model.model)
    torch.manual_seed(seed)
    add_adapters(model, default_adapter_config("hateful_memes", method))
    return CLIPClassifier(model, LinearHead(128, out))


def test_collate_tokenises_and_drops_skipped_items(tiny_model):
    collate = ClassifyCollate(tiny_model.tokenizer)
    items = [{"image": torch.zeros(3, 32, 32), "text": "a red circle", "label": torch.tensor(1), "index": 4,
              "missing": 2},
             None,
             {"image": torch.ones(3, 32, 32), "text": "", "label": torch.tensor(0), "index": 7}]
    batch = collate(items)
    assert batch["image"].shape == (2, 3, 32, 32)
    assert torch.equal(batch["tokens"], tiny_model.tokenizer(["a red circle", ""]))
    assert batch["label"].tolist() == [1, 0] and batch["index"].tolist() == [4, 7]
    assert batch["missing"].tolist() == [2, 0]


def test_a_batch_of_only_bad_images_is_passed_over_in_evaluation(tiny_model, tmp_path):
    settings = _memes_settings(tmp_path, n=6, skip_bad_images=True)
    for meme in ("te000", "te001"):  # the whole first batch of 2
        (tmp_path / "memes" / "img" / f"{meme}.png").write_bytes(b"not a png")
    data = scenario_data(settings, "test", "none", tiny_model.preprocess)
    collate = ClassifyCollate(tiny_model.tokenizer)
    assert collate([data[0], data[1]]) is None
    out = predict_logits(_classifier(tiny_model), ordered_loader(data, 2, CPU, collate_fn=collate), "cpu")
    assert out["index"].tolist() == [2, 3, 4, 5] and out["logits"].shape == (4, 2)


def test_losses_match_their_definitions():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -2.0]])
    labels = torch.tensor([0, 2])
    ce = -torch.log_softmax(logits, 1)[torch.arange(2), labels].mean()
    assert classification_loss("multiclass", logits, labels) == pytest.approx(float(ce))
    multi = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    p = torch.sigmoid(logits)
    bce = -(multi * torch.log(p) + (1 - multi) * torch.log(1 - p)).mean()
    assert classification_loss("multilabel", logits, multi) == pytest.approx(float(bce), rel=1e-5)


def test_missing_inputs_reach_the_encoders_exactly_as_assigned(tmp_path, tiny_model):
    """Spy on encode_image/encode_text: ones images and "" tokens exactly where the stored codes say."""
    settings = _memes_settings(tmp_path, missing="both:0.5", dataset="hateful-memes")
    data = scenario_data(settings, "train", "both:0.5", tiny_model.preprocess)
    codes = data.codes.copy()
    assert (codes == 1).sum() == 3 and (codes == 2).sum() == 3 and (codes == 0).sum() == 6
    # the draw was stored and is reused
    stored = list((tmp_path / "store").glob("hateful_memes__train__both-*.json"))
    assert len(stored) == 1 and json.loads(stored[0].read_text())["codes"] == codes.tolist()

    classifier = _classifier(tiny_model)
    seen_images, seen_tokens = [], []
    real_image, real_text = classifier.clip.encode_image, classifier.clip.encode_text
    classifier.clip.encode_image = lambda x, **kw: (seen_images.append(x.clone()), real_image(x, **kw))[1]
    classifier.clip.encode_text = lambda t, **kw: (seen_tokens.append(t.clone()), real_text(t, **kw))[1]
    collate = ClassifyCollate(tiny_model.tokenizer)
    out = predict_logits(classifier, ordered_loader(data, 5, CPU, collate_fn=collate), "cpu")
    images, tokens = torch.cat(seen_images), torch.cat(seen_tokens)
    assert out["index"].tolist() == list(range(12)) and out["missing"].tolist() == codes.tolist()

    base = data.dataset  # the unwrapped dataset: what a complete sample looks like
    empty = tiny_model.tokenizer([""])[0]
    n_ones = n_empty = 0
    for i, code in enumerate(codes):
        full_image = base[i]["image"]
        full_tokens = tiny_model.tokenizer([base.texts[i]])[0]
        if code == 2:
            assert torch.equal(images[i], torch.ones(3, 32, 32))
            n_ones += 1
        else:
            assert torch.equal(images[i], full_image)
        if code == 1:
            assert torch.equal(tokens[i], empty)
            n_empty += 1
        else:
            assert torch.equal(tokens[i], full_tokens) and not torch.equal(tokens[i], empty)
    assert (n_ones, n_empty) == ((codes == 2).sum(), (codes == 1).sum())

    # the "white" fill: the transformed white image instead of ones
    white = ClassifySettings(**{**settings.to_dict(), "missing_image": "white"})
    wdata = scenario_data(white, "train", "both:0.5", tiny_model.preprocess)
    i = int(np.flatnonzero(codes == 2)[0])
    expected = tiny_model.preprocess(Image.new("RGB", (28, 20), (255, 255, 255)))
    assert torch.allclose(wdata[i]["image"], expected)


def test_eval_on_merged_model_equals_eval_on_adapted_model(tmp_path, tiny_model):
    from mora_retrieval.adapters import export_checkpoint, merge_adapters
    from mora_retrieval.model.backbone import load_backbone

    settings = _memes_settings(tmp_path, missing="both:0.5")
    data = scenario_data(settings, "test", "both:0.5", tiny_model.preprocess)
    classifier = _classifier(tiny_model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move the adapter away from its initialisation (B = 0)
        for name, p in classifier.clip.named_parameters():
            if p.requires_grad:  # only the adapter tensors are trainable
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        classifier.head.linear.weight.normal_(0, 1, generator=gen)
    collate = ClassifyCollate(tiny_model.tokenizer)
    adapted = predict_logits(classifier, ordered_loader(data, 4, CPU, collate_fn=collate), "cpu")["logits"]
    adapted_metrics = evaluate_classifier(classifier, "binary", data, collate, "cpu", batch_size=4)
    merge_adapters(classifier.clip)
    merged = predict_logits(classifier, ordered_loader(data, 4, CPU, collate_fn=collate), "cpu")["logits"]
    plain = CLIPClassifier(tiny_model.model, classifier.head)  # same head, no adapters
    assert not torch.allclose(predict_logits(plain, ordered_loader(data, 4, CPU, collate_fn=collate), "cpu")["logits"], adapted, atol=1e-3)
    assert torch.allclose(merged, adapted, atol=1e-4, rtol=1e-4)
    merged_metrics = evaluate_classifier(classifier, "binary", data, collate, "cpu", batch_size=4)
    assert merged_metrics["auroc"] == pytest.approx(adapted_metrics["auroc"])
    assert merged_metrics["loss"] == pytest.approx(adapted_metrics["loss"], abs=1e-5)
    # the exported plain checkpoint reloads through open_clip to the same logits
    path = export_checkpoint(classifier.clip, tmp_path / "merged.safetensors")
    reloaded = CLIPClassifier(load_backbone("mora-tiny", str(path)).model, classifier.head)
    again = predict_logits(reloaded, ordered_loader(data, 4, CPU, collate_fn=collate), "cpu")["logits"]
    assert torch.allclose(again, merged, atol=1e-5)


def test_module_forward_loss_and_trainable_state(tiny_model, tmp_path):
    settings = _memes_settings(tmp_path, n=4)
    data = scenario_data(settings, "val", "none", tiny_model.preprocess)
    collate = ClassifyCollate(tiny_model.tokenizer)
    module = ClassifyModule(_classifier(tiny_model), "binary", data, collate, eval_batch_size=2)
    assert module.main_metric == "auroc" and module.higher_is_better
    batch = collate([data[i] for i in range(4)])
    loss = module(batch)
    logits = module.classifier(batch["image"], batch["tokens"])
    ref = torch.nn.functional.cross_entropy(logits, batch["label"]).detach()
    assert loss.ndim == 0 and float(loss.detach()) == pytest.approx(float(ref))
    keys = set(module.trainable_state_dict())
    assert "classifier.head.linear.weight" in keys
    assert not any(k.endswith("token_embedding.weight") for k in keys)  # frozen backbone stays out
    metrics = module.evaluate(torch.device("cpu"))
    assert {"auroc", "accuracy", "loss"} <= set(metrics)


def test_dataset_defaults_and_overrides():
    hm = default_adapter_config("hateful-memes")
    assert (hm.method, hm.r, hm.r_shared, hm.alpha, hm.targets, hm.layers) == ("mora", 8, 8, 0.1, ("k", "v"), 2)
    mm = default_adapter_config("mmimdb", "no_gram", r=2)
    assert (mm.r, mm.alpha, mm.targets) == (2, 0.001, ("q", "k"))
    assert default_adapter_config("food101", "lora").alpha is None  # LoRA keeps its own α = r
    cfg = default_train_config("hateful_memes", lr=3e-4)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay) == (5, 16, 3e-4, 0.1)
    food = default_train_config("food101")
    assert (food.epochs, food.batch_size, food.lr, food.weight_decay) == (20, 256, 1e-2, 0.02)


def test_scenarios_and_run_config_errors(tmp_path):
    s = ClassifySettings(dataset="food101", data_root=str(tmp_path), missing="both:0.70", test_missing="image:0.9",
                         missing_store=str(tmp_path / "s"))
    assert s.scenarios == {"train": "both:0.7", "val": "both:0.7", "test": "image:0.9"}
    from mora_retrieval.errors import DataError

    with pytest.raises(DataError, match="bad missing-modality spec 'half'"):
        ClassifySettings(dataset="food101", data_root=str(tmp_path), missing="half")
    with pytest.raises(TrainingError, match="config.json: run config not found"):
        read_run_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"train": {}, "extra": {"task": "cir"}}))
    with pytest.raises(TrainingError, match="not a classification run"):
        read_run_config(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_autocast_eval_on_cuda_is_close_to_fp32_on_cpu(tmp_path, tiny_model):
    settings = _memes_settings(tmp_path, n=6, missing="both:0.5")
    data = scenario_data(settings, "test", "both:0.5", tiny_model.preprocess)
    collate = ClassifyCollate(tiny_model.tokenizer)
    classifier = _classifier(tiny_model)
    cpu = predict_logits(classifier, ordered_loader(data, 3, CPU, collate_fn=collate), "cpu")["logits"]
    gpu = predict_logits(classifier.to("cuda"), ordered_loader(data, 3, CPU, collate_fn=collate), "cuda", precision="bf16")["logits"]
    assert gpu.dtype == torch.float32 and gpu.device.type == "cpu"
    assert torch.allclose(gpu, cpu, atol=5e-2)
