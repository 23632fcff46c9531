import torch

from stablefused import registry
from stablefused.guidance import COND, MODEL2, UNCOND, Guider, per_sample, perturbed, rescale
from stablefused.registry import register


@register("guidance_rule", "autoguidance")
class Autoguidance(Guider):
    """Autoguidance: guide the model with a weaker version of itself instead of the unconditional prediction
    (Karras et al. 2024).

    Karras, Aittala, Kynkäänniemi, Lehtinen, Aila, Laine 2024, "Guiding a Diffusion Model with a Bad Version
    of Itself" (arXiv:2406.02507), eq. 1 with the weak model D₀ in place of the unconditional one::

        D_w(x; σ, c) = D₀(x; σ, c) + w (D₁(x; σ, c) − D₀(x; σ, c))

    D₁ is the run's model and D₀ the weak one, both under the prompt. The paper's D₀ is a smaller and
    less-trained model of the same family (``weak_model``: a model config name under ``conf/model``, a builtin
    model name or a model folder; it must take the main model's text conditioning and latents). Without a
    second model, ``perturbation`` (a perturbation plugin name, e.g. ``attention_dropout``, with
    ``perturbation_params``) makes the weak prediction from the main model, as diffusers' ``AutoGuidance``
    does with layer skips/dropout (its forward is this equation with its ``pred_uncond`` the weak prediction).
    w = 1 is D₁ alone (the weak model is not run), w = 0 is D₀ alone (D₁ is still evaluated); ``rescale`` as diffusers'.
    """

    diffusers_class = "AutoGuidance"

    @classmethod
    def check(cls, params):
        weak, perturbation = params.get("weak_model"), params.get("perturbation")
        if (weak is None) == (perturbation is None):
            return ["weak_model: set exactly one of weak_model (a second model: conf/model name, builtin or folder) "
                    "and perturbation (e.g. attention_dropout)"]
        if weak is not None:
            try:
                weak_model_config(weak)
            except ValueError as e:
                return [f"weak_model={weak}: {str(e).split(': ', 1)[1]}"]
        return []

    @classmethod
    def second_model(cls, params):
        return params.get("weak_model")

    def __init__(self, weak_model: str | None = None, perturbation: str | None = None,
                 perturbation_params: dict | None = None, rescale: float = 0.0):
        if (weak_model is None) == (perturbation is None):
            raise ValueError("autoguidance: set exactly one of weak_model (a second model) and perturbation")
        self.weak_model, self.rescale = weak_model, float(rescale)
        self.perturbations = {}
        self.weak = MODEL2
        if perturbation is not None:
            self.perturbations = {perturbation: registry.create("perturbation", perturbation,
                                                                **dict(perturbation_params or {}))}
            self.weak = perturbed(perturbation)
        self.model2 = None

    def bind(self, family) -> None:
        """Load the weak model next to ``family`` (same device and dtype), once."""
        if self.weak_model is None or self.model2 is not None:
            return
        from stablefused.models import load_components

        comps = load_components(weak_model_config(self.weak_model), str(family.c.device),
                                str(family.c.dtype).removeprefix("torch."))
        weak, main = comps.family.network.config, family.network.config
        for key in ("in_channels", "cross_attention_dim", "joint_attention_dim"):
            if weak.get(key) != main.get(key):
                raise ValueError(f"autoguidance.weak_model={self.weak_model}: its {key} is {weak.get(key)}, the main "
                                 f"model's {main.get(key)}; the weak model must take the main model's latents and "
                                 "text conditioning (a smaller, less-trained model of the same family)")
        self.model2 = comps.family

    def needs(self, w, info):
        everyone = torch.ones_like(w, dtype=torch.bool)
        return {COND: everyone, UNCOND: ~everyone, self.weak: w != 1}

    def combine(self, p, w, info):
        c, weak = p[COND], p[self.weak]
        out = weak + per_sample(w, c) * (c - weak)
        return rescale(out, c, self.rescale)


def weak_model_config(name: str) -> dict:
    """A model config for ``weak_model``: ``conf/model/<name>.yaml``, a builtin model, or a folder."""
    from stablefused.models import named_model_config

    return named_model_config(name, "autoguidance.weak_model")
