"""The errors a user can cause, each with a message naming the setting and the fix. A leaf module: it
imports nothing from StableFused, so any module may raise these without an import cycle."""

from __future__ import annotations


def first_line(text: object, limit: int = 200) -> str:
    """The first line of ``text``, shortened at a word boundary (with "...") to at most ``limit`` characters:
    messages quote library errors without cutting a word in half."""
    line = (str(text).strip().splitlines() or [""])[0]
    if len(line) <= limit:
        return line
    cut = line[: limit - 3].rsplit(" ", 1)[0].rstrip(" ,;:")
    return cut + "..."


class ConfigError(ValueError):
    """A setting that cannot work; the message names the key and the fix (one line per bad setting)."""


class PluginError(ValueError):
    """A plugin name, kind or parameter that does not exist."""


class ModelLoadError(RuntimeError):
    """The weights could not be found or loaded; the message says how to get them."""


class NonFiniteError(RuntimeError):
    """The latents or images became NaN/inf (usually float16 overflow); the message names the step and the fix."""


USER_ERRORS = (ConfigError, PluginError, ModelLoadError, NonFiniteError)
