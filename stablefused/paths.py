"""Where the shipped ``conf/``, ``plugins/`` and bundled models live.

In a source checkout (``pip install -e .``) they are the top-level folders beside the package; in a wheel
(``pip install .``) the build copies them into the package as ``stablefused/_conf`` and
``stablefused/_plugins`` (see ``[tool.hatch.build.targets.wheel.force-include]`` in pyproject.toml).
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _find(top_level: str, in_package: str) -> Path:
    for candidate in (PACKAGE_DIR / in_package, PACKAGE_DIR.parent / top_level):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"StableFused's {top_level}/ folder is missing from the installation")


def config_dir() -> Path:
    return _find("conf", "_conf")


def builtin_plugins_dir() -> Path:
    return _find("plugins", "_plugins")


def bundled_models_dir() -> Path:
    return PACKAGE_DIR / "models"
