"""`mora-ret serve`: every endpoint through Starlette's test client, every bad input, the
batching queue, and the command itself (a real uvicorn process)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from serve_world import build_shapes_index  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from mora_retrieval.data.images import load_image  # noqa: E402
from mora_retrieval.errors import IndexFolderError, MoraError  # noqa: E402
from mora_retrieval.retrieval.encoder import load_encoder_from_source  # noqa: E402
from mora_retrieval.retrieval.index import load_index_folder  # noqa: E402
from mora_retrieval.retrieval.search import Query, search, search_many  # noqa: E402
from mora_retrieval.retrieval.serve import (  # noqa: E402
    TEXT_TRUNCATED_HEADER,
    QueryQueue,
    ServeConfig,
    create_app,
    is_loopback,
    background_server,
    open_socket,
)
from mora_retrieval_cli.app import app as cli_app  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    built = build_shapes_index(tmp_path_factory.mktemp("serve"))
    folder = load_index_folder(built["index"])
    # the server's model comes from the manifest, exactly as `mora-ret search` loads it
    encoder = load_encoder_from_source(folder.manifest["source"], device="cpu")
    return {**built, "folder": folder, "encoder": encoder, "label": str(built["index"])}


@pytest.fixture(scope="module")
def client(world):
    app = create_app(world["folder"], world["encoder"], index_label=world["label"])
    with TestClient(app) as c:
        yield c


def _image_path(world, row):
    return world["folder"].items[row].path


def _upload(world, row, name=None):
    path = _image_path(world, row)
    with open(path, "rb") as fh:
        return {"image": (name or os.path.basename(path), fh.read(), "image/jpeg")}


def _assert_hits_equal(results, hits):
    assert [r["row"] for r in results] == [h.row for h in hits]
    assert [r["rank"] for r in results] == [h.rank for h in hits]
    assert [r["path"] for r in results] == [h.item.path for h in hits]
    np.testing.assert_allclose([r["score"] for r in results], [h.score for h in hits], rtol=0, atol=1e-5)


def _assert_error(response, status, *fragments):
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and "\n" not in body["error"] and body["error"]
    for fragment in fragments:
        assert fragment in body["error"], body["error"]


# ------------------------------------------------------------------ endpoints


def test_healthz(client, world):
    body = client.get("/healthz").json()
    assert body["status"] == "ok" and body["count"] == world["folder"].count and body["waiting"] == 0


def test_info_summarises_the_manifest(client, world):
    info = client.get("/api/info").json()
    manifest = world["folder"].manifest
    assert info["model"] == "mora-tiny" == manifest["arch"]
    assert (info["count"], info["index_type"], info["dim"]) == (manifest["count"], "Flat", 64)
    assert info["fingerprint"] == manifest["fingerprint"] and info["composed_with"] == "sum"
    with open(world["coco"] / "annotations" / "instances_val2017.json") as fh:
        names = {str(c["id"]): c["name"] for c in json.load(fh)["categories"]}
    assert info["categories"] == names and "circle" in names.values()
    assert info["limits"] == {"k": [1, 1000], "default_k": 10, "max_upload_mb": 10.0}


def test_page_and_its_assets_are_served_without_any_cdn(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for ref in re.findall(r'(?:src|href)="([^"]+)"', page.text):
        assert not ref.startswith(("http:", "https:", "//")), ref
        asset = client.get("/" + ref)
        assert asset.status_code == 200 and len(asset.content) > 100, ref
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    _assert_error(client.get("/static/..%2Fserve.py"), 404)
    _assert_error(client.get("/static/index.html.bak"), 404, "no such file")


def test_thumbnails_are_served_by_row_only(client, world):
    response = client.get("/images/3")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(response.content))
    original = load_image(_image_path(world, 3))
    assert thumb.format == "JPEG" and max(thumb.size) <= 256
    diff = np.abs(np.asarray(thumb.convert("RGB"), float) - np.asarray(original.resize(thumb.size), float)).mean()
    assert diff < 12  # the same picture (JPEG re-encoding aside)
    n = world["folder"].count
    for bad in (str(n), "-1", "abc", "1e3", "..%2F..%2Fetc%2Fpasswd", _image_path(world, 0).lstrip("/")):
        _assert_error(client.get(f"/images/{bad}"), 404)
    _assert_error(client.get(f"/images/{n}"), 404, f"rows 0..{n - 1}")


def test_missing_image_file_of_a_row_is_a_404(world, tmp_path):
    folder = world["folder"]
    gone = replace(folder.items[0], path=str(tmp_path / "deleted.jpg"))
    broken = replace(folder, items=[gone, *folder.items[1:]])
    with TestClient(create_app(broken, world["encoder"])) as c:
        _assert_error(c.get("/images/0"), 404, "deleted.jpg", "not found")
        _assert_error(c.post("/api/search", data={"row": "0"}), 404, "deleted.jpg")
        assert c.get("/images/1").status_code == 200


# ------------------------------------------------------------------ search equals `search`


@pytest.mark.parametrize("mode", ["composed", "image", "text"])
def test_upload_query_hits_equal_search(client, world, mode):
    row, text = 5, "a large red circle on a white background"
    files = _upload(world, row) if mode != "text" else None
    data = {"k": "7", **({"text": text} if mode != "image" else {})}
    body = client.post("/api/search", files=files, data=data).json()
    hits = search(world["folder"], world["encoder"], image=_image_path(world, row) if mode != "text" else None,
                  text=text if mode != "image" else None, k=7)
    assert body["mode"] == mode and len(body["results"]) == 7
    _assert_hits_equal(body["results"], hits)
    if mode != "text":
        assert body["image"] == os.path.basename(_image_path(world, row))


def test_composed_row_query_json_equals_search_json(client, world):
    """A query by row (a clicked hit) gives exactly the JSON `mora-ret search --json` prints."""
    row, text = 11, "make the square blue"
    api = client.post("/api/search", data={"row": str(row), "text": text, "k": "9"}).json()
    result = CliRunner().invoke(cli_app, ["search", "--index", world["label"], "--image", _image_path(world, row),
                                          "--text", text, "-k", "9", "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    cli = json.loads(result.output[result.output.index("{"):])
    assert set(api) == set(cli) and api["mode"] == "composed"
    for key in ("index", "mode", "image", "text", "composed_with"):
        assert api[key] == cli[key], key
    assert [{k: v for k, v in r.items() if k != "score"} for r in api["results"]] == \
           [{k: v for k, v in r.items() if k != "score"} for r in cli["results"]]
    np.testing.assert_allclose([r["score"] for r in api["results"]], [r["score"] for r in cli["results"]], atol=1e-5)
    assert api["results"][0]["row"] == row or api["results"][0]["score"] >= api["results"][1]["score"]


def test_k_is_capped_by_the_index_size(client, world):
    body = client.post("/api/search", data={"text": "a star", "k": "1000"}).json()
    assert len(body["results"]) == world["folder"].count
    assert sorted(r["row"] for r in body["results"]) == list(range(world["folder"].count))
    default = client.post("/api/search", data={"text": "a star"}).json()
    assert len(default["results"]) == 10


def test_long_text_is_truncated_as_search_does(client, world):
    text = "make the circle blue and move it to the left " * 20
    response = client.post("/api/search", data={"text": text, "k": "5"})
    assert response.status_code == 200
    assert response.headers[TEXT_TRUNCATED_HEADER] == str(world["encoder"].tokenizer.context_length)
    _assert_hits_equal(response.json()["results"], search(world["folder"], world["encoder"], text=text, k=5))
    short = client.post("/api/search", data={"text": "a circle"})
    assert TEXT_TRUNCATED_HEADER not in short.headers


# ------------------------------------------------------------------ bad input


def _bad_requests(world):
    path = _image_path(world, 2)
    with open(path, "rb") as fh:
        jpeg = fh.read()
    return {
        "corrupt image": ({"files": {"image": ("x.jpg", jpeg[: len(jpeg) // 2], "image/jpeg")}}, 400, "corrupt"),
        "not an image": ({"files": {"image": ("notes.txt", b"hello, this is text\n" * 20, "text/plain")}}, 400,
                         "not an image"),
        "empty file": ({"files": {"image": ("e.png", b"", "image/png")}}, 400, "empty file"),
        "empty query": ({"data": {"text": "   ", "k": "5"}}, 400, "give a query"),
        "no fields": ({"data": {"k": "5"}}, 400, "give a query"),
        "k zero": ({"data": {"text": "a", "k": "0"}}, 400, "k 0: expected 1..1000"),
        "k too big": ({"data": {"text": "a", "k": "1001"}}, 400, "k 1001"),
        "k negative": ({"data": {"text": "a", "k": "-3"}}, 400, "k -3"),
        "k not a number": ({"data": {"text": "a", "k": "ten"}}, 400, "expected a whole number"),
        "unknown row": ({"data": {"row": "9999"}}, 400, "row 9999: not in the index"),
        "row not a number": ({"data": {"row": "../../etc/passwd"}}, 400, "expected a whole number"),
        "row and upload": ({"files": {"image": ("q.jpg", jpeg, "image/jpeg")}, "data": {"row": "1"}}, 400, "not both"),
        "unknown field": ({"data": {"text": "a", "path": "/etc/passwd"}}, 400, "unknown field 'path'"),
        "two images": ({"files": [("image", ("a.jpg", jpeg, "image/jpeg")), ("image", ("b.jpg", jpeg, "image/jpeg"))]},
                       400, "Too many files"),
        "text as a file": ({"files": {"text": ("t.txt", b"hello", "text/plain")}}, 400, "text: expected a form field"),
        "json body": ({"json": {"text": "a"}}, 415, "expected multipart/form-data"),
        "huge text field": ({"files": {"image": ("q.jpg", jpeg, "image/jpeg")}, "data": {"text": "x" * 70_000}}, 400,
                            "exceeded maximum size"),
    }


def test_bad_inputs_get_a_4xx_one_line_json_error_and_the_server_keeps_running(client, world):
    for name, (kwargs, status, fragment) in _bad_requests(world).items():
        response = client.post("/api/search", **kwargs)
        assert response.status_code == status, (name, response.text)
        _assert_error(response, status, fragment)
    _assert_error(client.get("/api/search"), 405, "method not allowed")
    _assert_error(client.get("/no/such/page"), 404, "not found")
    assert client.get("/healthz").json()["status"] == "ok"
    good = client.post("/api/search", files=_upload(world, 0), data={"text": "a circle", "k": "3"})
    assert good.status_code == 200 and len(good.json()["results"]) == 3


def test_upload_over_the_size_limit_is_a_413(world):
    app = create_app(world["folder"], world["encoder"], config=ServeConfig(max_upload_mb=0.05))
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(buffer, "PNG")
    big = buffer.getvalue()
    assert len(big) > 0.05 * (1 << 20)
    with TestClient(app) as c:
        _assert_error(c.post("/api/search", files={"image": ("big.png", big, "image/png")}), 413, "0.05 MB",
                      "--max-upload-mb")

        def chunks():  # no Content-Length: the limit is enforced while reading
            for start in range(0, len(big), 8192):
                yield big[start:start + 8192]

        boundary = "b0undary"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.png\"\r\n"
                "Content-Type: image/png\r\n\r\n").encode()

        def body():
            yield head
            yield from chunks()
            yield f"\r\n--{boundary}--\r\n".encode()

        response = c.post("/api/search", content=body(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        _assert_error(response, 413, "upload limit")
        small = _upload(world, 0)
        assert c.post("/api/search", files=small, data={"k": "2"}).status_code == 200


def test_decompression_bombs_are_refused_before_decoding(world):
    buffer = io.BytesIO()
    Image.new("L", (4000, 4000)).save(buffer, "PNG")  # a small file of 16 M pixels
    app = create_app(world["folder"], world["encoder"], config=ServeConfig(max_image_pixels=1_000_000))
    with TestClient(app) as c:
        _assert_error(c.post("/api/search", files={"image": ("bomb.png", buffer.getvalue(), "image/png")}), 400,
                      "4000x4000 pixels is over the limit")


def test_the_app_refuses_a_model_the_index_was_not_built_with(world):
    other = replace(world["encoder"], fingerprint="0" * 16)
    with pytest.raises(IndexFolderError, match="built with weights"):
        create_app(world["folder"], other)


# ------------------------------------------------------------------ queue and batching


def _queries(world):
    images = [load_image(_image_path(world, r)) for r in (0, 4, 9)]
    return [Query(image=images[0], text="make it red", k=5), Query(text="a small star", k=3),
            Query(image=images[1], k=8), Query(image=images[2], text="add a square", k=1),
            Query(text="two circles", k=6), Query(image=images[0], k=2)]


def test_search_many_equals_one_search_per_query(world):
    queries = _queries(world)
    batched = search_many(world["folder"], world["encoder"], queries)
    paths = {0: _image_path(world, 0), 1: None, 2: _image_path(world, 4), 3: _image_path(world, 9), 4: None,
             5: _image_path(world, 0)}
    for i, (q, hits) in enumerate(zip(queries, batched)):
        want = search(world["folder"], world["encoder"], image=paths[i], text=q.text, k=q.k)
        assert [h.row for h in hits] == [h.row for h in want], i
        np.testing.assert_allclose([h.score for h in hits], [h.score for h in want], atol=1e-5)


def test_queue_batches_concurrent_queries_and_answers_every_one(world):
    queries = _queries(world) * 3
    calls = []

    def answer(batch):
        calls.append(len(batch))
        return search_many(world["folder"], world["encoder"], batch)

    async def main():
        async with QueryQueue(answer, max_batch=8) as queue:
            results = await asyncio.gather(*(queue.submit(q) for q in queries))
            return results, dict(queue.batch_sizes)

    results, sizes = asyncio.run(main())
    assert calls == [8, 8, 2] and sizes == {8: 2, 2: 1}  # FIFO, one batch at a time, none dropped
    want = search_many(world["folder"], world["encoder"], queries)
    assert [[h.row for h in r] for r in results] == [[h.row for h in w] for w in want]


def test_one_failing_query_does_not_fail_its_batch():
    def answer(batch):
        if any(q.text == "boom" for q in batch):
            if len(batch) == 1:
                raise MoraError("boom: bad query")
            raise RuntimeError("batch failed")
        return [q.text.upper() for q in batch]

    async def main():
        async with QueryQueue(answer, max_batch=4) as queue:
            return await asyncio.gather(*(queue.submit(Query(text=t)) for t in ("a", "boom", "c")),
                                        return_exceptions=True)

    a, boom, c = asyncio.run(main())
    assert (a, c) == ("A", "C") and isinstance(boom, MoraError)
    with pytest.raises(MoraError, match="max_batch 0: expected at least 1"):
        QueryQueue(answer, max_batch=0)


def test_concurrent_http_clients_all_get_their_own_answer(client, world):
    texts = ["a red circle", "a blue star", "two squares", "a small triangle", "make it green", "a diamond"] * 4

    def ask(text):
        return client.post("/api/search", data={"text": text, "k": "4"}).json()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, texts))
    for text, body in zip(texts, answers):
        assert body["text"] == text
        _assert_hits_equal(body["results"], search(world["folder"], world["encoder"], text=text, k=4))
    assert client.get("/healthz").json()["waiting"] == 0


def test_load_200_requests_from_8_clients_on_a_real_server_all_answered(world):
    """The correctness half of benchmarks/bench_serve.py: none lost, each client gets its own answer."""
    import httpx

    rows, texts = [0, 6, 13, 20, 27], ["make the circle blue", None, "a red square", "add a star", None]
    kinds = []
    for row, text in zip(rows, texts):
        with open(_image_path(world, row), "rb") as fh:
            kinds.append(({"image": ("q.jpg", fh.read(), "image/jpeg")}, {"k": "5", **({"text": text} if text else {})},
                          [h.row for h in search(world["folder"], world["encoder"], image=_image_path(world, row),
                                                 text=text, k=5)]))
    kinds.append((None, {"text": "two stars", "k": "5"},
                  [h.row for h in search(world["folder"], world["encoder"], text="two stars", k=5)]))
    app = create_app(world["folder"], world["encoder"])

    def client(start, url):
        answers = []
        with httpx.Client(base_url=url, timeout=60) as http:
            for i in range(start, 200, 8):
                files, data, _ = kinds[i % len(kinds)]
                response = http.post("api/search", files=files, data=data)
                answers.append((i, response.status_code, [r["row"] for r in response.json().get("results", [])]))
        return answers

    with background_server(app) as url:
        with ThreadPoolExecutor(8) as pool:
            answers = [a for part in pool.map(client, range(8), [url] * 8) for a in part]
        health = httpx.get(url + "healthz").json()
    assert sorted(i for i, _, _ in answers) == list(range(200))
    for i, status, got in answers:
        assert status == 200 and got == kinds[i % len(kinds)][2], i
    sizes = {int(k): v for k, v in health["batch_sizes"].items()}
    assert sum(k * v for k, v in sizes.items()) == 200 and health["waiting"] == 0


# ------------------------------------------------------------------ the command


def test_loopback_rule():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.0.1.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.org")


def test_a_port_in_use_is_one_line():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(MoraError, match=f"127.0.0.1:{port}: cannot listen there"):
            open_socket("127.0.0.1", port)
    finally:
        taken.close()


def _cli(*args, pre=""):
    code = f"{pre}from mora_retrieval_cli.app import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


def test_without_the_extra_serve_says_how_to_install_it(tmp_path):
    proc = _cli("serve", "--index", str(tmp_path), pre="import sys; sys.modules['uvicorn'] = None; ")
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == ["error: mora-ret serve needs the serve extra: pip install 'mora-retrieval[serve]' (missing: uvicorn)"]


def test_a_bad_index_is_one_line_before_listening(tmp_path):
    proc = _cli("serve", "--index", str(tmp_path / "nope"), "--port", "0")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: index folder not found"]


def test_serve_command_end_to_end_with_the_public_address_warning(world):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "300"}
    proc = subprocess.Popen([sys.executable, "-c", "from mora_retrieval_cli.app import main; main()", "serve",
                             "--index", world["label"], "--host", "0.0.0.0", "--port", "0", "--device", "cpu"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        seen, url, deadline = [], None, time.monotonic() + 90
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen.append(line)
            found = re.search(r"http://0\.0\.0\.0:(\d+)/", line)
            url = found and f"http://127.0.0.1:{found.group(1)}/"
        assert url, "".join(seen)
        assert any(line.startswith("warning: listening on 0.0.0.0") for line in seen), seen
        import httpx

        for _ in range(100):  # the socket is bound before the message; uvicorn starts accepting soon after
            try:
                if httpx.get(url + "healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        body = httpx.post(url + "api/search", data={"row": "2", "text": "a circle", "k": "3"}).json()
        _assert_hits_equal(body["results"], search(world["folder"], world["encoder"], image=_image_path(world, 2),
                                                   text="a circle", k=3))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0


@pytest.mark.parametrize(("limits", "message"), [({"max_batch": 0}, "--max-batch 0: expected at least 1"),
                                                 ({"max_upload_mb": 0}, "--max-upload-mb 0: expected a positive"),
                                                 ({"default_k": 0}, "default k 0: expected 1..")])
def test_serve_config_refuses_bad_limits_before_anything_is_loaded(limits, message):
    from mora_retrieval.errors import MoraError
    from mora_retrieval.retrieval.serve import ServeConfig

    with pytest.raises(MoraError, match=message):
        ServeConfig(**limits)
