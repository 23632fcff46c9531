"""``shapes_adherence``: does a ``shapes`` image show the colour, shape, size and background its prompt names?"""

from __future__ import annotations

from stablefused.registry import register
from stablefused.shapes.classify import classify_image, score

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
        return [
            {f"{NAME}/{k}": v for k, v in score(classify_image(image), rec.get("prompt", "")).items()}
            for image, rec in zip(images, records)
        ]
