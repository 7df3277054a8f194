"""The generated "shapes world": one synthetic universe written in the five published layouts.

``generate_shapes_world(out_dir, size, seed)`` writes ``out_dir/{cirr,coco,food101,mmimdb,
hateful_memes}`` exactly as docs/protocols.md §6 describes, so the ordinary loaders read them, plus
``out_dir/shapes_world.json`` (seed, size, counts); the images are :mod:`.shapes_scene` scenes.
The same seed gives the same bytes.

How each part's labels depend on the modalities (so missing modalities really cost accuracy,
while a linear head on concatenated CLIP features can still learn them):

* **cirr**: groups of 6 images: a reference and 5 distinct edits of it (recolour, reshape, add,
  remove, resize, new background). Each edit is one triplet whose relative caption says the edit
  ("make the circle blue"); the group is the triplet's ``img_set``. PNG; ``train/<g % 100>/``,
  ``dev/``, ``test1/``.
* **coco**: categories are the shapes (ids 1–5, supercategory ``shape``); polygon segmentations,
  boxes and areas; 5 captions per image; ~5% images without objects (left out of the gallery).
* **food101**: 30 classes ``<colour>_<shape>``. The image holds the class object plus up to two
  distractors of other shapes and colours; the title names only the colour. Image alone: the
  class is one of the objects; text alone: one of 5 shapes; both: unambiguous.
* **mmimdb**: genres 1–5 (Drama…Action) = the shapes on the poster, 6–11 = the poster's
  colours, 12–16 = the shapes named in the plot, 17–22 = the plot's colours, 23 (Film-Noir) = the
  plot names a large object. Portrait posters (1.5× taller). 20% of movies have two plots.
* **hateful_memes**: label 1 iff the image contains a red object AND the text says "large"
  (each true for 60% of samples). An AND, not an XOR: the classifier adds an image score and a
  text score, and an XOR of the two would be unlearnable for it.

Sizes (``tiny`` for tests, ``small``, ``medium`` for the demo) are in :data:`WORLD_SIZES`.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DataError
from ..fileio import check_can_create, read_json, write_json
from .images import require_choice
from .mmimdb import MMIMDB_GENRES
from .shapes_scene import (COLOUR_NAMES, SHAPES, Obj, Scene, distinct_edits, join_phrases, noun_phrase, object_polygon, polygon_area,
                           random_object, random_scene, render, scene_captions)

PARTS = ("cirr", "coco", "food101", "mmimdb", "hateful_memes")
MANIFEST = "shapes_world.json"
Progress = Callable[[str, int], None]


@dataclass(frozen=True)
class WorldSize:
    """Item counts per part and split (CIRR counts are groups of 6 images / 5 triplets)."""

    cirr_groups: tuple[int, int, int]       # train, val, test1
    coco_images: tuple[int, int]            # train2017, val2017
    food_images: tuple[int, int]            # train (val is carved out of it), test
    mmimdb_movies: tuple[int, int, int]     # train, dev, test
    memes: tuple[int, int, int]             # train, dev_seen, test_seen

    def total_images(self) -> int:
        return (6 * sum(self.cirr_groups) + sum(self.coco_images) + sum(self.food_images)
                + sum(self.mmimdb_movies) + sum(self.memes))


WORLD_SIZES = {
    "tiny": WorldSize((8, 4, 4), (60, 40), (150, 60), (40, 15, 20), (80, 20, 40)),
    "smoke": WorldSize((8, 12, 2), (60, 150), (150, 60), (40, 15, 20), (80, 20, 40)),
    "small": WorldSize((60, 20, 20), (500, 200), (900, 300), (300, 60, 120), (400, 100, 200)),
    "medium": WorldSize((150, 40, 40), (1200, 400), (1800, 450), (600, 100, 200), (900, 150, 300)),
}


def _rng(seed: int, *keys: str | int) -> np.random.Generator:
    """An independent generator per (seed, part, split, item)."""
    ints = [k if isinstance(k, int) else zlib.crc32(k.encode()) for k in keys]
    return np.random.default_rng([seed, *ints])


def _save(img, path: Path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))


def _write_cirr(root: Path, spec: WorldSize, seed: int, image_size: int, tick: Progress) -> dict:
    counts = {}
    for split, prefix, groups in zip(("train", "val", "test1"), ("train", "dev", "test1"), spec.cirr_groups):
        records, image_split, pairid = [], {}, 0
        for g in range(groups):
            rng = _rng(seed, "cirr", split, g)
            ref = random_scene(rng, int(rng.integers(1, 4)))
            edits = distinct_edits(ref, rng, 5)
            scenes = [ref] + [s for s, _ in edits]
            names = [f"{prefix}-{g}-img{j}" for j in range(6)]
            for name, scene in zip(names, scenes):
                rel = f"./train/{g % 100}/{name}.png" if split == "train" else f"./{prefix}/{name}.png"
                _save(render(scene, image_size, rng), root / rel, "PNG")
                image_split[name] = rel
                tick("cirr", 1)
            members = list(names)
            rng.shuffle(members)
            for j, (_, caption) in enumerate(edits, start=1):
                rec = {"pairid": pairid, "reference": names[0], "target_hard": names[j],
                       "target_soft": {names[j]: 1.0}, "caption": caption,
                       "img_set": {"id": g, "members": members, "reference_rank": members.index(names[0]),
                                   "target_rank": members.index(names[j])}}
                if split == "test1":
                    del rec["target_hard"], rec["target_soft"], rec["img_set"]["target_rank"]
                records.append(rec)
                pairid += 1
        write_json(root / "captions" / f"cap.rc2.{split}.json", records)
        write_json(root / "image_splits" / f"split.rc2.{split}.json", image_split)
        counts[split] = {"images": len(image_split), "triplets": len(records)}
    return counts


def _write_coco(root: Path, spec: WorldSize, seed: int, image_size: int, tick: Progress) -> dict:
    categories = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
    info = {"description": "mora-retrieval shapes world", "version": "1.0", "year": 2026}
    licenses = [{"id": 1, "name": "generated", "url": ""}]
    counts, next_id, ann_id, cap_id = {}, 1, 1, 1
    for split, n in zip(("train2017", "val2017"), spec.coco_images):
        images, instances, captions = [], [], []
        for i in range(n):
            rng = _rng(seed, "coco", split, i)
            scene = random_scene(rng, 0) if rng.random() < 0.05 else random_scene(rng)
            image_id, next_id = next_id, next_id + 1
            file_name = f"{image_id:012d}.jpg"
            _save(render(scene, image_size, rng), root / split / file_name, "JPEG")
            tick("coco", 1)
            images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size,
                           "license": 1})
            for obj in scene.objects:
                poly = object_polygon(obj, image_size / 64)
                xs, ys = [p[0] for p in poly], [p[1] for p in poly]
                instances.append({
                    "id": ann_id, "image_id": image_id, "category_id": SHAPES.index(obj.shape) + 1,
                    "segmentation": [[round(float(v), 2) for p in poly for v in p]],
                    "area": round(polygon_area(poly), 2),
                    "bbox": [round(min(xs), 2), round(min(ys), 2), round(max(xs) - min(xs), 2),
                             round(max(ys) - min(ys), 2)],
                    "iscrowd": 0})
                ann_id += 1
            for text in scene_captions(scene, rng, 5):
                captions.append({"id": cap_id, "image_id": image_id, "caption": text})
                cap_id += 1
        base = {"info": info, "licenses": licenses, "images": images}
        write_json(root / "annotations" / f"instances_{split}.json",
                   {**base, "annotations": instances, "categories": categories})
        write_json(root / "annotations" / f"captions_{split}.json", {**base, "annotations": captions})
        counts[split] = {"images": n, "instances": len(instances), "captions": len(captions)}
    return counts


FOOD_CLASSES = tuple(f"{c}_{s}" for c in COLOUR_NAMES for s in SHAPES)
_TITLE_TEMPLATES = ("the {c} one", "a {c} shape", "look at the {c} shape", "it is {c}",
                    "a picture of the {c} one", "the {c} shape in the picture")


def _write_food(root: Path, spec: WorldSize, seed: int, image_size: int, tick: Progress) -> dict:
    counts = {}
    for split, n in zip(("train", "test"), spec.food_images):
        rows = []
        for i in range(n):
            rng = _rng(seed, "food101", split, i)
            cls = FOOD_CLASSES[i % len(FOOD_CLASSES)]
            colour, shape = cls.split("_")
            main = random_object(rng, shape, colour, int(rng.integers(4)))
            others = tuple(c for c in COLOUR_NAMES if c != colour)
            scene = random_scene(rng, int(rng.integers(1, 4)), colours=others, must=(main,))
            name = f"{cls}_{i}.jpg"
            _save(render(scene, image_size, rng), root / "images" / split / cls / name, "JPEG")
            tick("food101", 1)
            title = _TITLE_TEMPLATES[int(rng.integers(len(_TITLE_TEMPLATES)))].format(c=colour)
            rows.append((name, title, cls))
        (root / "texts").mkdir(parents=True, exist_ok=True)
        with open(root / "texts" / f"{split}_titles.csv", "w", encoding="utf-8", newline="") as handle:
            csv.writer(handle, lineterminator="\n").writerows(rows)
        counts[split] = {"images": n, "classes": len({r[2] for r in rows})}
    return counts


_PLOT_TEMPLATES = ("a story about {x}", "{x} meet on a long journey", "this film follows {x}",
                   "the life of {x}", "{x} and what happens next")


def mmimdb_genres(poster: Scene, plot_objects: tuple[Obj, ...]) -> list[str]:
    """The genre rule of the shapes world (see the module docstring)."""
    idx = {SHAPES.index(o.shape) for o in poster.objects}
    idx |= {5 + COLOUR_NAMES.index(o.colour) for o in poster.objects}
    idx |= {11 + SHAPES.index(o.shape) for o in plot_objects}
    idx |= {16 + COLOUR_NAMES.index(o.colour) for o in plot_objects}
    if any(o.size == "large" for o in plot_objects):
        idx.add(22)
    return [MMIMDB_GENRES[i] for i in sorted(idx)]


def _write_mmimdb(root: Path, spec: WorldSize, seed: int, image_size: int, tick: Progress) -> dict:
    splits, counts, movie = {}, {}, 1
    for split, n in zip(("train", "dev", "test"), spec.mmimdb_movies):
        ids, plots_total = [], 0
        for i in range(n):
            rng = _rng(seed, "mmimdb", split, i)
            poster = random_scene(rng)
            story = random_scene(rng).objects
            movie_id, movie = f"{movie:07d}", movie + 1
            img = render(poster, image_size, rng, height=round(1.5 * image_size))
            _save(img, root / "dataset" / f"{movie_id}.jpeg", "JPEG")
            tick("mmimdb", 1)
            n_plots = 2 if rng.random() < 0.2 else 1
            order = rng.permutation(len(_PLOT_TEMPLATES))[:n_plots]
            plots = [_PLOT_TEMPLATES[k].format(x=join_phrases([noun_phrase(o) for o in story])) for k in order]
            meta = {"title": f"movie {movie_id}", "plot": plots, "genres": mmimdb_genres(poster, story)}
            (root / "dataset" / f"{movie_id}.json").write_text(json.dumps(meta) + "\n", encoding="utf-8")
            ids.append(movie_id)
            plots_total += n_plots
        splits[split] = ids
        counts[split] = {"movies": n, "samples": plots_total}
    write_json(root / "split.json", splits)
    return counts


_MEME_TEMPLATES = ("look at this {z} {c} {s}", "when the {s} is {z}", "such a {z} {c} {s}",
                   "nobody likes a {z} {s}", "me and my {z} {c} {s}")


def _write_memes(root: Path, spec: WorldSize, seed: int, image_size: int, tick: Progress) -> dict:
    counts = {}
    id_rng = _rng(seed, "hateful_memes", "ids")
    all_ids = id_rng.choice(np.arange(10000, 100000), size=sum(spec.memes), replace=False)
    offset = 0
    for split, n in zip(("train.jsonl", "dev_seen.jsonl", "test_seen.jsonl"), spec.memes):
        lines, positives = [], 0
        for i in range(n):
            rng = _rng(seed, "hateful_memes", split, i)
            has_red, says_large = bool(rng.random() < 0.6), bool(rng.random() < 0.6)
            if has_red:
                scene = random_scene(rng, must=(random_object(rng, SHAPES[int(rng.integers(5))], "red",
                                                              int(rng.integers(4))),))
            else:
                scene = random_scene(rng, colours=tuple(c for c in COLOUR_NAMES if c != "red"))
            meme_id = f"{int(all_ids[offset + i]):05d}"
            _save(render(scene, image_size, rng), root / "img" / f"{meme_id}.png", "PNG")
            tick("hateful_memes", 1)
            template = _MEME_TEMPLATES[int(rng.integers(len(_MEME_TEMPLATES)))]
            text = template.format(z="large" if says_large else "small", c=COLOUR_NAMES[int(rng.integers(6))],
                                   s=SHAPES[int(rng.integers(5))])
            label = int(has_red and says_large)
            positives += label
            lines.append(json.dumps({"id": meme_id, "img": f"img/{meme_id}.png", "label": label, "text": text}))
        (root / split).write_text("\n".join(lines) + "\n", encoding="utf-8")
        counts[split.removesuffix(".jsonl")] = {"memes": n, "hateful": positives}
        offset += n
    return counts


_WRITERS = {"cirr": _write_cirr, "coco": _write_coco, "food101": _write_food,
            "mmimdb": _write_mmimdb, "hateful_memes": _write_memes}


def generate_shapes_world(out_dir: str | os.PathLike, size: str = "tiny", seed: int = 0, image_size: int = 64,
                          progress: Progress | None = None) -> dict[str, Path]:
    """Write the world under ``out_dir`` and return ``{part: root}``; ``progress(part, n)`` follows every image.

    Each part is built in a temporary folder and moved into place when complete; an existing world
    (one with ``shapes_world.json``) is replaced, any other existing ``out_dir/<part>`` raises DataError.
    """
    require_choice(size, WORLD_SIZES, "shapes-world size")
    if image_size < 16:
        raise DataError(f"image size {image_size} is too small for the shapes world (need at least 16)")
    out = check_can_create(out_dir, "folder for the shapes world")
    ours = (out / MANIFEST).is_file()
    for part in PARTS:
        if (out / part).exists() and not ours:
            raise DataError(f"{out / part}: already exists and is not part of a shapes world; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    spec, tick = WORLD_SIZES[size], progress or (lambda part, n: None)
    counts = {}
    tmp = Path(tempfile.mkdtemp(prefix=".shapes-", dir=out))
    try:
        for part in PARTS:
            counts[part] = _WRITERS[part](tmp / part, spec, seed, image_size, tick)
        for part in PARTS:  # an interrupted swap keeps the old manifest, so a rerun may replace it
            if (out / part).exists():
                shutil.rmtree(out / part)
            os.replace(tmp / part, out / part)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_json(out / MANIFEST, {"generator": "mora-retrieval shapes world", "size": size, "seed": seed,
                                "image_size": image_size, "sizes": asdict(spec),
                                "parts": {p: {"root": p, "splits": counts[p]} for p in PARTS}})
    return {part: out / part for part in PARTS}


def read_world_manifest(out_dir: str | os.PathLike) -> dict:
    """The ``shapes_world.json`` written by :func:`generate_shapes_world`."""
    return read_json(Path(out_dir) / MANIFEST, "shapes world manifest", error=DataError)
