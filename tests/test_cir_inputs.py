"""`train cirr` from the prepared-image cache: same losses as from the files, one uint8 buffer per batch, bad images."""

from __future__ import annotations

import contextlib
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from mora_retrieval.data.images import make_transform, preprocess_spec
from mora_retrieval.errors import DataError


def _settings(root, run_dir, **kw):
    from mora_retrieval.engine import TrainConfig
    from mora_retrieval.tasks.cir import CIRSettings

    s = CIRSettings.with_defaults(str(root), str(run_dir), "mora", arch="mora-tiny", pretrained=None, **kw)
    s.stage1 = TrainConfig(epochs=2, batch_size=8, lr=1e-2, log_every=1, device="cpu", num_workers=0)
    s.stage2 = TrainConfig(epochs=1, batch_size=8, lr=1e-3, weight_decay=0.0, device="cpu", num_workers=0)
    return s


def _history(run, stage):
    return [json.loads(line) for line in (run / stage / "metrics.jsonl").read_text().splitlines()]


def test_training_from_the_prepared_cache_gives_the_losses_of_the_image_files(world, tmp_path):
    from mora_retrieval.tasks.cir import train_cirr

    cache = tmp_path / "cache"
    runs = {}
    for prepared in (False, True):
        torch.manual_seed(0)
        run = tmp_path / f"run-{prepared}"
        runs[prepared] = train_cirr(_settings(world["cirr"], run, prepared=prepared, prepared_dir=str(cache)),
                                    quiet=True), run
    assert sorted(p.name for p in cache.iterdir() if p.suffix == ".npy") == ["cirr-train-32x32.npy",
                                                                              "cirr-val-32x32.npy"]
    (plain, plain_run), (fast, fast_run) = runs[False], runs[True]
    for stage in ("stage1", "stage2"):
        want, got = _history(plain_run, stage), _history(fast_run, stage)
        assert [r["train_loss"] for r in got] == pytest.approx([r["train_loss"] for r in want], rel=1e-6, abs=1e-7)
        for a, b in zip(want, got):
            assert b["val"] == pytest.approx(a["val"], abs=1e-4)
    assert fast["val_stage1"] == pytest.approx(plain["val_stage1"], abs=1e-4)
    assert fast["val_combiner"] == pytest.approx(plain["val_combiner"], abs=1e-4)
    assert json.loads((fast_run / "config.json").read_text())["prepared"] is True
    assert fast["dropped_triplets"] == {"train": 0, "val": 0}


def test_a_batch_is_one_uint8_tensor_normalised_on_the_device_as_the_pil_transform(world, tiny_model, tmp_path):
    from torch.utils.data import DataLoader

    from mora_retrieval.data.cirr import CIRRTriplets
    from mora_retrieval.tasks.cir.inputs import cir_inputs
    from mora_retrieval.tasks.cir.stages import CIRStage1

    spec = preprocess_spec(tiny_model.model, "targetpad")
    inputs = cir_inputs(world["cirr"], spec, tiny_model.tokenizer, prepared_dir=tmp_path, workers=0)
    loader = DataLoader(inputs.train, batch_size=4, collate_fn=inputs.collate, num_workers=1)
    batch = next(iter(loader))
    assert batch["pixels"].dtype == torch.uint8 and batch["pixels"].shape == (8, 3, 32, 32)
    files = CIRRTriplets(world["cirr"], "train", transform=make_transform(spec))
    want = torch.cat([torch.stack([files[i]["reference"] for i in range(4)]),
                      torch.stack([files[i]["target"] for i in range(4)])])
    module = CIRStage1(tiny_model.model, tiny_model.tokenizer, None, pixel_spec=spec)
    assert torch.equal(module.images(batch), want)  # bit-identical on the CPU
    assert batch["caption"] == [files.records[i]["caption"] for i in range(4)]
    assert module.image_rows(batch)[:4].tolist() == [inputs.train.prepared.row(r["reference"]) for r in files.records[:4]]


def test_bad_images_leave_their_triplets_out_of_every_stage(world, tiny_model, tmp_path):
    from mora_retrieval.data.cirr import read_image_split
    from mora_retrieval.tasks.cir.inputs import cir_inputs

    root = tmp_path / "cirr"
    shutil.copytree(world["cirr"], root)
    train_records = json.loads((root / "captions" / "cap.rc2.train.json").read_text())
    bad = train_records[0]["reference"]
    read_image_split(root, "train")[bad].write_bytes(b"not an image")
    spec = preprocess_spec(tiny_model.model, "targetpad")
    with pytest.raises(DataError, match="unreadable or corrupt"):
        cir_inputs(root, spec, tiny_model.tokenizer, prepared_dir=tmp_path / "a", workers=0)
    inputs = cir_inputs(root, spec, tiny_model.tokenizer, prepared_dir=tmp_path / "b", skip_bad_images=True,
                        workers=0)
    uses_bad = [r for r in train_records if bad in (r["reference"], r["target_hard"])]
    assert inputs.dropped == {"train": len(uses_bad), "val": 0} and len(uses_bad) >= 1
    assert len(inputs.train) == len(train_records) - len(uses_bad)
    assert all(bad not in (r["reference"], r["target_hard"]) for r in inputs.train.records)
    gallery_names = [inputs.train_gallery[i]["name"] for i in range(len(inputs.train_gallery))]
    assert bad not in gallery_names and len(gallery_names) == len(read_image_split(root, "train")) - 1


def test_prepared_flags_reach_the_settings_and_an_older_run_resumes(tmp_path):
    from mora_retrieval.tasks.cir import build_settings

    s = build_settings("root", str(tmp_path / "run"), "mora", overrides={"prepared": False, "prepared_dir": "/x"})
    assert s.prepared is False and s.prepared_dir == "/x"
    assert build_settings("root", str(tmp_path / "run"), "mora").prepared is True
    record = s.to_dict()
    del record["prepared"], record["prepared_dir"]  # a run started before the flags existed
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(record))
    resumed = build_settings("root", str(tmp_path / "run"), overrides={"prepared": False}, resume=True)
    assert resumed.prepared is False and resumed.arch == s.arch


def test_cache_placement_rule():
    from mora_retrieval.model.prefix_cache import cache_dtype, cache_placement

    assert cache_placement(10**9, "cpu", None) == "cpu"
    assert cache_placement(10**9, "cuda", 4 * 10**9) == "device"
    assert cache_placement(3 * 10**9, "cuda", 4 * 10**9) == "pinned"  # over half the free memory
    assert cache_placement(10**9, "cuda", None) == "pinned"
    assert cache_dtype("cuda", torch.float32) == torch.bfloat16 and cache_dtype("cpu", torch.float32) == torch.float32


def test_cache_frozen_reads_no_pixels_once_every_image_is_cached(world, tmp_path):
    from mora_retrieval.tasks.cir import recipes, train_cirr
    from mora_retrieval.tasks.cir.inputs import PreparedTripletCollate

    seen = []
    original = PreparedTripletCollate.__call__

    def spy(self, items):
        batch = original(self, items)
        seen.append("pixels" in batch)
        return batch

    runs = {}
    for cache_frozen in (False, True):
        torch.manual_seed(0)
        run = tmp_path / f"run-{cache_frozen}"
        settings = _settings(world["cirr"], run, prepared_dir=str(tmp_path / "cache"), cache_frozen=cache_frozen)
        settings.stage1.epochs, settings.stage2 = 3, None
        seen.clear()
        PreparedTripletCollate.__call__ = spy
        try:
            train_cirr(settings, quiet=True)
        finally:
            PreparedTripletCollate.__call__ = original
        runs[cache_frozen] = (_history(run, "stage1"), list(seen))
    (plain, plain_seen), (cached, cached_seen) = runs[False], runs[True]
    assert all(plain_seen)
    steps = len(cached_seen) // 3
    assert all(cached_seen[:steps]) and not any(cached_seen[-steps:])  # epoch 3 reads no image
    assert [r["train_loss"] for r in cached] == pytest.approx([r["train_loss"] for r in plain], rel=1e-5)


def test_persistent_workers_see_the_pixel_flag(world, tiny_model, tmp_path):
    from torch.utils.data import DataLoader

    from mora_retrieval.tasks.cir.inputs import cir_inputs

    spec = preprocess_spec(tiny_model.model, "targetpad")
    inputs = cir_inputs(world["cirr"], spec, tiny_model.tokenizer, prepared_dir=tmp_path, workers=0)
    loader = DataLoader(inputs.train, batch_size=4, collate_fn=inputs.collate, num_workers=1,
                        persistent_workers=True, prefetch_factor=1)
    assert all("pixels" in b for b in loader)
    inputs.collate.read_pixels.fill_(False)  # in the main process, as the stage-1 forward does
    assert not any("pixels" in b for b in loader)
    assert inputs.train.needed_rows.tolist() == sorted(set(inputs.train.reference_rows) | set(inputs.train.target_rows))


def test_bf16_prefix_matches_autocast_and_leaves_the_fp32_weights_alone(tiny_model):
    from mora_retrieval.adapters import AdapterConfig, add_adapters
    from mora_retrieval.tasks.cir.stages import CIRStage1

    model, _, tokenizer = tiny_model
    add_adapters(model, AdapterConfig(method="mora", targets=("q", "v"), layers=1))
    module = CIRStage1(model, tokenizer, validation=None).train()
    torch.manual_seed(0)
    captions = ["add a red circle", "make it blue", "remove the square", "two"]
    batch = {"reference": torch.randn(4, 3, 32, 32), "target": torch.randn(4, 3, 32, 32),
             "tokens": tokenizer(captions)}
    keys = list(module.state_dict())
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}

    def features():
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16), contextlib.ExitStack() as stack:
            for prefix in module.bf16_prefixes or ():
                stack.enter_context(prefix.active())
            return model.encode_image(batch["reference"]).float(), model.encode_text(batch["tokens"]).float()

    with torch.no_grad():
        exact = model.encode_image(batch["reference"]), model.encode_text(batch["tokens"])
    autocast = features()
    assert module.enable_bf16_prefix()
    pure = features()
    for e, a, p in zip(exact, autocast, pure):  # within bf16 rounding of the autocast reference
        assert F.cosine_similarity(p, a).min() > 0.999
        assert (p - e).norm() <= 2 * (a - e).norm() + 1e-3 * e.norm()
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(2):
        with torch.autocast("cpu", torch.bfloat16):
            loss = module(batch)
        loss.backward()
        assert all(p.grad is None for n, p in module.named_parameters() if not p.requires_grad)
        assert all(p.grad is not None and p.dtype == torch.float32 for p in trainable)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert list(module.state_dict()) == keys and len(model.visual.transformer.resblocks) == 4
    for name, value in module.named_parameters():
        if name in frozen:
            assert value.dtype == torch.float32 and torch.equal(value, frozen[name]), name
    image_prefix, text_prefix = module.bf16_prefixes
    assert (image_prefix.depth, text_prefix.depth) == (3, 2)
    with image_prefix.active():  # the copy stands in for the frozen blocks, as one pure-bf16 block
        assert all(p.dtype == torch.bfloat16 for p in model.visual.transformer.resblocks[0].parameters())


def test_train_cirr_in_bf16_on_the_cpu_runs_the_pure_bf16_prefix(world, tmp_path, monkeypatch):
    import math

    from mora_retrieval.model import bf16_prefix
    from mora_retrieval.tasks.cir import train_cirr

    used = []
    original = bf16_prefix.Bf16Prefix.active
    monkeypatch.setattr(bf16_prefix.Bf16Prefix, "active", lambda self: used.append(self.depth) or original(self))
    settings = _settings(world["cirr"], tmp_path / "run", prepared_dir=str(tmp_path / "cache"))
    settings.stage1.epochs, settings.stage1.precision, settings.stage2 = 1, "bf16", None
    results = train_cirr(settings, quiet=True)
    assert math.isfinite(results["val_stage1"]["avg"]) and set(used) == {2, 1}  # mora-tiny: 4 and 3 blocks, 2 adapted


@pytest.mark.gpu
def test_on_cuda_the_prefix_cache_is_bf16_on_the_device_and_the_bf16_prefix_tracks_autocast(tiny_model):
    from mora_retrieval.adapters import AdapterConfig, add_adapters
    from mora_retrieval.tasks.cir.stages import CIRStage1

    model, _, tokenizer = tiny_model
    add_adapters(model, AdapterConfig(method="mora", targets=("q", "v"), layers=1))
    module = CIRStage1(model, tokenizer, validation=None).cuda().train()
    torch.manual_seed(0)
    batch = {"reference": torch.randn(4, 3, 32, 32, device="cuda"), "target": torch.randn(4, 3, 32, 32, device="cuda"),
             "tokens": tokenizer(["a", "b", "c", "d"]).cuda(), "index": torch.arange(4, device="cuda"),
             "reference_row": torch.arange(4, device="cuda"), "target_row": torch.arange(4, 8, device="cuda")}
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        want = model.encode_image(batch["reference"]).float()
        assert module.enable_bf16_prefix()
        with module.bf16_prefixes[0].active():
            got = model.encode_image(batch["reference"]).float()
    assert F.cosine_similarity(got, want).min() > 0.99
    module.bf16_prefixes = None
    assert module.enable_prefix_cache("cuda", image_rows=8, text_rows=4)
    with torch.autocast("cuda", torch.bfloat16):
        module(batch).backward()
    image_cache = module.prefix_caches[0]
    assert image_cache.placement == "device" and image_cache.states.dtype == torch.bfloat16
    assert image_cache.states.device.type == "cuda" and bool(image_cache.filled.all())
