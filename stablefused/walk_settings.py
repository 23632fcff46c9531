"""A walk's settings from the config (``task=walk``): the walker plugin, the :class:`~stablefused.walkers.Walk`
it is given, the user's story/audio files."""

from __future__ import annotations

from numbers import Real
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from stablefused import registry
from stablefused.walkers import Walk, Walker, default_keyframes

# --------------------------------------------------------------------------------------------- config
def resolve_file(path: str | None) -> Path | None:
    """A user's file: as given (relative to the working directory), else relative to the shipped conf/."""
    if path is None:
        return None
    from stablefused.paths import config_dir

    p = Path(str(path)).expanduser()
    if not p.is_absolute() and not p.exists() and (config_dir() / p).exists():
        return config_dir() / p
    return p


def make_walker(cfg: Any) -> Walker:
    node = cfg.get("walker")
    params = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node or {})
    name = params.pop("name", None)
    try:
        return registry.create("walkers", name, **params)
    except registry.ParamError as e:  # each bad parameter named as the user writes it: walker.<param>=...
        raise registry.PluginError("\n".join(f"walker.{p}" for p in e.problems)) from None
    except registry.PluginError as e:
        raise registry.PluginError(f"walker={name}: {e}") from None


def walk_settings(cfg: Any) -> Walk:
    prompts = list(cfg.prompts or cfg.model.example_prompts)
    seeds = [int(s) for s in cfg.seeds]
    story, audio = resolve_file(cfg.story), resolve_file(cfg.audio)
    return Walk(keyframes=default_keyframes(prompts, seeds) if cfg.walker.name != "story" else [], seeds=seeds,
                frames=int(cfg.segment_frames), loop=bool(cfg.loop), fps=float(cfg.walk_fps), story=story and str(story),
                audio=audio and str(audio), audio_start=float(cfg.audio_start),
                audio_duration=None if cfg.audio_duration is None else float(cfg.audio_duration))


def _number(cfg: Any, key: str, minimum: float, strict: bool, allow_none: bool = False) -> str | None:
    v = cfg.get(key)
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, Real) or (v <= minimum if strict else v < minimum):
        return f"{key}={v!r}: must be a number {'>' if strict else '>='} {minimum:g}"
    return None
