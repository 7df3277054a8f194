"""The real ``train cirr`` path, end to end: triplets/s of stage 1 from image files, from the
prepared-image cache, and from the cache with ``--cache-frozen``, beside the model-bound figure.

    OMP_NUM_THREADS=1 python benchmarks/bench_train_e2e.py --arch mora-tiny --batch 12            # CPU
    python benchmarks/bench_train_e2e.py --arch ViT-B-16 --batch 128 --world medium --device cuda --workers 12

Generates a shapes world with large images (``--image-size``, default 320; ``--world-dir``
reuses one), then runs the library's ``train_cirr`` (stage 1 only, ``--epochs`` epochs, random
weights) once per variant, each in its own process:

* ``files``: ``--no-prepared``, every epoch decodes the PNGs and runs the PIL transform;
* ``prepared``: the prepared cache (built before training; its build time is reported apart);
* ``prepared+cache-frozen``: the same with ``--cache-frozen`` (epoch 1 fills the prefix cache).

Steady state is the epochs after the first (the engine's own ``samples_per_s`` of each epoch,
training time only, validation excluded): ``sum(samples) / sum(time)`` over epochs 2.. . The
``model-bound`` rows are :mod:`bench_cir`'s ``mora`` and ``mora+cache`` variants (random
tensors already on the device, same model and batch), run in the same invocation. Prints one
Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = {
    "files": {"prepared": False, "cache_frozen": False},
    "prepared": {"prepared": True, "cache_frozen": False},
    "prepared+cache-frozen": {"prepared": True, "cache_frozen": True},
}


def run_variant(args: argparse.Namespace) -> dict:
    """One ``train_cirr`` run (stage 1 only) of ``args.variant``; its per-epoch figures."""
    import warnings

    import torch

    from mora_retrieval.engine import TrainConfig
    from mora_retrieval.tasks.cir import CIRSettings, train_cirr
    from mora_retrieval.tasks.cir.inputs import cir_inputs
    from mora_retrieval.data.images import preprocess_spec
    from mora_retrieval.model.backbone import load_backbone

    warnings.simplefilter("ignore")
    options = VARIANTS[args.variant]
    root = Path(args.world_dir) / "cirr"
    prepared_dir = Path(args.run_root) / "prepared"
    build_s = None
    if options["prepared"] and not any(prepared_dir.glob("*.npy")):  # build the caches first, so the build is timed apart from the epochs
        backbone = load_backbone(args.arch, None)
        start = time.perf_counter()
        cir_inputs(root, preprocess_spec(backbone.model, "targetpad"), backbone.tokenizer, prepared_dir=prepared_dir,
                   workers=args.workers)
        build_s = time.perf_counter() - start
    settings = CIRSettings.with_defaults(str(root), str(Path(args.run_root) / args.variant), "mora", arch=args.arch,
                                         pretrained=None, prepared=options["prepared"],
                                         prepared_dir=str(prepared_dir), cache_frozen=options["cache_frozen"])
    settings.stage1 = TrainConfig(epochs=args.epochs, batch_size=args.batch, lr=1e-4, device=args.device,
                                  num_workers=args.workers, log_every=1000)
    settings.stage2 = None
    settings.eval_batch_size = max(args.batch, 64)
    torch.manual_seed(0)
    train_cirr(settings, quiet=True)
    history = [json.loads(line) for line in
               (Path(settings.run_dir) / "stage1" / "metrics.jsonl").read_text().splitlines()]
    steps = json.loads((Path(settings.run_dir) / "stage1" / "config.json").read_text())["resolved"]["steps_per_epoch"]
    later = history[1:]
    samples = sum(r["samples_per_s"] * r["time_s"] for r in later)
    return {"variant": args.variant, "steps_per_epoch": steps, "build_s": build_s,
            "first_epoch": history[0]["samples_per_s"],
            "steady": samples / sum(r["time_s"] for r in later)}


def model_bound(args: argparse.Namespace, variant: str) -> float:
    cmd = [sys.executable, str(HERE / "bench_cir.py"), "--arch", args.arch, "--batch", str(args.batch), "--steps",
           str(args.model_steps), "--device", args.device, "--variant", variant]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return json.loads(out)["triplets_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="mora-tiny")
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=3, help="at least 2: epoch 1 is not steady state")
    parser.add_argument("--world", default="small", help="shapes-world size (tiny, small, medium)")
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--world-dir", default=None, help="reuse a generated world (its --image-size is not checked)")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-steps", type=int, default=20)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--run-root", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2")
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-train-e2e-") as tmp:
        if args.world_dir is None:
            from mora_retrieval.data.shapes import generate_shapes_world

            args.world_dir = str(Path(tmp) / "world")
            generate_shapes_world(args.world_dir, args.world, image_size=args.image_size)
        rows = []
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--arch", args.arch, "--batch", str(args.batch), "--epochs",
                   str(args.epochs), "--world-dir", args.world_dir, "--workers", str(args.workers), "--device",
                   args.device, "--variant", variant, "--run-root", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"error: variant {variant} failed:\n{proc.stderr[-2000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        bound = {"mora": model_bound(args, "mora"), "mora+cache": model_bound(args, "mora+cache")}
    if args.device.startswith("cuda"):
        import torch

        device = torch.cuda.get_device_name()
    else:
        device = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    print(f"# train cirr stage 1, {args.arch}, batch {args.batch}, {args.workers} workers, shapes world "
          f"'{args.world}' at {args.image_size} px ({rows[0]['steps_per_epoch']} steps an epoch), {device}, "
          f"{datetime.date.today()}")
    print("| run | epoch 1 (triplets/s) | steady state, epochs 2+ (triplets/s) | share of model-bound |")
    print("|---|---:|---:|---:|")
    for r in rows:
        bound_of = bound["mora+cache" if "cache-frozen" in r["variant"] else "mora"]
        build = "" if not r["variant"].startswith("prepared") else (
            " (cache reused)" if r["build_s"] is None else f" (cache built first, {r['build_s']:.1f} s)")
        print(f"| `train cirr` {r['variant']}{build} | {r['first_epoch']:.1f} | {r['steady']:.1f} | "
              f"{r['steady'] / bound_of:.0%} |")
    for name, value in bound.items():
        print(f"| model-bound (`bench_cir.py` {name}) | — | {value:.1f} | 100% |")


if __name__ == "__main__":
    main()
