import torch

from stablefused.guidance import Guider, per_sample, project
from stablefused.registry import register


@register("guidance_rule", "fdg")
class FDG(Guider):
    """Frequency-decoupled guidance: CFG with its own scale per level of a Laplacian pyramid (Sadat et al. 2025).

    Sadat, Vontobel, Salehi, Weber 2025, "Guidance in the Frequency Domain Enables High-Fidelity Sampling at
    Low CFG Scales" (arXiv:2506.19713), Algorithm 2: c and u are split into Laplacian pyramids (level 0 the
    highest frequencies), and per level k::

        Δ_k   = c_k − u_k        (optionally Δ_k = β_k Δ_k∥ + Δ_k⊥, parallel part against c_k, ``parallel_weights``)
        out_k = u_k + w_k Δ_k
        out   = the pyramid of out_k collapsed (pyrup and add, from the coarsest level)

    Per-level scales follow the run's scale w as a strength: w_k = 1 + (w − 1) m_k (``levels`` = [m_0, m_1, ...],
    default [1, 0.5]: full guidance on high frequencies, half on low), so w = 1 is the conditional prediction
    (no unconditional pass) and schedules apply to every level. diffusers' ``FrequencyDecoupledGuidance``
    default ``guidance_scales=[10, 5]`` is w = 10 with levels [1, 4/9]; a level whose scale is 1 keeps c_k, as
    there. Pyramids and pyrup are kornia's (``pip install kornia``, as diffusers requires).
    """

    diffusers_class = "FrequencyDecoupledGuidance"

    def __init__(self, levels: list[float] = (1.0, 0.5), parallel_weights: list[float] | None = None):
        try:
            import kornia  # noqa: F401
        except ImportError:
            raise ImportError("guidance.rule=fdg needs kornia: pip install kornia (or stablefused[fdg])") from None
        self.levels = [float(m) for m in levels]
        self.parallel_weights = [1.0] * len(self.levels) if parallel_weights is None else [float(b) for b in parallel_weights]
        if len(self.parallel_weights) != len(self.levels):
            raise ValueError(f"fdg: {len(self.parallel_weights)} parallel_weights for {len(self.levels)} levels")

        self._spatial = self._packed = lambda x: x

    def bind(self, family) -> None:
        """The pyramid is spatial: a family whose scheduler layout is packed (Flux) unpacks the predictions."""
        self._spatial, self._packed = family.to_spatial, family.from_spatial

    def passes(self, w):
        return torch.ones_like(w, dtype=torch.bool), w != 1

    def __call__(self, cond, uncond, w, info):
        shape = cond.shape
        cond, uncond = self._spatial(cond), self._spatial(uncond)
        out = self._pyramid(cond, uncond, w)
        out = self._packed(out)
        return out if out.shape == shape else out.reshape(shape)

    def _pyramid(self, cond, uncond, w):
        from kornia.geometry import pyrup
        from kornia.geometry.transform import build_laplacian_pyramid

        if cond.ndim != 4:
            raise ValueError(f"fdg works on image latents (B, C, H, W), got {tuple(cond.shape)}")
        n = len(self.levels)
        pc, pu = build_laplacian_pyramid(cond, n), build_laplacian_pyramid(uncond, n)
        out = []
        for c, u, m, beta in zip(pc, pu, self.levels, self.parallel_weights):
            wk = per_sample(1 + (w - 1) * m, c)
            shift = c - u
            if beta != 1.0:
                par, orth = project(shift, c)
                shift = beta * par + orth
            out.append(torch.where(wk == 1, c, u + wk * shift))
        img = out[-1]
        for level in reversed(out[:-1]):
            img = pyrup(img) + level
        # kornia pads a side that is not a power of two (12x12 latents: 16x16) at the bottom/right: crop back
        img = img[..., : cond.shape[-2], : cond.shape[-1]]
        return torch.where(per_sample(w, cond) == 1, cond, img)
