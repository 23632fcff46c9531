"""StableFused: experiments with Stable Diffusion sampling, driven by config, extended by plugins.

From Python (``import stablefused as sf``; see :mod:`stablefused.api` and ``examples/``)::

    res = sf.run("negative_guidance", seeds=[0], guidance_scales=[-5, 0, 5])
    res.grid, res.table, res.images, res.videos, res.records

Importing the package is cheap: the API (and torch, diffusers, Hydra under it) loads on first use.
"""

_API = ("run", "compose", "load", "Result", "ImageList", "Video", "load_model", "sampler", "plugins", "Guidance",
        "to_pil")
__all__ = [*_API, "load_records"]


def __getattr__(name):  # no annotations: `typing` alone would double the import time
    if name in _API:
        from stablefused import api

        return getattr(api, name)
    if name == "load_records":
        from stablefused.records import load

        return load
    raise AttributeError(f"module 'stablefused' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *__all__})
