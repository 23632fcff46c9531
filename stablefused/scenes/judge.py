"""The exact judge of compositional scenes: find the objects in an image, read the prompt, say whether the image
does what the prompt asks, GenEval-style (one pass/fail per image, reported per category).

Finding objects (analytic, no weights, as :mod:`stablefused.shapes.classify`): the background is the nearer of
black/white to the median border pixel; every pixel far from it is foreground and takes the nearest palette
colour; each 4-connected region of one colour of at least :data:`MIN_AREA` pixels is an object, its shape and
size from the shapes classifier's template fit, its position the centre of its bounding box.

Reading the prompt (:func:`parse_prompt`): ``desc ( and desc )* | desc RELATION desc``, optionally
``on a <background> background``; ``desc`` is ``a [colour] shape`` or ``two|three [colour] shapes``.

Passing (:func:`judge`): every described object present (a colour-less description matches any colour) —
exactly n of them for a count —, the relation held by some pair of matching objects (the same rule that placed
them: :func:`stablefused.scenes.data._relation_holds`), and the named background.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from stablefused.scenes.data import NUMBERS, RELATIONS, Obj, _relation_holds
from stablefused.shapes.classify import _dilate, _fit_template, connected_components, to_array
from stablefused.shapes.data import BACKGROUNDS, COLORS, SHAPES

FOREGROUND_DISTANCE = 0.4
MIN_AREA = 12  # px at 48x48: smaller specks are not objects
LARGE_MIN_SIDE = 13  # px at 48x48 (small 9-11, large 14-17)
_PALETTE = np.array(list(COLORS.values()), np.float32)
_BGS = np.array(list(BACKGROUNDS.values()), np.float32)
_DESC = re.compile(r"^(a|an|one|two|three)\s+(?:(" + "|".join(COLORS) + r")\s+)?(" + "|".join(SHAPES) + r")s?$")
_WORD_NUMBER = {"a": 1, "an": 1, "one": 1, **{v: k for k, v in NUMBERS.items()}}


def parse_prompt(prompt: str) -> dict[str, Any]:
    """``{"wants": [(count, colour | None, shape)], "relation": (0, rel, 1) | None, "background": str | None,
    "category": one of CATEGORIES}``; a ValueError for a prompt outside the grammar."""
    text = " ".join(prompt.lower().replace(",", " ").split())
    background = None
    m = re.search(r"\s+on an? (\w+) background$", text)
    if m:
        background, text = m.group(1), text[: m.start()]
        if background not in BACKGROUNDS:
            raise ValueError(f"prompt {prompt!r}: unknown background {background!r}")
    relation = None
    for rel in sorted(RELATIONS, key=len, reverse=True):
        parts = re.split(rf"\s+(?:to the )?{rel}\s+", text)
        if len(parts) == 2:
            relation, descs = (0, rel, 1), parts
            break
    else:
        descs = re.split(r"\s+and\s+", text)
    wants = []
    for d in descs:
        m = _DESC.match(d.strip())
        if not m:
            raise ValueError(f"prompt {prompt!r}: cannot read {d!r} (expected 'a [colour] shape' or 'two [colour] shapes')")
        wants.append((_WORD_NUMBER[m.group(1)], m.group(2), m.group(3)))
    if relation:
        category = "position"
    elif len(wants) == 1 and wants[0][0] > 1:
        category = "counting"
    elif len(wants) == 1:
        category = "colors" if wants[0][1] else "single"
    else:
        category = "color_attr" if all(w[1] for w in wants) else "two"
    return {"wants": wants, "relation": relation, "background": background, "category": category}


def detect(image: Any) -> tuple[str, list[Obj]]:
    """The background and the objects of an image (PIL or array)."""
    img = to_array(image)
    h = img.shape[0]
    scale = h / 48.0
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg_idx = int(np.argmin(((_BGS - np.median(border, axis=0)) ** 2).sum(-1)))
    bg = _BGS[bg_idx]
    fg = np.sqrt(((img - bg) ** 2).sum(-1)) > FOREGROUND_DISTANCE
    label = np.argmin(((img[..., None, :] - _PALETTE) ** 2).sum(-1), axis=-1)
    objects = []
    for c, color in enumerate(COLORS):
        for region in connected_components(fg & (label == c)):
            if region.sum() < MIN_AREA * scale * scale:
                continue
            axis = _PALETTE[c] - bg
            soft = np.clip(((img - bg) @ axis) / float(axis @ axis), 0.0, 1.0)
            soft = np.where(_dilate(region), soft, 0.0)
            shape, side = _fit_template(soft, region)
            ys, xs = np.nonzero(region)  # position: the bounding box's centre, as the scenes place objects
            cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
            objects.append(Obj(color, shape, "large" if side >= LARGE_MIN_SIDE * scale else "small", side,
                               cy - side / 2, cx - side / 2))
    return list(BACKGROUNDS)[bg_idx], objects


def _matches(o: Obj, want: tuple[int, str | None, str]) -> bool:
    return o.shape == want[2] and (want[1] is None or o.color == want[1])


def judge(image: Any, prompt: str) -> dict[str, Any]:
    """Whether ``image`` does what ``prompt`` asks: ``{"correct": 0/1, "category", "objects", "present",
    "counts", "relation", "background"}`` (each check True/False, None where the prompt asks nothing)."""
    spec = parse_prompt(prompt)
    background, objects = detect(image)
    wants = spec["wants"]
    found = [[o for o in objects if _matches(o, w)] for w in wants]
    present = all(len(f) >= 1 for f in found)
    counts = all(len(f) == w[0] for f, w in zip(found, wants)) if spec["category"] == "counting" else None
    relation = None
    if spec["relation"]:
        a, rel, b = spec["relation"]
        relation = any(_relation_holds(x, y, rel) for x in found[a] for y in found[b] if x is not y)
    bg_ok = None if spec["background"] is None else background == spec["background"]
    checks = [present, counts, relation, bg_ok]
    return {"correct": float(all(c is not False for c in checks)), "category": spec["category"],
            "objects": len(objects), "present": present, "counts": counts, "relation": relation, "background": bg_ok}

