"""The prompt baselines through ``mora-ret classify`` on the tiny world: train, test unmerged, re-test,
predict; the grid over methods (paper's Table 1 / 4 shape) and its reuse of finished cells."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import typer
from cli_helpers import cli_app, invoke_ok
from safetensors.torch import load_file

from mora_retrieval.errors import TrainingError

COMMON = ("--model", "mora-tiny", "--pretrained", "none", "--quiet", "--eval-batch-size", "16", "--device", "cpu",
          "--prompt-depth", "2", "--prompt-length", "6")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    return cli_app("classify", "analyze")


@pytest.fixture(scope="module", params=["dcp", "mmp"])
def trained(request, app, world, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / request.param
    invoke_ok(app, "classify", "hateful-memes", "--data-root", world["hateful_memes"], "--missing", "both:0.7",
            "--adapter", request.param, "--epochs", "2", "--batch-size", "16", "--seed", "3", "--run-dir", run,
            *COMMON)
    return request.param, run


def test_prompt_methods_train_and_test_unmerged(trained):
    method, run = trained
    results = json.loads((run / "results.json").read_text())
    assert results["method"] == method and results["evaluated_on"] == "unmerged"
    assert math.isfinite(results["test_metric"]) and results["metric"] == "auroc"
    assert results["missing_counts"]["test"] == {"complete": 12, "text_missing": 14, "image_missing": 14}
    assert not (run / "merged.safetensors").exists()  # cannot be merged
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["adapter"]["method"] == method and config["adapter"]["prompt_depth"] == 2
    tensors = set(load_file(run / "adapter" / "adapter.safetensors"))
    assert tensors and all(name.startswith("prompts.") for name in tensors)
    # only the prompts and the head trained
    assert 0 < results["trainable"]["percent"] < 10


def test_eval_only_reloads_the_unmerged_run_and_feeds_each_sample_its_missing_case(app, trained, monkeypatch):
    from mora_retrieval.model.heads import CLIPClassifier
    from mora_retrieval.tasks.classify import Predictor
    from mora_retrieval.tasks.classify.settings import scenario_data

    method, run = trained
    seen = []
    real = CLIPClassifier.forward

    def spy(self, image, tokens, missing=None):
        seen.append(missing.clone())
        return real(self, image, tokens, missing)

    monkeypatch.setattr(CLIPClassifier, "forward", spy)
    invoke_ok(app, "classify", "--eval-only", "--run", run, "--quiet")
    monkeypatch.undo()
    results = json.loads((run / "results.json").read_text())
    again = json.loads((run / "eval" / "test-both_0.7.json").read_text())
    assert again["evaluated_on"] == "unmerged"
    assert again["test_metric"] == pytest.approx(results["test_metric"], abs=1e-4)

    trained_classifier = Predictor(run, "cpu")
    assert trained_classifier.evaluated_on == "unmerged"
    classifier = trained_classifier.classifier
    dataset = scenario_data(trained_classifier.settings, "test", "both:0.7", trained_classifier.preprocess)
    assert torch.equal(torch.cat(seen), torch.as_tensor(dataset.codes))
    # the case changes the prediction: the same inputs read as complete give other logits
    batch = [dataset[i] for i in range(8)]
    images = torch.stack([item["image"] for item in batch])
    tokens = trained_classifier.tokenizer([item["text"] for item in batch])
    codes = torch.tensor([item["missing"] for item in batch])
    assert codes.any()
    with torch.no_grad():
        as_drawn = classifier(images, tokens, codes)
        as_complete = classifier(images, tokens, torch.zeros_like(codes))
    assert (as_drawn - as_complete)[codes > 0].abs().max() > 1e-6
    torch.testing.assert_close(as_drawn[codes == 0], as_complete[codes == 0])


def test_predict_uses_the_prompts_of_the_missing_input(app, trained, world):
    from mora_retrieval.tasks.classify import Predictor

    _, run = trained
    predictor = Predictor(run, device="cpu")
    pixels, tokens, code = predictor.encode_inputs(None, "a large red circle")
    assert code == 2
    with torch.no_grad():
        want = torch.softmax(predictor.classifier(pixels, tokens, torch.tensor([2])), 1)[0, 1]
    pred = json.loads(invoke_ok(app, "predict", "--run", run, "--text", "a large red circle", "--json").output)
    assert pred["missing"] == "image"
    assert {s["label"]: s["score"] for s in pred["scores"]}["hateful"] == pytest.approx(float(want), abs=1e-5)


def test_analyze_compares_the_unmerged_prompt_run_with_its_backbone(app, trained):
    from mora_retrieval.analysis.runs import read_run
    from mora_retrieval.tasks.classify import Predictor

    _, run = trained
    info = read_run(run)
    adapted, original = info.run.load_model("cpu"), info.run.load_base("cpu")
    trained_classifier = Predictor(run, "cpu")
    tokens = trained_classifier.tokenizer(["a large red circle", "small blue square"])
    with torch.no_grad():
        want = trained_classifier.classifier.clip.encode_text(tokens)  # no missing cases given: every sample complete
        torch.testing.assert_close(adapted.model.encode_text(tokens), want)
        assert (original.model.encode_text(tokens) - want).abs().max() > 1e-4
    invoke_ok(app, "analyze", "--run", run, "--max-samples", "10", "--device", "cpu")
    data = json.loads((run / "analysis" / "analysis.json").read_text())
    assert data["drift"]["text"]["l2"] > 0 and data["spectra"]["available"] is False


def test_a_prompt_depth_beyond_the_towers_fails_before_training(app, world, tmp_path):
    from mora_retrieval.errors import AdapterError

    with pytest.raises(AdapterError, match="prompt_depth=6 exceeds the shallower tower"):
        invoke_ok(app, "classify", "hateful-memes", "--data-root", world["hateful_memes"], "--adapter", "dcp",
                "--model", "mora-tiny", "--pretrained", "none", "--quiet", "--run-dir", tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(TrainingError, match="apply to the prompt methods dcp and mmp, not lora"):
        invoke_ok(app, "classify", "hateful-memes", "--data-root", world["hateful_memes"], "--adapter", "lora",
                "--prompt-depth", "2", "--run-dir", tmp_path / "run")


def test_grid_over_methods_writes_table_1_shape_and_reuses_finished_cells(app, world, tmp_path):
    out = tmp_path / "grid"
    args = ("classify", "hateful-memes", "--data-root", world["hateful_memes"], "--grid", "--methods", "mmp,mora",
            "--grid-types", "both", "--grid-ratios", "0.5", "--epochs", "1", "--batch-size", "16", "--run-dir", out,
            *COMMON)
    invoke_ok(app, *args)
    rows = (out / "grid.csv").read_text().splitlines()
    assert rows[0] == "dataset,method,missing_type,ratio,metric,value,run_dir" and len(rows) == 3
    cells = {m: json.loads((out / m / "both-0.5" / "results.json").read_text()) for m in ("mmp", "mora")}
    assert cells["mmp"]["evaluated_on"] == "unmerged" and cells["mora"]["evaluated_on"] == "merged"
    assert all(c["scenario"]["test"] == "both:0.5" for c in cells.values())
    md = (out / "grid.md").read_text()
    assert "| η | missing | mmp | mora |" in md
    assert f"| 50% | both | {cells['mmp']['test_metric']:.2f} | {cells['mora']['test_metric']:.2f} |" in md

    # a finished cell is reused (not retrained): remove one cell, run again, only that one is trained
    stamp = (out / "mmp" / "both-0.5" / "results.json").stat().st_mtime_ns
    for path in sorted((out / "mora").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    invoke_ok(app, *args)
    assert (out / "mmp" / "both-0.5" / "results.json").stat().st_mtime_ns == stamp
    assert (out / "mora" / "both-0.5" / "results.json").is_file()
    assert len((out / "grid.csv").read_text().splitlines()) == 3

    with pytest.raises(TrainingError, match="--methods needs --grid"):
        invoke_ok(app, "classify", "hateful-memes", "--data-root", world["hateful_memes"], "--methods", "mora")
    from mora_retrieval.errors import AdapterError

    with pytest.raises(AdapterError, match="unknown adapter method 'coop'"):
        invoke_ok(app, *args[:5], "--methods", "mora,coop", *args[7:])


def test_cir_refuses_prompt_methods_before_training(tmp_path):
    from mora_retrieval.adapters import AdapterConfig
    from mora_retrieval.tasks.cir import CIRSettings, train_cirr

    settings = CIRSettings(data_root=str(tmp_path), run_dir=str(tmp_path / "run"), arch="mora-tiny", pretrained=None,
                           adapter=AdapterConfig(method="dcp", prompt_depth=1))
    with pytest.raises(TrainingError, match="dcp is a prompt baseline .* cannot be merged"):
        train_cirr(settings)
    assert not (tmp_path / "run").exists()
