from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from stablefused.hooks import BaseHook, LoopContext, StepState
from stablefused.records import StepTracker, _check_every, _check_samples, recorder_name, sample_rows, save_recorder
from stablefused.registry import PluginError, register


class MapProcessor:
    """Wraps a cross-attention layer's processor: the original computes the layer's output (so images do not
    change by a single bit); on the side, when the recorder is active, the softmax attention probabilities of
    the layer's queries over the text tokens are recomputed, averaged over heads, resized to the latent grid
    and added to the recorder's per-call buffer."""

    def __init__(self, original: Any, name: str, sink: "Attention"):
        self.original, self.name, self.sink = original, name, sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if self.sink.active and encoder_hidden_states is not None:
            self.sink.add(attn, hidden_states, encoder_hidden_states)
        return out


@register("recorders", "attention")
class Attention(BaseHook):
    """Cross-attention maps per prompt token (DAAM-style), accumulated over chosen layers and steps; on SD3's
    joint attention, the image queries' attention to the text tokens (softmax over the text keys alone; the
    token strings name the CLIP positions, the T5 positions after them are recorded unnamed).

    Tensor ``attention`` (N, T, H, W) at the latent resolution, T = the tokenizer's max length (BOS, the
    prompt's tokens, EOS, padding; their strings are in the index under ``tokens``). Each value is the mean,
    over the chosen cross-attention layers, heads and UNet calls of the chosen steps, of the softmax
    probability that the pixel's query gives the token, each layer's map bilinearly resized to H×W (videos:
    also the mean over the frames, whose spatial layers attend to the prompt frame by frame). So
    ``attention.sum(dim=1) == 1`` at every pixel (up to rounding); only the conditional pass is used.
    Parameters: ``layers`` (null = every cross-attention layer, else name substrings such as
    ``[up_blocks, mid_block]``), ``every``/``steps`` (which scheduler steps: every k-th, or an explicit list),
    ``samples``, ``dtype``. Processors are wrapped (the originals compute every output) and restored after
    each batch.
    """

    ranges = {"every": (1, None), "steps": (0, None), "samples": (0, None)}
    RESUME_STATE = ("used_layers", "tracker.start_step")  # with the chunks: what a resumed run needs

    run_params = {"samples": "images", "every": "every", "steps": "steps", "layers": "list"}

    def __init__(self, layers: list[str] | str | None = None, every: int = 1, steps: list[int] | None = None,
                 samples: list[int] | int | None = None, dtype: Literal["float16", "bfloat16", "float32"] | None = "float32"):
        from stablefused.records import _check_dtype

        if isinstance(layers, str):
            layers = [layers]
        self.layers = None if layers is None else [str(x) for x in layers]
        self.every = _check_every(every)
        self.steps = None if steps is None else [int(s) for s in steps]
        self.samples = _check_samples(samples)
        self.dtype = _check_dtype(dtype)
        self.tracker = StepTracker("step")
        self.active = False
        self._offset = 0
        self._chunks: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []  # (indices, sums, counts)
        self._unet = None
        self._originals: dict | None = None
        self.used_layers: list[str] = []

    # -- processor management
    def _chosen(self, step: int) -> bool:
        if self.steps is not None:
            return step in self.steps
        return step % self.every == 0

    def install(self, unet: Any) -> None:
        procs = dict(unet.attn_processors)
        # a run that crashed mid-loop may have left wrappers behind: unwrap them first
        procs = {k: (p.original if isinstance(p, MapProcessor) else p) for k, p in procs.items()}
        # UNet attn2, or SD3's joint attention (not Flux's: its processor rotates q/k, which is not done here)
        cross = [f"{n}.processor" for n, m in unet.named_modules() if f"{n}.processor" in procs and (
                 getattr(m, "is_cross_attention", False) or (getattr(m, "add_k_proj", None) is not None
                                                             and "JointAttnProcessor" in type(procs[f"{n}.processor"]).__name__))]
        chosen = [k for k in cross if self.layers is None or any(s in k for s in self.layers)]
        if not chosen:
            raise PluginError(f"recorders.attention: layers={self.layers} matches no cross-attention layer; "
                              f"layers are {', '.join(k.removesuffix('.processor') for k in cross)}")
        self._unet, self._originals, self.used_layers = unet, procs, [k.removesuffix(".processor") for k in chosen]
        unet.set_attn_processor({k: MapProcessor(p, k, self) if k in chosen else p for k, p in procs.items()})

    def restore(self) -> None:
        if self._unet is not None and self._originals is not None:
            self._unet.set_attn_processor(dict(self._originals))
        self._unet = self._originals = None
        self.active = False

    # -- hook
    def before_loop(self, ctx: LoopContext) -> None:
        self.tracker.reset(ctx)
        indices, keep = sample_rows(ctx, self._offset, self.samples)
        self._offset += ctx.latents.shape[0]
        self._indices, self._keep = [indices[k] for k in keep], keep
        self._size = tuple(ctx.latents.shape[-2:])
        self._frames = ctx.latents.shape[2] if ctx.latents.ndim == 5 else 1  # video: UNet rows = sample x frame
        self._tokens = ctx.cond_embeds.shape[1]
        b = ctx.latents.shape[0]
        self._sum = torch.zeros((b, self._tokens, *self._size), device=ctx.latents.device, dtype=torch.float32)
        self._count = torch.zeros(b, device=ctx.latents.device, dtype=torch.float32)
        self._call: torch.Tensor | None = None
        self._layers_in_call = 0
        if self._indices:
            self.install(ctx.network)
            self.active = self._chosen(0)

    def add(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> None:
        """Head-averaged attention probabilities (rows, T, H, W) of one layer, added to this call's buffer."""
        x = hidden_states
        if getattr(attn, "add_k_proj", None) is not None:  # joint attention (SD3's MMDiT)
            probs = self._joint_probs(attn, x, encoder_hidden_states)
            rows, hw, tokens = probs.shape
            return self._add_maps(probs, rows, hw, tokens)
        if x.ndim == 4:
            b, c, h, w = x.shape
            x = x.view(b, c, h * w).transpose(1, 2)
        if getattr(attn, "group_norm", None) is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        ctx = encoder_hidden_states
        if getattr(attn, "norm_cross", None):
            ctx = attn.norm_encoder_hidden_states(ctx)
        q = attn.head_to_batch_dim(attn.to_q(x))
        k = attn.head_to_batch_dim(attn.to_k(ctx))
        probs = attn.get_attention_scores(q, k, None)  # (rows*heads, HW, T)
        rows, hw, tokens = x.shape[0], probs.shape[1], probs.shape[2]
        self._add_maps(probs.view(rows, attn.heads, hw, tokens).mean(1).float(), rows, hw, tokens)

    @staticmethod
    def _joint_probs(attn: Any, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Joint attention (``JointAttnProcessor2_0``): the image queries' softmax over the text keys alone
        (= their attention to the text, renormalised over the text tokens), averaged over heads:
        (rows, image tokens, text tokens)."""
        b, heads = x.shape[0], attn.heads
        q = attn.to_q(x)
        d = q.shape[-1] // heads
        q = q.view(b, -1, heads, d).transpose(1, 2)
        k = attn.add_k_proj(context).view(b, -1, heads, d).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_added_k is not None:
            k = attn.norm_added_k(k)
        return torch.softmax((q.float() @ k.float().transpose(-1, -2)) * attn.scale, dim=-1).mean(1)

    def _add_maps(self, probs: torch.Tensor, rows: int, hw: int, tokens: int) -> None:
        """Per-layer maps (rows, image tokens, T) onto the latent grid, added to this call's buffer."""
        h, w = self._grid(hw)
        maps = probs.transpose(1, 2).reshape(rows, tokens, h, w)
        if (h, w) != self._size:
            maps = F.interpolate(maps, size=self._size, mode="bilinear", align_corners=False)
        self._call = maps if self._call is None else self._call + maps
        self._layers_in_call += 1

    def _grid(self, hw: int) -> tuple[int, int]:
        H, W = self._size
        f = max(1, round(math.sqrt(H * W / hw)))
        for g in (f, f // 2 or 1, f * 2):
            h, w = math.ceil(H / g), math.ceil(W / g)
            if h * w == hw:
                return h, w
        raise RuntimeError(f"attention recorder: cannot place {hw} queries on a {H}x{W} latent grid")

    def on_step(self, state: StepState) -> None:
        step, _ = self.tracker.observe(state)
        if self._call is not None:
            # the UNet batch was [rows needing uncond, rows needing cond]: keep the conditional rows
            n_uncond = int(state.has_uncond.sum())
            rows = state.has_cond.nonzero().flatten().to(self._sum.device)
            call = self._call
            if self._frames > 1:  # (rows * F, T, H, W), frames of a row adjacent → mean over the frames
                call = call.view(-1, self._frames, *call.shape[1:]).mean(1)
            cond = call[n_uncond:]
            if len(rows):
                self._sum.index_add_(0, rows, cond)
                self._count.index_add_(0, rows, torch.full((len(rows),), float(self._layers_in_call),
                                                           device=self._count.device))
        self._call, self._layers_in_call = None, 0
        # is the next UNet call part of a chosen step?
        nxt = step + 1 if self.tracker.next_call_starts_step() else step
        self.active = bool(self._indices) and self._chosen(nxt)
        return None

    def after_loop(self, ctx: LoopContext, latents: torch.Tensor) -> None:
        self.restore()
        if not self._indices:
            return
        keep = torch.tensor(self._keep, device=self._sum.device)
        mean = self._sum.index_select(0, keep) / self._count.index_select(0, keep).clamp(min=1).view(-1, 1, 1, 1)
        self._chunks.append((self._indices, mean.to("cpu", self.dtype or torch.float32),
                             self._count.index_select(0, keep).cpu()))
        self._sum = self._count = None

    # -- results
    def result(self, run: Any = None) -> tuple[dict, dict]:
        indices = [i for idx, _, _ in self._chunks for i in idx]
        order = sorted(range(len(indices)), key=indices.__getitem__)
        tensors = {}
        if self._chunks:
            maps = torch.cat([m for _, m, _ in self._chunks])[order]
            tensors["attention"] = (maps.contiguous(), ("sample", "token", "height", "width"))
        counts = torch.cat([c for _, _, c in self._chunks])[order].tolist() if self._chunks else []
        info = {"kind": "attention", "layers": self.used_layers, "every": self.every, "steps_chosen": self.steps,
                "samples": sorted(indices), "maps_averaged": counts, "steps": [], "t": [], "sigma": [],
                "normalisation": "mean over layers, heads and calls of softmax probabilities: sums to 1 over "
                                 "tokens at each pixel"}
        if run is not None:
            info["tokens"] = self._token_strings(run, sorted(indices))
        return tensors, info

    @staticmethod
    def _token_strings(run: Any, indices: list[int]) -> dict[str, list[str]]:
        tok = run.tokenizer
        prompt_of = {int(r["index"]): r["prompt"] for r in run.records}
        out = {}
        for i in indices:
            if i in prompt_of:
                ids = tok(prompt_of[i], truncation=True, max_length=tok.model_max_length).input_ids
                out[str(i)] = [t.replace("</w>", "") for t in tok.convert_ids_to_tokens(ids)]
        return out

    def save(self, run: Any) -> list[Path]:
        return save_recorder(run, recorder_name(self), self)
