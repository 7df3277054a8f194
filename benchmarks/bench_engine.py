"""Per-step overhead of the training engine against a bare hand-written loop.

    python benchmarks/bench_engine.py [--steps 300] [--batch 64] [--width 512] [--device cuda]

(On a busy small CPU machine set OMP_NUM_THREADS=1: oversubscribed threads dominate otherwise.)

Both loops train the same MLP (AdamW, same DataLoader settings, same data). The engine adds
its sampler, ``to_device``, autocast context, scheduler, loss accumulation on the device and
the log-point syncs; validation and checkpoints are excluded (the engine's ``time_s`` is the
training time of the epoch). Prints one Markdown table. Target: engine within 5% of bare.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mora_retrieval.engine import Trainer, TrainConfig, TrainModule, to_device


class MLPTask(TrainModule):
    main_metric = "loss"
    higher_is_better = False

    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, batch) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def evaluate(self, device) -> dict[str, float]:
        return {"loss": 0.0}


def bare_loop(task: MLPTask, data: TensorDataset, batch: int, device: torch.device) -> float:
    """Seconds for one epoch of a minimal loop (shuffle, AdamW, no bookkeeping)."""
    opt = torch.optim.AdamW(task.parameters(), lr=1e-3)
    loader = DataLoader(data, batch_size=batch, shuffle=True, drop_last=True, pin_memory=device.type == "cuda")
    task.train()
    start = time.perf_counter()
    for item in loader:
        loss = task(to_device(item, device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    n = args.steps * args.batch
    data = TensorDataset(torch.randn(n, args.width), torch.randn(n, args.width))
    bare, engine = [], []
    for repeat in range(args.repeats):  # interleaved to even out drift
        torch.manual_seed(0)
        task = MLPTask(args.width).to(device)
        bare.append(bare_loop(task, data, args.batch, device))
        torch.manual_seed(0)
        config = TrainConfig(epochs=1, batch_size=args.batch, lr=1e-3, precision="fp32", device=args.device,
                             log_every=50)
        with tempfile.TemporaryDirectory() as run:
            result = Trainer(MLPTask(args.width), config, Path(run) / "r", data, quiet=True).fit()
        engine.append(result.history[0]["time_s"])
    best_bare, best_engine = min(bare), min(engine)
    per_step = (best_engine - best_bare) / args.steps * 1e6
    print(f"<!-- {datetime.date.today()} {platform.processor() or platform.machine()} torch {torch.__version__} "
          f"device {device} -->")
    print("| loop | steps | batch | width | s/epoch (best of %d) | steps/s | overhead |" % args.repeats)
    print("|---|---|---|---|---|---|---|")
    for name, secs in (("bare", best_bare), ("engine", best_engine)):
        over = "" if name == "bare" else f"{100 * (secs / best_bare - 1):+.1f}% ({per_step:+.0f} µs/step)"
        print(f"| {name} | {args.steps} | {args.batch} | {args.width} | {secs:.3f} | {args.steps / secs:.1f} | {over} |")


if __name__ == "__main__":
    main()
