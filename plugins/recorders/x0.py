from stablefused.records import TensorRecorder
from stablefused.registry import register


@register("recorders", "x0")
class X0(TensorRecorder):
    """Predicted clean latents x̂0 at every recorded step: tensor x0 (N, S, C, H, W).

    x̂0 is the scheduler's ``pred_original_sample`` where it has one, else computed by the loop from the guided
    prediction. Parameters as for the ``latents`` recorder (every, samples, dtype, per).
    """

    FIELDS = {"x0": "x0_pred"}
