from stablefused.records import TensorRecorder
from stablefused.registry import register


@register("recorders", "noise")
class Noise(TensorRecorder):
    """Model predictions per recorded step: eps_cond, eps_uncond, eps_guided (N, S, C, H, W).

    Predictions are in the model's parameterisation (epsilon, or v for v-prediction models). A sample whose
    conditional (unconditional) pass was skipped (guidance 0, resp. 1 with CFG) holds the other prediction.
    Parameters as for the ``latents`` recorder (every, samples, dtype, per).
    """

    FIELDS = {"eps_cond": "eps_cond", "eps_uncond": "eps_uncond", "eps_guided": "eps_guided"}
