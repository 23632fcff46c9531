"""``shapes_adherence``: does a ``shapes`` image show the colour, shape, size and background its prompt names?"""

from __future__ import annotations

from stablefused.registry import PluginError, register
from stablefused.shapes.classify import classify_image, parse_prompt, score, unknown_words

NAME = "shapes_adherence"


def in_place(image, box: list[int]):
    """``image`` with everything outside ``box`` = [x0, y0, x1, y1] painted the box's median border colour."""
    import numpy as np
    from PIL import Image

    image = image.convert("RGB")
    crop = image.crop(tuple(box))
    a = np.asarray(crop)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    out = Image.new("RGB", image.size, tuple(int(v) for v in np.median(border, axis=0)))
    out.paste(crop, tuple(box[:2]))
    return out


@register("metrics", NAME)
class ShapesAdherence:
    """Prompt adherence of shapes-model images: colour, shape, size, background correct (1/0), and their mean.

    An analytic classifier (``stablefused.shapes.classify.classify_image``) reads each attribute from the
    image; only the attributes the prompt names are scored (``parse_prompt``), the others are NaN. Under
    negative guidance, ``shapes_adherence/color`` is the rate at which the prompted colour is chosen
    (chance: 1/5).

    Words the model does not know (anything outside its training vocabulary: the colours, shapes, sizes,
    backgrounds, plural shapes and filler words like "a", "on", "background") are requests it cannot meet
    — it silently ignores them. Each such word counts as one unmet request in ``shapes_adherence/mean``:
    mean = (attributes met) / (attributes named + unknown words). "a purple hexagon on a grey background"
    drawn as a purple circle on white scores color 1.0, shape and background NaN (not named in words the
    model knows) and mean 1/3 (purple met; hexagon, grey not). The per-attribute scores are unchanged.

    ``against``: the record keys whose text the image is scored against: ``prompt`` gives
    ``shapes_adherence/<attr>``, another key ``k`` gives ``shapes_adherence_<k>/<attr>`` (e.g. ``source``:
    img2img's source description, i.e. faithfulness to the source image).

    ``region``: null scores the whole image; a record key (e.g. ``mask_box``, written by ``task=inpaint``)
    scores just the box ``[x0, y0, x1, y1]`` that key holds, in place: the rest of the image is painted with
    the box's median border colour, so sizes keep their meaning (records without the key are scored whole).
    """

    def __init__(self, against: list[str] = ("prompt",), region: str | None = None):
        against = [against] if isinstance(against, str) else list(against)
        if not against or not all(isinstance(k, str) and k for k in against):
            raise PluginError(f"metrics.{NAME}: against={against!r}: must be a list of record keys, e.g. [prompt, source]")
        if region is not None and not (isinstance(region, str) and region):
            raise PluginError(f"metrics.{NAME}: region={region!r}: must be null (whole image) or a record key holding "
                              "[x0, y0, x1, y1], e.g. mask_box")
        self.against, self.region = against, region

    def summaries(self) -> dict[str, dict]:
        """The keys a task summarises (img2img's trade-off): each text's ``/mean``; against the prompt it is
        the edit, against the source the faithfulness (:mod:`stablefused.scores`)."""
        out = {}
        for key in self.against:
            prefix = NAME if key == "prompt" else f"{NAME}_{key}"
            role, title = {"prompt": ("edit", "edit: adherence to the target prompt"),
                           "source": ("faithful", "faithfulness: adherence to the source")}.get(
                               key, (None, f"adherence to the {key}"))
            out[f"{prefix}/mean"] = {"title": title, **({"role": role} if role else {})}
        return out

    def __call__(self, images, records):
        out = []
        for image, rec in zip(images, records):
            box = rec.get(self.region) if self.region else None
            if box:
                image = in_place(image, [int(v) for v in box])
            scores, predicted = {}, None
            for key in self.against:
                text = rec.get(key) or ""
                # A text that names no shapes attribute (e.g. a real model's prompt, or no source) is not
                # scored at all: no classification, no keys.
                wanted = parse_prompt(text)
                if not wanted:
                    continue
                predicted = predicted or classify_image(image)
                prefix = NAME if key == "prompt" else f"{NAME}_{key}"
                scores.update({f"{prefix}/{k}": v
                               for k, v in score(predicted, wanted, unknown=len(unknown_words(text))).items()})
            out.append(scores)
        return out
