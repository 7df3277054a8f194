"""CLI end to end on a tiny COCO-format world with mora-tiny: index, search, eval, errors."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import typer
from test_retrieval_fixtures import write_tiny_checkpoint, write_tiny_coco
from typer.testing import CliRunner


@pytest.fixture(scope="module")
def app():
    from mora_retrieval_cli.app import build_app

    cli = typer.Typer(rich_markup_mode=None)  # plain click help and errors, as the real app
    cli.callback()(lambda: None)
    return build_app(cli, ("index", "search", "eval"))


@pytest.fixture(scope="module")
def built(app, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_tiny_coco(root / "coco")
    write_tiny_checkpoint(root / "tiny.safetensors")
    result = CliRunner().invoke(app, [
        "index", "coco", "--data-root", str(root / "coco"), "--model", "mora-tiny",
        "--pretrained", str(root / "tiny.safetensors"), "--out", str(root / "idx"), "--workers", "0",
        "--batch-size", "4", "--device", "cpu",
    ])
    assert result.exit_code == 0, result.output
    return root


def _run(app, args):
    result = CliRunner().invoke(app, args)
    return result


def test_index_folder_layout(built):
    idx = built / "idx"
    assert sorted(p.name for p in idx.iterdir()) == ["embeddings.npy", "index.faiss", "items.jsonl", "manifest.json"]
    manifest = json.loads((idx / "manifest.json").read_text())
    assert manifest["count"] == 9 and manifest["arch"] == "mora-tiny" and manifest["index_type"] == "Flat"
    assert manifest["collection"]["kind"] == "coco" and manifest["source"]["pretrained"].endswith("tiny.safetensors")


def test_search_json_matches_stored_embeddings(app, built):
    query = built / "coco" / "val2017" / "000000000003.jpg"
    result = _run(app, ["search", "--index", str(built / "idx"), "--image", str(query), "-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["mode"] == "image" and [r["rank"] for r in payload["results"]] == [1, 2, 3]
    emb = np.load(built / "idx" / "embeddings.npy").astype(np.float32)
    assert payload["results"][0]["path"] == str(query.resolve())  # its own stored embedding ranks first
    ref = np.argsort(-(emb[payload["results"][0]["row"]] @ emb.T), kind="stable")[:3]
    assert [r["row"] for r in payload["results"]] == ref.tolist()


def test_search_table_and_html(app, built, tmp_path):
    query = built / "coco" / "val2017" / "000000000001.jpg"
    result = _run(app, ["search", "--index", str(built / "idx"), "--image", str(query), "--text", "a cat",
                        "-k", "2", "--html", str(tmp_path / "g.html")])
    assert result.exit_code == 0, result.output
    assert "composed query" in result.stdout and "rank" in result.stdout
    assert (tmp_path / "g.html").read_text().count("data:image/jpeg;base64,") == 3


def test_eval_coco_json(app, built):
    result = _run(app, ["eval", "coco", "--index", str(built / "idx"), "--mode", "both", "--relevance", "primary",
                        "--json", "--workers", "0"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout[result.stdout.index("{"):])
    assert payload["relevance"] == "primary"
    for mode in ("image", "cir"):
        rec = payload[mode]["recall"]
        assert 0 <= rec["R@1"] <= rec["R@5"] <= rec["R@10"] <= 100
        assert payload[mode]["evaluated_queries"] + payload[mode]["queries_without_relevant"] == 9


def test_errors_are_one_line(app, built, tmp_path, monkeypatch, capsys):
    """Through the real entry point: `error: <one line>` and exit status 1."""
    import mora_retrieval_cli.app as app_module

    from mora_retrieval.errors import MoraError

    def expect_error(args, fragment):
        result = CliRunner().invoke(app, args)
        assert isinstance(result.exception, MoraError), result.output
        message = str(result.exception)
        assert "\n" not in message and fragment in message, message
        return message

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    expect_error(["search", "--index", str(built / "idx"), "--image", str(bad)], "bad.jpg")
    expect_error(["search", "--index", str(tmp_path / "missing"), "--text", "x"], "missing")
    other = write_tiny_checkpoint(tmp_path / "other.safetensors", seed=3)
    expect_error(["search", "--index", str(built / "idx"), "--text", "x", "--model", "mora-tiny",
                  "--pretrained", str(other)], "built with weights")
    expect_error(["eval", "coco", "--index", str(built / "idx"), "--relevance", "jaccard:2"], "jaccard:2")

    monkeypatch.setattr(app_module, "app", app)
    monkeypatch.setattr(sys, "argv", ["mora-ret", "search", "--index", str(built / "idx"), "--image", str(bad)])
    with pytest.raises(SystemExit) as exit_info:
        app_module.main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "bad.jpg" in err[0]


def test_output_paths_and_k_are_checked_before_writing(app, built, tmp_path):
    """Files in the way, folders given as files, k < 1 and a dir as query image: one line each."""
    from mora_retrieval.errors import MoraError

    index_args = ["index", "coco", "--data-root", str(built / "coco"), "--model", "mora-tiny", "--pretrained",
                  str(built / "tiny.safetensors"), "--workers", "0", "--device", "cpu"]
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    for out, fragment in ((blocker, "exists and is not a folder"), (blocker / "idx", "is a file, so")):
        result = _run(app, [*index_args, "--out", str(out)])
        assert isinstance(result.exception, MoraError) and fragment in str(result.exception), result.output
    assert blocker.read_text() == "keep me"
    result = _run(app, ["search", "--index", str(built / "idx"), "--text", "x", "--html", str(tmp_path)])
    assert isinstance(result.exception, MoraError) and "is a folder (expected a file name" in str(result.exception)
    result = CliRunner().invoke(app, ["search", "--index", str(built / "idx"), "--text", "x", "-k", "0"],
                                terminal_width=200)
    assert result.exit_code == 2 and "--top-k': Input should be greater than or equal to 1" in result.output
    result = _run(app, ["search", "--index", str(built / "idx"), "--image", str(tmp_path)])
    assert isinstance(result.exception, MoraError) and "is a folder (expected an image file)" in str(result.exception)


def test_reindexing_with_another_model_needs_overwrite(app, built, tmp_path):
    import shutil

    target = tmp_path / "idx"
    shutil.copytree(built / "idx", target)
    before = (target / "manifest.json").read_bytes()
    other = write_tiny_checkpoint(tmp_path / "other.safetensors", seed=5)
    args = ["index", "coco", "--data-root", str(built / "coco"), "--model", "mora-tiny", "--pretrained", str(other),
            "--out", str(target), "--workers", "0", "--device", "cpu"]
    result = _run(app, args)
    assert "already holds an index of another model" in str(result.exception) and "--overwrite" in str(result.exception)
    assert (target / "manifest.json").read_bytes() == before  # nothing was touched
    result = _run(app, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert json.loads((target / "manifest.json").read_text())["source"]["pretrained"] == str(other)
    # the same model may rebuild its own folder without --overwrite
    result = _run(app, args)
    assert result.exit_code == 0, result.output


def test_ctrl_c_during_indexing_says_how_to_resume(app, built, tmp_path, monkeypatch):
    import mora_retrieval.retrieval.build as build_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "embed_paths", interrupted)
    result = _run(app, ["index", "coco", "--data-root", str(built / "coco"), "--model", "mora-tiny", "--pretrained",
                        str(built / "tiny.safetensors"), "--out", str(tmp_path / "idx"), "--workers", "0",
                        "--device", "cpu"])
    assert result.exit_code == 130
    text = " ".join(result.output.split())
    assert "interrupted: the finished chunks are kept under" in text and "run the same command again" in text


def test_index_images_folder_and_rebuild(app, built, tmp_path):
    out = tmp_path / "imgs-idx"
    result = _run(app, ["index", "images", str(built / "coco" / "val2017"), "--model", "mora-tiny", "--pretrained",
                        str(built / "tiny.safetensors"), "--out", str(out), "--workers", "0", "--index-type", "HNSW8"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 10 and manifest["index_type"] == "HNSW8" and manifest["search_params"] == "efSearch=128"
    result = _run(app, ["index", "rebuild", str(out), "--index-type", "Flat"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["index_type"] == "Flat"
    # eval coco needs COCO labels: a plain folder index is refused with one line
    result = _run(app, ["eval", "coco", "--index", str(out)])
    assert "no COCO category labels" in str(result.exception)
