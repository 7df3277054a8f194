"""The README's "Every command on the demo's world" block runs exactly as written.

It runs on the smallest demo (``DemoSettings.smoke``) in a scratch folder laid out like the
repository root after ``make demo``; only ``serve``, which does not return, is left out.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def walkthrough_block() -> str:
    text = README.read_text()
    match = re.search(r"<!-- walkthrough:start -->\s*```bash\n(.*?)```\s*<!-- walkthrough:end -->", text, re.S)
    assert match, "README lost its walkthrough block"
    return match.group(1)


def test_block_uses_every_main_command():
    block = walkthrough_block()
    for command in ("train cirr", "eval cirr", "merge", "index coco", "eval coco", "search", "classify", "predict",
                    "analyze", "serve"):
        assert f"mora-ret {command}" in block, command


@pytest.mark.slow
def test_walkthrough_runs_as_written(tmp_path):
    from mora_retrieval.demo import DemoSettings, run_demo

    run_demo(DemoSettings.smoke(str(tmp_path / "demo")), quiet=True)
    script = "set -euo pipefail\n" + "\n".join(
        line for line in walkthrough_block().replace("\\\n", " ").splitlines() if not line.startswith("mora-ret serve"))
    bindir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""), COLUMNS="200")
    assert shutil.which("mora-ret", path=env["PATH"]), "mora-ret is not installed beside this python"
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for produced in ("runs/cirr-mora/merged.safetensors", "runs/cirr-mora-merged/open_clip_config.json",
                     "indexes/coco-mora/manifest.json", "runs/food-mora/results.json",
                     "runs/food-mora/analysis/analysis.json"):
        assert (tmp_path / produced).is_file(), produced
    assert "Traceback" not in proc.stderr
