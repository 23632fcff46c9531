"""Sweeps (``python -m stablefused -m ...``): the launcher-plugin check."""

from __future__ import annotations

import importlib.util

# hydra/launcher=<name> -> (plugin module under hydra_plugins, pyproject extra, PyPI package)
LAUNCHERS = {
    "submitit_local": ("hydra_submitit_launcher", "slurm", "hydra-submitit-launcher"),
    "submitit_slurm": ("hydra_submitit_launcher", "slurm", "hydra-submitit-launcher"),
    "slurm_gpu": ("hydra_submitit_launcher", "slurm", "hydra-submitit-launcher"),
    "joblib": ("hydra_joblib_launcher", "joblib", "hydra-joblib-launcher"),
    "ray": ("hydra_ray_launcher", "ray", "hydra-ray-launcher"),
    "ray_aws": ("hydra_ray_launcher", "ray", "hydra-ray-launcher"),
}


def missing_launcher(argv: list[str]) -> str | None:
    """One line naming the ``pip install`` to run when ``hydra/launcher=NAME`` on the command line needs a
    plugin that is not installed (Hydra's own error is a long "Could not find 'hydra/launcher/NAME'")."""
    for arg in argv:
        if arg.startswith("hydra/launcher="):
            name = arg.split("=", 1)[1]
            if name in LAUNCHERS:
                module, extra, package = LAUNCHERS[name]
                if importlib.util.find_spec(f"hydra_plugins.{module}") is None:
                    return (f"hydra/launcher={name}: the {package} plugin is not installed; "
                            f"pip install -e '.[{extra}]' (or pip install {package})")
    return None
