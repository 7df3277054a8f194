"""The run folder: the record, results without NaN, resume only with something to resume, a finished run."""

from __future__ import annotations

import json
import math

import pytest

from mora_retrieval.errors import BackboneError, MoraError
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
