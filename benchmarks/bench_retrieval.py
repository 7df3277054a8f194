"""Retrieval benchmark: embedding throughput, exact-search queries/s, FAISS index types.

1. Embedding (images/s), every row from one run on the same JPEG files:

   * *plain loop*: PIL decode + open_clip preprocess + ``encode_image`` in one process;
   * *clip-retrieval-style peer*: DataLoader workers decode with PIL and run the open_clip
     preprocess per image (default collate: one tensor per image crosses the worker queue),
     fp32 weights, ``torch.autocast(bf16)`` on CUDA;
   * *toolkit*: ``retrieval.embed.embed_paths`` with its defaults (and ``--fast-jpeg`` on CPU);
   * *transport only*: a DataLoader that only reads the JPEG bytes, shipped as one tensor per
     image or as one buffer per batch: the cost of the worker queues alone.

   mora-tiny on CPU; ``--gpu-arch`` (ViT-B-16, random weights: speed does not depend on them)
   on GPU when available. Images are synthetic photo-like JPEGs in four COCO sizes
   (640x480, 640x427, 480x640, 500x375; about 80 KB each).
2. Exact search (queries/s) for query batches of 1, 100 and 1,000 through
   ``retrieval.search.search_vectors`` over an ``N x 512`` float16 gallery (an exact ``Flat``
   index): FAISS on CPU, the torch path on a CUDA machine without GPU FAISS. ``--search-n``
   sets N (1,000,000 by default; exact search at 1M on a 2-core CPU takes minutes per
   1,000 queries, so the CPU figures in BENCHMARKS.md use a smaller N, stated there).
3. Index types (queries/s, Recall@10 against exact search) at 100k and 1M vectors, d=512.
   The vectors are random but clustered like embeddings: ``normalize(c_j + 1.5 g)`` with
   2,000 random unit centres ``c_j`` and Gaussian noise ``g`` of unit expected norm; queries
   come from the same distribution. Uniformly random vectors have no neighbourhood structure
   and no approximate index does well on them. Queries are searched as one batch. To keep the
   run short on small machines the IVF variants share one coarse quantizer (spherical k-means,
   10 iterations, on ``--train-per-list``·nlist vectors) and the vectors are assigned to lists
   once (``faiss.contrib.ivf_tools.add_preassigned``); search speed and recall do not depend
   on that shortcut. nlist is 1024 at 100k and 2048 at 1M.

Usage: ``python benchmarks/bench_retrieval.py [--skip-index] [--search-n 100000] [--images 512] [--repeat 3]``;
prints Markdown tables (paste them into ``BENCHMARKS.md``). With ``--repeat`` every embedding
row is timed that many times in turn and the best is reported (for noisy shared machines).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

COCO_SIZES = ((640, 480), (640, 427), (480, 640), (500, 375))  # (width, height)


def make_images(folder: Path, count: int, seed: int = 0) -> list[str]:
    """Photo-like JPEGs (smooth colour fields plus mild noise, ~80 KB) in four COCO sizes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        w, h = COCO_SIZES[i % len(COCO_SIZES)]
        coarse = Image.fromarray(rng.integers(0, 255, size=(12, 16, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        pixels = np.asarray(coarse, np.float32) + 6.0 * rng.standard_normal((h, w, 3), dtype=np.float32)
        path = folder / f"{i:06d}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def plain_loop(model, preprocess, paths: list[str], batch: int, device: str) -> float:
    import torch
    from PIL import Image

    start = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(paths), batch):
            imgs = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths[s : s + batch]]).to(device)
            model.encode_image(imgs)
    _sync(device)
    return len(paths) / (time.perf_counter() - start)


class PeerFiles:
    """clip-retrieval's reader: one preprocessed tensor per image, decoded by PIL in a worker."""

    def __init__(self, paths: list[str], preprocess) -> None:
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as img:
            return self.preprocess(img.convert("RGB"))


def peer_loader(model, preprocess, paths: list[str], batch: int, device: str, workers: int) -> float:
    """DataLoader workers (PIL + open_clip preprocess), fp32 weights, autocast bf16 on CUDA."""
    import contextlib

    import torch
    from torch.utils.data import DataLoader

    on_cuda = device.startswith("cuda")
    loader = DataLoader(PeerFiles(paths, preprocess), batch_size=batch, num_workers=workers, pin_memory=on_cuda)
    cast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else contextlib.nullcontext()
    start = time.perf_counter()
    with torch.inference_mode(), cast:
        for imgs in loader:
            model.encode_image(imgs.to(device, non_blocking=True))
    _sync(device)
    return len(paths) / (time.perf_counter() - start)


class BytesPerImage:
    """Transport probe: each JPEG's bytes as its own uint8 tensor (one tensor per image)."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import torch

        with open(self.paths[i], "rb") as handle:
            return torch.frombuffer(bytearray(handle.read()), dtype=torch.uint8)


class BytesPerBatch:
    """Transport probe: a batch's JPEG bytes concatenated into one uint8 tensor + offsets."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, positions: list[int]):
        import torch

        blobs = []
        for i in positions:
            with open(self.paths[i], "rb") as handle:
                blobs.append(handle.read())
        offsets = np.cumsum([0] + [len(b) for b in blobs]).tolist()
        return torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8), offsets


def _keep_list(batch):
    return batch


def _identity(batch):
    return batch


def transport_only(paths: list[str], batch: int, workers: int, per_batch: bool) -> float:
    """Images/s of a DataLoader that only reads JPEG bytes (nothing is decoded)."""
    from torch.utils.data import DataLoader

    if per_batch:
        batches = [list(range(s, min(len(paths), s + batch))) for s in range(0, len(paths), batch)]
        loader = DataLoader(BytesPerBatch(paths), batch_size=None, sampler=batches, num_workers=workers,
                            collate_fn=_identity)
    else:
        loader = DataLoader(BytesPerImage(paths), batch_size=batch, num_workers=workers, collate_fn=_keep_list)
    start = time.perf_counter()
    count = 0
    for item in loader:
        count += len(item[1]) - 1 if per_batch else len(item)
    assert count == len(paths)
    return len(paths) / (time.perf_counter() - start)


def bench_embedding(arch: str, count: int, batch: int, device: str, workers: int | None, repeat: int = 1) -> list[dict]:
    import copy

    from mora_retrieval.device import default_workers
    from mora_retrieval.retrieval.embed import EmbedConfig, embed_paths
    from mora_retrieval.retrieval.encoder import load_encoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = load_encoder(arch, None, device=device)
    workers = default_workers() if workers is None else workers
    rows: list[dict] = []

    def row(pipeline: str, measure) -> None:
        rates = [measure() for _ in range(repeat)]
        rows.append({"model": arch, "device": device, "images": count, "batch": batch, "workers": workers,
                     "pipeline": pipeline, "img_s": max(rates)})
        print(f"  {arch} {device} {pipeline:<58} {' '.join(f'{r:9.1f}' for r in rates)} img/s", flush=True)

    def toolkit(fast: bool) -> float:
        start = time.perf_counter()
        embed_paths(encoder, paths, EmbedConfig(batch_size=batch, workers=workers, fast_jpeg=fast))
        _sync(device)
        return count / (time.perf_counter() - start)

    on_cuda = device.startswith("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(Path(tmp), count)
        embed_paths(encoder, paths[:batch], EmbedConfig(batch_size=batch, workers=0))  # warm-up
        fp32 = copy.deepcopy(encoder.model).float()  # the baselines keep fp32 weights (the encoder's are bf16 on CUDA)
        row("plain loop (1 process, PIL, fp32)", lambda: plain_loop(fp32, encoder.preprocess, paths, batch, device))
        row(f"clip-retrieval-style peer ({workers} workers, PIL, {'autocast bf16' if on_cuda else 'fp32'})",
            lambda: peer_loader(fp32, encoder.preprocess, paths, batch, device, workers))
        for fast in (False,) if on_cuda else (False, True):
            name = "GPU JPEG decode, bf16" if on_cuda else ("--fast-jpeg" if fast else "default")
            row(f"toolkit `embed_paths` ({workers} workers, {name})", lambda: toolkit(fast))
        row(f"transport only: JPEG bytes, one tensor per image ({workers} workers)",
            lambda: transport_only(paths, batch, workers, per_batch=False))
        row(f"transport only: JPEG bytes, one buffer per batch ({workers} workers)",
            lambda: transport_only(paths, batch, workers, per_batch=True))
    return rows


NOISE = 1.5


def clustered(n: int, d: int, centres: np.ndarray, rng: np.random.Generator, noise: float = NOISE) -> np.ndarray:
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        x = centres[rng.integers(0, centres.shape[0], m)] + noise * rng.standard_normal((m, d), dtype=np.float32) / np.sqrt(d)
        out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def bench_exact_search(n: int, d: int, batches: list[int], min_seconds: float, device: str) -> list[dict]:
    """queries/s of ``search_vectors`` (k=10) over an exact float16 gallery, per query batch size.

    On CPU the torch exact path (``search_exact_torch``, float32) is timed beside it for context.
    """
    import faiss

    from mora_retrieval.retrieval.index import IndexFolder
    from mora_retrieval.retrieval.search import search_exact_torch, search_vectors

    rng = np.random.default_rng(1)
    centres = rng.standard_normal((2000, d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    stored = clustered(n, d, centres, rng).astype(np.float16)  # what an index folder holds
    queries = clustered(max(batches), d, centres, rng)
    index = faiss.IndexFlatIP(d)
    for s in range(0, n, 65536):
        index.add(stored[s : s + 65536].astype(np.float32))
    folder = IndexFolder(path=Path("<memory>"), manifest={"count": n, "dim": d, "index_type": "Flat"}, items=[],
                         embeddings=stored, index=index)
    paths = {"search_vectors": lambda q: search_vectors(folder, q, 10)}
    if device == "cpu":
        paths["search_exact_torch (cpu)"] = lambda q: search_exact_torch(folder, q, 10, "cpu")
    for search in paths.values():
        search(queries[:1])  # warm-up (moves the gallery to the device on the torch path)
    rows = []
    for b in batches:
        row = {"n": n, "batch": b}
        for name, search in paths.items():
            calls, start = 0, time.perf_counter()
            while True:
                start_row = (calls * b) % (queries.shape[0] - b + 1)
                search(queries[start_row : start_row + b])
                calls += 1
                elapsed = time.perf_counter() - start
                if elapsed >= min_seconds:
                    break
            row[name] = calls * b / elapsed
            print(f"  exact search n={n:,} batch {b:>5} {name:<26}: {row[name]:10.0f} queries/s ({calls} calls)", flush=True)
        rows.append(row)
    return rows


def _ivf_variant(kind: str, quantizer, d: int, nlist: int):
    import faiss

    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "Flat":
        return faiss.IndexIVFFlat(quantizer, d, nlist, ip)
    if kind == "SQ8":
        return faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit, ip)
    if kind == "PQ32x4fs":
        return faiss.IndexIVFPQFastScan(quantizer, d, nlist, 32, 4, ip)
    raise ValueError(kind)


def _measure(index, queries, truth, n_queries: int) -> tuple[float, float]:
    index.search(queries[:10], 10)  # warm-up
    start = time.perf_counter()
    _, found = index.search(queries, 10)
    qps = n_queries / (time.perf_counter() - start)
    recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]))
    return qps, recall


def bench_index(n: int, d: int, n_queries: int, nlist: int, ivf: list[tuple[str, list[int]]], hnsw: list[int],
                train_per_list: int) -> list[dict]:
    """Exact search, IVF variants sharing one trained coarse quantizer (vectors assigned once), HNSW."""
    import faiss
    from faiss.contrib.ivf_tools import add_preassigned

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((2000, d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    base = clustered(n, d, centres, rng)
    queries = clustered(n_queries, d, centres, rng)
    rows = []

    def report(factory: str, params: str, build_s: float, qps: float, recall: float) -> None:
        rows.append({"n": n, "index": factory, "params": params, "build_s": build_s, "qps": qps, "recall10": recall,
                     "speedup": qps / rows[0]["qps"] if rows else 1.0})
        print(f"  {n:>8} {factory:<18} {params:<14} build {build_s:6.1f}s  recall@10 {recall:.3f}  {qps:9.0f} q/s  "
              f"x{rows[-1]['speedup']:.1f}", flush=True)

    exact = faiss.IndexFlatIP(d)
    exact.add(base)
    exact.search(queries[:10], 10)
    start = time.perf_counter()
    _, truth = exact.search(queries, 10)
    report("Flat", "", 0.0, n_queries / (time.perf_counter() - start), 1.0)
    del exact

    start = time.perf_counter()
    sample = base[rng.choice(n, size=min(n, train_per_list * nlist), replace=False)]
    kmeans = faiss.Kmeans(d, nlist, niter=10, seed=0, spherical=True)
    kmeans.train(sample)
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(kmeans.centroids)
    _, assign = quantizer.search(base, 1)
    coarse_s = time.perf_counter() - start
    for kind, nprobes in ivf:
        start = time.perf_counter()
        index = _ivf_variant(kind, quantizer, d, nlist)
        index.train(sample)
        if kind.endswith("fs"):  # fast-scan lists are packed in blocks: no pre-assigned add
            index.add(base)
        else:
            add_preassigned(index, base, assign.ravel())
        build_s = coarse_s + time.perf_counter() - start
        for nprobe in nprobes:
            index.nprobe = nprobe
            qps, recall = _measure(index, queries, truth, n_queries)
            report(f"IVF{nlist},{kind}", f"nprobe={nprobe}", build_s, qps, recall)
        del index
    if hnsw:
        start = time.perf_counter()
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.add(base)
        build_s = time.perf_counter() - start
        for ef in hnsw:
            index.hnsw.efSearch = ef
            qps, recall = _measure(index, queries, truth, n_queries)
            report("HNSW32", f"efSearch={ef}", build_s, qps, recall)
    return rows


def main() -> None:
    import faiss
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--images", type=int, default=512, help="JPEG files for the CPU embedding rows")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers for peer and toolkit (default: the toolkit's)")
    parser.add_argument("--repeat", type=int, default=1, help="time each embedding row this many times, report the best")
    parser.add_argument("--gpu-arch", default="ViT-B-16")
    parser.add_argument("--gpu-images", type=int, default=8192, help="JPEG files for the GPU embedding rows")
    parser.add_argument("--search-n", type=int, default=1_000_000, help="gallery size of the exact-search rows")
    parser.add_argument("--search-batches", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument("--search-seconds", type=float, default=3.0, help="minimum timed seconds per search row")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="index-type table sizes")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--train-per-list", type=int, default=64, help="IVF training sample per list (toolkit: 256)")
    parser.add_argument("--skip-embed", action="store_true")
    parser.add_argument("--skip-search", action="store_true", help="skip the exact-search batch-size rows")
    parser.add_argument("--skip-index", action="store_true", help="skip the index-type table (the slow part on CPU)")
    parser.add_argument("--no-hnsw", action="store_true", help="skip HNSW (slow to build on few cores)")
    args = parser.parse_args()

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"# retrieval benchmark, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"device: {device} ({torch.cuda.get_device_name() if device == 'cuda' else platform.processor() or platform.machine()}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, faiss {faiss.__version__} (GPUs: {faiss.get_num_gpus()})\n")
    if not args.skip_embed:
        if device == "cuda":
            emb_rows = bench_embedding(args.gpu_arch, args.gpu_images, 256, device, args.workers, args.repeat)
        else:
            emb_rows = bench_embedding("mora-tiny", args.images, 128, device, args.workers, args.repeat)
        peer = next(r["img_s"] for r in emb_rows if r["pipeline"].startswith("clip-retrieval"))
        print("\n| model | device | images | batch | pipeline | images/s | vs peer |")
        print("|---|---|---:|---:|---|---:|---:|")
        for r in emb_rows:
            print(f"| {r['model']} | {r['device']} | {r['images']} | {r['batch']} | {r['pipeline']} | {r['img_s']:.1f} | "
                  f"{r['img_s'] / peer:.2f}x |")
        print()
    if not args.skip_search:
        search_rows = bench_exact_search(args.search_n, args.dim, args.search_batches, args.search_seconds, device)
        names = [k for k in search_rows[0] if k not in ("n", "batch")]
        print("\n| gallery | query batch | " + " | ".join(f"{name} (queries/s)" for name in names) + " |")
        print("|---:|---:|" + "---:|" * len(names))
        for r in search_rows:
            print(f"| {r['n']:,} x {args.dim} | {r['batch']:,} | " + " | ".join(f"{r[name]:,.0f}" for name in names) + " |")
        print()
    if args.skip_index:
        return
    all_rows = []
    for n in args.sizes:
        small = n <= 200_000
        nlist = 1024 if small else 2048
        ivf = [("Flat", [8, 16, 32, 64, 128]), ("SQ8", [32, 64])] + ([("PQ32x4fs", [32])] if small else [])
        hnsw = [64, 128] if small and not args.no_hnsw else []
        all_rows += bench_index(n, args.dim, args.queries if small else max(100, int(args.queries / 2.5)), nlist, ivf, hnsw,
                                args.train_per_list)
    print("\n| vectors | index | search params | build (s) | queries/s | Recall@10 vs exact | speed-up vs exact |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for r in all_rows:
        print(f"| {r['n']:,} | {r['index']} | {r['params']} | {r['build_s']:.1f} | {r['qps']:.0f} | {r['recall10']:.3f} | {r['speedup']:.1f}x |")


if __name__ == "__main__":
    main()
