from stablefused import guider_config, registry
from stablefused.guidance import Guider
from stablefused.registry import register


@register("guidance_rule", "diffusers_config")
class DiffusersConfig(Guider):
    """A diffusers guider saved with ``save_pretrained`` (``guider_config.json``, or the folder holding it),
    run as the equivalent StableFused guider (:mod:`stablefused.guider_config`; settings without an
    equivalent are refused in one line). The run's ``guidance_scales`` are the CFG scale, as for every guider;
    the file's ``guidance_scale`` is kept in ``file_scale`` (``guidance_scales=[<it>]`` reproduces the file)."""

    @classmethod
    def check(cls, params):
        if params.get("path") is None:
            return ["path: required (+guidance.rule_params.path=<guider_config.json or its folder>)"]
        try:
            guider_config.load(params["path"])
        except OSError:
            return [f"path={params['path']}: no guider_config.json there (give the file, or the folder diffusers' "
                    "save_pretrained wrote)"]
        except ValueError as e:
            return [f"path={params['path']}: {str(e).split(': ', 1)[-1]}"]
        return []

    def __init__(self, path: str):
        loaded = guider_config.load(path)
        self.inner = registry.create("guidance_rule", loaded["rule"], **loaded["rule_params"])
        self.file_scale, self.rule_name = loaded["scale"], loaded["rule"]
        self.perturbations = getattr(self.inner, "perturbations", {})
        self.diffusers_class = getattr(self.inner, "diffusers_class", None)

    def needs(self, w, info):
        return self.inner.needs(w, info)

    def combine(self, p, w, info):
        return self.inner.combine(p, w, info)

    def reset(self):
        self.inner.reset()
