import torch

from stablefused.perturbations import Perturbation
from stablefused.registry import register


@register("perturbation", "attention_dropout")
class AttentionDropout(Perturbation):
    """Self-attention output dropped out with probability ``p`` (a weaker model by dropout, as diffusers'
    ``AutoGuidance(dropout=...)`` builds its bad model; Karras et al. 2024, arXiv:2406.02507, §3 discuss
    degrading the model this way). The dropout draws from a generator seeded with ``seed`` at every run, so
    runs repeat exactly; ``p = 1`` removes the attention's contribution."""

    ranges = {"p": (0, 1)}

    def __init__(self, layers: list | None = None, p: float = 0.1, seed: int = 0):
        super().__init__(layers)
        self.p, self.seed = float(p), int(seed)
        self.generator: torch.Generator | None = None

    def reset(self) -> None:
        self.generator = None

    def forward(self, module, original, args, kwargs):
        out = original(*args, **kwargs)
        return tuple(map(self._drop, out)) if isinstance(out, tuple) else self._drop(out)  # joint attention: both streams

    def _drop(self, out):
        if out is None or self.p == 0:
            return out
        if self.p == 1:
            return torch.zeros_like(out)
        if self.generator is None or self.generator.device != out.device:
            self.generator = torch.Generator(out.device).manual_seed(self.seed)
        keep = torch.rand(out.shape, generator=self.generator, device=out.device) >= self.p
        return out * keep / (1 - self.p)
