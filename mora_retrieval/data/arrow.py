"""Arrow files of earlier missing-modality work (ViLT-style ``<name>_<split>.arrow``).

One row per image: an encoded ``image`` (bytes), a list of texts (``text``, or ``plots`` for
MM-IMDb) and a ``label`` (a class index, or a 23-long multi-hot list for MM-IMDb); every text
of a row is one sample. Both Arrow IPC formats are read, with pyarrow: *file* (what those
projects wrote) and *stream* (``datasets`` cache files). Other column names are passed as
``image_column``, ``text_column`` and ``label_column``.

The dataset name (``food101``, ``mmimdb``, ``hateful_memes``; else guessed from the file name,
where ``hatememes`` means Hateful Memes) sets ``task`` and ``class_names``; an unknown name needs
``num_classes`` and gets task ``multiclass`` (``multilabel`` for list labels). Arrow files carry
no class names, so Food-101's are ``"0"`` … ``"100"``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa

from ..errors import DataError
from .base import ClassificationDataset
from .mmimdb import MMIMDB_GENRES

_SPLIT_ALIASES = {"train": ("train",), "val": ("val", "dev", "dev_seen"), "test": ("test", "test_seen")}
_KNOWN = {"food101": ("multiclass", None), "mmimdb": ("multilabel", list(MMIMDB_GENRES)),
          "hateful_memes": ("binary", ["not hateful", "hateful"])}


def _read_table(path: Path) -> Any:
    """A pyarrow Table from an Arrow IPC file or stream."""
    for open_reader in (pa.ipc.open_file, pa.ipc.open_stream):
        try:
            with pa.memory_map(str(path)) as source:
                return open_reader(source).read_all()
        except (pa.ArrowInvalid, OSError) as exc:
            reason = f"{exc.__class__.__name__}: {exc}"
    raise DataError(f"{path}: not an Arrow IPC file or stream ({reason})")


def _guess_name(path: Path) -> str | None:
    stem = path.stem.lower().replace("hatememes", "hateful_memes")
    return next((name for name in _KNOWN if stem.startswith(name)), None)


def resolve_arrow_file(path_or_dir: str | os.PathLike, split: str | None) -> Path:
    """The file itself, or the one ``*_<split>.arrow`` file in the folder (``val`` also matches ``dev``)."""
    path = Path(path_or_dir)
    if path.is_file():
        return path
    if not path.is_dir():
        raise DataError(f"{path}: Arrow file or folder not found")
    if split not in _SPLIT_ALIASES:
        raise DataError(f"{path}: a folder needs split train, val or test (got {split!r})")
    found = sorted(p for alias in _SPLIT_ALIASES[split] for p in path.glob(f"*_{alias}.arrow"))
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise DataError(f"{path}: expected exactly one *_{split}.arrow file (found: {names})")
    return found[0]


class ArrowClassification(ClassificationDataset):
    """Items ``{"image", "text", "label", "index"}`` from a ViLT-style Arrow file."""

    def __init__(self, path_or_dir: str | os.PathLike, split: str | None = None, transform: Callable | None = None,
                 skip_bad_images: bool = False, name: str | None = None, num_classes: int | None = None,
                 text_column: str | None = None, image_column: str = "image", label_column: str = "label") -> None:
        super().__init__(transform, skip_bad_images)
        self.file = resolve_arrow_file(path_or_dir, split)
        self.split = split
        table = _read_table(self.file)
        columns = set(table.column_names)
        text_column = text_column or next((c for c in ("text", "plots") if c in columns), None)
        for col in (image_column, label_column, text_column):
            if col is None or col not in columns:
                raise DataError(f"{self.file}: column {col or 'text/plots'!r} not found "
                                f"(has: {', '.join(sorted(columns))})")
        self._images = table.column(image_column)
        raw_labels = table.column(label_column).to_pylist()
        raw_texts = table.column(text_column).to_pylist()
        multilabel = bool(raw_labels) and isinstance(raw_labels[0], list)
        self.name = (name or _guess_name(self.file) or "arrow").replace("-", "_")
        self.task, names = _KNOWN.get(self.name, ("multilabel" if multilabel else "multiclass", None))
        if names is None:  # the class indices as names
            known = len(raw_labels[0]) if self.task == "multilabel" else 101 if self.name == "food101" else None
            count = num_classes or known
            if count is None:
                raise DataError(f"{self.file}: unknown dataset {self.name!r}: pass num_classes")
            names = [str(i) for i in range(count)]
        self.class_names = list(names)
        self.rows: list[int] = []
        for row, (texts, label) in enumerate(zip(raw_texts, raw_labels)):
            if (self.task == "multilabel") != isinstance(label, list):
                raise DataError(f"{self.file}: row {row} has label {label!r}, not fit for a {self.task} task")
            if self.task == "multilabel" and len(label) != self.num_classes:
                raise DataError(f"{self.file}: row {row} has {len(label)} labels, expected {self.num_classes}")
            if self.task != "multilabel" and not 0 <= int(label) < self.num_classes:
                raise DataError(f"{self.file}: row {row} has label {label}, outside 0..{self.num_classes - 1}")
            texts = [texts] if isinstance(texts, str) else (texts or [""])
            for text in texts:
                self.rows.append(row)
                self.texts.append(str(text))
                self.labels.append([float(v) for v in label] if self.task == "multilabel" else int(label))
                self.paths.append(f"{self.file}[row {row}]")

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        data = self._images[self.rows[index]].as_py()
        if not isinstance(data, (bytes, bytearray)):
            raise DataError(f"{self.paths[index]}: image column holds {type(data).__name__}, expected encoded bytes")
        return self._item(self.paths[index], bytes(data), **self.item_without_image(index))
