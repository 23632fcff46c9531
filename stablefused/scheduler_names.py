"""Display names of schedulers, as A1111 / ComfyUI users know them ("Euler a", "DPM++ 2M Karras"...).

``conf/scheduler/<name>.yaml`` carries its name as ``label``; :func:`sampler_label` derives one from a
scheduler's class and config, for ``scheduler=default`` (the model's own) and for any other scheduler.
Names follow the table in diffusers' scheduler docs (A1111 name → diffusers class and settings).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping

_NAMES = {
    "DDIMScheduler": "DDIM",
    "DDPMScheduler": "DDPM",
    "PNDMScheduler": "PLMS",  # with skip_prk_steps (SD's setting); otherwise PNDM
    "LMSDiscreteScheduler": "LMS",
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "HeunDiscreteScheduler": "Heun",
    "KDPM2DiscreteScheduler": "DPM2",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    "DPMSolverSDEScheduler": "DPM++ SDE",
    "DEISMultistepScheduler": "DEIS",
    "UniPCMultistepScheduler": "UniPC",
    "LCMScheduler": "LCM",
    "FlowMatchEulerDiscreteScheduler": "Flow Euler",  # SD3, Flux
    "FlowMatchHeunDiscreteScheduler": "Flow Heun",
}


def sampler_label(scheduler: Any, config: Mapping | None = None) -> str:
    """The display name of ``scheduler`` (an instance, or a class name with its ``config``)."""
    if isinstance(scheduler, str):
        cls, config = scheduler, dict(config or {})
    else:
        cls, config = type(scheduler).__name__, dict(getattr(scheduler, "config", None) or {})
    if cls == "DPMSolverMultistepScheduler":
        algo = config.get("algorithm_type", "dpmsolver++")
        order = config.get("solver_order", 2)
        name = {"dpmsolver++": f"DPM++ {order}M", "sde-dpmsolver++": f"DPM++ {order}M SDE",
                "dpmsolver": f"DPM-Solver {order}M", "sde-dpmsolver": f"DPM-Solver {order}M SDE"}.get(
            algo, f"DPM-Solver {order}M ({algo})")
    elif cls == "DPMSolverSinglestepScheduler":
        order = config.get("solver_order", 2)
        name = f"DPM++ {order}S" if config.get("algorithm_type", "dpmsolver++") == "dpmsolver++" else f"DPM-Solver {order}S"
    elif cls == "PNDMScheduler" and config and not config.get("skip_prk_steps", False):
        name = "PNDM"
    else:
        name = _NAMES.get(cls) or cls.removesuffix("Scheduler").removesuffix("Discrete") or cls
    if config.get("use_karras_sigmas"):
        name += " Karras"
    return name


@lru_cache(maxsize=None)
def config_label(scheduler_name: str) -> str | None:
    """``label`` of ``conf/scheduler/<scheduler_name>.yaml``, if that file exists and has one."""
    from omegaconf import OmegaConf

    from stablefused.paths import config_dir

    path = config_dir() / "scheduler" / f"{scheduler_name}.yaml"
    if not scheduler_name or "/" in scheduler_name or not path.is_file():
        return None
    label = OmegaConf.load(path).get("label")
    return str(label) if label else None


def record_label(rec: Mapping) -> str | None:
    """The sampler name for an image record: its ``sampler``; else the label of its ``scheduler`` config;
    else derived from ``scheduler_class``; else the ``scheduler`` config name."""
    if rec.get("sampler"):
        return str(rec["sampler"])
    if rec.get("scheduler") and (label := config_label(str(rec["scheduler"]))):
        return label
    if rec.get("scheduler_class"):
        return sampler_label(str(rec["scheduler_class"]))
    return rec.get("scheduler")
