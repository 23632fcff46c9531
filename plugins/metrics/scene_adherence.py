"""``scene_adherence``: does a compositional-scene image do what its prompt asks (GenEval-style, exact judge)?"""

from __future__ import annotations

from stablefused.registry import register
from stablefused.scenes.data import CATEGORIES
from stablefused.scenes.judge import judge

NAME = "scene_adherence"


@register("metrics", NAME)
class SceneAdherence:
    """Pass/fail of a scene image against its prompt, per GenEval-style category, from an exact judge.

    ``stablefused.scenes.judge`` finds the objects (colour segmentation, shape template fit, bounding-box
    centres) and reads the prompt ("a circle and a square", "two yellow triangles", "a red circle left of a
    blue square", "... on a white background"). ``scene_adherence/correct`` is 1 when every described object
    is there (exactly n for a count), the relation holds and the named background is right, else 0;
    ``scene_adherence/<category>`` repeats it under the prompt's category (single, two, counting, colors,
    position, color_attr; NaN for the others), so run summaries give the score per category;
    ``scene_adherence/objects`` is the number of objects found. A prompt outside the scenes grammar is not
    scored (no keys).
    """

    def __call__(self, images, records):
        out = []
        for image, rec in zip(images, records):
            try:
                r = judge(image, rec.get("prompt") or "")
            except ValueError:  # not a scenes prompt: nothing to score
                out.append({})
                continue
            scores = {f"{NAME}/correct": r["correct"], f"{NAME}/objects": float(r["objects"])}
            scores.update({f"{NAME}/{c}": (r["correct"] if c == r["category"] else float("nan")) for c in CATEGORIES})
            out.append(scores)
        return out
