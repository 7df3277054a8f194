"""One encoder interface over a plain, adapted or merged open_clip model.

:func:`load_encoder` accepts at most one weight source on top of ``arch`` and ``pretrained`` (an
open_clip tag or checkpoint file; ``None``: random weights):

* ``adapter=DIR``     – an adapter folder, merged onto ``pretrained``; a prompt method's adapter
  (``dcp``, ``mmp``) cannot be merged and stays loaded, every query counting as complete;
* ``checkpoint=FILE`` – a merged open_clip checkpoint (or the folder ``mora-ret merge -o`` writes);
* ``run=DIR``         – a training run folder: arch/pretrained from ``config.json``, then
  ``merged.safetensors`` if present (else ``adapter/`` merged onto the base), plus the run's
  ``combiner.safetensors`` if present.

Precision. The model is held in one inference dtype (:func:`~mora_retrieval.device.inference_dtype`:
bf16 on CUDA, fp32 on CPU; ``dtype=`` overrides it). The weights fingerprint is taken before the
cast, so it names the weights, not their precision. Gallery images, query images, texts and
composed queries all run these weights without autocast (open_clip casts the text attention mask
to the activations' dtype; its LayerNorm accumulates in float32).

The composed query uses the Combiner when one is loaded, else ``normalize(image_raw + text_raw)``.
The Combiner stays in float32 and takes the float32 raw features, so a composed query gets the same
arithmetic whether its image feature came from the pipeline (``eval --mode cir``) or a single query.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..adapters import load_merged
from ..data.images import preprocess_spec
from ..device import inference_dtype, resolve_device
from ..errors import BackboneError
from ..model.backbone import embed_dim, load_backbone, local_dir_arch, weights_fingerprint
from ..model.combiner import load_combiner
from ..model.encode import composed_query, encode_image_batch, encode_texts
from ..runs import COMBINER_FILE, CONFIG_FILE, FinishedRun


@dataclass
class Encoder:
    """A CLIP model ready for retrieval queries: eval mode, on ``device``, its weights in ``dtype``."""

    model: Any
    preprocess: Callable
    tokenizer: Callable
    device: str
    fingerprint: str
    source: dict[str, Any]
    combiner: Any = None
    preprocess_cfg: dict[str, Any] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32

    def encode_images(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Features (float32, on ``device``) of a preprocessed image batch ``[B, 3, H, W]``."""
        with torch.inference_mode():
            images = images.to(self.device, dtype=self.dtype, non_blocking=True)
            return encode_image_batch(self.model, images, torch.device(self.device), normalize=normalize)

    def encode_texts(self, texts: list[str], normalize: bool = True) -> torch.Tensor:
        """Features (float32, on ``device``) of a list of strings."""
        with torch.inference_mode():
            return encode_texts(self.model, self.tokenizer, texts, torch.device(self.device), normalize=normalize)

    def encode_composed(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Composed query feature from *raw* (unnormalised) image and text features (one text
        row is paired with every image row), as the module docstring says."""
        with torch.inference_mode():
            return composed_query(image_features.float().to(self.device), text_features.float().to(self.device),
                                  self.combiner).float()

    @property
    def dim(self) -> int:
        """Dimension of the joint embedding space."""
        return embed_dim(self.model)


def load_encoder(
    arch: str | None,
    pretrained: str | None = None,
    *,
    adapter: str | Path | None = None,
    checkpoint: str | Path | None = None,
    run: str | Path | None = None,
    combiner: str | Path | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
) -> Encoder:
    """Build an :class:`Encoder` from one weight source (see the module docstring)."""
    if sum(x is not None for x in (adapter, checkpoint, run)) > 1:
        raise BackboneError("give at most one of --adapter, --checkpoint and --run")
    dev = resolve_device(device)
    device = str(dev)
    source: dict[str, Any] = {"arch": arch, "pretrained": pretrained}
    if run is not None:
        finished = FinishedRun.open(run, BackboneError)
        if arch not in (None, finished.arch):
            raise BackboneError(f"{finished.path / CONFIG_FILE}: run was trained with {finished.arch}, not {arch}")
        arch = finished.arch
        combiner = combiner if combiner is not None else finished.find(COMBINER_FILE)
        source = {"arch": arch, "pretrained": finished.pretrained, "run": str(finished.path.resolve())}
    if checkpoint is not None and Path(checkpoint).is_dir():
        folder_arch = local_dir_arch(checkpoint)
        if folder_arch is None:
            raise BackboneError(f"{checkpoint}: not a checkpoint folder (expected open_clip_config.json, as "
                                f"`mora-ret merge -o FOLDER` writes)")
        arch, checkpoint, pretrained = folder_arch, None, None
        source = {"arch": arch, "pretrained": None}
    if arch is None:
        raise BackboneError("no architecture given (use --model ARCH, --checkpoint FOLDER or --run DIR)")
    with warnings.catch_warnings(action="ignore"):  # random weights warn; the index records them as such
        if run is not None:
            backbone = finished.load_model()
        else:
            backbone = load_backbone(arch, pretrained=str(checkpoint) if checkpoint is not None else pretrained)
    model = backbone.model
    if adapter is not None:
        model = load_merged(model, adapter, arch=arch)  # prompt methods (dcp, mmp) stay unmerged
    comb = None if combiner is None else load_combiner(combiner).to(device=device, dtype=torch.float32).eval()
    source.update({key: str(Path(value).resolve()) for key, value in
                   (("checkpoint", checkpoint), ("adapter", adapter), ("combiner", combiner)) if value is not None})
    model = model.eval()
    fingerprint = weights_fingerprint(model)  # of the weights as loaded, before the cast
    dtype = dtype or inference_dtype(dev)
    model = model.to(device=device, dtype=dtype)
    spec = preprocess_spec(model)  # recorded in the index manifest as these plain fields
    preprocess_cfg = {"size": spec.size[0], "mean": list(spec.mean), "std": list(spec.std),
                      "interpolation": spec.interpolation, "resize_mode": spec.resize_mode}
    return Encoder(
        model=model,
        preprocess=backbone.preprocess,
        tokenizer=backbone.tokenizer,
        device=device,
        fingerprint=fingerprint,
        source=source,
        combiner=comb,
        preprocess_cfg=preprocess_cfg,
        dtype=dtype,
    )


def load_encoder_from_source(source: dict[str, Any], device: str | None = None,
                             dtype: torch.dtype | None = None) -> Encoder:
    """Rebuild the encoder recorded in an index manifest's ``source``."""
    files = {key: source.get(key) for key in ("adapter", "checkpoint", "run", "combiner")}
    return load_encoder(source.get("arch"), source.get("pretrained"), device=device, dtype=dtype, **files)
