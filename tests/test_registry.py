"""Plugin registry: built-ins, user folders, entry points, listing, helpful errors."""

import subprocess
import sys
import textwrap

import pytest

from stablefused import registry


def test_builtins_are_found_by_kind_and_name():
    assert "cfg" in registry.list_names("guidance_rule")
    assert "constant" in registry.list_names("guidance_schedule")
    cfg = registry.create("guidance_rule", "cfg")
    assert cfg.plugin_name == "cfg" and cfg.plugin_kind == "guidance_rule"


def test_unknown_name_suggests_the_closest():
    with pytest.raises(registry.PluginError, match=r"no guidance_rule plugin named 'cgf'\. Did you mean 'cfg'\?"):
        registry.get("guidance_rule", "cgf")
    with pytest.raises(registry.PluginError, match="unknown plugin kind 'rules'"):
        registry.get("rules", "cfg")


def test_user_plugin_folder(tmp_path):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "brightness.py").write_text(textwrap.dedent('''
        from stablefused.registry import register

        @register("metrics", "test_brightness")
        class Brightness:
            """Mean pixel value of each image, in [0, 1]."""
            def __init__(self, channel: int = 0):
                self.channel = channel
            def __call__(self, images, records):
                return [{"brightness": 0.5} for _ in images]
    '''))
    registry.discover([tmp_path])
    info = {p.name: p for p in registry.list_plugins("metrics")}["test_brightness"]
    assert info.params == {"channel": 0} and info.doc == "Mean pixel value of each image, in [0, 1]."
    with pytest.raises(registry.PluginError, match="has no parameter 'chanel'. Did you mean 'channel'"):
        registry.create("metrics", "test_brightness", chanel=1)


def test_entry_points_are_loaded(monkeypatch, tmp_path):
    mod = tmp_path / "sf_thirdparty_plugin.py"
    mod.write_text(textwrap.dedent('''
        from stablefused.registry import register

        @register("guidance_schedule", "test_thirdparty")
        class Third:
            """A third-party schedule."""
            def __call__(self, base, info):
                return base
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    from importlib.metadata import EntryPoint

    eps = [EntryPoint("thirdparty", "sf_thirdparty_plugin", registry.ENTRY_POINT_GROUP)]
    monkeypatch.setattr(registry, "entry_points", lambda group: eps if group == registry.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    assert registry.get("guidance_schedule", "test_thirdparty").__name__ == "Third"


def test_plugins_command_lists_every_plugin():
    out = subprocess.run([sys.executable, "-m", "stablefused", "plugins"], capture_output=True, text=True, check=True)
    assert "guidance_rule" in out.stdout and "cfg" in out.stdout
    assert "Classifier-free guidance" in out.stdout
    for info in registry.list_plugins():
        if info.source.startswith("stablefused_plugins."):  # built-ins (tests register others in-process)
            assert info.name in out.stdout
