"""Facts a reviewer can check about the code's shape (issue 15): each one fails when the shape regresses."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from omegaconf import OmegaConf

from stablefused import registry

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_GROUPS = {"recorders": "recorders", "visualizers": "visualizers", "metrics": "metrics", "walker": "walkers"}


def test_no_yaml_plugin_param_restates_a_constructor_default():
    """conf/<group>/<name>.yaml selects a plugin and may override; the defaults are the constructor's only."""
    registry.discover()
    restated = []
    for group, kind in PLUGIN_GROUPS.items():
        for f in sorted((ROOT / "conf" / group).glob("*.yaml")):
            node = OmegaConf.to_container(OmegaConf.load(f))
            node.pop("defaults", None)
            params = dict(node) if group == "walker" else dict(node.get(f.stem) or {})
            params.pop("name" if group == "walker" else registry.SELECTED, None)
            accepted = registry._parameters(registry.get(kind, f.stem))
            for key, value in params.items():
                p = accepted.get(key)
                default = None if p is None or p.default is inspect.Parameter.empty else p.default
                if p is not None and (value == default or (isinstance(default, tuple) and value == list(default))):
                    restated.append(f"{f.relative_to(ROOT)}: {key}={value!r}")
    assert not restated, restated


def test_plugin_yaml_takes_the_constructor_defaults_and_plain_overrides():
    """The composed config holds every constructor default (so ``visualizers.denoise_video.fps=4`` needs no
    ``+``), and an override replaces just its key."""
    from tests.conftest import compose_cfg

    cfg = compose_cfg("task=walk", "visualizers=[denoise_video,step_strip]", "visualizers.denoise_video.fps=4",
                      "walker=zoom", "walker.direction=in")
    registry.discover()
    for name in ("denoise_video", "step_strip"):
        expected = {**registry.param_defaults(registry.get("visualizers", name)), registry.SELECTED: True}
        if name == "denoise_video":
            expected["fps"] = 4
        assert OmegaConf.to_container(cfg.visualizers[name]) == expected
    assert OmegaConf.to_container(cfg.walker) == {**registry.param_defaults(registry.get("walkers", "zoom")),
                                                  "direction": "in", "name": "zoom"}
