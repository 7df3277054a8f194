"""Toy tasks and data for the engine tests (a 2-layer MLP regression behind a frozen layer)."""

from __future__ import annotations

import os
import signal

import torch
from torch import nn
from torch.utils.data import Dataset

from mora_retrieval.engine import TrainModule


class ToyData(Dataset):
    """``n`` samples of ``{"x": [8], "y": [1]}``, a fixed function of the index."""

    def __init__(self, n: int = 64, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=gen)
        self.y = self.x @ torch.randn(8, 1, generator=gen) + 0.1 * torch.randn(n, 1, generator=gen)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i]}


class ToyTask(TrainModule):
    """MSE regression; hooks to inject failures at the n-th forward (1-based) of this instance.

    ``script``: validation values returned epoch by epoch instead of the real validation MSE.
    """

    main_metric = "mse"
    higher_is_better = False

    def __init__(self, dropout: float = 0.0, seed: int = 0, script: list[float] | None = None,
                 interrupt_at: int | None = None, sigint_at: int | None = None, nan_at: int | None = None,
                 higher_is_better: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 1))
        self.register_buffer("scale", torch.ones(1))
        self.script = script
        self.interrupt_at, self.sigint_at, self.nan_at = interrupt_at, sigint_at, nan_at
        self.higher_is_better = higher_is_better
        self.forwards = 0
        self.evaluations = 0
        self.snapshots: list[dict] = []  # trainable state at each evaluate()
        self.val = ToyData(32, seed=1)

    def forward(self, batch: dict) -> torch.Tensor:
        self.forwards += 1
        if self.forwards == self.interrupt_at:
            raise KeyboardInterrupt
        if self.forwards == self.sigint_at:
            os.kill(os.getpid(), signal.SIGINT)
        out = self.net(self.frozen(batch["x"]))
        self.last_dtype = out.dtype  # bf16 under autocast
        pred = out * self.scale
        loss = nn.functional.mse_loss(pred, batch["y"])
        if self.forwards == self.nan_at:
            loss = loss * float("nan")
        return loss

    def evaluate(self, device) -> dict[str, float]:
        self.snapshots.append({k: v.detach().clone() for k, v in self.trainable_state_dict().items()})
        self.evaluations += 1
        if self.script is not None:
            return {"mse": self.script[self.evaluations - 1], "aux": float(self.evaluations)}
        pred = self.net(self.frozen(self.val.x.to(device)))
        return {"mse": float(nn.functional.mse_loss(pred, self.val.y.to(device)))}


def params_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
