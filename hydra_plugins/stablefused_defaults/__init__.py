"""Hydra discovers this search-path plugin whenever it composes a config (``python -m stablefused`` and the
compose API alike). For StableFused's own config folder it stores every plugin's constructor defaults as the
config nodes ``plugin_defaults/<kind>/<name>`` (:func:`stablefused.registry.store_defaults`), which the
``conf/<kind>/<name>.yaml`` files extend: a plugin's parameters are declared once, in its constructor, and
``visualizers.denoise_video.fps=4`` still overrides an existing key (no ``+``)."""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class StableFusedPluginDefaults(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from stablefused.paths import config_dir

        ours = str(config_dir())
        if any(str(p.path).rstrip("/") == ours for p in search_path.get_path()):
            from stablefused.registry import store_defaults

            store_defaults()
