"""Backbones: open_clip models, their preprocessing and tokenizers, from tags or local files.

The toolkit's own small architectures (``mora-tiny``, ``mora-small``) live in
``model_configs/`` as open_clip JSON configs and are registered with open_clip's own config
registry, so ``open_clip.create_model("mora-tiny")`` works once :func:`register_model_configs`
has run (``load_backbone`` calls it).

``pretrained`` may be
  * an open_clip tag (``openai``, ``laion2b_s34b_b88k``, ...): downloaded and cached by open_clip;
  * a local checkpoint file (``.pt``, ``.pth``, ``.bin``, ``.safetensors``), e.g. a checkpoint
    written by ``mora-ret merge`` or ``mora-ret pretrain``;
  * ``None``: random weights (a warning says so).

``arch`` may also be open_clip's ``local-dir:FOLDER``: a self-describing folder written by
``mora-ret merge -o FOLDER`` (``open_clip_config.json`` beside ``open_clip_model.safetensors``),
which plain open_clip loads by itself, the toolkit's own architectures included.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import open_clip
import torch

from ..errors import BackboneError

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
LOCAL_DIR = "local-dir:"
LOCAL_DIR_CONFIG = "open_clip_config.json"
LOCAL_DIR_WEIGHTS = "open_clip_model.safetensors"


def local_dir_arch(folder: str | Path) -> str | None:
    """``local-dir:FOLDER`` when ``folder`` is a self-describing open_clip checkpoint folder."""
    folder = Path(folder)
    return f"{LOCAL_DIR}{folder.resolve()}" if (folder / LOCAL_DIR_CONFIG).is_file() else None


def register_model_configs() -> None:
    """Add the toolkit's architectures to open_clip's registry (idempotent)."""
    if not all(name in open_clip.list_models() for name in toolkit_architectures()):
        open_clip.add_model_config(MODEL_CONFIG_DIR)


def toolkit_architectures() -> list[str]:
    """Names of the small architectures shipped with the toolkit."""
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def list_architectures() -> list[str]:
    """Every architecture open_clip can build, the toolkit's own included."""
    register_model_configs()
    return open_clip.list_models()


@dataclass
class Backbone:
    """An open_clip model with its eval preprocessing and tokenizer; unpacks like open_clip's factory:
    ``model, preprocess, tokenizer = load_backbone(...)``."""

    model: Any
    preprocess: Callable
    tokenizer: Callable
    arch: str
    pretrained: str | None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.preprocess, self.tokenizer))


def _first_sentence(message: str, limit: int = 300) -> str:
    """The first line of ``message``, cut after a whole sentence when it is longer than ``limit``."""
    line = (message.splitlines() or [""])[0]
    if len(line) <= limit:
        return line
    cut = line.rfind(". ", 0, limit)
    return line[: cut + 1] if cut > 0 else line[:limit] + " …"


def _classify_pretrained(arch: str, pretrained: str | None) -> str:
    """Return ``'none'``, ``'file'`` or ``'tag'``; raise for anything else."""
    if pretrained in (None, "", "none"):
        return "none"
    path = Path(pretrained)
    if path.suffix in CHECKPOINT_SUFFIXES or path.exists():
        if not path.is_file():
            raise BackboneError(f"{path}: checkpoint file not found (expected an open_clip .pt/.bin/.safetensors file)")
        return "file"
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if pretrained in tags:
        return "tag"
    known = ", ".join(tags) if tags else "none"
    raise BackboneError(
        f"'{pretrained}' is neither a local checkpoint file nor a pretrained tag of {arch} (known tags: {known})"
    )


def load_backbone(
    arch: str,
    pretrained: str | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    cache_dir: str | None = None,
) -> Backbone:
    """Create an open_clip model, its eval transform and tokenizer; errors are one-line :class:`BackboneError`
    (a tag that cannot be downloaded names the local-file alternative)."""
    register_model_configs()
    if arch.startswith(LOCAL_DIR):
        folder = Path(arch[len(LOCAL_DIR):])
        if local_dir_arch(folder) is None or not (folder / LOCAL_DIR_WEIGHTS).is_file():
            raise BackboneError(f"{folder}: not a checkpoint folder (expected {LOCAL_DIR_CONFIG} and {LOCAL_DIR_WEIGHTS}, "
                                f"as `mora-ret merge -o FOLDER` writes)")
        if pretrained not in (None, "", "none"):
            raise BackboneError(f"{folder}: a checkpoint folder holds its own weights; drop --pretrained {pretrained}")
        kind = "folder"
    elif arch not in open_clip.list_models():
        raise BackboneError(f"unknown architecture '{arch}' (see `mora-ret models`; e.g. ViT-B-16, mora-tiny)")
    else:
        kind = _classify_pretrained(arch, pretrained)
    if kind == "none":
        warnings.warn(f"{arch}: no pretrained weights given, the model is randomly initialised", stacklevel=2)
    try:
        with _without_open_clip_random_weights_log():  # the warning above says it once
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch,
                pretrained=None if kind in ("none", "folder") else str(pretrained),
                device=device,
                precision=precision,
                cache_dir=cache_dir,
            )
    except Exception as exc:  # open_clip raises RuntimeError, AssertionError, pickle/safetensors errors
        text = str(exc)
        first = _first_sentence(text) or exc.__class__.__name__
        if kind == "tag":
            raise BackboneError(
                f"could not download '{pretrained}' weights for {arch} (offline?): download the open_clip "
                f"checkpoint on a connected machine and pass its path, e.g. --pretrained "
                f"/path/to/open_clip_pytorch_model.bin"
            ) from None
        if kind in ("file", "folder"):
            where = pretrained if kind == "file" else arch[len(LOCAL_DIR):]
            if exc.__class__.__name__ == "UnpicklingError":
                raise BackboneError(
                    f"{where}: refused to load: the file holds pickled Python objects besides tensors, and "
                    f"only weights are read (torch.load weights_only=True); if you trust the file, re-save its "
                    f"state dict with safetensors") from None
            if isinstance(exc, (AssertionError, KeyError)) or "state_dict" in text or "size mismatch" in text:
                raise BackboneError(f"{where}: not a checkpoint of {arch} ({first})") from None
            raise BackboneError(f"{where}: unreadable checkpoint ({exc.__class__.__name__}: {first})") from None
        raise
    tokenizer = open_clip.get_tokenizer(arch)
    return Backbone(model=model, preprocess=preprocess, tokenizer=tokenizer, arch=arch, pretrained=pretrained)


@contextlib.contextmanager
def _without_open_clip_random_weights_log() -> Iterator[None]:
    """Drop open_clip's own "No pretrained weights loaded" log line, which repeats our warning. Each call
    adds a filter of its own, so concurrent loads do not remove each other's."""
    def keep(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def weights_fingerprint(model_or_state: Any, length: int = 16) -> str:
    """A short SHA-256 over the names, shapes and values of a model's (or a state dict's) tensors, the
    values in float32 so that it does not depend on device or precision."""
    state = model_or_state if isinstance(model_or_state, dict) else model_or_state.state_dict()
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        data = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()[:length]


def image_size_of(model: Any) -> int:
    """The square input size of an open_clip visual tower."""
    size = getattr(model.visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def embed_dim(model: Any) -> int:
    """The width of the joint image-text embedding space."""
    proj = getattr(model, "text_projection", None)
    if proj is not None:
        return int(proj.shape[1]) if hasattr(proj, "shape") else int(proj.out_features)
    return int(model.visual.output_dim)
