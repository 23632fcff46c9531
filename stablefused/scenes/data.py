"""Compositional scenes: 1-3 objects from the ``shapes`` vocabulary (colours, shapes, sizes) on a black or white
background, with prompts in GenEval-style categories, each scene a pure function of its seed.

Categories (:data:`CATEGORIES`, after GenEval) and their prompts:

* ``single``     "a circle"                                       the named shape, any colour (0-2 unnamed others)
* ``two``        "a circle and a square"                          two objects of different shapes, any colours
* ``counting``   "two yellow triangles", "three green squares"    exactly n objects alike (2 or 3)
* ``colors``     "a purple square" (beside another object)        the named object in the named colour
* ``position``   "a red circle left of a blue square"             left of / right of / above / below
* ``color_attr`` "a red square and a blue circle"                 both bindings right (not the swapped colours)

A single-object prompt names one thing in a scene of 1-3 objects, as a real caption names one thing in a busy
photo: if ``single`` scenes held one object each, "a circle" would mean "fewer objects than usual" (1 against
the data's mean of about 2), and guidance, which extrapolates the conditional prediction away from the
unconditional one, erased the object (the models trained that way: empty canvases at guidance 1 / 4 / 7.5 were
0.00 / 0.07 / 0.25 for ``scenes``, 0.07 / 0.85 / 0.97 for ``scenes_flow``; ``benchmarks/guidance_erasure.py``,
``benchmarks/results/guidance_erasure_scenes_v1.txt``).

Backgrounds are named about half the time ("... on a white background"); sizes are not named (drawn at random),
so a prompt's words are ``colour shape`` pairs, counts, relations and the background. Objects do not overlap
(a 2-px gap); a position scene's two objects are apart by at least a quarter of the image along the relation's
axis and further along it than across, so the relation is unambiguous for the judge
(:mod:`stablefused.scenes.judge`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stablefused.shapes.data import BACKGROUNDS, COLORS, SHAPES, shape_mask

IMAGE_SIZE = 48
SIZES = {"small": (9, 11), "large": (14, 17)}  # side ranges (px at 48x48)
CATEGORIES = ("single", "two", "counting", "colors", "position", "color_attr")
RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}  # (dy, dx) of a from b
NUMBERS = {2: "two", 3: "three"}
GAP = 2
MIN_APART = IMAGE_SIZE // 4
SINGLE_OTHERS = (0, 2)  # unnamed objects beside a single scene's named one (min, max)


@dataclass
class Obj:
    color: str
    shape: str
    size: str
    side: int
    top: int
    left: int

    @property
    def center(self) -> tuple[float, float]:
        return self.top + self.side / 2, self.left + self.side / 2


@dataclass
class Scene:
    category: str
    background: str
    objects: list[Obj]
    prompt: str
    # what the prompt asks: [(count, colour or None for any, shape)] and an optional relation (a, relation, b)
    wants: list[tuple[int, str | None, str]] = field(default_factory=list)
    relation: tuple[int, str, int] | None = None
    background_named: bool = False


def _place(rng: np.random.Generator, sides: list[int], size: int, tries: int = 200) -> list[tuple[int, int]] | None:
    """Non-overlapping (top, left) for squares of ``sides`` (a GAP apart), or None."""
    out: list[tuple[int, int, int]] = []
    for side in sides:
        for _ in range(tries):
            top, left = (int(v) for v in rng.integers(1, size - side, size=2))
            if all(top + side + GAP <= t or t + s + GAP <= top or left + side + GAP <= l or l + s + GAP <= left
                   for t, l, s in out):
                out.append((top, left, side))
                break
        else:
            return None
    return [(t, l) for t, l, _ in out]


def _relation_holds(a: Obj, b: Obj, rel: str) -> bool:
    """``a`` is ``rel`` ``b``: along the relation's axis a's centre is at least MIN_APART further, and the
    offset along that axis exceeds the offset across it."""
    (ay, ax), (by, bx) = a.center, b.center
    dy, dx = RELATIONS[rel]
    along = (ay - by) * dy + (ax - bx) * dx
    across = abs(ax - bx) if dy else abs(ay - by)
    return along >= MIN_APART and along > across


def _describe(count: int, color: str | None, shape: str) -> str:
    words = f"{color} {shape}" if color else shape
    return f"a {words}" if count == 1 else f"{NUMBERS[count]} {words}s"


def make_scene(seed: int, category: str | None = None, size: int = IMAGE_SIZE,
               single_others: tuple[int, int] = SINGLE_OTHERS) -> Scene:
    """Scene number ``seed`` (a category drawn from the seed unless given); a ``single`` scene holds
    ``single_others`` (min, max) unnamed objects beside the named one."""
    rng = np.random.default_rng([48_017, int(seed)])
    category = category or CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    colors, shapes = list(COLORS), list(SHAPES)
    background = list(BACKGROUNDS)[int(rng.integers(2))]

    def pick(xs, k):
        return [xs[i] for i in rng.choice(len(xs), size=k, replace=False)]

    while True:
        relation = None
        if category == "single":  # the named shape once, and single_others objects of other shapes (unnamed)
            shape = pick(shapes, 1)[0]
            others = [s for s in shapes if s != shape]
            specs = [(pick(colors, 1)[0], shape)]  # (the draws in this order: each seed's scene as before)
            specs += [(pick(colors, 1)[0], others[int(rng.integers(len(others)))])
                      for _ in range(int(rng.integers(single_others[0], single_others[1] + 1)))]
            wants = [(1, None, shape)]
        elif category == "two":
            (c1, c2), (s1, s2) = pick(colors, 2), pick(shapes, 2)
            specs = [(c1, s1), (c2, s2)]
            wants = [(1, None, s1), (1, None, s2)]
        elif category == "counting":
            n, c, s = int(rng.integers(2, 4)), pick(colors, 1)[0], pick(shapes, 1)[0]
            specs, wants = [(c, s)] * n, [(n, c, s)]
        elif category == "colors":  # the named object, and a distractor of another colour and shape
            (c1, c2), (s1, s2) = pick(colors, 2), pick(shapes, 2)
            specs, wants = [(c1, s1), (c2, s2)], [(1, c1, s1)]
        elif category == "position":
            (c1, c2), (s1, s2) = pick(colors, 2), pick(shapes, 2)
            specs, wants = [(c1, s1), (c2, s2)], [(1, c1, s1), (1, c2, s2)]
            relation = (0, list(RELATIONS)[int(rng.integers(4))], 1)
        elif category == "color_attr":  # two shapes, each with the other's colour as the wrong binding
            (c1, c2), (s1, s2) = pick(colors, 2), pick(shapes, 2)
            specs, wants = [(c1, s1), (c2, s2)], [(1, c1, s1), (1, c2, s2)]
        else:
            raise ValueError(f"unknown scene category {category!r}; categories: {', '.join(CATEGORIES)}")
        sizes = [list(SIZES)[int(rng.integers(2))] for _ in specs]
        sides = [int(rng.integers(SIZES[z][0], SIZES[z][1] + 1)) for z in sizes]
        where = _place(rng, sides, size)
        if where is None:
            continue
        objects = [Obj(c, s, z, side, t, l) for (c, s), z, side, (t, l) in zip(specs, sizes, sides, where)]
        if relation and not _relation_holds(objects[0], objects[1], relation[1]):
            continue
        break
    if relation:
        text = f"{_describe(*wants[0])} {relation[1]} {_describe(*wants[1])}"
    else:
        text = " and ".join(_describe(*w) for w in wants)
    named = bool(rng.random() < 0.5)
    if named:
        text += f" on a {background} background"
    return Scene(category, background, objects, text, wants, relation, named)


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """The scene as float32 (H, W, 3) in [0, 1], drawn without anti-aliasing (as ``shapes``)."""
    img = np.empty((size, size, 3), np.float32)
    img[:] = BACKGROUNDS[scene.background]
    for o in scene.objects:
        img[shape_mask(o.shape, o.side, o.top, o.left, size)] = COLORS[o.color]
    return img


def batch(seeds, size: int = IMAGE_SIZE, single_others: tuple[int, int] = SINGLE_OTHERS
          ) -> tuple[np.ndarray, list[Scene]]:
    """Images (N, H, W, 3) and scenes for ``seeds``."""
    scenes = [make_scene(int(s), size=size, single_others=single_others) for s in seeds]
    return np.stack([render(s, size) for s in scenes]), scenes


FILLER_WORDS = ("a", "an", "one", "and", "of", "to", "the", "on", "background")
VOCABULARY = tuple(dict.fromkeys(
    FILLER_WORDS + tuple(NUMBERS.values()) + tuple(COLORS) + SHAPES + tuple(s + "s" for s in SHAPES)
    + tuple(w for rel in RELATIONS for w in rel.split()) + tuple(BACKGROUNDS)))


def items(seeds, size: int = IMAGE_SIZE, single_others: tuple[int, int] = SINGLE_OTHERS
          ) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Training items for ``seeds``: images (N, H, W, 3), prompts, foreground masks (N, H, W) (the objects'
    pixels), as :func:`stablefused.shapes.data.batch` gives them for shapes."""
    imgs, scenes = batch(seeds, size, single_others)
    bgs = np.array([BACKGROUNDS[s.background] for s in scenes], np.float32)[:, None, None, :]
    return imgs, [s.prompt for s in scenes], np.abs(imgs - bgs).sum(-1) > 0
