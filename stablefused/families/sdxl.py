"""SDXL (``StableDiffusionXLPipeline`` and its img2img/inpaint pipelines; the refiner): a UNet conditioned on
two CLIP text encoders and on micro-conditioning added to its time embedding.

What differs from SD 1.x/2.x, each as the pipeline does it (``encode_prompt``, ``_get_add_time_ids``,
the denoising loop's ``added_cond_kwargs``):

* the text sequence is the penultimate hidden state (``hidden_states[-2]``) of ``text_encoder``
  (``CLIPTextModel``) and of ``text_encoder_2`` (``CLIPTextModelWithProjection``), concatenated on the feature
  axis; the refiner has only the second encoder;
* the pooled, projected embedding of ``text_encoder_2`` goes to the UNet as ``text_embeds``;
* ``time_ids``: ``original_size + crops_coords_top_left + target_size`` (6 numbers), or for a UNet trained
  with aesthetic scores (the refiner, ``requires_aesthetics_score``) ``original_size + crops_coords_top_left +
  (aesthetic_score,)`` (5 numbers). Which one a UNet takes is read from its added-embedding width, as the
  pipeline checks it. Sizes left unset are the image's (height, width), as in the pipeline;
* an empty negative prompt is all zeros (text and pooled) where the pipeline config says
  ``force_zeros_for_empty_prompt`` (SDXL base: yes; the refiner: no);
* the VAE: in float16 with ``force_upcast`` in its config (SDXL's VAE overflows in float16) the VAE runs in
  float32, as the pipeline's upcast does; ``latents_mean``/``latents_std`` in its config are applied.

Model-level settings (``model.<key>``, defaults in :attr:`SDXL.settings`): ``original_size``,
``crops_coords_top_left``, ``target_size`` and their ``negative_*`` counterparts (each defaults to the
positive one), ``aesthetic_score`` / ``negative_aesthetic_score`` (refiner-style UNets only); ``refiner`` (a
second SDXL model that finishes text-to-image: a conf/model name, builtin model or folder) and
``refiner_handover`` (the fraction of the schedule the base runs first: diffusers' ``denoising_end`` /
``denoising_start``), see :func:`txt2img_refined`, :func:`refiner_problems` and :func:`load_refiner`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Sequence

import numpy as np
import torch

from stablefused.families import Conditioning, Family, register_family


def pipeline_config(c: Any) -> dict:
    """The pipeline's registered config (``force_zeros_for_empty_prompt``, ``requires_aesthetics_score``): its
    class's ``__init__`` defaults overridden by what the model folder's ``model_index.json`` says, as
    ``DiffusionPipeline.from_pretrained`` builds it."""
    import diffusers

    cls = getattr(diffusers, c.info.get("pipeline_class") or SDXL.reference, None)
    defaults = {}
    if cls is not None:
        defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                    if isinstance(p.default, (bool, int, float, str))}
    return {**defaults, **c.info.get("pipeline_config", {})}


@register_family
class SDXL(Family):
    """Stable Diffusion XL base and refiner: ``StableDiffusionXLPipeline``, ``StableDiffusionXLImg2ImgPipeline``,
    ``StableDiffusionXLInpaintPipeline``."""

    name = "sdxl"
    components = ("tokenizer_2", "text_encoder_2", "unet", "vae")
    optional = ("tokenizer", "text_encoder")  # the refiner has only the second encoder
    pipelines = ("StableDiffusionXL",)
    reference = "StableDiffusionXLPipeline"
    settings = {
        "original_size": None, "crops_coords_top_left": (0, 0), "target_size": None,
        "negative_original_size": None, "negative_crops_coords_top_left": None, "negative_target_size": None,
        "aesthetic_score": 6.0, "negative_aesthetic_score": 2.5,
        "refiner": None, "refiner_handover": 0.8,  # base + refiner (txt2img_refined); null: the base alone
    }

    @classmethod
    def setting_problems(cls, model_cfg: Any) -> list[str]:
        from numbers import Real

        out = refiner_setting_problems(model_cfg)
        for key in cls.settings:
            v = model_cfg.get(key)
            if v is None or key in REFINER_KEYS:
                continue
            if key.endswith("aesthetic_score"):
                if isinstance(v, bool) or not isinstance(v, Real):
                    out.append(f"model.{key}={v!r}: must be a number (SDXL's default {cls.settings[key]})")
                continue
            least = 0 if "crops" in key else 1
            try:
                ok = len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and x >= least for x in v)
            except TypeError:
                ok = False
            if not ok:
                what = "[top, left] pixel offsets >= 0" if least == 0 else "[height, width] in pixels"
                out.append(f"model.{key}={v!r}: must be two integers, {what}, e.g. model.{key}="
                           f"{'[0,0]' if least == 0 else '[1024,1024]'}")
        return out

    def __init__(self, c: Any):
        super().__init__(c)
        vae = c.vae
        if vae is not None and vae.dtype == torch.float16 and vae.config.get("force_upcast", False):
            vae.to(dtype=torch.float32)  # the pipeline's upcast_vae: SDXL's VAE overflows in float16

    # ------------------------------------------------------------------ settings
    def setting(self, key: str) -> Any:
        value = (self.c.info.get("model") or {}).get(key)
        return self.settings[key] if value is None else value

    @functools.cached_property
    def aesthetic(self) -> bool:
        """Whether the UNet's time_ids are ``original_size + crops + (aesthetic_score,)`` (refiner) instead of
        ``original_size + crops + target_size``: read from its added-embedding width, as the pipeline checks."""
        unet = self.network
        expected = unet.add_embedding.linear_1.in_features
        per_id, proj = unet.config.addition_time_embed_dim, self.c.modules["text_encoder_2"].config.projection_dim
        if expected == 5 * per_id + proj:
            return True
        if expected == 6 * per_id + proj:
            return False
        raise ValueError(f"model={self.c.name}: its UNet's added embedding takes {expected} values; SDXL gives it "
                         f"{6 * per_id + proj} (6 time ids) or {5 * per_id + proj} (5, with an aesthetic score)")

    def time_ids(self, negative: bool) -> list[float]:
        """This side's micro-conditioning; a size left unset is 0 here and becomes the image's size when the
        UNet is called (:meth:`__call__`)."""
        s = self.setting
        size = lambda v: [0.0, 0.0] if v is None else [float(x) for x in v]  # noqa: E731
        orig, crops, target = s("original_size"), s("crops_coords_top_left"), s("target_size")
        if negative:
            orig = s("negative_original_size") or orig
            crops = s("negative_crops_coords_top_left") or crops
            target = s("negative_target_size") or target
        last = [float(s("negative_aesthetic_score" if negative else "aesthetic_score"))] if self.aesthetic \
            else size(target)
        return size(orig) + size(crops) + last

    @property
    def force_zeros(self) -> bool:
        return bool(pipeline_config(self.c).get("force_zeros_for_empty_prompt", True))

    # ------------------------------------------------------------------ text
    @property
    def tokenizer(self) -> Any:
        return self.c.modules.get("tokenizer") or self.c.modules["tokenizer_2"]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], negative: bool = False) -> Conditioning:
        """``StableDiffusionXLPipeline.encode_prompt`` (no clip skip): both encoders' ``hidden_states[-2]``
        concatenated, the second's pooled projection; empty negatives zeroed where the config says so."""
        c, prompts = self.c, list(prompts)
        pairs = [(tok, enc) for tok, enc in ((c.modules.get("tokenizer"), c.modules.get("text_encoder")),
                                             (c.modules["tokenizer_2"], c.modules["text_encoder_2"]))
                 if tok is not None and enc is not None]
        zero = [negative and p == "" and self.force_zeros for p in prompts]  # the pipeline's zeros_like: not encoded
        todo = [p for p, z in zip(prompts, zero) if not z]
        length = pairs[-1][0].model_max_length
        embeds = torch.zeros(len(prompts), length, sum(e.config.hidden_size for _, e in pairs), device=c.device)
        pooled = torch.zeros(len(prompts), pairs[-1][1].config.projection_dim, device=c.device)
        if todo:
            hidden, pool = [], None
            for tokenizer, encoder in pairs:
                ids = tokenizer(todo, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                                return_tensors="pt").input_ids
                out = encoder(ids.to(encoder.device), output_hidden_states=True)
                if pool is None and out[0].ndim == 2:  # CLIPTextModelWithProjection's text_embeds
                    pool = out[0]
                hidden.append(out.hidden_states[-2])
            rows = torch.tensor([i for i, z in enumerate(zero) if not z], device=c.device)
            embeds = embeds.to(hidden[0].dtype).index_copy(0, rows, torch.cat(hidden, dim=-1))
            pooled = pooled.to(pool.dtype).index_copy(0, rows, pool)
        time_ids = torch.tensor([self.time_ids(negative)] * len(prompts), device=c.device)
        return Conditioning({"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": time_ids}).to(
            c.device, c.dtype)

    # ------------------------------------------------------------------ the network
    def _image_size_ids(self, time_ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Unset sizes (0) in ``time_ids`` → this batch's image size (height, width)."""
        f = self.vae_scale_factor
        hw = time_ids.new_tensor([x.shape[-2] * f, x.shape[-1] * f])
        sizes = [0, 1] if self.aesthetic else [0, 1, 4, 5]  # original_size (and target_size)
        fill = torch.zeros_like(time_ids[0])
        fill[sizes] = hw.repeat(len(sizes) // 2)
        return torch.where((time_ids == 0) & (fill > 0), fill, time_ids)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        added = {"text_embeds": cond.rows["text_embeds"], "time_ids": self._image_size_ids(cond.rows["time_ids"], x)}
        return self.network(x, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=added, return_dict=False)[0]

    # ------------------------------------------------------------------ images
    def latent_rgb(self) -> tuple[list, list, str] | None:
        """SDXL's VAE (4 channels, scaling factor 0.13025, 128-256-512-512 blocks): ComfyUI's published
        coefficients (``comfy/latent_formats.py``, class ``SDXL``). Other VAEs: fitted."""
        cfg = self.c.vae.config
        if (cfg.latent_channels == 4 and abs(float(cfg.scaling_factor) - 0.13025) < 1e-6
                and tuple(cfg.block_out_channels) == (128, 256, 512, 512)):
            return SDXL_LATENT_RGB, SDXL_LATENT_RGB_BIAS, "sdxl known coefficients (ComfyUI)"
        return None

    def _latents_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        cfg = self.c.vae.config
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        if mean is None or std is None:
            return None
        shape = (1, len(mean), 1, 1)
        return (torch.tensor(mean).view(shape).to(like.device, like.dtype),
                torch.tensor(std).view(shape).to(like.device, like.dtype))

    def image_latents(self, encoded: Sequence[Any], generators: Sequence[torch.Generator]) -> torch.Tensor:
        """``StableDiffusionXLImg2ImgPipeline.prepare_latents``: the VAE sample (VAE in float32 where it is
        upcast), cast to the model's dtype, then normalised by ``latents_mean``/``latents_std`` if the VAE's
        config has them, else times ``scaling_factor``."""
        from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import retrieve_latents

        latents = torch.cat([retrieve_latents(e, generator=g) for e, g in zip(encoded, generators)]).to(self.c.dtype)
        scale, stats = self.c.vae.config.scaling_factor, self._latents_stats(latents)
        if stats is not None:
            return (latents - stats[0]) * scale / stats[1]
        return scale * latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int | None = None) -> np.ndarray:
        stats = self._latents_stats(latents)
        if stats is None:
            return super().decode(latents, batch_size)
        # denormalise, then the base decode's division by scaling_factor is undone by scaling first
        scale = self.c.vae.config.scaling_factor
        return super().decode((latents * stats[1] / scale + stats[0]) * scale, batch_size)


# ---------------------------------------------------------------------------------------------- base + refiner
def handover_steps(scheduler: Any, fraction: float) -> int:
    """How many steps of ``scheduler``'s current schedule the base runs before the refiner takes over at
    ``fraction`` of the noise schedule: diffusers' ``denoising_end`` (the timesteps at or above
    ``round((1 - fraction) * num_train_timesteps)``), which is also where ``denoising_start`` begins."""
    if not 0 < fraction < 1:
        raise ValueError(f"refiner handover {fraction!r}: must be in (0, 1), e.g. 0.8")
    if scheduler.order != 1:
        raise ValueError(f"refiner handover: {type(scheduler).__name__} is a second-order scheduler; use a "
                         "first-order one (euler, dpmpp_2m, ddim, ...)")
    cutoff = int(round(scheduler.config.num_train_timesteps * (1 - fraction)))
    return int((scheduler.timesteps >= cutoff).sum())


@torch.no_grad()
def txt2img_refined(base: Any, refiner: Any, prompts: Sequence[str], seeds: Sequence[int],
                    guidance_scales: Sequence[float] | float, negative_prompts: Sequence[str] | str = "", *,
                    steps: int = 20, handover: float = 0.8, height: int | None = None, width: int | None = None,
                    eta: float = 0.0, samples: list[dict] | None = None, hooks: Sequence[Any] = (),
                    refiner_hooks: Sequence[Any] = (), **loop_kw: Any) -> Any:
    """SDXL base + refiner as an ensemble of expert denoisers: the base (a :class:`Sampler`) denoises the first
    ``handover`` of the schedule (``denoising_end``), the refiner (another Sampler) the rest from the base's
    latents (``denoising_start``, no new noise), as ``StableDiffusionXLPipeline(..., denoising_end=f,
    output_type="latent")`` followed by ``StableDiffusionXLImg2ImgPipeline(image=latents, denoising_start=f)``.
    Each image's generator carries on from the base into the refiner. Both use ``steps``; the guidance
    (``loop_kw``) runs in both loops, each counting its own steps. Returns the refiner's
    :class:`~stablefused.pipeline.Generation`: its ``context`` counts the refiner's steps, its
    ``base_context`` the base's."""
    from stablefused.errors import ConfigError
    from stablefused.sampling import Request, denoise

    n = len(prompts)
    negative_prompts = [negative_prompts] * n if isinstance(negative_prompts, str) else list(negative_prompts)
    scales = [float(guidance_scales)] * n if isinstance(guidance_scales, (int, float)) else list(guidance_scales)
    height, width = height or base.family.default_size, width or base.family.default_size
    guidance = loop_kw.get("guidance")
    cond, uncond, negative = base.conditions(prompts, negative_prompts, guidance)
    latents, generators = base.initial_latents(seeds, height, width, steps=steps)
    if problem := base.family.input_problem(latents, None):
        raise ConfigError(f"model={base.c.name}: {problem}")
    end = handover_steps(base.scheduler, handover)
    latents, base_context = denoise(
        base.family, base.scheduler, Request(latents, cond, uncond, scales, steps, generators=generators,
                                             end_step=end, samples=samples, eta=eta, negative=negative),
        hooks=hooks, **loop_kw)  # latents, not decoded (the pipeline's output_type="latent")
    cond, uncond, negative = refiner.conditions(prompts, negative_prompts, guidance)
    refiner.prepare(steps, seeds, start_step=end, height=height, width=width)
    if handover_steps(refiner.scheduler, handover) != end:
        raise ValueError("refiner handover: the base and the refiner schedulers split the schedule differently; "
                         "give both the same scheduler")
    latents = refiner.family.from_spatial(base.family.to_spatial(latents))
    gen = refiner.sample(Request(latents, cond, uncond, scales, steps, start_step=end, generators=generators,
                                 samples=samples, eta=eta, negative=negative), hooks=refiner_hooks, **loop_kw)
    gen.base_context = base_context
    return gen


# ---------------------------------------------------------------------------------------------- the refiner, by config
REFINER_KEYS = ("refiner", "refiner_handover")
SECOND_ORDER_HINT = "use a first-order one (euler, dpm_multistep, ddim, ...)"


def refiner_setting_problems(model_cfg: Any) -> list[str]:
    """``model.refiner`` / ``model.refiner_handover`` values on their own, one line each."""
    from numbers import Real

    out = []
    name, handover = model_cfg.get("refiner"), model_cfg.get("refiner_handover")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        out.append(f"model.refiner={name!r}: must name an SDXL refiner (a conf/model config, builtin model or model "
                   "folder), e.g. model.refiner=sdxl_refiner; null: the base model alone")
    if handover is not None and (isinstance(handover, bool) or not isinstance(handover, Real)
                                 or not 0 < handover < 1):
        out.append(f"model.refiner_handover={handover!r}: must be a number in (0, 1), the fraction of the schedule "
                   "the base model runs before the refiner (diffusers' denoising_end), e.g. 0.8")
    return out


def refiner_handover(model_cfg: Any) -> float:
    value = model_cfg.get("refiner_handover")
    return float(SDXL.settings["refiner_handover"] if value is None else value)


def refiner_problems(cfg: Any) -> list[str]:
    """What a run with ``model.refiner`` set cannot do, one line each, every one at once, before any model
    loads: a model that is not SDXL (where its family is known before loading), a refiner name that is no
    model (or not SDXL, or not downloaded while offline), a task that does not hand over to a refiner, a
    second-order scheduler (the handover splits a first-order schedule, as :func:`handover_steps`), recorders
    (they record one model's loop). Bad values of the settings themselves: :func:`refiner_setting_problems`.
    A guider that loads a second model of its own is refused by :func:`stablefused.guidance.guider_problems`."""
    import diffusers

    from stablefused import registry
    from stablefused.errors import ConfigError
    from stablefused.families import family_of_model_cfg
    from stablefused.models import named_model_config
    from stablefused.tasks import get_task, task_names

    model, name = cfg.model, cfg.model.get("refiner")
    if not isinstance(name, str) or not name.strip():
        return []  # none, or a bad value (refiner_setting_problems)
    where, out = f"model.refiner={name}", []
    family = family_of_model_cfg(model)
    if family is not None and family != SDXL.name:
        out.append(f"{where}: a refiner finishes an SDXL base model's images; model {model.get('name')} is not SDXL "
                   f"(family {family}); drop model.refiner")
    try:
        task = get_task(cfg.task)
    except ConfigError:  # an unknown task is named by its own check
        task = None
    if task is not None and not task.refiner:
        able = [t for t in task_names() if get_task(t).refiner]
        out.append(f"{where}: task={cfg.task} does not hand over to a refiner; {' and '.join(able)} do (drop "
                   "model.refiner)")
    sched = cfg.scheduler.get("cls") if cfg.get("scheduler") is not None else None
    if isinstance(sched, str) and getattr(getattr(diffusers, sched, None), "order", 1) != 1:
        out.append(f"{where}: scheduler={cfg.scheduler.get('name', sched)} ({sched}) is a second-order scheduler; "
                   f"the handover splits a first-order schedule: {SECOND_ORDER_HINT}")
    try:
        recorders = list(registry.selected(cfg, "recorders"))
    except Exception:  # a malformed recorders group is named by the plugin check
        recorders = []
    if recorders:
        out.append(f"{where}: recorders ({', '.join(recorders)}) record one model's loop and a run with a refiner has "
                   "two; drop the recorders or model.refiner")
    out += _refiner_model_problems(name, where, named_model_config, family_of_model_cfg)
    return out


def _refiner_model_problems(name: str, where: str, named_model_config: Any, family_of_model_cfg: Any) -> list[str]:
    """The refiner's own config: it names a model, an SDXL one where that is known before loading, whose files
    are there (a folder that exists; hub weights downloaded, or the hub reachable)."""
    from pathlib import Path

    from stablefused.models import hub_files_missing, hub_unavailable_reason, model_source

    try:
        rcfg = named_model_config(name, "model.refiner")
    except ValueError as e:
        return [f"{e}; e.g. model.refiner=sdxl_refiner"]
    family = family_of_model_cfg(rcfg)
    if family is not None and family != SDXL.name:
        return [f"{where}: not an SDXL model (family {family}); the refiner takes the base's latents: an SDXL "
                "refiner, e.g. model.refiner=sdxl_refiner"]
    try:
        source = model_source(rcfg)
    except Exception as e:  # ModelLoadError: its config names no source
        return [f"{where}: {e}"]
    if rcfg.get("path") or rcfg.get("bundled"):
        if not Path(source).exists():
            return [f"{where}: no such folder ({source})"]
    elif not source.startswith("builtin:") and hub_files_missing(source, "model_index.json", rcfg.get("revision")):
        return [f"{where}: {source} is not downloaded and {hub_unavailable_reason()}; run `hf download {source}` "
                "with network, or set model.refiner=<local SDXL refiner folder>"]
    return []


@dataclasses.dataclass
class Refiner:
    """A run's refiner, loaded: its :class:`~stablefused.pipeline.Sampler` (the base's scheduler class on the
    refiner's scheduler config), the handover fraction and the step of ``steps`` where the refiner takes
    over (what the image records say)."""

    sampler: Any
    handover: float
    start_step: int

    @property
    def name(self) -> str:
        return self.sampler.c.name

    def record(self) -> dict:
        return {"refiner": self.name, "refiner_handover": self.handover, "refiner_start_step": self.start_step}


def load_refiner(cfg: Any, base: Any, scheduler: Any) -> Refiner | None:
    """The refiner ``model.refiner`` names (None when unset), loaded once per process (the model cache) on the
    base's device and dtype (with the base's ``model.offload`` unless its own config sets one), after the base:
    the checks that need the loaded base (a hub model's family, the scheduler's order) come first, then the
    refiner's family and latent space, then the handover step on both schedules."""
    import logging

    from stablefused.errors import ConfigError
    from stablefused.models import load_components, named_model_config
    from stablefused.pipeline import Sampler

    name = cfg.model.get("refiner")
    if not name:
        return None
    where, handover = f"model.refiner={name}", refiner_handover(cfg.model)
    problems = []
    if base.family.name != SDXL.name:
        problems.append(f"{where}: a refiner finishes an SDXL base model's images; model {base.name} is not SDXL "
                        f"(family {base.family.name}); drop model.refiner")
    if scheduler.order != 1:
        problems.append(f"{where}: {type(scheduler).__name__} is a second-order scheduler; the handover splits a "
                        f"first-order schedule: {SECOND_ORDER_HINT}")
    if problems:
        raise ConfigError("\n".join(problems))
    rcfg = named_model_config(name, "model.refiner")
    if rcfg.get("offload") is None:
        rcfg["offload"] = cfg.model.get("offload")
    comps = load_components(rcfg, str(base.device), str(base.dtype).removeprefix("torch."))
    fam = comps.family
    if fam.name != SDXL.name or fam.latent_channels != base.family.latent_channels \
            or fam.vae_scale_factor != base.family.vae_scale_factor:
        raise ConfigError(f"{where}: family {fam.name}, {fam.latent_channels} latent channels; the refiner must be an "
                          f"SDXL model that takes the base's latents ({base.family.latent_channels} channels)")
    overrides = dict(cfg.scheduler.get("overrides") or {})
    cls_name = type(scheduler).__name__
    sampler = Sampler(comps, comps.make_scheduler(cls_name, **overrides))
    steps, height, width = int(cfg.steps), cfg.get("height") or cfg.model.get("height"), \
        cfg.get("width") or cfg.model.get("width")
    ends = []
    for c in (base, comps):  # the split on fresh schedulers: refused before any image, not after the base ran
        probe = c.make_scheduler(cls_name, **overrides)
        c.family.set_timesteps(probe, steps, height or c.family.default_size, width or c.family.default_size)
        ends.append(handover_steps(probe, handover))
    if ends[0] != ends[1]:
        raise ConfigError(f"{where}: its scheduler config splits the {steps}-step schedule at step {ends[1]}, the base "
                          f"model's at step {ends[0]}; give the refiner the base's scheduler config")
    log = logging.getLogger("stablefused")
    if ends[0] in (0, steps):
        log.warning("model.refiner_handover=%g with steps=%d: the %s runs all %d steps (the other none)", handover,
                    steps, "refiner" if ends[0] == 0 else "base", steps)
    log.info("refiner %s: the base runs steps 1-%d of %d, the refiner the rest (handover %g)", comps.name, ends[0],
             steps, handover)
    return Refiner(sampler, handover, ends[0])


# ---------------------------------------------------------------------------------------------- tiny models
def build_tiny_sdxl(seed: int = 0, refiner: bool = False) -> Any:
    """A tiny SDXL-shaped model with random weights, built in code (tests and plumbing): the shapes of
    diffusers' own SDXL fast-test components (two CLIP encoders of different widths, the second with a
    projection; a ``text_time`` UNet with linear-projection transformers, 1 and 2 per block), SDXL's
    scheduler config (EulerDiscrete, leading spacing, steps_offset 1) and VAE scaling factor 0.13025.
    ``refiner``: the refiner's shape (second encoder only, aesthetic-score time ids, no zeroed negatives)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from stablefused.models import TINY_WORDS, Components, _scheduler_dict
    from stablefused.text import build_word_tokenizer

    tokenizer = build_word_tokenizer(TINY_WORDS, model_max_length=16)
    torch.manual_seed(seed)

    def clip(width: int, projection: bool) -> Any:
        cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=width, intermediate_size=37,
                             num_attention_heads=4, num_hidden_layers=3, vocab_size=len(tokenizer) + 8,
                             max_position_embeddings=16, projection_dim=16, hidden_act="gelu")
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)

    text_encoder = None if refiner else clip(16, False)
    text_encoder_2 = clip(32, True)
    time_ids = 5 if refiner else 6
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=time_ids * 8 + 16, cross_attention_dim=32 if refiner else 48,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1, sample_size=16,
        scaling_factor=0.13025, force_upcast=True,
    )
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER)
    modules = dict(tokenizer=None if refiner else tokenizer, text_encoder=text_encoder, tokenizer_2=tokenizer,
                   text_encoder_2=text_encoder_2, unet=unet, vae=vae)
    name = "tiny_sdxl_refiner" if refiner else "tiny_sdxl"
    info = ({"pipeline_class": "StableDiffusionXLImg2ImgPipeline",
             "pipeline_config": {"requires_aesthetics_score": True, "force_zeros_for_empty_prompt": False}}
            if refiner else {"pipeline_class": "StableDiffusionXLPipeline",
                             "pipeline_config": {"force_zeros_for_empty_prompt": True}})
    return Components(name, modules, _scheduler_dict(scheduler), torch.device("cpu"), torch.float32,
                      source=f"builtin:{name}", info=info, family_name="sdxl")


# scaled SDXL latents -> RGB in [-1, 1]: rows = latent channels, columns = R, G, B (ComfyUI latent_formats.SDXL)
SDXL_LATENT_RGB = [[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362],
                   [-0.3165, -0.2492, -0.2188]]
SDXL_LATENT_RGB_BIAS = [0.1084, -0.0175, -0.0011]

# stabilityai/stable-diffusion-xl-base-1.0's scheduler/scheduler_config.json (diffusers-relevant keys)
SDXL_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1,
    timestep_spacing="leading", interpolation_type="linear", prediction_type="epsilon", use_karras_sigmas=False,
)


def _register() -> None:
    from stablefused.models import BUILTIN_MODELS

    BUILTIN_MODELS["tiny_sdxl"] = build_tiny_sdxl
    BUILTIN_MODELS["tiny_sdxl_refiner"] = lambda seed=0: build_tiny_sdxl(seed, refiner=True)


_register()
