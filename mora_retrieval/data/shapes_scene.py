"""The shapes world's vocabulary, scenes, renderer and caption templates.

A :class:`Scene` is a background (``white``/``gray``/``black``, plain or with light noise) and
0–3 :class:`Obj` objects, each a shape, a colour, a size (``small``/``large``) and one of four
quadrant slots (``top left`` … ``bottom right``) with a small fixed offset. Shapes in one scene
are distinct, so "the circle" always names one object. Captions, titles, plots and relative
captions all use the same small vocabulary, so a CLIP pretrained on the captions understands
the text of every part.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "star")
COLOURS = {
    "red": (215, 35, 35), "green": (35, 165, 60), "blue": (40, 75, 215),
    "yellow": (235, 205, 30), "purple": (135, 55, 175), "orange": (240, 135, 20),
}
COLOUR_NAMES = tuple(COLOURS)
BACKGROUNDS = {"white": (242, 242, 242), "gray": (128, 128, 128), "black": (22, 22, 22)}
BACKGROUND_NAMES = tuple(BACKGROUNDS)
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
_SLOT_CENTRES = ((16, 16), (48, 16), (16, 48), (48, 48))  # in a 64-unit frame
_RADIUS = {"small": 6.5, "large": 12.0}
_SUPERSAMPLE = 2
_COUNT_WORDS = ("no", "one", "two", "three")


@dataclass(frozen=True)
class Obj:
    """One drawn object; ``slot`` indexes :data:`POSITIONS`, ``dx``/``dy`` offset it (64-unit frame)."""

    shape: str
    colour: str
    size: str
    slot: int
    dx: int = 0
    dy: int = 0


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str
    noise: bool = False

    def shapes(self) -> set[str]:
        return {o.shape for o in self.objects}

    def free_slots(self) -> list[int]:
        used = {o.slot for o in self.objects}
        return [s for s in range(len(POSITIONS)) if s not in used]


def random_object(rng: np.random.Generator, shape: str, colour: str, slot: int) -> Obj:
    size = SIZES[rng.integers(2)]
    dx, dy = (int(v) for v in rng.integers(-3, 4, size=2))
    return Obj(shape, colour, size, slot, dx, dy)


def random_scene(rng: np.random.Generator, n_objects: int | None = None, *, colours: tuple[str, ...] = COLOUR_NAMES,
                 must: tuple[Obj, ...] = ()) -> Scene:
    """A scene with ``n_objects`` (default 1–3) objects of distinct shapes, plus the ``must`` objects."""
    n = int(rng.integers(1, 4)) if n_objects is None else n_objects
    objects, given = list(must), Scene(must, "")
    free = given.free_slots()
    rng.shuffle(free)
    shapes = [s for s in SHAPES if s not in given.shapes()]
    rng.shuffle(shapes)
    for i in range(max(n - len(objects), 0)):
        objects.append(random_object(rng, shapes[i], colours[rng.integers(len(colours))], free[i]))
    objects.sort(key=lambda o: o.slot)
    return Scene(tuple(objects), BACKGROUND_NAMES[rng.integers(len(BACKGROUND_NAMES))], bool(rng.random() < 0.3))


def _centre_radius(obj: Obj, scale: float, y_offset: float) -> tuple[float, float, float]:
    """The object's centre and radius in pixels."""
    cx0, cy0 = _SLOT_CENTRES[obj.slot]
    return (cx0 + obj.dx) * scale, (cy0 + obj.dy) * scale + y_offset, _RADIUS[obj.size] * scale


def object_polygon(obj: Obj, scale: float, y_offset: float = 0.0) -> list[tuple[float, float]]:
    """The object's outline in pixels (circles as a 24-gon)."""
    cx, cy, r = _centre_radius(obj, scale, y_offset)
    if obj.shape == "circle":
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in t]
    if obj.shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if obj.shape == "triangle":
        return [(cx, cy - r), (cx + 0.95 * r, cy + 0.8 * r), (cx - 0.95 * r, cy + 0.8 * r)]
    if obj.shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if obj.shape == "star":  # ten points, alternating between the outer and the inner radius
        radii_angles = [(r if k % 2 == 0 else 0.45 * r, -np.pi / 2 + k * np.pi / 5) for k in range(10)]
        return [(cx + rad * np.cos(a), cy + rad * np.sin(a)) for rad, a in radii_angles]
    raise ValueError(f"unknown shape {obj.shape!r}")


def polygon_area(points: list[tuple[float, float]]) -> float:
    xs, ys = np.array(points).T
    return float(0.5 * abs(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))))


def render(scene: Scene, size: int, rng: np.random.Generator, height: int | None = None) -> Image.Image:
    """Draw the scene (a ``size``×``size`` frame, centred vertically on a ``height``-tall canvas)."""
    height = height or size
    k = _SUPERSAMPLE
    img = Image.new("RGB", (size * k, height * k), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    y_off = (height - size) * k / 2
    for obj in scene.objects:
        jitter = rng.integers(-12, 13, size=3)
        fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[obj.colour], jitter))
        if obj.shape == "circle":
            cx, cy, r = _centre_radius(obj, size * k / 64, y_off)
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(object_polygon(obj, size * k / 64, y_off), fill=fill)
    img = img.resize((size, height), Image.Resampling.BOX)
    if scene.noise:
        arr = np.asarray(img, dtype=np.int16) + rng.integers(-10, 11, size=(height, size, 3), dtype=np.int16)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(obj: Obj, with_size: bool = True, with_position: bool = False) -> str:
    words = ([obj.size] if with_size else []) + [obj.colour, obj.shape]
    text = f"{article(words[0])} {' '.join(words)}"
    return f"{text} in the {POSITIONS[obj.slot]}" if with_position else text


def join_phrases(parts: list[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def scene_captions(scene: Scene, rng: np.random.Generator, n: int = 5) -> list[str]:
    """``n`` different descriptions of the scene (COCO-style captions)."""
    bg = scene.background
    if not scene.objects:
        pool = [f"an empty {bg} background", f"a plain {bg} picture with no shapes",
                f"nothing but a {bg} background", f"a {bg} image without any shape", f"no shapes on {bg}"]
        return [pool[i % len(pool)] for i in range(n)]
    count = f"{_COUNT_WORDS[len(scene.objects)]} shape{'s' if len(scene.objects) > 1 else ''}"
    captions = []
    for i in range(n):
        objs = list(scene.objects)
        rng.shuffle(objs)
        sized = bool(rng.random() < 0.6)
        listed = join_phrases([noun_phrase(o, sized, with_position=(i == 3)) for o in objs])
        template = (f"{listed} on a {bg} background", f"a {bg} background with {listed}",
                    f"a picture of {listed}", f"{listed}", f"{count}: {listed}")[i % 5]
        captions.append(template)
    return captions


EDIT_KINDS = ("colour", "shape", "add", "remove", "size", "background")


def apply_edit(scene: Scene, kind: str, rng: np.random.Generator) -> tuple[Scene, str] | None:
    """One random edit of the given kind and its relative caption, or ``None`` if impossible."""
    objs = list(scene.objects)
    pick = int(rng.integers(len(objs))) if objs else -1
    o = objs[pick] if objs else None

    def choose(options: list[str]) -> str:
        return options[int(rng.integers(len(options)))]

    if kind == "colour" and o:
        c = choose([c for c in COLOUR_NAMES if c != o.colour])
        objs[pick] = replace(o, colour=c)
        caption = choose([f"make the {o.shape} {c}", f"change the colour of the {o.shape} to {c}",
                          f"the {o.shape} should be {c}", f"paint the {o.shape} {c}"])
    elif kind == "shape" and o:
        free = [s for s in SHAPES if s not in scene.shapes()]
        s = choose(free)
        objs[pick] = replace(o, shape=s)
        caption = choose([f"turn the {o.shape} into {article(s)} {s}", f"replace the {o.shape} with {article(o.colour)} "
                          f"{o.colour} {s}", f"change the {o.shape} to {article(s)} {s}"])
    elif kind == "add" and len(objs) < 3:
        s = choose([s for s in SHAPES if s not in scene.shapes()])
        new = random_object(rng, s, choose(list(COLOUR_NAMES)), choose(scene.free_slots()))
        objs.append(new)
        caption = choose([f"add {noun_phrase(new)}", f"add {noun_phrase(new, False, True)}",
                          f"put {noun_phrase(new, True, True)}"])
    elif kind == "remove" and len(objs) >= 2:
        objs.pop(pick)
        caption = choose([f"remove the {o.shape}", f"take away the {o.colour} {o.shape}",
                          f"remove the {o.shape} and keep the rest"])
    elif kind == "size" and o:
        size = "small" if o.size == "large" else "large"
        objs[pick] = replace(o, size=size)
        caption = choose([f"make the {o.shape} {size}", f"the {o.shape} should be {size}"])
    elif kind == "background":
        bg = choose([b for b in BACKGROUND_NAMES if b != scene.background])
        caption = choose([f"change the background to {bg}", f"put the shapes on a {bg} background"])
        return Scene(scene.objects, bg, scene.noise), caption
    else:
        return None
    objs.sort(key=lambda x: x.slot)
    return Scene(tuple(objs), scene.background, scene.noise), caption


def distinct_edits(scene: Scene, rng: np.random.Generator, count: int = 5) -> list[tuple[Scene, str]]:
    """``count`` edits of the scene giving pairwise different scenes, of varied kinds."""
    kinds = list(EDIT_KINDS)
    rng.shuffle(kinds)
    seen, out = {scene}, []
    for attempt in range(200):
        result = apply_edit(scene, kinds[attempt % len(kinds)], rng)
        if result and result[0] not in seen:
            seen.add(result[0])
            out.append(result)
            if len(out) == count:
                return out
    raise RuntimeError("could not find enough distinct edits")  # unreachable for 1-3 object scenes
