"""Load benchmark of ``mora-ret serve``: latency and queries/s under concurrent clients.

The index is the tiny shapes world's COCO-format val gallery (39 images) embedded by mora-tiny
(seeded random weights saved as a checkpoint; speed does not depend on the weights), built the
way the server tests build it (``tests/serve_world.py``). The server is the real command
(``mora-ret serve --port 0``, a separate process on localhost); ``--clients`` threads, each with
its own HTTP connection, send ``--requests`` POST /api/search requests in all, cycling through
three kinds: a composed query (JPEG upload + text), an image upload alone, a text alone; k = 10.
A request counts as answered when it gets status 200 and 10 results. Latency is measured per
request on the client, from sending to the parsed JSON answer. The server's batch sizes come
from its ``/healthz``. Each setting of ``--max-batch`` is a fresh server; 8 warm-up requests
are not counted.

Usage: ``python benchmarks/bench_serve.py [--requests 200] [--clients 8] [--max-batch 32 1]``;
prints a Markdown table (paste it into ``BENCHMARKS.md``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def start_server(index: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    """``mora-ret serve`` on a free localhost port; returns the process and its base URL."""
    import httpx

    cmd = [sys.executable, "-c", "from mora_retrieval_cli.app import main; main()", "serve", "--index", str(index),
           "--port", "0", "--device", "cpu", "--max-batch", str(max_batch)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "300"})
    url = None
    while url is None:
        line = proc.stderr.readline()
        if not line:
            raise RuntimeError("the server did not start")
        found = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
        url = found and found.group(1)
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining its log
    for _ in range(200):
        try:
            if httpx.get(url + "healthz").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError("the server does not answer /healthz")


def request_kinds(coco: Path) -> list[dict]:
    """The request bodies, cycled through: composed, image alone, text alone."""
    images = sorted((coco / "val2017").glob("*.jpg"))
    texts = ["make the circle blue", "add a small star", "a red square on a black background", "remove the triangle"]
    kinds = []
    for i, path in enumerate(images):
        upload = {"image": (path.name, path.read_bytes(), "image/jpeg")}
        kinds.append({"files": upload, "data": {"text": texts[i % len(texts)], "k": "10"}})
        kinds.append({"files": upload, "data": {"k": "10"}})
        kinds.append({"data": {"text": texts[i % len(texts)], "k": "10"}})
    return kinds


def run_load(url: str, kinds: list[dict], requests: int, clients: int) -> dict:
    """Send ``requests`` requests from ``clients`` threads; latencies (s) and how many were answered."""
    import httpx

    lock = threading.Lock()
    next_request = iter(range(requests))
    latencies: list[float] = []
    failures: list[str] = []

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            while True:
                with lock:
                    i = next(next_request, None)
                if i is None:
                    return
                start = time.perf_counter()
                try:
                    response = http.post("api/search", **kinds[i % len(kinds)])
                    ok = response.status_code == 200 and len(response.json()["results"]) == 10
                    reason = "" if ok else f"{response.status_code} {response.text[:80]}"
                except httpx.HTTPError as exc:
                    ok, reason = False, repr(exc)
                elapsed = time.perf_counter() - start
                with lock:
                    (latencies.append(elapsed) if ok else failures.append(reason))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"latencies": latencies, "failures": failures, "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-batch", type=int, nargs="+", default=[32, 1])
    args = parser.parse_args()

    import httpx
    from serve_world import build_shapes_index

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        world = build_shapes_index(Path(tmp))
        kinds = request_kinds(world["coco"])
        for max_batch in args.max_batch:
            proc, url = start_server(world["index"], max_batch)
            try:
                run_load(url, kinds, 8, 1)  # warm-up
                before = httpx.get(url + "healthz").json()["batch_sizes"]
                result = run_load(url, kinds, args.requests, args.clients)
                after = httpx.get(url + "healthz").json()["batch_sizes"]
            finally:
                proc.terminate()
                proc.wait(30)
            sizes = {int(k): v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
            batches = sum(sizes.values())
            lat = np.array(result["latencies"]) * 1000
            answered = len(result["latencies"])
            rows.append(
                f"| {max_batch} | {args.requests} | {args.clients} | {answered} | {len(result['failures'])} | "
                f"{np.percentile(lat, 50):.1f} | {np.percentile(lat, 95):.1f} | {answered / result['wall']:.1f} | "
                f"{batches} | {sum(k * v for k, v in sizes.items()) / max(batches, 1):.2f} | {max(sizes, default=0)} |"
            )
            if result["failures"]:
                print(f"failures (max batch {max_batch}): {result['failures'][:5]}", file=sys.stderr)

    print(f"# mora-ret serve, tiny shapes world (39 images, mora-tiny), {args.clients} clients, "
          f"{platform.machine()} CPU ({os.cpu_count()} cores), "
          f"{datetime.date.today()}")
    print("| max batch | requests | clients | answered | failed | p50 ms | p95 ms | queries/s | batches | mean batch | "
          "largest batch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
