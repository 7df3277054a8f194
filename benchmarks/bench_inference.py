"""Inference time per sample against trainable parameters (the paper's Figure 6).

    python benchmarks/bench_inference.py                       # ViT-B-16, batch 1 and 64
    python benchmarks/bench_inference.py --arch mora-tiny --rounds 5
    python benchmarks/bench_inference.py --batches 1 --rounds 3 --device cuda

For each batch size, the same inputs go through the classifier of every row (image tower, text
tower, L2-normalised ``[image | text]`` features, a linear head of ``--classes`` outputs):

- ``plain``: the backbone alone;
- ``MoRA / LoRA / DoRA (merged)``: the adapter folded into the weights (a plain open_clip model);
- ``MoRA (unmerged)``: the adapter evaluated in every forward, as during training;
- ``DCP``, ``MMP``: the prompt baselines (never mergeable), given each sample's missing case.

Adapters use the toolkit's Food-101 defaults (r = r_s = 4 on q, v of the last two blocks); DCP
and MMP their defaults (36 and 16 prompt tokens in the first six blocks; fewer blocks in a
shallower tower). Weights are random: speed does not depend on them. Rows are timed in
interleaved rounds (the order rotates every round): per row and round one block of forwards
(about ``--block`` seconds, at least one forward), after ``--warmup`` untimed forwards. The table
gives the best round (noise on a shared machine only adds time; every round is kept in
``results.json``). It prints the table and MoRA's time as a share of DCP's (the paper: 25.90%),
and writes ``figure6.png`` and ``results.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import io
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from mora_retrieval.adapters import AdapterConfig, add_adapters, merge_adapters, missing_cases, trainable_share
from mora_retrieval.model.backbone import image_size_of, load_backbone
from mora_retrieval.fileio import atomic_write, write_json

PAPER_SHARE = 25.90  # MoRA's inference time as a percentage of DCP's, as the paper states
CAPTIONS = ("a bowl of ramen with a soft boiled egg", "grilled salmon on rice", "chocolate cake with berries",
            "a plate of pad thai", "caesar salad with croutons", "")


def build_rows(arch: str, device: str) -> list[tuple[str, torch.nn.Module, int]]:
    """``(name, model, trainable adapter parameters)`` for every row, all on one random backbone."""
    torch.manual_seed(0)
    plain = load_backbone(arch, None, device=device).model.eval()
    rows = [("plain", plain, 0)]
    adapted = {}
    for method in ("mora", "lora", "dora"):
        model = add_adapters(copy.deepcopy(plain), AdapterConfig(method=method, r=4, r_shared=4, targets=("q", "v"),
                                                                 layers=2)).eval()
        adapted[method] = (model, trainable_share(model)[0])
        rows.append((f"{method.replace('mora', 'MoRA').replace('lora', 'LoRA').replace('dora', 'DoRA')} (merged)",
                     merge_adapters(copy.deepcopy(model)).eval(), adapted[method][1]))
    rows.append(("MoRA (unmerged)", *adapted["mora"]))
    depth = min(6, len(plain.visual.transformer.resblocks), len(plain.transformer.resblocks))  # 6 unless tiny
    for method in ("dcp", "mmp"):
        model = add_adapters(copy.deepcopy(plain), AdapterConfig(method=method, prompt_depth=depth)).eval()
        rows.append((method.upper(), model, trainable_share(model)[0]))
    return rows


def classify(model: torch.nn.Module, head: torch.nn.Linear, images: torch.Tensor, tokens: torch.Tensor,
             cases: torch.Tensor) -> torch.Tensor:
    """Both towers and the head, as the classification task runs them (``CLIPClassifier``)."""
    with missing_cases(model, cases):
        image = F.normalize(model.encode_image(images).float(), dim=-1)
        text = F.normalize(model.encode_text(tokens).float(), dim=-1)
    return head(torch.cat([image, text], dim=-1))


def time_rows(rows, head, inputs, rounds: int, warmup: int, block: float, device: str) -> dict[str, list[float]]:
    """Seconds per forward of each row, interleaved: round ``k`` starts at row ``k`` of the list.

    Each timing is a block of forwards lasting about ``block`` seconds (at least one forward),
    sized from the warm-up, so short forwards are not read off a single call.
    """
    def run(model, number: int) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            for _ in range(number):
                classify(model, head, *inputs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / number

    numbers = {}
    for name, model, _ in rows:
        first = min(run(model, 1) for _ in range(max(warmup, 1)))
        numbers[name] = max(1, round(block / first))
    times: dict[str, list[float]] = {name: [] for name, _, _ in rows}
    for k in range(rounds):
        for name, model, _ in rows[k % len(rows):] + rows[:k % len(rows)]:
            times[name].append(run(model, numbers[name]))
    return times


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def table(rows, times, batch: int) -> tuple[str, dict[str, float]]:
    """The Markdown table of one batch size and ``{row: ms per sample}`` (best round: on a shared machine
    the noise only ever adds time)."""
    per_sample = {name: 1000 * min(times[name]) / batch for name, _, _ in rows}
    plain, dcp = per_sample["plain"], per_sample["DCP"]
    lines = ["| model | trainable params | ms / sample | vs plain | % of DCP |", "|---|---:|---:|---:|---:|"]
    for name, _, params in rows:
        t = per_sample[name]
        lines.append(f"| {name} | {params:,} | {t:.2f} | {t / plain:.2f}x | {100 * t / dcp:.1f}% |")
    return "\n".join(lines), per_sample


def plot(results: dict, path: Path) -> Path:
    """One panel per batch size: ms per sample against trainable parameters (log), plain as a line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    batches = results["batches"]
    fig = Figure(figsize=(5.2 * len(batches), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(batches), squeeze=False)[0]
    for ax, (batch, entry) in zip(axes, batches.items()):
        for name, row in entry["rows"].items():
            if name == "plain":
                ax.axhline(row["ms_per_sample"], color="grey", linestyle="--", label="plain (no adapter)")
                continue
            marker = "s" if name in ("DCP", "MMP") else ("^" if "unmerged" in name else "o")
            ax.scatter(row["params"], row["ms_per_sample"], marker=marker, s=50, label=name)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("inference time per sample (ms)")
        ax.set_title(f"{results['arch']}, batch {batch}")
        ax.legend(fontsize="small")
    fig.suptitle(f"{results['device']}, {results['date']}", fontsize="small")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getvalue())
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="ViT-B-16")
    parser.add_argument("--batches", default="1,64", help="batch sizes, comma-separated")
    parser.add_argument("--rounds", type=int, default=5, help="timed forwards per row and batch size")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards per row first (at least one)")
    parser.add_argument("--block", type=float, default=0.5, help="seconds of forwards per timing (at least one)")
    parser.add_argument("--classes", type=int, default=101, help="head outputs (Food-101: 101)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of torch [default: torch's]; 1 keeps a shared machine's noise down")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-inference"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if not batches or min(batches) < 1 or args.rounds < 1 or args.warmup < 0 or args.block < 0:
        raise SystemExit("error: --batches must be positive integers, --rounds >= 1, --warmup and --block >= 0")

    rows = build_rows(args.arch, args.device)
    plain = rows[0][1]
    with torch.no_grad():
        width = plain.encode_text(torch.zeros(1, plain.context_length, dtype=torch.long, device=args.device)).shape[-1]
    head = torch.nn.Linear(2 * width, args.classes).to(args.device).eval()
    size = image_size_of(plain)
    size = (size, size) if isinstance(size, int) else tuple(size)
    tokenizer = load_backbone(args.arch, None, device="cpu").tokenizer
    results = {"arch": args.arch, "device": device_name(args.device), "date": str(datetime.date.today()),
               "torch": torch.__version__, "rounds": args.rounds, "warmup": args.warmup, "batches": {}}
    print(f"# {args.arch}, image + text towers + head, {results['device']}, {results['date']}, "
          f"best of {args.rounds} interleaved rounds")
    for batch in batches:
        gen = torch.Generator().manual_seed(batch)
        images = torch.randn(batch, 3, *size, generator=gen).to(args.device)
        tokens = tokenizer([CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]).to(args.device)
        cases = (torch.arange(batch) % 3).to(args.device)  # complete, text missing, image missing in turn
        times = time_rows(rows, head, (images, tokens, cases), args.rounds, args.warmup, args.block, args.device)
        text, per_sample = table(rows, times, batch)
        share = 100 * per_sample["MoRA (merged)"] / per_sample["DCP"]
        print(f"\n## batch {batch}\n\n{text}\n")
        print(f"MoRA (merged) takes {share:.2f}% of DCP's time per sample (paper: {PAPER_SHARE:.2f}%); "
              f"unmerged MoRA {100 * per_sample['MoRA (unmerged)'] / per_sample['DCP']:.2f}%; "
              f"MMP {100 * per_sample['MMP'] / per_sample['DCP']:.2f}%.")
        results["batches"][str(batch)] = {
            "mora_share_of_dcp_percent": share,
            "rows": {name: {"params": params, "ms_per_sample": per_sample[name],
                            "median_ms_per_sample": 1000 * statistics.median(times[name]) / batch,
                            "seconds_per_forward": times[name]} for name, _, params in rows}}
    write_json(args.out / "results.json", results)
    print(f"\nwritten: {plot(results, args.out / 'figure6.png')}, {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
