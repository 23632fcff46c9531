"""``clip_score``: CLIP image-text similarity (100 x cosine, floored at 0) of each image with its prompt."""

from __future__ import annotations

from typing import Literal

from stablefused.errors import first_line
from stablefused.models import ModelLoadError
from stablefused.registry import register

NAME = "clip_score"


class ClipScoreUnavailable(ModelLoadError):
    """The CLIP model for ``clip_score`` could not be loaded (offline, not downloaded, or not a CLIP model)."""


@register("metrics", NAME)
class ClipScore:
    """CLIP score of each image with its prompt: 100 * cos(image, text) of a transformers CLIP model, >= 0.

    ``model_id`` is a hub id or a local folder holding a CLIPModel with its tokenizer and image processor.
    The model loads once, when the metric is created; without network or local weights that fails with one
    line saying how to get them. For real checkpoints only: the score is meaningless on the shapes model.
    """

    ranges = {"batch_size": (1, None)}

    @classmethod
    def check(cls, params):
        """Cheap, before anything loads: offline (or local_files_only) without the weights in the cache."""
        from stablefused.models import hub_files_missing

        mid = params["model_id"]
        if hub_files_missing(mid, "config.json", local_only=params["local_files_only"]):
            return [f"model_id={mid!r}: CLIP weights not downloaded and offline; run `hf download {mid}` with network, "
                    f"or set metrics.clip_score.model_id=<local CLIP folder>"]
        return []

    def __init__(self, model_id: str = "openai/clip-vit-base-patch32",
                 device: Literal["auto", "cpu", "cuda", "mps"] = "auto", batch_size: int = 32,
                 local_files_only: bool = False):
        import torch
        from transformers import CLIPModel, CLIPProcessor

        from stablefused.models import resolve_device

        self.model_id, self.batch_size = model_id, int(batch_size)
        self.device = resolve_device(device)
        try:
            self.processor = CLIPProcessor.from_pretrained(model_id, local_files_only=local_files_only)
            self.model = CLIPModel.from_pretrained(model_id, local_files_only=local_files_only)
        except (OSError, ValueError) as e:
            first = first_line(e, 160) or type(e).__name__
            raise ClipScoreUnavailable(
                f"metrics.clip_score: cannot load CLIP model {model_id!r} (offline or not downloaded: {first}); "
                f"run `hf download {model_id}` with network, or set metrics.clip_score.model_id=<local CLIP folder>"
            ) from None
        self.model.to(self.device).eval().requires_grad_(False)
        self._torch = torch

    def __call__(self, images, records):
        torch = self._torch
        out = []
        for i in range(0, len(images), self.batch_size):
            imgs = [im.convert("RGB") for im in images[i : i + self.batch_size]]
            texts = [r.get("prompt", "") for r in records[i : i + self.batch_size]]
            inputs = self.processor(text=texts, images=imgs, return_tensors="pt", padding=True, truncation=True)
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            with torch.no_grad():
                img = self.model.get_image_features(pixel_values=inputs["pixel_values"])
                txt = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
            img = getattr(img, "pooler_output", img)
            txt = getattr(txt, "pooler_output", txt)
            cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
            out += [{f"{NAME}/score": float(max(100.0 * c, 0.0))} for c in cos.cpu().tolist()]
        return out
