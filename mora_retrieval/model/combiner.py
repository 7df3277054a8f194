"""The CLIP4CIR Combiner (stage 2, Baldrati et al.): fuses a text and an image feature into one query
feature, ``normalize(branch + λ·text + (1 − λ)·image)`` with a learned gate ``λ``.

Saved as ``combiner.safetensors`` whose metadata holds the sizes, so it loads without code
or pickles: :func:`save_combiner` / :func:`load_combiner`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MoraError
from ..fileio import load_tensors_and_metadata, save_tensors


class Combiner(nn.Module):
    """Baldrati et al.'s Combiner over ``dim``-d CLIP features."""

    def __init__(self, dim: int, proj_dim: int | None = None, hidden_dim: int | None = None, dropout: float = 0.5):
        super().__init__()
        self.dim = dim
        self.proj_dim = proj_dim or 4 * dim
        self.hidden_dim = hidden_dim or 8 * dim
        self.text_proj = nn.Sequential(nn.Linear(dim, self.proj_dim), nn.ReLU(), nn.Dropout(dropout))
        self.image_proj = nn.Sequential(nn.Linear(dim, self.proj_dim), nn.ReLU(), nn.Dropout(dropout))
        self.branch = nn.Sequential(
            nn.Linear(2 * self.proj_dim, self.hidden_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(self.hidden_dim, dim)
        )
        self.gate = nn.Sequential(
            nn.Linear(2 * self.proj_dim, self.hidden_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(self.hidden_dim, 1)
        )

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Return the L2-normalised composed feature for raw (unnormalised or normalised) inputs."""
        joint = torch.cat([self.text_proj(text_features), self.image_proj(image_features)], dim=-1)
        lam = torch.sigmoid(self.gate(joint))
        out = self.branch(joint) + lam * text_features + (1 - lam) * image_features
        return F.normalize(out, dim=-1)

    def sizes(self) -> dict[str, int]:
        return {"dim": self.dim, "proj_dim": self.proj_dim, "hidden_dim": self.hidden_dim}


def save_combiner(combiner: Combiner, path: str | Path) -> None:
    """Write weights and sizes to one safetensors file (atomic)."""
    save_tensors(path, combiner.state_dict(), metadata={"combiner": json.dumps(combiner.sizes())})


def load_combiner(path: str | Path, map_location: str = "cpu") -> Combiner:
    """Read a file written by :func:`save_combiner`; one-line errors for damaged files."""
    path = Path(path)
    tensors, meta = load_tensors_and_metadata(path, "Combiner file")
    if "combiner" not in meta:
        raise MoraError(f"{path}: not a Combiner file (no 'combiner' sizes in its metadata)")
    combiner = Combiner(**json.loads(meta["combiner"]))
    try:
        combiner.load_state_dict(tensors)
    except RuntimeError as exc:
        raise MoraError(f"{path}: Combiner tensors do not match its sizes ({str(exc).splitlines()[0]})") from None
    return combiner.to(map_location).eval()
