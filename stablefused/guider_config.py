"""diffusers' ``guider_config.json`` ↔ our guiders.

:func:`load` reads a diffusers guider config (a folder holding ``guider_config.json``, or the file) into our
guidance config ``{"rule", "rule_params", "scale"}`` (``scale``: the config's ``guidance_scale``, the run's
``guidance_scales``); :func:`save` writes one of ours in diffusers' format with diffusers' own class
(``save_pretrained``), where an equivalent exists. Settings with no equivalent are refused in one line
naming them, never dropped: the CFG window ``start``/``stop`` (use a guidance schedule), diffusers' APG with
``use_original_formulation=false`` (its u + w·update differs from the paper's c + (w−1)·update that ``apg``
computes), AutoGuidance (its weak model is a layer-skip/dropout hook, ours a second model), and ``slg``
with ``window=pipeline`` (StableDiffusion3Pipeline's window count, not the guider class's).

Layer selections: diffusers' ``LayerSkipConfig`` (``fqn`` + block ``indices``) becomes our regular
expressions (``^<fqn>\\.<i>(\\.|$)``; ``fqn="auto"`` means ``transformer_blocks``); saving maps our selected
modules back to ``fqn``/``indices`` on the given network.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from stablefused import registry

CONFIG_NAME = "guider_config.json"
PERTURBED = {  # diffusers class -> (our guider, diffusers' parameter prefix, its scale key, its layer-config key)
    "PerturbedAttentionGuidance": ("pag", "perturbed_guidance", "perturbed_guidance_scale", "perturbed_guidance_config"),
    "SmoothedEnergyGuidance": ("seg", "seg_guidance", "seg_guidance_scale", "seg_guidance_config"),
    "SkipLayerGuidance": ("slg", "skip_layer_guidance", "skip_layer_guidance_scale", "skip_layer_config"),
}
TWO = {"ClassifierFreeGuidance": "cfg", "TangentialClassifierFreeGuidance": "tcfg", "MagnitudeAwareGuidance": "mambo_g",
       "ClassifierFreeZeroStarGuidance": "cfg_zero_star", "AdaptiveProjectedGuidance": "apg",
       "FrequencyDecoupledGuidance": "fdg"}


def _read(path: str | Path) -> dict:
    path = Path(path)
    return json.loads((path / CONFIG_NAME if path.is_dir() else path).read_text())


def _layers(cfg: dict, prefix: str, config_key: str, target: str) -> list:
    tail = r"\." if target == "attention" else r"(\.|$)"
    indices, configs = cfg.get(f"{prefix}_layers"), cfg.get(config_key)
    if configs is None:
        configs = [{"indices": [indices] if isinstance(indices, int) else list(indices or []), "fqn": "auto"}]
    configs = configs if isinstance(configs, list) else [configs]
    out = []
    for c in configs:
        fqn = "transformer_blocks" if c.get("fqn", "auto") == "auto" else c["fqn"]
        out += [rf"^{re.escape(fqn)}\.{i}{tail}" for i in c["indices"]]
    return out


def load(path: str | Path) -> dict:
    """A diffusers guider config → ``{"rule": name, "rule_params": {...}, "scale": guidance_scale}``."""
    cfg = _read(path)
    cls = cfg.get("_class_name")
    problems = [f"{k}={cfg[k]}" for k, d in (("start", 0.0), ("stop", 1.0), ("enabled", True)) if cfg.get(k, d) != d]
    original = bool(cfg.get("use_original_formulation", False))
    scale = cfg.get("guidance_scale")
    params: dict[str, Any] = {}
    if cls in PERTURBED:
        rule, prefix, scale_key, config_key = PERTURBED[cls]
        target = "block" if rule == "slg" else "attention"
        params = {"scale": cfg[scale_key], "start": cfg.get(f"{prefix}_start"), "stop": cfg.get(f"{prefix}_stop"),
                  "layers": _layers(cfg, prefix, config_key, target), "rescale": cfg.get("guidance_rescale", 0.0)}
        if rule == "seg":
            params.update(sigma=cfg["seg_blur_sigma"], sigma_inf=cfg["seg_blur_threshold_inf"])
    elif cls == "ClassifierFreeGuidance":
        rule = "rescaled_cfg" if cfg.get("guidance_rescale", 0.0) > 0 else "cfg"
        params = {"phi": cfg["guidance_rescale"]} if rule == "rescaled_cfg" else {}
        if original:  # c + g (c - u) = u + (g + 1)(c - u)
            scale, original = scale + 1, False
    elif cls == "AdaptiveProjectedGuidance":
        rule = "apg"
        if not original:
            problems.append("use_original_formulation=false (diffusers' u + w·update; our apg is the paper's "
                            "c + (w-1)·update, i.e. use_original_formulation=true with scale w-1)")
        scale, original = scale + 1, False
        params = {"eta": cfg.get("eta", 1.0), "r": cfg.get("adaptive_projected_guidance_rescale", 15.0),
                  "momentum": cfg.get("adaptive_projected_guidance_momentum") or 0.0, "space": "prediction"}
        if cfg.get("adaptive_projected_guidance_norm_dim") is not None:
            problems.append(f"adaptive_projected_guidance_norm_dim={cfg['adaptive_projected_guidance_norm_dim']}")
    elif cls == "FrequencyDecoupledGuidance":
        rule, scales = "fdg", list(cfg["guidance_scales"])
        scale = scales[0]
        params = {"levels": [(s - 1) / (scale - 1) if scale != 1 else 1.0 for s in scales],
                  "parallel_weights": cfg.get("parallel_weights")}
        problems = [f"guidance_scales={scales} (the first level's scale must not be 1)"] if scale == 1 else []
        for k, default in (("start", 0.0), ("stop", 1.0), ("guidance_rescale", 0.0)):
            v = cfg.get(k, default)
            if any(x != default for x in (v if isinstance(v, list) else [v])):
                problems.append(f"{k}={v}")
    elif cls in TWO:
        rule = TWO[cls]
        if cls == "MagnitudeAwareGuidance":
            params = {"alpha": cfg.get("alpha", 8.0)}
        if cls == "ClassifierFreeZeroStarGuidance":
            params = {"zero_steps": cfg.get("zero_init_steps", 1)}
    else:
        raise ValueError(f"{path}: diffusers guider {cls!r} has no StableFused equivalent; loadable: "
                         f"{', '.join(sorted([*PERTURBED, *TWO]))}")
    if original:
        problems.append("use_original_formulation=true")
    if cls in TWO and cls not in ("ClassifierFreeGuidance", "FrequencyDecoupledGuidance") \
            and cfg.get("guidance_rescale") not in (0, 0.0, None):
        problems.append(f"guidance_rescale={cfg['guidance_rescale']}")
    if problems:
        raise ValueError(f"{path}: {cls} settings with no StableFused equivalent: {', '.join(problems)}")
    registry.check_params("guidance_rule", rule, params)
    return {"rule": rule, "rule_params": params, "scale": scale}


def _skip_configs(guider: Any, network: Any, family_name: str) -> list[dict]:
    """Our selected modules as diffusers ``LayerSkipConfig`` dicts (block ``fqn`` + ``indices``)."""
    (perturbation,) = guider.perturbations.values()
    groups: dict[str, list[int]] = {}
    for name, _ in perturbation.modules(network, family_name):
        parts = name.split(".")
        while parts and not parts[-1].isdigit():  # attention modules: up to their block
            parts.pop()
        groups.setdefault(".".join(parts[:-1]), []).append(int(parts[-1]))
    return [{"fqn": fqn, "indices": sorted(set(ix))} for fqn, ix in groups.items()]


def to_diffusers(rule: str, params: dict, scale: float, network: Any = None, family_name: str = "sd") -> Any:
    """Our guider ``rule`` with ``params`` at the run's ``scale`` as a diffusers guider object."""
    from diffusers import guiders as dg

    guider = registry.create("guidance_rule", rule, **params)
    cls_name = getattr(guider, "diffusers_class", None)
    if cls_name is None or rule == "autoguidance":
        raise ValueError(f"guidance.rule={rule}: no diffusers guider with the same forward")
    cls = getattr(dg, cls_name)
    if rule in ("pag", "seg", "slg"):
        if network is None:
            raise ValueError(f"saving {rule} needs the network its layers select (to write fqn/indices)")
        if getattr(guider, "window", "guider") != "guider":
            raise ValueError(f"{rule} with window={guider.window} counts its window (and rows) as "
                             f"StableDiffusion3Pipeline does, which diffusers' {cls_name} cannot express; "
                             "use window=guider")
        _, prefix, scale_key, config_key = PERTURBED[cls_name]
        kw = {"guidance_scale": scale, scale_key: guider.scale, "guidance_rescale": guider.rescale,
              f"{prefix}_start": 0.0 if guider.start is None else guider.start,
              f"{prefix}_stop": 1.0 if guider.stop is None else guider.stop,
              config_key: _skip_configs(guider, network, family_name)}
        if rule == "seg":
            p = guider.perturbations["blurred_queries"]
            kw.update(seg_blur_sigma=p.sigma, seg_blur_threshold_inf=p.sigma_inf)
        if guider.start is None and guider.stop is None:
            raise ValueError(f"{rule} runs every step (start/stop unset), which diffusers' {cls_name} cannot "
                             "express (its window never includes step 0); set start/stop")
        return cls(**kw)
    if rule == "cfg":
        return cls(guidance_scale=scale)
    if rule == "rescaled_cfg":
        return cls(guidance_scale=scale, guidance_rescale=guider.phi)
    if rule == "apg":
        if guider.space != "prediction":
            raise ValueError("apg with space=x0 has no diffusers equivalent (diffusers guides the raw prediction)")
        return cls(guidance_scale=scale - 1, use_original_formulation=True, eta=guider.eta,
                   adaptive_projected_guidance_rescale=guider.r,
                   adaptive_projected_guidance_momentum=guider.momentum or None)
    if rule == "cfg_zero_star":
        return cls(guidance_scale=scale, zero_init_steps=guider.zero_steps)
    if rule == "mambo_g":
        return cls(guidance_scale=scale, alpha=guider.alpha)
    if rule == "fdg":
        return cls(guidance_scales=[1 + (scale - 1) * m for m in guider.levels], parallel_weights=guider.parallel_weights)
    return cls(guidance_scale=scale)


def save(rule: str, params: dict, scale: float, folder: str | Path, network: Any = None, family_name: str = "sd") -> Path:
    """Write ``folder/guider_config.json`` with diffusers' ``save_pretrained``."""
    to_diffusers(rule, params, scale, network, family_name).save_pretrained(str(folder))
    return Path(folder) / CONFIG_NAME
