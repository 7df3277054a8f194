"""Stage-1 CIR training speed: CLIP4CIR + MoRA (adapters in the last blocks) vs a plain loop.

    python benchmarks/bench_cir.py --arch mora-tiny --batch 64 --steps 20            # CPU
    python benchmarks/bench_cir.py --arch ViT-B-16 --batch 256 --steps 20 --device cuda

Each variant runs in its own process (so peak memory is its own): ``plain`` fine-tunes the
whole model with AdamW in a bare loop (fp32 on CPU, bf16 autocast on GPU); ``mora`` is the
toolkit's stage-1 module (MoRA r=4 on q, v of the last 2 blocks: no backward pass runs through
the frozen blocks below); ``mora+cache`` adds the frozen-prefix cache (``--cache-frozen``), whose
warm-up steps fill the cache so the timed steps are those of later epochs. Reports triplets/s (after warm-up) and peak memory (CUDA: peak
allocated; CPU: peak RSS of the process).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import subprocess
import sys
import time


def run_variant(args: argparse.Namespace) -> dict:
    import warnings

    import torch

    from mora_retrieval.adapters import AdapterConfig, add_adapters
    from mora_retrieval.model.backbone import image_size_of, load_backbone
    from mora_retrieval.tasks.cir.stages import CIRStage1

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    device = torch.device(args.device)
    model, _, tokenizer = load_backbone(args.arch, device=args.device)
    if args.variant.startswith("mora"):
        add_adapters(model, AdapterConfig(method="mora", targets=("q", "v"), layers=2))
    module = CIRStage1(model, tokenizer, validation=None).to(device).train()
    if args.variant == "mora+cache":
        module.enable_prefix_cache(device, 2 * args.batch, args.batch)  # warm-up steps fill it: timed steps are later epochs
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    size = image_size_of(model)
    batch = {
        "reference": torch.randn(args.batch, 3, size, size, device=device),
        "target": torch.randn(args.batch, 3, size, size, device=device),
        "tokens": tokenizer([f"make circle {i} blue" for i in range(args.batch)]).to(device),
        "caption": [f"make circle {i} blue" for i in range(args.batch)],
        "reference_row": torch.arange(args.batch, device=device),
        "target_row": torch.arange(args.batch, 2 * args.batch, device=device),
        "index": torch.arange(args.batch, device=device),
    }
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            loss = module(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"variant": args.variant, "triplets_per_s": args.batch * args.steps / elapsed, "peak_bytes": peak,
            "trainable": sum(p.numel() for p in params)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="mora-tiny")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    rows = []
    for variant in ("plain", "mora", "mora+cache"):
        cmd = [sys.executable, __file__, "--arch", args.arch, "--batch", str(args.batch), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--device", args.device, "--variant", variant]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    if args.device.startswith("cuda"):
        import torch

        device = torch.cuda.get_device_name()
    else:
        device = f"CPU ({platform.machine()}, {__import__('os').cpu_count()} cores)"
    print(f"# stage-1 CIR training, {args.arch}, batch {args.batch}, {device}, {datetime.date.today()}")
    print("| variant | trainable params | triplets/s | peak memory (MiB) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['trainable']:,} | {r['triplets_per_s']:.1f} | {r['peak_bytes'] / 2**20:.0f} |")
    plain = rows[0]
    for row in rows[1:]:
        print(f"\n{row['variant']} vs plain: {row['triplets_per_s'] / plain['triplets_per_s']:.2f}x triplets/s, "
              f"{row['peak_bytes'] / plain['peak_bytes']:.2f}x peak memory")


if __name__ == "__main__":
    main()
