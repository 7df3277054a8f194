"""``TrainModule``: the interface a task implements to be trained by the engine.

A task is an ``nn.Module`` whose ``forward(batch)`` returns the scalar loss of a batch that the
engine has already moved to the device. It names its validation metric (``main_metric``,
``higher_is_better``) and implements ``evaluate(device)``, which the engine calls once per epoch
in eval mode under ``torch.no_grad()``, with the engine's ``precision`` and ``num_workers``.

Defaults a task may override:

- ``optimizer_param_groups``: every parameter with ``requires_grad``; weight decay only on
  tensors with two or more dimensions (matrices such as LoRA/MoRA factors and heads), none on
  biases, norms and 1-D magnitude vectors.
- ``trainable_state_dict``: the parameters with ``requires_grad`` plus the persistent buffers.
  Frozen weights (the pretrained backbone) are never written to checkpoints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import TrainingError

if TYPE_CHECKING:
    from .config import TrainConfig


class TrainModule(nn.Module):
    """Base class of everything the :class:`~mora_retrieval.engine.trainer.Trainer` trains."""

    main_metric: str = "loss"
    higher_is_better: bool = False
    #: Set by the Trainer to the precision and DataLoader workers it resolved, for ``evaluate`` to use too.
    precision: str = "fp32"
    num_workers: int = 0

    def forward(self, batch) -> torch.Tensor:  # pragma: no cover - abstract
        """Return the scalar training loss of ``batch`` (already on the device)."""
        raise NotImplementedError

    def evaluate(self, device: torch.device) -> dict[str, float]:  # pragma: no cover - abstract
        """Validation metrics; must contain ``main_metric``."""
        raise NotImplementedError

    def optimizer_param_groups(self, config: "TrainConfig") -> list[dict]:
        """AdamW parameter groups: decay on >=2-D trainable tensors, none on the rest."""
        decay, no_decay = [], []
        for param in self.parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        groups = [{"params": decay, "weight_decay": config.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return [group for group in groups if group["params"]]

    def _trainable_keys(self) -> list[str]:
        params = dict(self.named_parameters())
        keys = []
        for key, value in self.state_dict(keep_vars=True).items():
            param = params.get(key)
            if param is None or param.requires_grad:
                keys.append(key)  # a buffer, or a trainable parameter
        return keys

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable parameters and persistent buffers, detached (what a checkpoint holds)."""
        state = self.state_dict(keep_vars=True)
        return {key: state[key].detach() for key in self._trainable_keys()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a :meth:`trainable_state_dict`; key or shape mismatches are one-line errors."""
        expected = self._trainable_keys()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise TrainingError(
                f"trainable state does not fit {type(self).__name__}: "
                f"missing {missing[:3]}{'…' if len(missing) > 3 else ''}, "
                f"unexpected {unexpected[:3]}{'…' if len(unexpected) > 3 else ''}")
        current = self.state_dict()
        for key in expected:
            if tuple(current[key].shape) != tuple(state[key].shape):
                raise TrainingError(f"trainable state does not fit {type(self).__name__}: {key} has shape "
                                    f"{tuple(state[key].shape)}, expected {tuple(current[key].shape)}")
        self.load_state_dict(state, strict=False)
