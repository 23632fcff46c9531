"""``shapes_adherence``: does a ``shapes`` image show the colour, shape, size and background its prompt names?"""

from __future__ import annotations

from stablefused.registry import register
from stablefused.shapes.classify import classify_image, parse_prompt, score

NAME = "shapes_adherence"


@register("metrics", NAME)
class ShapesAdherence:
    """Prompt adherence of shapes-model images: colour, shape, size, background correct (1/0), and their mean.

    An analytic classifier (``stablefused.shapes.classify.classify_image``) reads each attribute from the
    image; only the attributes the prompt names are scored (``parse_prompt``), the others are NaN. Under
    negative guidance, ``shapes_adherence/color`` is the rate at which the prompted colour is chosen
    (chance: 1/5).
    """

    def __call__(self, images, records):
        out = []
        for image, rec in zip(images, records):
            wanted = parse_prompt(rec.get("prompt", ""))
            # A prompt that names no shapes attribute (e.g. a real model's prompt) is not scored at all:
            # no classification, no keys.
            out.append({f"{NAME}/{k}": v for k, v in score(classify_image(image), wanted).items()} if wanted else {})
        return out
