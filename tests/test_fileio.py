"""fileio: the atomic writers and readers every module uses."""

from __future__ import annotations

import json

import pytest

from mora_retrieval.fileio import read_matching_json


def test_read_matching_json_accepts_only_a_record_of_the_same_work(tmp_path):
    path = tmp_path / "progress.json"
    expected = {"version": 1, "shape": [4, 3]}
    assert read_matching_json(path, expected) is None  # absent
    path.write_text("{not json")
    assert read_matching_json(path, expected) is None  # unreadable
    path.write_text(json.dumps([1, 2]))
    assert read_matching_json(path, expected) is None  # not an object
    path.write_text(json.dumps({"version": 1, "shape": [4, 2], "done": {}}))
    assert read_matching_json(path, expected) is None  # another piece of work
    path.write_text(json.dumps({"version": 1, "done": {}}))
    assert read_matching_json(path, expected) is None  # a key missing
    record = {"version": 1, "shape": [4, 3], "done": {"0": 2}}
    path.write_text(json.dumps(record))
    assert read_matching_json(path, expected) == record


def test_write_png_writes_the_figure_whole_or_not_at_all(tmp_path):
    """The one way the toolkit writes a figure (training curves, the report's PNGs)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    from mora_retrieval.fileio import write_png

    figure = Figure(figsize=(3, 2), dpi=50)
    FigureCanvasAgg(figure)
    figure.subplots().plot([1, 2], [3, 4])
    with Image.open(write_png(figure, tmp_path / "sub" / "plot.png")) as image:
        assert (image.format, image.size) == ("PNG", (150, 100))

    class FailingFigure:
        def savefig(self, handle, format):
            handle.write(b"\x89PNG half")
            raise RuntimeError("renderer failed")

    with pytest.raises(RuntimeError):
        write_png(FailingFigure(), tmp_path / "sub" / "broken.png")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["plot.png"]
