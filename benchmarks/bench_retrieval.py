"""Retrieval benchmark: embedding throughput and FAISS index speed/recall.

1. Embedding (images/s): the toolkit's pipeline (``retrieval.embed.embed_paths``: DataLoader
   workers, overlapped decoding, bf16 + GPU JPEG decoding on CUDA) against a plain loop
   (PIL decode + open_clip preprocess + fp32 ``encode_image``, one process). mora-tiny on
   CPU; ViT-B-16 (random weights: speed does not depend on them) on GPU when available.
   Images are synthetic 640x480 JPEGs (COCO-sized).
2. Index types (queries/s, Recall@10 against exact search) at 100k and 1M vectors, d=512.
   The vectors are random but clustered like embeddings: ``normalize(c_j + 1.5 g)`` with
   2,000 random unit centres ``c_j`` and Gaussian noise ``g`` of unit expected norm; queries
   come from the same distribution. Uniformly random vectors have no neighbourhood structure
   and no approximate index does well on them. Queries are searched as one batch. To keep the
   run short on small machines the IVF variants share one coarse quantizer (spherical k-means,
   10 iterations, on ``--train-per-list``·nlist vectors) and the vectors are assigned to lists
   once (``faiss.contrib.ivf_tools.add_preassigned``); search speed and recall do not depend
   on that shortcut. nlist is 1024 at 100k and 2048 at 1M.

Usage: ``python benchmarks/bench_retrieval.py [--sizes 100000 1000000] [--queries 500]``;
prints a Markdown table (paste it into ``BENCHMARKS.md``).
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


def make_images(folder: Path, count: int, seed: int = 0) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(480, 640, 3), dtype=np.uint8)
    paths = []
    for i in range(count):
        img = np.roll(base, shift=int(rng.integers(0, 640)), axis=1)
        path = folder / f"{i:06d}.jpg"
        Image.fromarray(img).save(path, quality=90)
        paths.append(str(path))
    return paths


def plain_loop(model, preprocess, paths: list[str], batch: int, device: str) -> float:
    import torch
    from PIL import Image

    start = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(paths), batch):
            imgs = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths[s : s + batch]]).to(device)
            model.encode_image(imgs)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return len(paths) / (time.perf_counter() - start)


def bench_embedding(arch: str, count: int, batch: int, device: str) -> list[dict]:
    import torch

    from mora_retrieval.retrieval.embed import EmbedConfig, embed_paths
    from mora_retrieval.retrieval.encoder import load_encoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = load_encoder(arch, None, device=device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(Path(tmp), count)
        embed_paths(encoder, paths[:batch], EmbedConfig(batch_size=batch, workers=0))  # warm-up
        plain = plain_loop(encoder.model.float(), encoder.preprocess, paths, batch, device)
        for fast in (False, True):
            start = time.perf_counter()
            embed_paths(encoder, paths, EmbedConfig(batch_size=batch, fast_jpeg=fast))
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            ours = count / (time.perf_counter() - start)
            rows.append({"model": arch, "device": device, "images": count, "plain_img_s": plain, "toolkit_img_s": ours,
                         "variant": "GPU JPEG decode, bf16" if device.startswith("cuda") else ("--fast-jpeg" if fast else "default")})
            if device.startswith("cuda"):
                break  # fast_jpeg only affects the CPU decoding path
    return rows


NOISE = 1.5


def clustered(n: int, d: int, centres: np.ndarray, rng: np.random.Generator, noise: float = NOISE) -> np.ndarray:
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        x = centres[rng.integers(0, centres.shape[0], m)] + noise * rng.standard_normal((m, d), dtype=np.float32) / np.sqrt(d)
        out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


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
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--train-per-list", type=int, default=64, help="IVF training sample per list (toolkit: 256)")
    parser.add_argument("--skip-embed", action="store_true")
    parser.add_argument("--no-hnsw", action="store_true", help="skip HNSW (slow to build on few cores)")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"# retrieval benchmark, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"device: {device} ({torch.cuda.get_device_name() if device == 'cuda' else platform.processor() or platform.machine()}), "
          f"torch threads {torch.get_num_threads()}, faiss {faiss.__version__} (GPUs: {faiss.get_num_gpus()})\n")
    if not args.skip_embed:
        emb_rows = bench_embedding("mora-tiny", args.images, 128, "cpu" if device == "cpu" else device)
        if device == "cuda":
            emb_rows += bench_embedding("ViT-B-16", 4 * args.images, 256, device)
        print("| model | device | images | plain loop (img/s) | toolkit pipeline | toolkit (img/s) | speed-up |")
        print("|---|---|---:|---:|---|---:|---:|")
        for r in emb_rows:
            print(f"| {r['model']} | {r['device']} | {r['images']} | {r['plain_img_s']:.1f} | {r['variant']} | {r['toolkit_img_s']:.1f} | "
                  f"{r['toolkit_img_s'] / r['plain_img_s']:.2f}x |")
        print()
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
