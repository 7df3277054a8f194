"""``TrainModule``: the interface a task implements to be trained by the engine.

A task is an ``nn.Module`` whose ``forward(batch)`` returns the scalar loss of a batch already on the
device. It names its validation metric (``main_metric``, ``higher_is_better``) and implements
``evaluate(device)``, which the engine calls once per epoch in eval mode under ``torch.no_grad()``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import TrainingError
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

    def optimizer_param_groups(self, config: TrainConfig) -> list[dict]:
        """AdamW parameter groups: weight decay on >=2-D trainable tensors (LoRA/MoRA factors, heads),
        none on biases, norms and 1-D magnitude vectors."""
        trainable = [param for param in self.parameters() if param.requires_grad]
        groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": config.weight_decay},
                  {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
        return [group for group in groups if group["params"]]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable parameters and persistent buffers, detached: what a checkpoint holds (frozen weights,
        such as the pretrained backbone, never are)."""
        frozen = {name for name, param in self.named_parameters() if not param.requires_grad}
        return {key: value.detach() for key, value in self.state_dict(keep_vars=True).items() if key not in frozen}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a :meth:`trainable_state_dict`; key or shape mismatches are one-line errors."""
        current = self.trainable_state_dict()
        missing = sorted(set(current) - set(state))
        unexpected = sorted(set(state) - set(current))
        if missing or unexpected:
            raise TrainingError(
                f"trainable state does not fit {type(self).__name__}: "
                f"missing {missing[:3]}{'…' if len(missing) > 3 else ''}, "
                f"unexpected {unexpected[:3]}{'…' if len(unexpected) > 3 else ''}")
        for key in current:
            if tuple(current[key].shape) != tuple(state[key].shape):
                raise TrainingError(f"trainable state does not fit {type(self).__name__}: {key} has shape "
                                    f"{tuple(state[key].shape)}, expected {tuple(current[key].shape)}")
        self.load_state_dict(state, strict=False)
