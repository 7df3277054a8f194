"""What only a CUDA machine does: the real commands end to end on the GPU, and bf16 against fp32.

Every test here is marked ``gpu`` and skipped without CUDA (``make test-gpu`` runs the whole suite
plus these on a GPU machine). The CPU semantics of the same code paths are tested elsewhere with
``device="cpu"``.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu


def _resolved(run_dir) -> dict:
    return json.loads((run_dir / "config.json").read_text())["resolved"]


def test_encoder_bf16_on_cuda_tracks_fp32_on_cpu(tiny_model):
    from mora_retrieval.retrieval.encoder import load_encoder

    torch.manual_seed(0)
    images = torch.rand(8, 3, 32, 32)
    texts = ["a red circle", "a blue square", "", "a small green triangle"]
    cpu = load_encoder("mora-tiny", None, device="cpu")
    state = cpu.model.state_dict()
    gpu = load_encoder("mora-tiny", None, device="cuda")
    gpu.model.load_state_dict(state)
    for a, b in ((cpu.encode_images(images), gpu.encode_images(images)),
                 (cpu.encode_texts(texts), gpu.encode_texts(texts))):
        cosine = F.cosine_similarity(a, b.float().cpu(), dim=-1)
        assert float(cosine.min()) > 0.99


def test_train_cirr_runs_on_cuda_in_bf16(world, tmp_path):
    from mora_retrieval.engine import TrainConfig
    from mora_retrieval.tasks.cir import CIRSettings, evaluate_cirr_run, train_cirr

    run = tmp_path / "run"
    settings = CIRSettings.with_defaults(str(world["cirr"]), str(run), "mora", arch="mora-tiny", pretrained=None)
    settings.stage1 = TrainConfig(epochs=1, batch_size=8, lr=1e-2, log_every=1)  # device "auto"
    settings.stage2 = TrainConfig(epochs=1, batch_size=8, lr=1e-3, weight_decay=0.0)
    results = train_cirr(settings, quiet=True)
    for stage in ("stage1", "stage2"):
        assert _resolved(run / stage)["device"] == "cuda:0" and _resolved(run / stage)["precision"] == "bf16"
    again = evaluate_cirr_run(run, use_combiner=False)  # auto: the GPU again
    assert again["avg"] == pytest.approx(results["val_stage1"]["avg"], abs=1.0)


def test_classify_cli_runs_on_cuda(world, tmp_path):
    import typer
    from typer.testing import CliRunner

    from mora_retrieval_cli.app import build_app

    app = typer.Typer()
    app.callback()(lambda: None)
    build_app(app, ("classify",))
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["classify", "hateful-memes", "--data-root", str(world["hateful_memes"]),
                                      "--model", "mora-tiny", "--pretrained", "none", "--epochs", "1",
                                      "--batch-size", "16", "--quiet", "--run-dir", str(run)])
    assert result.exit_code == 0, result.output
    assert _resolved(run)["device"] == "cuda:0" and _resolved(run)["precision"] == "bf16"
    assert 0.0 <= json.loads((run / "results.json").read_text())["test"]["auroc"] <= 100.0


def test_demo_tiny_on_cuda(tmp_path):
    from mora_retrieval.demo import DemoSettings, run_demo

    settings = DemoSettings.smoke(str(tmp_path / "demo"))
    run_demo(settings, quiet=True)
    assert (tmp_path / "demo" / "report.html").is_file()
    assert _resolved(tmp_path / "demo" / "runs" / "cir-mora" / "stage1")["device"] == "cuda:0"


@pytest.mark.parametrize("memory_budget", [0, None])  # 0: the cache does not fit, it lives in pinned host memory
def test_frozen_prefix_cache_on_cuda_device_and_pinned(tiny_model, memory_budget):
    from mora_retrieval.model.prefix_cache import FrozenPrefixCache

    visual = tiny_model.model.visual.to("cuda").eval()
    for p in visual.parameters():
        p.requires_grad_(False)
    for p in visual.transformer.resblocks[-1].parameters():
        p.requires_grad_(True)
    torch.manual_seed(0)
    images = torch.rand(6, 3, 32, 32, device="cuda")
    rows = torch.tensor([5, 0, 3, 1, 2, 4])
    cache = FrozenPrefixCache(visual.transformer, rows=6, device="cuda", memory_budget=memory_budget)
    with torch.no_grad():
        exact = visual(images).float()
        filled = cache.encode(visual, images, rows).float()
        cached = cache.encode(visual, torch.zeros_like(images), rows).float()  # every row is a hit
    assert cache.placement == ("pinned" if memory_budget == 0 else "device")
    assert cache.states.is_pinned() == (memory_budget == 0)
    assert cache.hits == 6 and cache.misses == 6
    assert torch.equal(filled, cached)
    assert float(F.cosine_similarity(exact, cached, dim=-1).min()) > 0.99  # bf16 states
