"""One encoder interface over a plain, adapted or merged open_clip model.

:func:`load_encoder` accepts exactly one weight source on top of ``arch``:

* ``pretrained`` alone – an open_clip tag or checkpoint file (``None``: random weights);
* ``adapter=DIR``      – an adapter folder, loaded onto ``pretrained`` and merged into it;
* ``checkpoint=FILE``  – a merged open_clip checkpoint (overrides ``pretrained``);
* ``run=DIR``          – a training run folder: arch/pretrained from ``config.json``, then
  ``merged.safetensors`` if present (else ``adapter/`` merged onto the base), plus the
  run's ``combiner.safetensors`` if present.

An adapter of a prompt method (``dcp``, ``mmp``), which cannot be merged, stays loaded unmerged;
its samples count as complete (both modalities), the case of every retrieval query.

The encoder runs in fp32 on CPU and under bf16 autocast on CUDA. Features returned by
``encode_images``/``encode_texts`` are L2-normalised unless ``normalize=False``; the composed
query uses the Combiner when one is loaded, else ``normalize(image_raw + text_raw)``.

The embedding pipeline encodes through ``encode_prepared``: on CUDA a copy of the image tower
whose weights are cast to bf16 once (no autocast: every layer runs in bf16), on CPU the fp32
model as ``encode_images`` does.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import BackboneError

RUN_CONFIG = "config.json"
RUN_MERGED = "merged.safetensors"
RUN_ADAPTER = "adapter"


@dataclass
class Encoder:
    """A CLIP model ready for retrieval queries (eval mode, on ``device``)."""

    model: Any
    preprocess: Callable
    tokenizer: Callable
    device: str
    fingerprint: str
    source: dict[str, Any]
    combiner: Any = None
    preprocess_cfg: dict[str, Any] = field(default_factory=dict)
    _towers: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def _autocast(self) -> contextlib.AbstractContextManager:
        import torch

        from ..device import autocast, resolve_precision

        device = torch.device(self.device)
        return autocast(device, resolve_precision("auto", device))

    def encode_images(self, images: Any, normalize: bool = True) -> Any:
        """Features (float32, on ``device``) of a preprocessed image batch ``[B, 3, H, W]``."""
        import torch
        import torch.nn.functional as F

        with torch.inference_mode(), self._autocast():
            feats = self.model.encode_image(images.to(self.device, non_blocking=True)).float()
        return F.normalize(feats, dim=-1) if normalize else feats

    @property
    def pipeline_dtype(self) -> Any:
        """The dtype of :meth:`encode_prepared`'s input and weights: bf16 on CUDA, else float32."""
        import torch

        from ..device import inference_dtype

        return inference_dtype(torch.device(self.device))

    def image_tower(self, dtype: Any) -> Any:
        """The image tower with weights in ``dtype``: the model's own for its dtype, else a
        copy cast once and kept (the model itself is left as it is)."""
        import copy

        visual = self.model.visual
        if next(visual.parameters()).dtype == dtype:
            return visual
        if dtype not in self._towers:
            self._towers[dtype] = copy.deepcopy(visual).to(dtype=dtype).eval()
        return self._towers[dtype]

    def encode_prepared(self, images: Any, normalize: bool = True) -> Any:
        """Features (float32, on ``device``) of a preprocessed batch, for the embedding pipeline.

        On CUDA the batch runs through :meth:`image_tower` in bf16 without autocast; on CPU
        this is :meth:`encode_images`.
        """
        import torch
        import torch.nn.functional as F

        dtype = self.pipeline_dtype
        if dtype == torch.float32:
            return self.encode_images(images, normalize=normalize)
        with torch.inference_mode():
            feats = self.image_tower(dtype)(images.to(self.device, dtype=dtype, non_blocking=True))
            feats = (feats[0] if isinstance(feats, tuple) else feats).float()
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_texts(self, texts: list[str], normalize: bool = True) -> Any:
        """Features (float32, on ``device``) of a list of strings."""
        import torch
        import torch.nn.functional as F

        tokens = self.tokenizer(list(texts)).to(self.device)
        with torch.inference_mode(), self._autocast():
            feats = self.model.encode_text(tokens).float()
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_composed(self, image_features: Any, text_features: Any) -> Any:
        """Composed query feature from *raw* (unnormalised) image and text features.

        Uses the Combiner when present, else ``normalize(image + text)`` (CLIP4CIR stage 1).
        """
        import torch
        import torch.nn.functional as F

        image_features = image_features.float().to(self.device)
        text_features = text_features.float().to(self.device)
        if text_features.shape[0] == 1 and image_features.shape[0] > 1:
            text_features = text_features.expand(image_features.shape[0], -1)
        if self.combiner is not None:
            with torch.inference_mode():
                return self.combiner(image_features, text_features).float()
        return F.normalize(image_features + text_features, dim=-1)

    @property
    def dim(self) -> int:
        """Dimension of the joint embedding space."""
        proj = getattr(self.model, "text_projection", None)
        if proj is not None:
            return int(proj.shape[1]) if hasattr(proj, "shape") else int(proj.out_features)
        return int(self.model.visual.output_dim)


def preprocess_config(model: Any) -> dict[str, Any]:
    """The model's eval preprocessing as plain data (size, mean, std, interpolation, resize mode)."""
    from ..backbone import image_size_of

    cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    size = cfg.get("size", image_size_of(model))
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    return {
        "size": size,
        "mean": [float(x) for x in cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))],
        "std": [float(x) for x in cfg.get("std", (0.26862954, 0.26130258, 0.27577711))],
        "interpolation": str(cfg.get("interpolation", "bicubic")),
        "resize_mode": str(cfg.get("resize_mode", "shortest")),
    }


def _resolve_run(run: Path) -> tuple[str, str | None, str | None, str | None, str | None]:
    """``(arch, pretrained, checkpoint, adapter, combiner)`` from a training run folder."""
    from ..fileio import read_json
    from ..tasks.combiner import COMBINER_FILE

    if not run.is_dir():
        raise BackboneError(f"{run}: run folder not found (expected a folder with {RUN_CONFIG})")
    config = read_json(run / RUN_CONFIG, "run configuration", error=BackboneError)
    if not isinstance(config, dict) or "arch" not in config:
        raise BackboneError(f"{run / RUN_CONFIG}: expected a JSON object with an 'arch' key")
    merged = run / RUN_MERGED
    adapter = run / RUN_ADAPTER
    checkpoint = str(merged) if merged.is_file() else None
    adapter_dir = str(adapter) if checkpoint is None and adapter.is_dir() else None
    if checkpoint is None and adapter_dir is None:
        raise BackboneError(f"{run}: the run has not finished (neither {RUN_MERGED} nor {RUN_ADAPTER}/ is there yet): "
                            f"let it finish, or resume it with --resume, before using its weights")
    combiner = run / COMBINER_FILE
    return config["arch"], config.get("pretrained"), checkpoint, adapter_dir, str(combiner) if combiner.is_file() else None


def load_encoder(
    arch: str | None,
    pretrained: str | None = None,
    *,
    adapter: str | Path | None = None,
    checkpoint: str | Path | None = None,
    run: str | Path | None = None,
    combiner: str | Path | None = None,
    device: str | None = None,
) -> Encoder:
    """Build an :class:`Encoder` from one weight source (see the module docstring)."""
    import warnings

    from ..backbone import load_backbone, weights_fingerprint

    if sum(x is not None for x in (adapter, checkpoint, run)) > 1:
        raise BackboneError("give at most one of --adapter, --checkpoint and --run")
    from ..device import resolve_device

    device = str(resolve_device(device))
    source: dict[str, Any] = {"arch": arch, "pretrained": pretrained}
    if run is not None:
        run = Path(run)
        run_arch, pretrained, run_ckpt, run_adapter, run_comb = _resolve_run(run)
        if arch not in (None, run_arch):
            raise BackboneError(f"{run / RUN_CONFIG}: run was trained with {run_arch}, not {arch}")
        arch = run_arch
        checkpoint, adapter = run_ckpt, run_adapter
        combiner = combiner if combiner is not None else run_comb
        source = {"arch": arch, "pretrained": pretrained, "run": str(run.resolve())}
    if checkpoint is not None and Path(checkpoint).is_dir():  # a self-describing folder (`mora-ret merge -o DIR`)
        from ..backbone import local_dir_arch

        folder_arch = local_dir_arch(checkpoint)
        if folder_arch is None:
            raise BackboneError(f"{checkpoint}: not a checkpoint folder (expected open_clip_config.json, as "
                                f"`mora-ret merge -o FOLDER` writes)")
        arch, checkpoint, pretrained = folder_arch, None, None
        source = {"arch": arch, "pretrained": None}
    if arch is None:
        raise BackboneError("no architecture given (use --model ARCH, --checkpoint FOLDER or --run DIR)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = load_backbone(arch, pretrained=str(checkpoint) if checkpoint is not None else pretrained, device="cpu")
    model = backbone.model
    if checkpoint is not None and run is None:
        source["checkpoint"] = str(Path(checkpoint).resolve())
    if adapter is not None:
        from ..adapters import get_method, load_adapters, merge_adapters

        model = load_adapters(model, adapter, arch=arch)
        if get_method(model.mora_adapter.config.method).mergeable:  # prompt methods stay unmerged
            model = merge_adapters(model)
        if run is None:
            source["adapter"] = str(Path(adapter).resolve())
    comb = None
    if combiner is not None:
        from ..tasks.combiner import load_combiner

        comb = load_combiner(combiner)
        source["combiner"] = str(Path(combiner).resolve())
    model = model.eval()
    fingerprint = weights_fingerprint(model)
    model = model.to(device)
    if comb is not None:
        comb = comb.to(device).eval()
    return Encoder(
        model=model,
        preprocess=backbone.preprocess,
        tokenizer=backbone.tokenizer,
        device=device,
        fingerprint=fingerprint,
        source=source,
        combiner=comb,
        preprocess_cfg=preprocess_config(model),
    )


def load_encoder_from_source(source: dict[str, Any], device: str | None = None) -> Encoder:
    """Rebuild the encoder recorded in an index manifest's ``source``."""
    return load_encoder(
        source.get("arch"),
        source.get("pretrained"),
        adapter=source.get("adapter"),
        checkpoint=source.get("checkpoint"),
        run=source.get("run"),
        combiner=source.get("combiner"),
        device=device,
    )
