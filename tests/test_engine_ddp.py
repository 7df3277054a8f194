"""torchrun with two CPU processes (gloo) equals one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from engine_toys import ToyData, ToyTask
from mora_retrieval.engine import Trainer, TrainConfig
from mora_retrieval.fileio import load_tensors

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_two_process_gloo_matches_single_process(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "engine_ddp_script.py"), str(tmp_path / "ddp"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

    ranks = [load_tensors(out / f"rank{r}.safetensors") for r in (0, 1)]
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # identical across ranks
    with safe_open(str(out / "rank1.safetensors"), "pt") as handle:
        assert handle.metadata()["evaluations"] == "0"  # validation runs on rank 0 only
        assert handle.metadata()["best_epoch"] != "None"  # ...but every rank knows the result

    single = ToyTask()
    config = TrainConfig(epochs=2, batch_size=8, lr=0.05, weight_decay=0.01, seed=7, log_every=2,
                         checkpoint_every=5, max_grad_norm=5.0, device="cpu")
    Trainer(single, config, tmp_path / "single", ToyData(48), quiet=True).fit()
    for key, value in single.state_dict().items():
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-5, atol=1e-6)

    saved = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert saved["resolved"]["world_size"] == 2 and saved["resolved"]["effective_batch_size"] == 8
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    ref = (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()
    for mine, theirs in zip(lines, ref, strict=True):
        a, b = json.loads(mine), json.loads(theirs)
        assert a["step"] == b["step"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
