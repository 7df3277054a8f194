"""load_encoder: plain, adapter, merged checkpoint and run folder sources agree on the weights."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from retrieval_fixtures import write_tiny_checkpoint

from mora_retrieval.model.backbone import load_backbone, weights_fingerprint
from mora_retrieval.errors import BackboneError
from mora_retrieval.retrieval.encoder import load_encoder, load_encoder_from_source


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    from mora_retrieval.adapters import AdapterConfig, add_adapters, export_checkpoint, merge_adapters, save_adapters
    from mora_retrieval.model.combiner import Combiner, save_combiner

    root = tmp_path_factory.mktemp("enc")
    base = write_tiny_checkpoint(root / "base.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_backbone("mora-tiny", pretrained=str(base)).model
    add_adapters(model, AdapterConfig())
    save_adapters(model, root / "adapter", arch="mora-tiny")
    merged = merge_adapters(model).eval()
    run = root / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"arch": "mora-tiny", "pretrained": str(base)}))
    export_checkpoint(merged, run / "merged.safetensors")
    torch.manual_seed(1)
    save_combiner(Combiner(64), run / "combiner.safetensors")
    return {"root": root, "base": base, "fingerprint": weights_fingerprint(merged)}


def test_adapter_checkpoint_and_run_give_the_merged_weights(adapted):
    root, base = adapted["root"], adapted["base"]
    plain = load_encoder("mora-tiny", str(base), device="cpu")
    via_adapter = load_encoder("mora-tiny", str(base), adapter=root / "adapter", device="cpu")
    via_ckpt = load_encoder("mora-tiny", checkpoint=root / "run" / "merged.safetensors", device="cpu")
    via_run = load_encoder(None, run=root / "run", device="cpu")
    assert plain.fingerprint != adapted["fingerprint"]
    assert via_adapter.fingerprint == via_ckpt.fingerprint == via_run.fingerprint == adapted["fingerprint"]
    assert via_adapter.source["adapter"].endswith("adapter") and via_ckpt.source["checkpoint"].endswith("merged.safetensors")
    assert via_run.source["run"].endswith("run") and via_run.combiner is not None and via_adapter.combiner is None
    # the manifest's source reloads the same weights
    assert load_encoder_from_source(json.loads(json.dumps(via_run.source)), device="cpu").fingerprint == adapted["fingerprint"]


def test_run_without_merged_checkpoint_merges_its_adapter(adapted, tmp_path):
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(adapted["root"] / "run" / "config.json", run / "config.json")
    shutil.copytree(adapted["root"] / "adapter", run / "adapter")
    enc = load_encoder(None, run=run, device="cpu")
    assert enc.fingerprint == adapted["fingerprint"] and enc.combiner is None


def test_unfinished_run_is_refused_not_replaced_by_its_base_weights(adapted, tmp_path):
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(adapted["root"] / "run" / "config.json", run / "config.json")  # stage 1 still running
    with pytest.raises(BackboneError, match=r"run: the run has not finished \(neither merged.safetensors nor adapter/"):
        load_encoder(None, run=run, device="cpu")


def test_non_finite_embeddings_are_refused_before_writing(adapted, tmp_path):
    from mora_retrieval.errors import IndexFolderError
    from mora_retrieval.retrieval.build import BuildConfig, build_index
    from mora_retrieval.retrieval.embed import EmbedConfig
    from mora_retrieval.retrieval.items import Item
    from PIL import Image

    enc = load_encoder(None, run=adapted["root"] / "run", device="cpu")
    with torch.no_grad():
        enc.model.visual.proj.fill_(float("nan"))  # weights that diverged
    paths = []
    for i in range(3):
        Image.new("RGB", (40, 30), (40 * i, 90, 10)).save(tmp_path / f"{i}.png")
        paths.append(Item(path=str(tmp_path / f"{i}.png")))
    with pytest.raises(IndexFolderError, match=r"3 of 3 embeddings are NaN or inf \(first: .*0.png\)"):
        build_index(enc, paths, tmp_path / "idx", BuildConfig(embed=EmbedConfig(batch_size=2, workers=0)))
    assert not (tmp_path / "idx" / "manifest.json").exists()


def test_composed_query_uses_the_combiner_else_the_sum(adapted):
    enc = load_encoder(None, run=adapted["root"] / "run", device="cpu")
    img = torch.randn(3, 64)
    txt = torch.randn(1, 64)
    with torch.no_grad():
        want = enc.combiner(img, txt.expand(3, -1))
    assert torch.allclose(enc.encode_composed(img, txt), want, atol=1e-6)
    enc.combiner = None
    assert torch.allclose(enc.encode_composed(img, txt), F.normalize(img + txt, dim=-1), atol=1e-6)


def _cosine(a, b):
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def test_bf16_encoder_matches_fp32_for_images_texts_and_composed_queries(adapted):
    """The bf16 path (CUDA's default) run on the CPU: one cast of the weights, no autocast."""
    run = adapted["root"] / "run"
    full = load_encoder(None, run=run, device="cpu")
    half = load_encoder(None, run=run, device="cpu", dtype=torch.bfloat16)
    assert full.dtype == torch.float32  # the CPU's inference dtype
    assert {p.dtype for p in full.model.parameters()} == {torch.float32}
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in half.combiner.parameters()} == {torch.float32}  # the Combiner stays float32
    assert half.fingerprint == full.fingerprint == adapted["fingerprint"]  # taken before the cast
    torch.manual_seed(0)
    images = torch.randn(5, 3, 32, 32)
    texts = ["a red square", "two blue circles on the left", "", "x " * 100]
    raw = {}
    for name, enc in (("full", full), ("half", half)):
        img, txt = enc.encode_images(images, normalize=False), enc.encode_texts(texts, normalize=False)
        assert img.dtype == txt.dtype == torch.float32
        with_combiner = enc.encode_composed(img[:4], txt)
        enc.combiner, combiner = None, enc.combiner
        summed = enc.encode_composed(img[:4], txt)
        enc.combiner = combiner
        raw[name] = (img, txt, with_combiner, summed)
    for ours, ref in zip(raw["half"], raw["full"]):
        assert not torch.equal(ours, ref)  # the bf16 path really ran
        assert _cosine(ours, ref).min() > 1 - 1e-2


def test_source_errors_are_one_line(adapted, tmp_path):
    with pytest.raises(BackboneError, match="at most one"):
        load_encoder("mora-tiny", adapter=adapted["root"] / "adapter", checkpoint=adapted["base"])
    with pytest.raises(BackboneError) as err:
        load_encoder(None, run=tmp_path)
    assert "config.json" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(BackboneError, match="no architecture"):
        load_encoder(None)
