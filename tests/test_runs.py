"""The run folder: the record, results without NaN, resume only with something to resume, a finished run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mora_retrieval.errors import BackboneError, MoraError, TrainingError
from mora_retrieval.runs import (ADAPTER_DIR, MERGED_FILE, FinishedRun, read_record, resumable, update_record,
                                 write_record, write_results)


def test_record_round_trip_and_update(tmp_path):
    write_record(tmp_path, {"task": "cir", "arch": "mora-tiny"})
    update_record(tmp_path, classify={"dataset": "food101"})
    assert read_record(tmp_path) == {"task": "cir", "arch": "mora-tiny", "classify": {"dataset": "food101"}}
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(BackboneError, match="config.json: expected a JSON object"):
        read_record(tmp_path, error=BackboneError)


def test_results_are_valid_json_without_nan(tmp_path):
    write_results(tmp_path / "results.json", {"auroc": math.nan, "rows": [1.0, math.inf], "ok": 2.5, "n": 3})
    assert json.loads((tmp_path / "results.json").read_text()) == {"auroc": None, "rows": [1.0, None], "ok": 2.5,
                                                                  "n": 3}


def test_resume_only_when_a_checkpoint_is_there(tmp_path):
    assert not resumable(tmp_path, resume=True)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"x")
    assert resumable(tmp_path, resume=True) and not resumable(tmp_path, resume=False)


def test_finished_run_finds_its_files_and_names_what_is_missing(tmp_path):
    with pytest.raises(MoraError, match="run folder not found"):
        FinishedRun.open(tmp_path / "nope")
    write_record(tmp_path, {"task": "pretrain"})
    with pytest.raises(MoraError, match="expected a JSON object with an 'arch' key"):
        FinishedRun.open(tmp_path)
    write_record(tmp_path, {"arch": "mora-tiny", "pretrained": None})
    run = FinishedRun.open(tmp_path, BackboneError)
    assert (run.arch, run.pretrained, run.find(MERGED_FILE)) == ("mora-tiny", None, None)
    with pytest.raises(BackboneError, match=f"{MERGED_FILE}: not found \\(the run did not finish"):
        run.require(MERGED_FILE)
    with pytest.raises(BackboneError, match=f"neither {MERGED_FILE} nor {ADAPTER_DIR}/ is there yet"):
        run.load_model()


def test_finished_run_of_a_wanted_task(tmp_path):
    needs = "this command needs a classification run"
    write_record(tmp_path, {"train": {"seed": 1}, "extra": {"task": "cir-stage1"}})  # a CIR stage folder
    with pytest.raises(TrainingError, match=r"not a classification or CIR run \(task 'cir-stage1'\); " + needs):
        FinishedRun.open(tmp_path, TrainingError, tasks=("classify", "cir"), needs=needs)
    write_record(tmp_path, {"train": {"seed": 1}, "extra": {"task": "classify"}})  # the engine's record only
    with pytest.raises(TrainingError, match="the run did not finish \\(no classify record\\); resume it with --resume"):
        FinishedRun.open(tmp_path, TrainingError, tasks=("classify",))
    write_record(tmp_path, {"task": "classify", "arch": "mora-tiny", "pretrained": "none", "train": {"seed": 4}})
    run = FinishedRun.open(tmp_path, tasks=("classify",))
    assert (run.task, run.pretrained, run.seed) == ("classify", None, 4)


def test_base_weights_are_redrawn_from_the_seed_and_checked(tmp_path):
    from mora_retrieval.adapters import AdapterConfig, add_adapters, merge_adapters, save_adapters
    from mora_retrieval.model.backbone import load_backbone

    torch.manual_seed(7)  # as training draws random base weights: seeded, then built
    drawn = load_backbone("mora-tiny").model
    original = {name: tensor.clone() for name, tensor in drawn.state_dict().items()}
    add_adapters(drawn, AdapterConfig(method="lora", r=2, targets=("q",), layers=1))
    with torch.no_grad():
        for param in (p for p in drawn.parameters() if p.requires_grad):
            param.add_(0.1)  # a trained adapter: merged weights differ from the base
    save_adapters(drawn, tmp_path / ADAPTER_DIR, arch="mora-tiny")
    write_record(tmp_path, {"task": "cir", "arch": "mora-tiny", "pretrained": None, "stage1": {"seed": 7}})
    state = torch.random.get_rng_state()
    base = FinishedRun.open(tmp_path).load_base().model
    assert torch.equal(torch.random.get_rng_state(), state) and not base.training  # the caller's draws go on
    assert base.state_dict().keys() == original.keys()
    assert all(torch.equal(tensor, original[name]) for name, tensor in base.state_dict().items())
    merged = merge_adapters(drawn).state_dict()  # only adapter/ kept: merged onto the re-drawn base
    model = FinishedRun.open(tmp_path).load_model().model
    loaded = model.state_dict()
    assert not model.training
    assert any(not torch.equal(merged[name], original[name]) for name in original)
    assert all(torch.equal(tensor, merged[name]) for name, tensor in loaded.items())
    write_record(tmp_path, {"task": "cir", "arch": "mora-tiny", "pretrained": None, "stage1": {"seed": 8}})
    for load in (FinishedRun.load_base, FinishedRun.load_model):
        with pytest.raises(BackboneError, match="the run started from base weights .*random weights from seed 8"):
            load(FinishedRun.open(tmp_path))


def test_each_run_folder_name_is_written_in_one_module_only():
    """A run-folder file name (``merged.safetensors``, ``checkpoints/last.pt``…) appears as a string in the
    module that defines it and nowhere else in the library or the CLI (docstrings and comments aside):
    everything else uses the constant. (Folder names such as ``adapter`` double as settings keys.)"""
    import ast
    from pathlib import Path

    from mora_retrieval import runs
    from mora_retrieval.adapters import io as adapter_io
    from mora_retrieval.engine import checkpoint

    owners = {runs: ("MERGED_FILE", "COMBINER_FILE", "HEAD_FILE", "PRETRAINED_FILE", "RESULTS_FILE"),
              checkpoint: ("CONFIG_FILE", "LAST_FILE", "BEST_FILE", "METRICS_FILE", "CURVES_FILE"),
              adapter_io: ("CONFIG_FILE", "WEIGHTS_FILE")}
    owner_of = {getattr(module, name): Path(module.__file__) for module, names in owners.items() for name in names}
    assert len(owner_of) == 12  # no two names alike
    root = Path(runs.__file__).parent.parent
    found = []
    for path in sorted([*(root / "mora_retrieval").rglob("*.py"), *(root / "cli").rglob("*.py")]):
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                text = node.value.strip("/")
                if text in owner_of and owner_of[text] != path:
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {node.value!r}")
    assert not found, "run-folder names written outside the module that defines them:\n" + "\n".join(found)
