from stablefused.records import TensorRecorder
from stablefused.registry import register


@register("recorders", "latents")
class Latents(TensorRecorder):
    """Latents entering (x_t) and leaving (x_prev) every recorded step: tensors x_t, x_prev (N, S, C, H, W).

    Parameters: ``every`` (k: steps 0, k, 2k, ... and always the last), ``samples`` (global sample indices;
    null = all), ``dtype`` (storage: float16, bfloat16, float32, null = as computed), ``per`` (step: one
    entry per scheduler step; call: one per UNet call, for 2nd-order schedulers). ``x_prev`` of the last step
    is the final latent. Load with ``stablefused.records.load(run_dir)``.
    """

    FIELDS = {"x_t": "x_t", "x_prev": "x_prev"}
