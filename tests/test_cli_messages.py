"""Messages a user reads: one warning for random weights, and log output that is not cut at 80 columns."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings


def test_random_weights_are_announced_once(caplog):
    from mora_retrieval.model.backbone import load_backbone

    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        load_backbone("mora-tiny", None)
    said = [str(w.message) for w in caught if "random" in str(w.message).lower()]
    assert said == ["mora-tiny: no pretrained weights given, the model is randomly initialised"]
    assert not [r for r in caplog.records if "No pretrained weights loaded" in r.getMessage()]


def test_log_output_keeps_long_lines_and_paths_whole():
    """Not a terminal (a log file, CI): no hard wrap at 80 columns, no truncated table cells."""
    code = ("from rich.table import Table; from mora_retrieval_cli.options import make_console; c = make_console();"
            "c.print('recall@10 ' + 'x' * 150 + ' 68.0000'); t = Table('index folder', 'images');"
            "t.add_row('indexes/' + 'coco-val2017-' * 8 + 'end', '5000'); c.print(t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "recall@10 " + "x" * 150 + " 68.0000" in out.splitlines()
    assert "indexes/" + "coco-val2017-" * 8 + "end" in out and "…" not in out


def test_warnings_print_as_one_line_from_the_cli(tmp_path):
    code = ("import sys, warnings; from mora_retrieval_cli import app as a; a.app = lambda: warnings.warn('careful');"
            "a.main()")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stderr
    assert err.strip() == "warning: careful"
