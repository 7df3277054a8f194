"""Forward cost of the plain, adapted (unmerged) and merged models, measured side by side.

    python benchmarks/bench_adapters.py --arch ViT-B-16 --batch 8 [--device cuda]

Prints one Markdown table row per model; targets: merged within 2% of plain, unmerged within
10% (docs/protocols.md: merging leaves no inference overhead).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import warnings

import torch
import torch.utils.benchmark as tbench

from mora_retrieval.adapters import AdapterConfig, add_adapters, cached_adapted_weights, merge_adapters
from mora_retrieval.model.backbone import image_size_of, load_backbone


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="mora-tiny")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--min-run-time", type=float, default=3.0)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    plain = load_backbone(args.arch, device=args.device).model.eval()
    adapted = add_adapters(copy.deepcopy(plain), AdapterConfig(method="mora", targets=("q", "v"), layers=2)).eval()
    merged = merge_adapters(copy.deepcopy(adapted)).eval()
    size = image_size_of(plain)
    images = torch.randn(args.batch, 3, size, size, device=args.device)
    tokens = torch.randint(1, 1000, (args.batch, plain.context_length), device=args.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.device == "cuda" else torch.autocast("cpu", enabled=False)

    def forward(model):
        with torch.no_grad(), autocast:
            model.encode_image(images)
            model.encode_text(tokens)
        if args.device == "cuda":
            torch.cuda.synchronize()

    def forward_cached(model):
        with cached_adapted_weights():
            forward(model)

    rows = {}
    for _ in range(3):  # interleave to even out drift
        for name, fn, model in (
            ("plain", forward, plain),
            ("adapted (unmerged)", forward, adapted),
            ("adapted (unmerged, cached weights)", forward_cached, adapted),
            ("merged", forward, merged),
        ):
            timer = tbench.Timer("fn(model)", globals={"fn": fn, "model": model})
            rows.setdefault(name, []).append(timer.blocked_autorange(min_run_time=args.min_run_time).median)
    base = min(rows["plain"])
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"# {args.arch}, batch {args.batch}, image+text forward, {device}, {datetime.date.today()}")
    print("| model | ms / batch | vs plain |")
    print("|---|---|---|")
    for name, times in rows.items():
        t = min(times)
        print(f"| {name} | {1000 * t:.2f} | {t / base:.3f}x |")


if __name__ == "__main__":
    main()
