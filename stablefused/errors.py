"""The errors a user can cause, each with a message naming the setting and the fix. A leaf module: it
imports nothing from StableFused, so any module may raise these without an import cycle."""

from __future__ import annotations


class ConfigError(ValueError):
    """A setting that cannot work; the message names the key and the fix (one line per bad setting)."""


class PluginError(ValueError):
    """A plugin name, kind or parameter that does not exist."""


class ModelLoadError(RuntimeError):
    """The weights could not be found or loaded; the message says how to get them."""


USER_ERRORS = (ConfigError, PluginError, ModelLoadError)
