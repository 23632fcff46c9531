import math

import torch

from stablefused.guidance import Guider, per_sample
from stablefused.registry import register


@register("guidance_rule", "cfgpp")
class CFGPP(Guider):
    """CFG++: guidance inside the denoised estimate only; the sampler re-noises with the unconditional
    prediction (Chung et al. 2024).

    Chung, Kim, Park, Nam, Ye 2024, "CFG++: Manifold-constrained Classifier Free Guidance for Diffusion
    Models" (arXiv:2406.08070), Algorithm 1 (DDIM) and its Euler form (Algorithm 2 / Appendix), with λ ∈ [0, 1]
    the run's guidance scale::

        ε_λ   = ε_∅ + λ (ε_c − ε_∅)
        x̂0    = (x_t − √(1−ᾱ_t) ε_λ) / √ᾱ_t
        x_t−1 = √ᾱ_t−1 x̂0 + √(1−ᾱ_t−1) ε_∅            (DDIM, η = 0; Euler: x_i+1 = x̂0 + σ_i+1 ε_∅)

    The scheduler's own step is kept: the guider returns the one prediction whose deterministic DDIM/Euler
    step lands there. With D = x̂0 of a prediction and σ, σ' this and the next noise level (EDM convention),
    D' = (σ D(ε_λ) − σ' D(ε_∅)) / (σ − σ'), returned in the model's parameterisation (ε, v or flow), so the
    equation holds for every model family. Defined for DDIM (η = 0) and Euler (scheduler=ddim, euler, euler_karras,
    flow-matching Euler; others are refused in one line before the model loads). λ = 0 is the unconditional prediction (no conditional pass);
    λ = 1 is not plain conditional sampling (the renoising still uses ε_∅). The paper uses λ ≤ 1 (e.g. 0.6).
    """

    schedulers = ("DDIMScheduler", "EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler")

    def passes(self, w):
        return w != 0, torch.ones_like(w, dtype=torch.bool)

    def __call__(self, cond, uncond, w, info):
        if info.sigma_next is None or info.model_input is None:
            raise ValueError("cfgpp needs StepInfo.sigma_next and model_input (set by the loop)")
        guided = uncond + per_sample(w, cond) * (cond - uncond)
        s, s_next = float(info.sigma), float(info.sigma_next)
        if math.isinf(s) or s == s_next:
            return guided
        d_guided, d_uncond = info.to_x0(guided.double()), info.to_x0(uncond.double())
        out = info.from_x0((s * d_guided - s_next * d_uncond) / (s - s_next)).to(cond.dtype)
        return torch.where(per_sample(w, cond) == 0, uncond, out)
