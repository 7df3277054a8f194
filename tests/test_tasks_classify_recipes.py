"""End to end on the generated tiny world: classify (train → best → merge → test), eval-only, predict, grid.

The learning check uses the Hateful-Memes-format part (label = red object AND the text says
"large"): with a randomly initialised ``mora-tiny`` (no contrastive warm start), the text half
is learnable quickly, so ``full`` fine-tuning at lr 1e-3, batch 8, 8 epochs reaches a test AUROC
far above the constant predictor's 50 (about 83 with seed 0; the assertion asks for 65).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import typer
from cli_helpers import cli_app, invoke_ok

from mora_retrieval.errors import DataError, TrainingError


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    return cli_app("classify")


COMMON = ("--model", "mora-tiny", "--pretrained", "none", "--quiet", "--eval-batch-size", "64", "--device", "cpu")


@pytest.fixture(scope="module")
def trained(app, world, tmp_path_factory):
    import warnings

    run = tmp_path_factory.mktemp("runs") / "memes"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        invoke_ok(app, "classify", "hateful-memes", "--data-root", world["hateful_memes"], "--missing", "none",
                "--adapter", "full", "--lr", "1e-3", "--batch-size", "8", "--epochs", "8", "--seed", "0",
                "--run-dir", run, *COMMON)
    return run


def test_training_beats_the_constant_baseline_and_writes_the_run_folder(trained):
    results = json.loads((trained / "results.json").read_text())
    assert results["metric"] == "auroc" and results["majority_baseline"] == 50.0
    assert results["test_metric"] >= 65.0, results
    assert results["evaluated_on"] == "merged" and results["method"] == "full"
    assert results["scenario"] == {"train": "none", "val": "none", "test": "none"}
    assert results["samples"] == {"train": 80, "val": 20, "test": 40}
    assert 1 <= results["best_epoch"] <= 8 and results["trainable"]["percent"] > 99
    for name in ("adapter/adapter_config.json", "adapter/adapter.safetensors", "head.safetensors",
                 "merged.safetensors", "metrics.jsonl", "curves.png", "checkpoints/best.safetensors",
                 "checkpoints/last.pt"):
        assert (trained / name).is_file(), name
    assert len((trained / "metrics.jsonl").read_text().splitlines()) == 8
    config = json.loads((trained / "config.json").read_text())
    assert (config["task"], config["arch"], config["pretrained"], config["dataset"]) == \
        ("classify", "mora-tiny", None, "hateful_memes")
    assert config["classify"]["scenarios"]["test"] == "none" and config["extra"]["task"] == "classify"
    # the merged checkpoint is a plain open_clip checkpoint
    import open_clip

    from mora_retrieval.model.backbone import register_model_configs

    register_model_configs()
    model = open_clip.create_model("mora-tiny", pretrained=str(trained / "merged.safetensors"))
    assert not any("parametrizations" in k for k in model.state_dict())


def test_eval_only_reproduces_the_test_metric_and_tests_other_scenarios(app, trained, world):
    results = json.loads((trained / "results.json").read_text())
    invoke_ok(app, "classify", "--eval-only", "--run", trained, "--test-missing", "none", "--quiet")
    same = json.loads((trained / "eval" / "test-none.json").read_text())
    assert same["test_metric"] == pytest.approx(results["test_metric"], abs=1e-3)

    invoke_ok(app, "classify", "hateful-memes", "--eval-only", "--run", trained, "--test-missing", "image:0.9",
            "--quiet")
    cross = json.loads((trained / "eval" / "test-image_0.9.json").read_text())
    assert cross["scenario"] == {"train": "none", "test": "image:0.9"}
    assert cross["missing_counts"] == {"complete": 4, "text_missing": 0, "image_missing": 36}
    assert math.isfinite(cross["test_metric"]) and cross["metric"] == "auroc"

    with pytest.raises(TrainingError, match="trained on hateful_memes, not food101"):
        invoke_ok(app, "classify", "food101", "--eval-only", "--run", trained)


def test_predict_treats_absent_inputs_as_the_protocol_does(app, trained, world):
    from mora_retrieval.tasks.classify import Predictor

    out = invoke_ok(app, "predict", "--run", trained, "--text", "look at this large red circle", "--json").output
    pred = json.loads(out)
    assert pred["task"] == "binary" and pred["missing"] == "image"
    scores = {s["label"]: s["score"] for s in pred["scores"]}
    assert set(scores) == {"hateful", "not hateful"} and sum(scores.values()) == pytest.approx(1.0, abs=1e-5)
    assert pred["predicted"] == [max(scores, key=scores.get)]

    predictor = Predictor(trained)
    pixels, tokens, code = predictor.encode_inputs(None, "a text")
    assert code == 2 and torch.equal(pixels, torch.ones(1, 3, 32, 32))
    image = next((world["hateful_memes"] / "img").glob("*.png"))
    pixels, tokens, code = predictor.encode_inputs(image, None)
    assert code == 1 and torch.equal(tokens, predictor.tokenizer([""]))
    # the CLI's numbers are the classifier's softmax on exactly those inputs
    with torch.no_grad():
        logits = predictor.classifier(*predictor.encode_inputs(None, "look at this large red circle")[:2])
    assert scores["hateful"] == pytest.approx(float(torch.softmax(logits, 1)[0, 1]), abs=1e-5)

    table = invoke_ok(app, "predict", "--run", trained, "--image", image).output
    assert "missing text" in table and "hateful" in table
    with pytest.raises(DataError, match="give an image, a text, or both"):
        invoke_ok(app, "predict", "--run", trained)
    with pytest.raises(DataError, match="nope.png: image file not found"):
        invoke_ok(app, "predict", "--run", trained, "--image", world["food101"] / "nope.png")


def test_resume_refuses_changed_scenarios(app, trained, world):
    with pytest.raises(TrainingError, match="task settings changed .*scenarios"):
        invoke_ok(app, "classify", "hateful-memes", "--data-root", world["hateful_memes"], "--missing", "text:0.5",
                "--adapter", "full", "--lr", "1e-3", "--batch-size", "8", "--epochs", "8", "--seed", "0",
                "--run-dir", trained, "--resume", *COMMON)


def test_grid_writes_one_markdown_and_csv_table(app, world, tmp_path):
    args = ("classify", "hateful-memes", "--data-root", world["hateful_memes"], "--grid", "--grid-ratios",
            "0.5,0.9", "--grid-types", "both", "--epochs", "1", "--batch-size", "16", "--run-dir", tmp_path / "grid",
            *COMMON)
    invoke_ok(app, *args)
    rows = (tmp_path / "grid" / "grid.csv").read_text().splitlines()
    assert rows[0] == "dataset,method,missing_type,ratio,metric,value,run_dir" and len(rows) == 3
    for ratio in ("0.5", "0.9"):
        cell = json.loads((tmp_path / "grid" / f"both-{ratio}" / "results.json").read_text())
        assert cell["scenario"] == {"train": f"both:{ratio}", "val": f"both:{ratio}", "test": f"both:{ratio}"}
        n = round(float(ratio) * 40)
        assert cell["missing_counts"]["test"] == {"complete": 40 - n, "text_missing": n - round(n / 2),
                                                  "image_missing": round(n / 2)}
    md = (tmp_path / "grid" / "grid.md").read_text()
    assert "| missing type | η = 50% | η = 90% |" in md and md.count("| both |") == 1
    before = (tmp_path / "grid" / "grid.csv").read_text()
    invoke_ok(app, *args)  # finished cells are reused, not retrained
    assert (tmp_path / "grid" / "grid.csv").read_text() == before


def test_interrupted_run_resumes_to_the_same_weights_and_results(app, world, tmp_path, monkeypatch):
    from mora_retrieval.engine import TrainingInterrupted
    from mora_retrieval.fileio import load_tensors
    from mora_retrieval.tasks.classify.model import ClassifyModule

    args = ("classify", "hateful-memes", "--data-root", world["hateful_memes"], "--missing", "both:0.5",
            "--epochs", "2", "--batch-size", "16", "--seed", "1", *COMMON)
    invoke_ok(app, *args, "--run-dir", tmp_path / "straight", "--resume")  # nothing to resume: starts afresh

    real, calls = ClassifyModule.forward, {"n": 0}

    def interrupted_at_step_7(self, batch):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(ClassifyModule, "forward", interrupted_at_step_7)
    with pytest.raises(TrainingInterrupted, match="--resume"):
        invoke_ok(app, *args, "--run-dir", tmp_path / "resumed")
    monkeypatch.undo()
    assert not (tmp_path / "resumed" / "results.json").exists()
    invoke_ok(app, *args, "--run-dir", tmp_path / "resumed", "--resume")

    a = json.loads((tmp_path / "straight" / "results.json").read_text())
    b = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert (a["test"], a["best_epoch"]) == (b["test"], b["best_epoch"])
    for name in ("merged.safetensors", "head.safetensors", "adapter/adapter.safetensors"):
        x, y = load_tensors(tmp_path / "straight" / name), load_tensors(tmp_path / "resumed" / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


def test_eval_only_on_a_moved_data_root_keeps_its_assignments_there(trained, world, tmp_path):
    import shutil

    from mora_retrieval.tasks.classify import evaluate_run

    old_store = world["hateful_memes"] / "missing_assignments"
    before = sorted(p.name for p in old_store.iterdir())
    moved = tmp_path / "moved"
    shutil.copytree(world["hateful_memes"], moved, ignore=shutil.ignore_patterns("missing_assignments"))
    evaluate_run(trained, test_missing="text:0.7", data_root=str(moved), device="cpu")
    assert [p.name for p in (moved / "missing_assignments").iterdir()] == ["hateful_memes__test__text-r0.7-s0.5-seed0.json"]
    assert sorted(p.name for p in old_store.iterdir()) == before  # the old root is not written to


def test_settings_layers_defaults_file_command_line_and_write_nothing(tmp_path):
    from mora_retrieval.errors import MoraError
    from mora_retrieval.tasks.classify import build_settings

    root = tmp_path / "nowhere" / "food"
    (tmp_path / "cfg.toml").write_text('arch = "mora-tiny"\nmissing = "text:0.5"\n[adapter]\nr = 8\nmethod = "lora"\n'
                                       '[train]\nlr = 0.5\nepochs = 3\n')
    settings, train = build_settings("food101", str(root), tmp_path / "cfg.toml",
                                     {"train": {"epochs": 7}, "adapter": {"targets": ["q", "k"]}})
    assert not (tmp_path / "nowhere").exists()  # building settings creates no folder
    assert (settings.arch, settings.missing, settings.pretrained) == ("mora-tiny", "text:0.5", "openai")
    assert (settings.adapter.method, settings.adapter.r, settings.adapter.targets) == ("lora", 8, ("q", "k"))
    assert settings.adapter.alpha is None  # LoRA's own default, not food101's MoRA α
    assert (train.lr, train.epochs, train.batch_size, train.weight_decay) == (0.5, 7, 256, 0.02)
    memes, train = build_settings("hateful-memes", str(root))
    assert (memes.adapter.r, memes.adapter.alpha, train.batch_size, train.epochs) == (8, 0.1, 16, 5)
    (tmp_path / "typo.json").write_text('{"adapter": {"rank": 8}}')
    with pytest.raises(MoraError, match="typo.json: unknown setting 'adapter.rank'"):
        build_settings("food101", str(root), tmp_path / "typo.json")
    (tmp_path / "types.json").write_text('{"train": {"lr": "fast"}}')
    expected = r"types\.json: setting 'train\.lr' takes float values \(like 0\.01\), not 'fast'$"
    with pytest.raises(MoraError, match=expected):
        build_settings("food101", str(root), tmp_path / "types.json")
    assert not (tmp_path / "nowhere").exists()


def test_pretrain_settings_layers(tmp_path):
    from mora_retrieval.tasks.pretrain import build_settings

    (tmp_path / "cfg.json").write_text('{"arch": "mora-small", "val_split": "", "train": {"lr": 0.01, "epochs": 2}}')
    s = build_settings(str(tmp_path / "run"), tmp_path / "cfg.json", {"train": {"epochs": 5}, "coco_root": "coco"})
    assert (s.arch, s.val_split, s.coco_root, s.train_split) == ("mora-small", None, "coco", "train2017")
    assert (s.train.lr, s.train.epochs, s.train.batch_size, s.train.weight_decay) == (0.01, 5, 128, 0.1)


@pytest.mark.parametrize(("types", "ratios", "bad"), [(("text", "video"), (0.5,), "video"),
                                                      (("both",), (0.0, 1.5), "0.0, 1.5"), ((), (0.5,), "")])
def test_grid_refuses_bad_cells_before_writing(tmp_path, types, ratios, bad):
    from mora_retrieval.engine import TrainConfig
    from mora_retrieval.tasks.classify import ClassifySettings, run_grid

    settings = ClassifySettings(dataset="hateful_memes", data_root=str(tmp_path / "none"), arch="mora-tiny")
    with pytest.raises(TrainingError, match=rf"--grid-types must be from text,image,both .*\(bad: {bad}\)"):
        run_grid(settings, TrainConfig(), tmp_path / "grid", ratios=ratios, types=types)
    assert not (tmp_path / "grid").exists()


def test_a_hand_edited_classify_record_is_one_line_error_before_any_weights_load(tmp_path):
    from mora_retrieval.tasks.classify import Predictor

    record = {"arch": "mora-tiny"}
    for classify, expected in [({"arch": "mora-tiny"}, "its classify record lacks dataset, dataset_task, class_names"),
                               ({"dataset": "food101", "dataset_task": "multiclass", "class_names": ["a"],
                                 "data_root": "d", "adapter": 5}, "adapter must be given as AdapterConfig or a dict")]:
        (tmp_path / "config.json").write_text(json.dumps({"task": "classify", **record, "classify": classify}))
        with pytest.raises(TrainingError, match=r"config\.json: not a valid classification run config \(" + expected):
            Predictor(tmp_path, device="cpu")
