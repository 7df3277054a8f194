"""``mora-ret analyze`` end to end on tiny runs of the generated world, checked against an independent encoding."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
import typer
from cli_helpers import cli_app, invoke_ok

from mora_retrieval.errors import BackboneError, DataError, MoraError, TrainingError

PNG = b"\x89PNG\r\n\x1a\n"
COMMON = ("--model", "mora-tiny", "--pretrained", "none", "--quiet", "--device", "cpu", "--batch-size", "8",
          "--eval-batch-size", "64")


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    return cli_app("classify", "analyze")


def _classify_run(app, world, run, method):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        invoke_ok(app, "classify", "food101", "--data-root", world["food101"], "--missing", "both:0.7",
                "--adapter", method, "--epochs", "1", "--max-steps", "3", "--seed", "2", "--run-dir", run, *COMMON)
    return run


@pytest.fixture(scope="module")
def mora_run(app, world, tmp_path_factory):
    return _classify_run(app, world, tmp_path_factory.mktemp("runs") / "food-mora", "mora")


def _encode_independently(world, run, indices):
    """The selected test samples through the original (seed 2) and the merged model, without the analysis code."""
    from mora_retrieval.model.backbone import load_backbone
    from mora_retrieval.data.food101 import Food101

    torch.manual_seed(2)
    original = load_backbone("mora-tiny", None)
    adapted = load_backbone("mora-tiny", str(run / "merged.safetensors"))
    data = Food101(world["food101"], "test", transform=original.preprocess)
    images = torch.stack([data[i]["image"] for i in indices])
    tokens = original.tokenizer([data.texts[i] for i in indices])
    labels = np.array([data.labels[i] for i in indices])
    out = {}
    with torch.no_grad():
        for name, backbone in (("original", original), ("adapted", adapted)):
            model = backbone.model.eval()
            out[name] = (model.encode_image(images).double().numpy(), model.encode_text(tokens).double().numpy())
    return out, labels


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_classification_run_end_to_end(app, mora_run, world, tmp_path):
    out = tmp_path / "analysis"
    printed = invoke_ok(app, "analyze", "--run", mora_run, "--out", out, "--max-samples", "40", "--device", "cpu").output
    assert "Inter-modal distance" in printed and "Modality-specific drift" in printed
    for name in ("analysis.json", "analysis.html", "spectra.png", "tsne.png"):
        assert (out / name).is_file(), name
    for name in ("spectra.png", "tsne.png"):
        assert (out / name).read_bytes()[:8] == PNG
    data = json.loads((out / "analysis.json").read_text())
    for key in ("run", "task", "dataset", "method", "split", "original", "samples", "inter_modal", "modality_gap",
                "drift", "spectra", "tsne", "figures", "notes"):
        assert key in data, key
    assert (data["task"], data["dataset"], data["method"], data["split"]) == ("classify", "food101", "mora", "test")
    assert data["samples"]["pairs"] == 40 and data["samples"]["available"] == 60 and data["original"]["seed"] == 2
    assert data["figures"] == {"spectra": "spectra.png", "tsne": "tsne.png"} and data["tsne"]["colour"] == "class"
    html = (out / "analysis.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "Modality-specific drift" in html

    # every number against an independent encoding and numpy
    indices = np.unique(np.linspace(0, 59, 40).round().astype(int))
    emb, labels = _encode_independently(world, mora_run, indices)
    (ai, at), (oi, ot) = emb["adapted"], emb["original"]
    drift = data["drift"]
    assert drift["vision"]["l2"] == pytest.approx(np.linalg.norm(ai - oi, axis=1).mean(), rel=1e-4)
    assert drift["text"]["l2"] == pytest.approx(np.linalg.norm(at - ot, axis=1).mean(), rel=1e-4)
    cos = (_unit(at) * _unit(ot)).sum(1)
    assert drift["text"]["angle"] == pytest.approx(np.degrees(np.arccos(np.clip(cos, -1, 1))).mean(), rel=1e-3)
    assert drift["vision"]["l2"] > 0  # adaptation moved the embeddings
    for model, (img, txt) in emb.items():
        means = [(img[labels == c].mean(0), txt[labels == c].mean(0)) for c in np.unique(labels)]
        got = data["inter_modal"][model]["raw"]
        assert got["categories"] == len(means)
        assert got["l2"] == pytest.approx(np.mean([np.linalg.norm(v - t) for v, t in means]), rel=1e-4)
        gap = np.linalg.norm(_unit(img).mean(0) - _unit(txt).mean(0))
        assert data["modality_gap"][model] == pytest.approx(gap, rel=1e-4)

    spectra = data["spectra"]
    assert spectra["available"] and [s["slot"] for s in spectra["slots"]] == ["0", "1"]
    for slot in spectra["slots"]:
        assert sum(slot["gram_vision"]) == pytest.approx(1.0) and len(slot["gram_text"]) == 4
        assert sorted(slot["pretrained"]) == ["text.q", "text.v", "visual.q", "visual.v"]


def test_the_original_model_against_itself_has_no_drift(mora_run):
    from mora_retrieval.analysis.run import geometry
    from mora_retrieval.analysis.runs import image_transform, read_run, run_samples
    from mora_retrieval.analysis.samples import encode_samples, spread_indices

    info = read_run(mora_run)
    original = info.run.load_base("cpu")
    samples = run_samples(info, "test")
    samples = samples.select(spread_indices(len(samples), 12))
    samples, emb = encode_samples({"adapted": original, "original": original}, samples,
                                  image_transform(info, original), batch_size=5)
    result = geometry(samples, emb)
    for tower in ("vision", "text"):
        assert result["drift"][tower]["l2"] == 0.0 and result["drift"][tower]["angle"] == pytest.approx(0, abs=1e-3)
    assert result["inter_modal"]["adapted"] == result["inter_modal"]["original"]
    assert result["modality_gap"]["adapted"] == result["modality_gap"]["original"]


def test_a_method_without_shared_part_has_no_spectra(app, world, tmp_path):
    run = _classify_run(app, world, tmp_path / "food-lora", "lora")
    invoke_ok(app, "analyze", "--run", run, "--max-samples", "10", "--device", "cpu")
    data = json.loads((run / "analysis" / "analysis.json").read_text())
    assert data["spectra"]["available"] is False and data["spectra"]["slots"] == []
    assert any("no shared part" in note for note in data["notes"])
    assert not (run / "analysis" / "spectra.png").exists() and data["figures"] == {"tsne": "tsne.png"}


def test_cir_run_uses_reference_images_and_captions(world, tmp_path):
    from mora_retrieval.analysis import AnalyzeConfig, analyze_run
    from mora_retrieval.engine import TrainConfig
    from mora_retrieval.tasks.cir import CIRSettings, train_cirr

    settings = CIRSettings.with_defaults(str(world["cirr"]), str(tmp_path / "cir"), "mora", arch="mora-tiny",
                                         pretrained=None)
    settings.stage1 = TrainConfig(epochs=1, batch_size=8, max_steps=2, seed=5, device="cpu")
    settings.stage2 = None
    train_cirr(settings, quiet=True)
    result = analyze_run(tmp_path / "cir", config=AnalyzeConfig(device="cpu"))
    data = result.data
    captions = json.loads((world["cirr"] / "captions" / "cap.rc2.val.json").read_text())
    assert data["split"] == "val" and data["samples"]["pairs"] == len(captions)
    assert data["samples"]["images"] == len({c["reference"] for c in captions}) < len(captions)
    assert data["inter_modal"] is None and data["tsne"]["colour"] == "modality"
    assert data["drift"]["vision"]["samples"] == data["samples"]["images"]
    assert data["spectra"]["available"] and data["original"]["seed"] == 5
    assert any("CIRR has no categories" in note for note in data["notes"])
    assert set(result.files) == {"json", "html", "spectra", "tsne"}


def test_bad_input_fails_before_anything_is_written(mora_run, tmp_path):
    from mora_retrieval.analysis import AnalyzeConfig, analyze_run

    out = tmp_path / "out"
    with pytest.raises(DataError, match="--split 'test1'.*train, val, test"):
        analyze_run(mora_run, out, AnalyzeConfig(split="test1", device="cpu"))
    with pytest.raises(MoraError, match="--max-samples must be at least 5"):
        analyze_run(mora_run, out, AnalyzeConfig(max_samples=2))
    with pytest.raises(TrainingError, match="not a classification or CIR run"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "config.json").write_text('{"task": "pretrain"}')
        analyze_run(tmp_path / "other", out)
    with pytest.raises(TrainingError, match="run folder not found"):
        analyze_run(tmp_path / "nowhere", out)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(MoraError, match="a-file: is a file \\(expected a folder for --out\\)"):
        analyze_run(mora_run, tmp_path / "a-file", AnalyzeConfig(device="cpu"))
    with pytest.raises(MoraError, match="a-file: is a file, so .*a-file/sub cannot be created"):
        analyze_run(mora_run, tmp_path / "a-file" / "sub", AnalyzeConfig(device="cpu"))
    # the original backbone must be the one the run started from
    copy = tmp_path / "copy"
    shutil.copytree(mora_run, copy, ignore=shutil.ignore_patterns("checkpoints", "analysis"))
    meta_path = copy / "adapter" / "adapter_config.json"
    meta = json.loads(meta_path.read_text())
    meta["base_fingerprint"] = "0123456789abcdef"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BackboneError, match="started from base weights 0123456789abcdef"):
        analyze_run(copy, out, AnalyzeConfig(device="cpu"))
    (copy / "merged.safetensors").unlink()
    with pytest.raises(TrainingError, match="merged.safetensors: not found"):
        analyze_run(copy, out)
    assert not out.exists()
