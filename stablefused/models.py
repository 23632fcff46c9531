"""Loading model components: a hub id, a local diffusers folder, a single ``.safetensors`` file, a bundled
model, or the ``tiny_random`` test model built in code. Loaded models are cached per process (keyed by
source, dtype and device) so a sweep loads each model once.
"""

from __future__ import annotations

import functools

import copy
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from stablefused.errors import ModelLoadError, first_line
from stablefused.paths import bundled_models_dir

log = logging.getLogger(__name__)


def _module(name: str) -> property:
    return property(lambda self: self.modules.get(name), lambda self, value: self.modules.__setitem__(name, value),
                    doc=f"The {name} module (None if this model has none).")


@dataclass
class Components:
    """A loaded model: its modules under diffusers' component names (``tokenizer``, ``text_encoder``,
    ``unet`` or ``transformer``, ``vae``, ``tokenizer_2``, ...), its scheduler config and its family
    (:mod:`stablefused.families`), which knows how to use them."""

    name: str
    modules: dict[str, Any]
    scheduler_config: dict
    device: torch.device
    dtype: torch.dtype
    source: str = ""
    info: dict = field(default_factory=dict)
    family_name: str | None = None  # None: read from the network (stablefused.families.family_of_network)

    tokenizer = _module("tokenizer")
    text_encoder = _module("text_encoder")
    unet = _module("unet")
    transformer = _module("transformer")
    vae = _module("vae")

    @property
    def network(self) -> Any:
        """The denoising network: the UNet, the transformer (SD3, Flux) or another ``network`` (model=gmm)."""
        return next(self.modules[k] for k in ("unet", "transformer", "network") if self.modules.get(k) is not None)

    @property
    def family(self) -> Any:
        """The model family's adapter (:mod:`stablefused.families`) over these components."""
        from stablefused.families import family_class, family_of_network

        return family_class(self.family_name or family_of_network(self.network))(self)

    @property
    def vae_scale_factor(self) -> int:
        return self.family.vae_scale_factor

    def make_scheduler(self, cls_name: str | None = None, **overrides: Any) -> Any:
        """A fresh scheduler from the model's own scheduler config, of class ``cls_name`` (default: the
        model's), with ``overrides`` applied. Fresh per run, so no state leaks between runs."""
        import diffusers

        cls_name = cls_name or self.scheduler_config["_class_name"]
        try:
            cls = getattr(diffusers, cls_name)
        except AttributeError:
            raise ModelLoadError(f"scheduler.cls: diffusers has no scheduler class {cls_name!r}") from None
        return cls.from_config(self.scheduler_config, **overrides)


def sd_components(name: str, tokenizer: Any, text_encoder: Any, unet: Any, vae: Any, scheduler_config: dict,
                  **kw: Any) -> Components:
    """Components of a UNet model with one text encoder (SD 1.x/2.x, or UNet3D video), on the CPU in float32."""
    modules = dict(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, vae=vae)
    return Components(name, modules, scheduler_config, torch.device("cpu"), torch.float32, **kw)


_CACHE: dict[tuple, Components] = {}


def _scheduler_dict(scheduler: Any) -> dict:
    return {**scheduler.config, "_class_name": type(scheduler).__name__}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device=cuda: no CUDA device is available here; use device=cpu or device=auto")
    return torch.device(device)


def hub_offline() -> bool:
    """True when the Hugging Face hub may not be contacted (HF_HUB_OFFLINE set)."""
    import os

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_files_missing(repo_or_dir: str, filename: str, revision: str | None = None, local_only: bool = False) -> bool:
    """True when ``repo_or_dir`` is a hub id whose ``filename`` is not in the local cache and the hub cannot
    be used: HF_HUB_OFFLINE, ``local_only``, or (asked once per process, in seconds) the hub does not answer.
    Loading it would fail, after minutes of huggingface_hub's retries. A local folder, a cached file or a
    reachable hub are not "missing" (a download may still fail later)."""
    if Path(str(repo_or_dir)).expanduser().exists():
        return False
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(str(repo_or_dir), filename, revision=revision)
    except Exception:  # not a valid repo id: let the loader say what is wrong
        return False
    if isinstance(found, str):
        return False
    return hub_offline() or local_only or not hub_reachable_once()


def hub_unavailable_reason() -> str:
    """Why the hub cannot be used, for messages: HF_HUB_OFFLINE, or the endpoint does not answer."""
    if hub_offline():
        return "the hub is offline (HF_HUB_OFFLINE is set)"
    return f"the hub ({hub_endpoint()}) cannot be reached"


@functools.lru_cache(maxsize=None)
def hub_reachable_once() -> bool:
    """:func:`hub_reachable` of the configured endpoint, asked once per process (every hub check of a run,
    the model's and each metric's, shares the answer). Bounded in time even where name resolution hangs
    (the socket timeout does not cover DNS): asked in a daemon thread, given up after the timeout."""
    import threading

    endpoint, answer = hub_endpoint(), []
    thread = threading.Thread(target=lambda: answer.append(hub_reachable(endpoint)), daemon=True)
    thread.start()
    thread.join(HUB_TIMEOUT_S + 2)
    return bool(answer and answer[0])


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable ``.safetensors`` file (None if its header parses). Reads 8 bytes plus the
    JSON header: a safetensors file starts with the header's length (8-byte little-endian) and the header."""
    import json
    import struct

    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"only {size} bytes, too short for a safetensors header (corrupt or truncated)"
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > min(size - 8, 100_000_000):
                return "not a safetensors file (its first 8 bytes are not a header length; corrupt, truncated, or another format)"
            header = json.loads(f.read(n))
    except OSError as e:
        return f"cannot be read ({e.strerror or type(e).__name__})"
    except (ValueError, UnicodeDecodeError):
        return "corrupt safetensors header (not valid JSON; the file is damaged or truncated)"
    if not isinstance(header, dict):
        return "corrupt safetensors header (not a JSON object)"
    end = max((int(v["data_offsets"][1]) for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
    if 8 + n + end > size:
        return f"truncated: the header lists {8 + n + end} bytes but the file has {size}"
    return None


def resolve_dtype(dtype: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def quiet_libraries() -> None:
    """Keep diffusers' and transformers' chatter out of the run log: warnings such as "`accelerate` was not
    found" and the per-model "Loading weights" progress bars; errors still show. A library whose
    ``DIFFUSERS_VERBOSITY`` / ``TRANSFORMERS_VERBOSITY`` environment variable is set is left as the user
    asked. (Download progress from huggingface_hub is left on: a first download can take minutes.)"""
    import os

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for env, lib in (("DIFFUSERS_VERBOSITY", diffusers_logging), ("TRANSFORMERS_VERBOSITY", transformers_logging)):
        if not os.environ.get(env):
            lib.set_verbosity_error()
            lib.disable_progress_bar()


def load_components(model_cfg: Any, device: str = "auto", dtype: str = "float32") -> Components:
    """Load (or fetch from the cache) the components that ``model_cfg`` names."""
    quiet_libraries()
    dev = resolve_device(device)
    if dtype == "auto":  # float32, except on a GPU where the model config names its own (Flux: bfloat16)
        dtype = (model_cfg.get("gpu_dtype") or "float32") if dev.type == "cuda" else "float32"
    dt = resolve_dtype(dtype)
    source = model_source(model_cfg)
    offload = model_cfg.get("offload")
    key = (source, model_cfg.get("prediction_type"), bool(model_cfg.get("allow_pickle")), str(dev), str(dt), offload)
    if key not in _CACHE:
        if source.startswith("builtin:"):
            comps = builtin_models()[source.removeprefix("builtin:")](seed=int(model_cfg.get("seed", 0)))
        else:
            comps = _load_from(source, model_cfg)
        if model_cfg.get("prediction_type"):
            comps.scheduler_config["prediction_type"] = model_cfg["prediction_type"]
        comps.name = model_cfg["name"]
        comps.source = source
        for m in comps.modules.values():
            if isinstance(m, torch.nn.Module):
                m.to(device="cpu" if offload else dev).eval().requires_grad_(False)
                if m.dtype != dt:
                    m.to(dtype=dt)
        if offload and dev.type != "cpu":  # on the CPU the weights are where they run already
            cpu_offload(comps, offload, dev)
        comps.device, comps.dtype = dev, dt
        log.info("Loaded model %s from %s (%s, %s%s)", comps.name, source, dev, dt,
                 f", {offload} CPU offload" if offload else "")
        _CACHE[key] = comps
    comps = _CACHE[key]
    # Each run gets its own copy of the scheduler config; the modules are shared (read-only). The model's
    # config goes along in info["model"]: a family reads its model-level settings there (Family.settings).
    return replace(comps, scheduler_config=copy.deepcopy(comps.scheduler_config),
                   info={**comps.info, "model": _plain(model_cfg)})


def _plain(cfg: Any) -> dict:
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


OFFLOAD_MODES = (None, "model", "sequential")


def cpu_offload(comps: Components, mode: str, device: torch.device) -> None:
    """Keep the weights in CPU memory and move them to ``device`` only while they run (accelerate's hooks, as
    diffusers' ``enable_model_cpu_offload`` / ``enable_sequential_cpu_offload`` install them): ``model``
    moves one whole module at a time, in the family's component order (text encoders, network, VAE; about
    the largest module's size on the GPU), ``sequential`` one layer at a time (least GPU memory, slowest)."""
    from accelerate import cpu_offload as sequential, cpu_offload_with_hook

    hook = None
    for module in comps.modules.values():
        if not isinstance(module, torch.nn.Module):
            continue
        if mode == "sequential":
            sequential(module, execution_device=device, offload_buffers=len(module._parameters) > 0)
        else:
            _, hook = cpu_offload_with_hook(module, device, prev_module_hook=hook)


def model_source(model_cfg: Any) -> str:
    if model_cfg.get("path"):
        return str(Path(model_cfg["path"]).expanduser().resolve())
    if model_cfg.get("bundled"):
        return str(bundled_models_dir() / model_cfg["bundled"])
    if model_cfg.get("builtin"):
        return f"builtin:{model_cfg['builtin']}"
    if model_cfg.get("hub_id"):
        return model_cfg["hub_id"]
    raise ModelLoadError(f"model {model_cfg.get('name')!r}: set model.path, model.hub_id or model.bundled")


NETWORK_CLASSES = ("UNet2DConditionModel", "UNet3DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel")


def _load_from(source: str, model_cfg: Any) -> Components:
    allow_pickle = bool(model_cfg.get("allow_pickle"))
    name = model_cfg.get("name", source)
    path = Path(source)
    if path.suffix in (".safetensors", ".ckpt", ".pt", ".bin") or path.is_file():
        if path.suffix != ".safetensors" and not allow_pickle:
            raise ModelLoadError(
                f"model.path={source}: refusing to load pickle weights (arbitrary code). Convert it to "
                "safetensors, or set model.allow_pickle=true if you trust the file."
            )
        if not path.is_file():
            raise ModelLoadError(f"model.path={source}: no such file")
        bad = safetensors_problem(path) if path.suffix == ".safetensors" else None
        if bad:
            raise ModelLoadError(f"model.path={source}: {bad}; download or convert it again")
        from diffusers import StableDiffusionPipeline

        try:
            pipe = StableDiffusionPipeline.from_single_file(
                str(path), safety_checker=None, requires_safety_checker=False,
                original_config=model_cfg.get("original_config"), config=model_cfg.get("config"),
            )
        except Exception as e:  # diffusers needs the model's config (a hub id or local folder)
            raise ModelLoadError(
                f"model.path={source}: could not load the single-file checkpoint ({type(e).__name__}: "
                f"{first_line(e)}). Set model.config=<local diffusers folder or hub id> with "
                "the matching configs, or use a diffusers folder."
            ) from e
        return sd_components(name, pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae, _scheduler_dict(pipe.scheduler))

    is_local = path.is_dir()
    if not is_local and (source.startswith(("/", ".", "~")) or model_cfg.get("path")):
        raise ModelLoadError(f"model.path={source}: no such folder")
    revision = model_cfg.get("revision")
    kw = dict(use_safetensors=None if allow_pickle else True, revision=revision)

    def load(local_only: bool) -> Components:
        return _load_folder(source, name, revision, local_only, kw)

    how = (f"Download it with `hf download {source}` on a machine with network (and accept its licence if it "
           f"is gated), or set model.path=<local diffusers folder or .safetensors file>.")
    try:  # a local folder, or a hub id already in the local cache: no network at all
        comps = load(local_only=True)
    except LOAD_ERRORS as e:
        if is_local:
            raise ModelLoadError(f"model.path={source}: not a loadable diffusers folder ({(first_line(e) or type(e).__name__)})") from e
        # Not (completely) in the cache. Ask the hub once, quickly: huggingface_hub's own retries against an
        # unreachable network take minutes before they give up.
        if _env_true("HF_HUB_OFFLINE"):
            raise ModelLoadError(f"model={name}: {source!r} is not in the local Hugging Face cache and "
                                 f"HF_HUB_OFFLINE is set. {how}") from e
        endpoint = hub_endpoint()
        if not hub_reachable_once():
            raise ModelLoadError(f"model={name}: {source!r} is not in the local Hugging Face cache and the hub "
                                 f"({endpoint}) cannot be reached. {how}") from e
        try:
            comps = load(local_only=False)
        except LOAD_ERRORS as e2:
            raise ModelLoadError(f"model={name}: cannot load {source!r} from the Hugging Face hub (not found, "
                                 f"gated or incomplete: {(first_line(e2) or type(e2).__name__)}). {how}") from e2
    return comps


def _load_folder(source: str, name: str, revision: str | None, local_only: bool, kw: dict) -> Components:
    """A diffusers folder or hub id: its family from ``model_index.json`` (the pipeline class; a folder without
    one is read as SD), then each component the family uses with the class ``model_index.json`` names, as
    ``DiffusionPipeline.from_pretrained`` does (safety checker and feature extractor are not loaded)."""
    import importlib

    import diffusers
    from diffusers import DDIMScheduler, DiffusionPipeline

    from stablefused.families import family_class, family_for_pipeline

    common = dict(revision=revision, local_files_only=local_only)
    try:
        index = dict(DiffusionPipeline.load_config(source, **common))
    except LOAD_ERRORS:
        if not Path(source).is_dir():
            raise
        index = {"_class_name": "StableDiffusionPipeline"}  # an SD folder written without model_index.json
    network_spec = index.get("unet") or index.get("transformer") or [None, None]
    family = family_class(family_for_pipeline(index.get("_class_name"), network_spec[1]))
    modules: dict[str, Any] = {}
    for part in family.components + family.optional:
        lib, cls_name = (index.get(part) or [None, None]) if part in index else _DEFAULT_CLASSES.get(part, (None, None))
        if cls_name is None:
            if part in family.optional:
                modules[part] = None
                continue
            raise ModelLoadError(f"model={name}: its model_index.json has no {part}, which a {family.name} model needs")
        if part in ("unet", "transformer") and lib == "diffusers" and cls_name not in NETWORK_CLASSES:
            raise ModelLoadError(f"model={name}: its {part} is a {cls_name}; StableFused runs {', '.join(NETWORK_CLASSES)}")
        cls = getattr(diffusers if lib == "diffusers" else importlib.import_module(lib), cls_name)
        extra = {} if part.startswith("tokenizer") else kw
        modules[part] = cls.from_pretrained(source, subfolder=part, **{**common, **extra})
    scheduler_config = dict(DDIMScheduler.load_config(source, subfolder="scheduler", **common))  # any class reads it
    # the pipeline's own settings in model_index.json (SDXL: force_zeros_for_empty_prompt, requires_aesthetics_score)
    info = {"pipeline_class": index.get("_class_name"),
            "pipeline_config": {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)}}
    return Components(name, modules, scheduler_config, torch.device("cpu"), torch.float32, info=info,
                      family_name=family.name)


# an SD folder without model_index.json: the classes SD's index names
_DEFAULT_CLASSES = {"tokenizer": ("transformers", "CLIPTokenizer"), "text_encoder": ("transformers", "CLIPTextModel"),
                    "unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL")}


LOAD_ERRORS = (OSError, ValueError, EnvironmentError)
HUB_TIMEOUT_S = 3.0  # the one reachability check of the hub before an online load


def _env_true(name: str) -> bool:
    import os

    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_endpoint() -> str:
    import os

    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_reachable(endpoint: str, timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether the hub endpoint answers at all (any HTTP status) within ``timeout`` seconds."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(endpoint + "/api/whoami-v2", method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return True  # it answered (401 without a token): reachable
    except (OSError, ValueError):
        return False
    return True


def named_model_config(name: str, where: str) -> dict:
    """The model config a setting names by one word (``model.refiner``, ``autoguidance.weak_model``):
    ``conf/model/<name>.yaml``, a builtin model, or a model folder. ``where`` names the setting in the
    ValueError for a name that is none of these."""
    from omegaconf import OmegaConf

    from stablefused.paths import config_dir

    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}={name!r}: must name a conf/model config, builtin model or model folder")
    path = config_dir() / "model" / f"{name}.yaml"
    if path.is_file():
        return dict(OmegaConf.to_container(OmegaConf.load(path)))
    if name in builtin_models():
        return {"name": name, "builtin": name}
    if Path(name).expanduser().is_dir():
        return {"name": Path(name).name, "path": str(Path(name).expanduser())}
    raise ValueError(f"{where}={name!r}: not a conf/model config, builtin model or model folder")


def builtin_models() -> dict[str, Any]:
    """Models built in code with random weights (tests and plumbing): name → ``builder(seed=0)``. Each
    family file may add its tiny model (``BUILTIN_MODELS["tiny_sdxl"] = build_tiny``)."""
    from stablefused.families import family_names

    family_names()  # imports every family file, which registers its tiny model
    return BUILTIN_MODELS


TINY_WORDS = "a an the red green blue yellow white black circle square triangle small large on of photo cat dog".split()


def build_tiny_random(seed: int = 0, prediction_type: str = "epsilon", cross_attention_dim: int = 32) -> Components:
    """A tiny Stable-Diffusion-shaped model with random weights, built in code (for tests)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from stablefused.text import build_word_tokenizer

    tokenizer = build_word_tokenizer(TINY_WORDS, model_max_length=16)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1, sample_size=16,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=cross_attention_dim, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer) + 8, max_position_embeddings=16,
    ))
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )
    return sd_components("tiny_random", tokenizer, text_encoder, unet, vae, _scheduler_dict(scheduler),
                         source="builtin:tiny_random")


BUILTIN_MODELS: dict[str, Any] = {"tiny_random": build_tiny_random}


def save_components(comps: Components, folder: str | Path) -> Path:
    """Write components as a diffusers folder (``model_index.json`` + subfolders, safetensors) that the
    family's reference pipeline loads too."""
    import json

    import diffusers

    folder = Path(folder)
    index: dict[str, Any] = {"_class_name": comps.info.get("pipeline_class") or comps.family.reference,
                             "_diffusers_version": diffusers.__version__, **comps.info.get("pipeline_config", {})}
    if comps.family.name == "sd":
        index.update(feature_extractor=[None, None], safety_checker=[None, None], requires_safety_checker=False,
                     image_encoder=[None, None])
    for part, module in comps.modules.items():
        if module is None:
            index[part] = [None, None]
            continue
        if isinstance(module, torch.nn.Module):
            module.save_pretrained(folder / part, safe_serialization=True)
        else:
            module.save_pretrained(folder / part)
        lib = "diffusers" if type(module).__module__.startswith("diffusers") else "transformers"
        index[part] = [lib, type(module).__name__]
    sched = getattr(diffusers, comps.scheduler_config["_class_name"]).from_config(comps.scheduler_config)
    sched.save_pretrained(folder / "scheduler")
    index["scheduler"] = ["diffusers", comps.scheduler_config["_class_name"]]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
