"""Train a bundled model from scratch: ``python -m stablefused.shapes.train`` (``shapes``), and through presets
``python -m stablefused.scenes.train scenes|scenes_flow`` (the compositional scene models).

One script for every bundled model: a *world* (``--world shapes|scenes``: the dataset module, its vocabulary and
its evaluation) and a *denoiser* (``--arch unet``: CLIP text encoder + UNet2DConditionModel, epsilon prediction,
DDPM noise; ``--arch sd3``: two CLIP text encoders + an SD3Transformer2DModel, flow matching, as SD3). Stages,
all seeded (``--seed``) and run with deterministic algorithms:

1. **VAE** (AutoencoderKL, downsampling factor 4, 4 latent channels). The reconstruction loss is balanced
   between foreground and background: each image's object pixels together weigh as much as its background
   pixels, so an object's colour is not sacrificed to the (much larger) background. Tiny KL weight.
2. **Decoder fine-tuning** (encoder frozen, so the latents do not change): the balanced loss with extra weight
   on outlines. Stage 1 alone turned some small circles into rounded squares (95% shape accuracy on shapes
   reconstructions); after stage 2 reconstructions keep every attribute. Then ``scaling_factor`` = 1 / std of
   the latents (and, for ``--arch sd3``, ``shift_factor`` = their mean, as SD3's VAE has), stored in the VAE
   config; the VAE is saved at once (``<out>/vae``), so ``--vae-from <out>`` resumes after it.
3. **Text encoder(s) + denoiser** trained jointly. ``unet``: epsilon prediction with the DDPM noise schedule of
   Stable Diffusion (scaled_linear 0.00085..0.012, 1000 steps), shipped with a DDIM config. ``sd3``: rectified
   flow (x_s = (1 - s) x0 + s noise, target noise - x0, s logit-normal as in the SD3 paper), shipped with
   ``FlowMatchEulerDiscreteScheduler``. 10% of prompts dropped to "" so classifier-free guidance works;
   ``--prompt-swap`` replaces prompts by other items' prompts at low noise (below); EMA weights are shipped.
4. Saved as a diffusers folder (safetensors) that the family's diffusers pipeline loads, then a quality report.

**Prompt swapping at low noise** (``--prompt-swap P --prompt-swap-sigma S``): with probability
P * max(0, 1 - sigma / S) (sigma = noise / signal of the training sample) the prompt is another item's. The
target is the true noise either way, so the model learns that when the prompt and a clearly visible image
disagree the image wins, as a model trained on real, loosely captioned images behaves (its implicit classifier
has a bounded gradient, so eps_cond - eps_uncond = -sigma * grad log p(c | x) shrinks with sigma). Exact captions
without it give a model whose conditional and unconditional predictions disagree wildly at low noise for an
image that contradicts the prompt: image-to-image at strength 0.15 becomes a noisy mess (issue 17).

Stages are independent given the seed: ``--vae-from FOLDER`` (a finished run's VAE, trained with the same args)
skips stages 1-2 and gives the same weights as the full run.

The tokenizers are CLIP tokenizers over the world's vocabulary (:func:`stablefused.text.build_word_tokenizer`;
``--whole-word-tokens``: every word one token).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
BUNDLED_DIR = MODELS_DIR / "shapes"  # the shipped shapes weights
WORLDS = {  # --world: the dataset module (IMAGE_SIZE, VOCABULARY, items(seeds)), the evaluation module
    "shapes": ("stablefused.shapes.data", "stablefused.shapes.evaluate"),
    "scenes": ("stablefused.scenes.data", "stablefused.scenes.evaluate"),
}


def world(name: str) -> SimpleNamespace:
    data_mod, eval_mod = WORLDS[name]
    return SimpleNamespace(name=name, data=importlib.import_module(data_mod), evaluate=eval_mod)


def world_items(args: argparse.Namespace, seeds):
    """The world's training items for ``seeds`` (scenes: with ``--single-others``)."""
    kw = {"single_others": tuple(args.single_others)} if args.single_others else {}
    return args.world.data.items(seeds, **kw)


def schedule(args: argparse.Namespace) -> dict:
    """The noise schedule for training (DDPMScheduler) and sampling (the shipped DDIM config)."""
    return dict(num_train_timesteps=1000, beta_start=args.beta_start, beta_end=args.beta_end, beta_schedule=args.beta_schedule)


def build_vae(args: argparse.Namespace):
    from diffusers import AutoencoderKL

    vc = tuple(args.vae_channels)
    return AutoencoderKL(
        block_out_channels=vc, in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * len(vc), up_block_types=("UpDecoderBlock2D",) * len(vc),
        layers_per_block=1, sample_size=args.world.data.IMAGE_SIZE,
    )


def build_denoiser(args: argparse.Namespace, latent_size: int) -> dict:
    """Tokenizer(s), text encoder(s) and the denoiser, as the components of a diffusers folder."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from stablefused.text import build_word_tokenizer

    window = args.max_tokens
    tokenizer = build_word_tokenizer(list(args.world.data.VOCABULARY), model_max_length=window,
                                     whole_words=args.whole_word_tokens)
    dim = args.text_dim
    text_cfg = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=dim, intermediate_size=2 * dim,
                    num_attention_heads=4, vocab_size=len(tokenizer), max_position_embeddings=window)
    if args.arch == "unet":
        from diffusers import UNet2DConditionModel

        text_encoder = CLIPTextModel(CLIPTextConfig(num_hidden_layers=2, **text_cfg))
        uc = tuple(args.unet_channels)
        unet = UNet2DConditionModel(
            block_out_channels=uc, layers_per_block=args.unet_layers, sample_size=latent_size,
            in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * len(uc), up_block_types=("CrossAttnUpBlock2D",) * len(uc),
            cross_attention_dim=dim, attention_head_dim=8, norm_num_groups=32,
        )
        return dict(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet)
    from diffusers import SD3Transformer2DModel

    # CLIP-L and CLIP-G stand-ins (3 layers: SD3 reads the penultimate hidden state), no T5
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(num_hidden_layers=3, projection_dim=dim, **text_cfg))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(num_hidden_layers=3, projection_dim=dim, **text_cfg))
    inner = args.dit_heads * args.dit_head_dim
    transformer = SD3Transformer2DModel(
        sample_size=latent_size, patch_size=args.dit_patch, in_channels=4, out_channels=4, num_layers=args.dit_layers,
        attention_head_dim=args.dit_head_dim, num_attention_heads=args.dit_heads, joint_attention_dim=2 * dim,
        caption_projection_dim=inner, pooled_projection_dim=2 * dim, pos_embed_max_size=latent_size,
        qk_norm="rms_norm")
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, tokenizer_2=copy.deepcopy(tokenizer),
                text_encoder_2=text_encoder_2, tokenizer_3=None, text_encoder_3=None, transformer=transformer)


def text_conditioning(mods: dict, ids: torch.Tensor, args: argparse.Namespace) -> dict:
    """The network's text inputs for token ids, with gradients (what the family's ``encode`` computes)."""
    if args.arch == "unet":
        return {"encoder_hidden_states": mods["text_encoder"](ids)[0]}
    from stablefused.families.sd3 import joint_embeds

    lo = mods["text_encoder"](ids, output_hidden_states=True)
    go = mods["text_encoder_2"](ids, output_hidden_states=True)
    t5 = torch.zeros((ids.shape[0], args.max_sequence_length, 2 * args.text_dim), device=ids.device)
    seq, pooled = joint_embeds(lo.hidden_states[-2], lo[0], go.hidden_states[-2], go[0], t5)
    return {"encoder_hidden_states": seq, "pooled_projections": pooled}


def to_tensor(imgs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous() * 2 - 1


def vae_loss_weights(masks: np.ndarray) -> torch.Tensor:
    """Per-pixel weights: foreground and background each sum to half of the image's total weight."""
    m = torch.from_numpy(masks).float()[:, None]
    n = m.shape[-1] * m.shape[-2]
    fg = m.sum((2, 3), keepdim=True).clamp(min=1)
    w = m * (n / (2 * fg)) + (1 - m) * (n / (2 * (n - fg)))
    return w


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def update(opt, params, loss, lr: float) -> None:
    """One optimiser step at learning rate ``lr``, gradients clipped to norm 1 (every stage)."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def train_vae(vae, args, log) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    vae.train()
    t0 = time.time()
    for step in range(args.vae_steps):
        seeds = range(10_000_000 + step * args.vae_batch, 10_000_000 + (step + 1) * args.vae_batch)
        imgs, _, masks = args.world.data.items(seeds)
        x = to_tensor(imgs).to(args.device)
        w = vae_loss_weights(masks).to(args.device)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        err = (rec - x)
        rec_loss = (w * (err.abs() + err.pow(2))).mean()
        kl = post.kl().mean() / (x.shape[1] * x.shape[2] * x.shape[3])
        loss = rec_loss + args.kl_weight * kl
        update(opt, vae.parameters(), loss, lr_at(step, args.vae_steps, args.vae_lr, 100))
        if step % 100 == 0 or step == args.vae_steps - 1:
            log(f"vae step {step}/{args.vae_steps} rec {rec_loss.item():.4f} kl {kl.item():.3f} ({time.time() - t0:.0f}s)")
    vae.eval()


def edge_map(masks: np.ndarray) -> np.ndarray:
    """Pixels within one pixel of a shape's outline (where circles, squares and triangles differ)."""
    m = torch.from_numpy(masks).float()[:, None]
    dil = F.max_pool2d(m, 3, 1, 1)
    ero = -F.max_pool2d(-m, 3, 1, 1)
    return (dil - ero)[:, 0].numpy() > 0


def finetune_decoder(vae, args, log) -> None:
    """Stage 3: sharpen the decoder's outlines with the encoder frozen (latents, hence the UNet, unchanged).

    Same balanced loss as stage 1, with outline pixels weighted ``1 + edge_weight``, on latents sampled
    from the frozen encoder's posterior with a generator of its own: a pure function of the VAE and seed.
    """
    if args.decoder_steps <= 0:
        return
    dec_params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(dec_params, lr=args.decoder_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 2)
    vae.train()
    t0 = time.time()
    for step in range(args.decoder_steps):
        seeds = range(20_000_000 + step * args.vae_batch, 20_000_000 + (step + 1) * args.vae_batch)
        imgs, _, masks = world_items(args, seeds)
        x = to_tensor(imgs).to(args.device)
        w = (vae_loss_weights(masks) * (1 + args.edge_weight * torch.from_numpy(edge_map(masks)).float()[:, None])).to(args.device)
        with torch.no_grad():
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(args.device)
        rec = vae.decode(z).sample
        err = rec - x
        loss = (w * (err.abs() + err.pow(2))).mean()
        update(opt, dec_params, loss, lr_at(step, args.decoder_steps, args.decoder_lr, 50))
        if step % 100 == 0 or step == args.decoder_steps - 1:
            log(f"decoder step {step}/{args.decoder_steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    vae.eval()


@torch.no_grad()
def encode_dataset(vae, n: int, args) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Latent means/stds and prompts of dataset items 0..n-1."""
    means, stds, prompts = [], [], []
    for start in range(0, n, 256):
        imgs, p, _ = world_items(args, range(start, min(n, start + 256)))
        post = vae.encode(to_tensor(imgs).to(args.device)).latent_dist
        means.append(post.mean.cpu())
        stds.append(post.std.cpu())
        prompts += p
    return torch.cat(means), torch.cat(stds), prompts


def swap_probability(sigma: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    """``--prompt-swap`` P * max(0, 1 - sigma / ``--prompt-swap-sigma``), per sample."""
    return args.prompt_swap * (1 - sigma / args.prompt_swap_sigma).clamp(min=0)


def train_denoiser(mods: dict, latents, prompts, args, log, save=None) -> dict:
    """Stage 3: text encoder(s) + denoiser jointly; returns the EMA copies (same keys as ``mods``)."""
    from diffusers import DDPMScheduler

    means, stds = latents
    flow = args.arch == "sd3"
    net_key = "transformer" if flow else "unet"
    text_keys = [k for k in ("text_encoder", "text_encoder_2") if mods.get(k) is not None]
    trained = [net_key] + ([] if args.text_from else text_keys)  # --text-from: the text encoders stay frozen
    alphas = DDPMScheduler(**schedule(args)).alphas_cumprod.to(args.device)
    tok = mods["tokenizer"]
    ids_all = tok(prompts, padding="max_length", max_length=args.max_tokens, truncation=True, return_tensors="pt").input_ids
    empty = tok([""], padding="max_length", max_length=args.max_tokens, return_tensors="pt").input_ids
    params = [p for k in trained for p in mods[k].parameters()]
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.01)
    ema = {k: copy.deepcopy(mods[k]).requires_grad_(False) for k in trained}
    ema_params = [p for k in trained for p in ema[k].parameters()]
    for k in trained:
        mods[k].train()
    g = torch.Generator().manual_seed(args.seed + 1)
    n, b = len(prompts), args.unet_batch
    t0 = time.time()
    running = 0.0
    for step in range(args.unet_steps):
        idx = torch.randint(0, n, (b,), generator=g)
        z0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g) - args.shift_factor) * args.scaling_factor
        ids = ids_all[idx].clone()
        drop = torch.rand(b, generator=g) < args.p_uncond
        noise = torch.randn(z0.shape, generator=g)
        if flow:  # logit-normal s (SD3 paper) or uniform (rectified flow); sigma = noise/signal = s / (1 - s)
            s = torch.sigmoid(torch.randn(b, generator=g)) if args.flow_times == "logit_normal" else torch.rand(b, generator=g)
            sigma, t = s / (1 - s), s * 1000
        else:
            t = torch.randint(0, 1000, (b,), generator=g)
            a = alphas[t].cpu()
            sigma = ((1 - a) / a).sqrt()
        if args.prompt_swap > 0:  # (no draws at 0: the random stream of a model trained without it)
            swap = torch.rand(b, generator=g) < swap_probability(sigma, args)
            other = torch.randint(0, n, (b,), generator=g)
            ids[swap] = ids_all[other[swap]]
        ids[drop] = empty[0]
        z0, noise, t, ids = z0.to(args.device), noise.to(args.device), t.to(args.device), ids.to(args.device)
        cond = text_conditioning(mods, ids, args)
        if flow:
            sv = (t / 1000).view(-1, 1, 1, 1)
            pred = mods[net_key](hidden_states=(1 - sv) * z0 + sv * noise, timestep=t, **cond).sample
            target = noise - z0
        else:
            a = alphas[t].view(-1, 1, 1, 1)
            pred = mods[net_key](a.sqrt() * z0 + (1 - a).sqrt() * noise, t, cond["encoder_hidden_states"]).sample
            target = noise
        loss = F.mse_loss(pred, target)
        update(opt, params, loss, lr_at(step, args.unet_steps, args.unet_lr, 200))
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if step % 200 == 0 or step == args.unet_steps - 1:
            log(f"{net_key} step {step}/{args.unet_steps} loss {running:.4f} ({time.time() - t0:.0f}s)")
        if save and args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.unet_steps:
            save({**mods, **ema}, step + 1)
    return {**mods, **{k: m.eval() for k, m in ema.items()}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--name", default="shapes", help="the model's name (bundled folder, default output folder)")
    p.add_argument("--world", default="shapes", choices=sorted(WORLDS), help="the dataset")
    p.add_argument("--arch", default="unet", choices=("unet", "sd3"),
                   help="unet: CLIP + UNet, epsilon, DDIM; sd3: two CLIPs + SD3 transformer, flow matching")
    p.add_argument("--out", default=None,
                   help="diffusers folder to write (default: runs/<name>_train/<timestamp> under the current folder)")
    p.add_argument("--overwrite-bundled", action="store_true",
                   help=f"write over the shipped weights in {MODELS_DIR}/<name> (the only way to write there)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy 2-core machine)")
    p.add_argument("--vae-threads", type=int, default=None,
                   help="threads for stages 1-2 (default --threads); the thread count changes float rounding, so "
                        "a VAE other presets load keeps its bytes only at the thread count it was trained with")
    p.add_argument("--device", default="cpu")
    p.add_argument("--vae-steps", type=int, default=2500)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-channels", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--kl-weight", type=float, default=1e-4, help="KL weight, per latent element vs per pixel")
    p.add_argument("--beta-schedule", default="scaled_linear", help="noise schedule (training and shipped DDIM)")
    p.add_argument("--beta-start", type=float, default=0.00085)
    p.add_argument("--beta-end", type=float, default=0.012)
    p.add_argument("--vae-from", default=None, metavar="FOLDER",
                   help="skip stages 1-2 and load the VAE of FOLDER (a run with the same args, finished or past stage 2)")
    p.add_argument("--vae-only", action="store_true", help="stop after stage 2 (the VAE is in <out>/vae)")
    p.add_argument("--text-from", default=None, metavar="FOLDER",
                   help="load FOLDER's text encoder(s) and keep them frozen: a companion model that takes FOLDER's "
                        "text conditioning (the weak model of autoguidance); use --vae-from FOLDER too")
    p.add_argument("--unet-steps", type=int, default=4000, help="stage 3 steps (UNet or transformer)")
    p.add_argument("--unet-batch", type=int, default=64)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--unet-channels", type=int, nargs="+", default=[64, 128])
    p.add_argument("--unet-layers", type=int, default=1)
    p.add_argument("--dit-layers", type=int, default=6, help="--arch sd3: joint transformer blocks")
    p.add_argument("--dit-patch", type=int, default=2, help="--arch sd3: patch size (latent pixels per token side)")
    p.add_argument("--dit-heads", type=int, default=4)
    p.add_argument("--dit-head-dim", type=int, default=32)
    p.add_argument("--flow-shift", type=float, default=1.0, help="--arch sd3: the shipped scheduler's shift")
    p.add_argument("--flow-times", default="logit_normal", choices=("logit_normal", "uniform"),
                   help="--arch sd3: how training draws s (uniform draws s < 0.2 or > 0.8 2.4x as often)")
    p.add_argument("--max-sequence-length", type=int, default=4,
                   help="--arch sd3: the (zero) T5 tokens the transformer sees; sample with the same model.max_sequence_length")
    p.add_argument("--text-dim", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=16, help="tokenizer window (prompts are truncated to it)")
    p.add_argument("--whole-word-tokens", action="store_true",
                   help="one token per vocabulary word (without it some words split into pieces, as the shipped "
                        "shapes and scenes tokenizers do: stablefused.text.build_word_tokenizer)")
    p.add_argument("--p-uncond", type=float, default=0.1, help="prompt dropout for classifier-free guidance")
    p.add_argument("--prompt-swap", type=float, default=0.5, help="prompt-swap probability at sigma 0 (see above)")
    p.add_argument("--prompt-swap-sigma", type=float, default=2.0, help="sigma where prompt swapping stops")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--single-others", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="--world scenes: unnamed objects beside a single-object scene's named one (data default 0 2)")
    p.add_argument("--dataset-size", type=int, default=50_000, help="items encoded for stage 3")
    p.add_argument("--decoder-steps", type=int, default=1500, help="stage 2: decoder-only fine-tuning steps")
    p.add_argument("--decoder-lr", type=float, default=5e-4)
    p.add_argument("--edge-weight", type=float, default=4.0, help="extra loss weight on outlines in stage 2")
    p.add_argument("--save-every", type=int, default=0, help="also save EMA checkpoints every N stage-3 steps (to <out>-step<N>)")
    p.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True, help="VAE accuracy after its stages and a quality report at the end")
    args = p.parse_args(argv)
    if args.single_others and (args.world != "scenes" or not 0 <= args.single_others[0] <= args.single_others[1] <= 2):
        p.error(f"--single-others {' '.join(map(str, args.single_others))}: give MIN MAX with 0 <= MIN <= MAX <= 2, "
                "for --world scenes only")
    args.out = str(output_dir(args, p.error))
    return args


def output_dir(args: argparse.Namespace, error=None) -> Path:
    """Where a training run writes: ``--out``, else a fresh ``runs/<name>_train/<timestamp>``. The shipped
    weights are written over only with ``--overwrite-bundled`` (a typo'd or default ``--out`` never does)."""
    bundled = (MODELS_DIR / args.name).resolve()
    if args.overwrite_bundled:
        if args.out and Path(args.out).resolve() != bundled:
            (error or _fail)("--overwrite-bundled writes to the bundled folder; do not also give --out")
        return MODELS_DIR / args.name
    if args.out is None:
        return Path("runs") / f"{args.name}_train" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out = Path(args.out)
    if out.resolve() == bundled or out.resolve().parent == MODELS_DIR.resolve():
        (error or _fail)(f"--out {args.out} is a bundled model's folder; add --overwrite-bundled (and drop --out) "
                         "to replace the shipped weights")
    return out


def _fail(msg: str):
    raise SystemExit(f"error: {msg}")


def _vae_stages(vae, args, out: Path, log):
    """Stages 1-2, or the VAE of ``--vae-from``; latents' scaling (and shift) in its config; saved to <out>/vae."""
    from diffusers import AutoencoderKL

    ev = importlib.import_module(args.world.evaluate)
    if args.vae_from:  # stages 1-2 already run with these args (they are independent of everything after)
        vae.load_state_dict(AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae").state_dict())
        log(f"vae loaded from {args.vae_from}")
    else:
        train_vae(vae, args, log)
        if args.eval:  # reports only: no random draws, so the weights do not depend on them
            log(f"vae reconstruction accuracy (fresh items): {ev.vae_accuracy(SimpleNamespace(vae=vae))}")
        finetune_decoder(vae, args, log)
        if args.eval:
            log(f"vae reconstruction accuracy after decoder fine-tuning: {ev.vae_accuracy(SimpleNamespace(vae=vae))}")
    torch.set_num_threads(args.threads)  # stages 1-2 ran on --vae-threads
    means, stds, prompts = encode_dataset(vae, args.dataset_size, args)
    z = means + stds * torch.randn(means.shape, generator=torch.Generator().manual_seed(args.seed))
    args.shift_factor = float(z.mean()) if args.arch == "sd3" else 0.0  # SD1.x-style pipelines apply no shift
    args.scaling_factor = float(1.0 / (z - args.shift_factor).pow(2).mean().sqrt()) if args.arch == "sd3" else float(1.0 / z.std())
    vae.register_to_config(scaling_factor=args.scaling_factor, shift_factor=args.shift_factor if args.arch == "sd3" else None)
    log(f"encoded {len(prompts)} items; latent mean {float(z.mean()):.3f} std {float(z.std()):.3f}; scaling_factor "
        f"{args.scaling_factor:.4f}, shift_factor {args.shift_factor:.4f}")
    vae.cpu().save_pretrained(out / "vae", safe_serialization=True)
    return vae.to(args.device), (means, stds), prompts


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.world = world(args.world)
    torch.set_num_threads(args.vae_threads or args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - start:7.1f}s] {msg}", flush=True)

    log(f"args: {dict(vars(args), world=args.world.name)}")
    # every module built first, in one order, from the seed (the random stream is then the VAE stages')
    vae = build_vae(args).to(args.device)
    mods = build_denoiser(args, args.world.data.IMAGE_SIZE // 2 ** (len(args.vae_channels) - 1))
    for m in mods.values():
        if isinstance(m, torch.nn.Module):
            m.to(args.device)
    log("params: " + ", ".join(f"{k} {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M"
                               for k, m in {**mods, "vae": vae}.items() if isinstance(m, torch.nn.Module)))
    vae, latents, prompts = _vae_stages(vae, args, out, log)
    if args.vae_only:
        return
    if args.text_from:
        import transformers

        for k in ("text_encoder", "text_encoder_2"):
            if mods.get(k) is not None:
                loaded = getattr(transformers, type(mods[k]).__name__).from_pretrained(args.text_from, subfolder=k)
                mods[k].load_state_dict(loaded.state_dict())
                mods[k].requires_grad_(False).eval()
        log(f"text encoder(s) loaded from {args.text_from} (frozen)")
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    from stablefused.models import Components, save_components

    if args.arch == "unet":
        sched = DDIMScheduler(**schedule(args), clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type="epsilon")
    else:
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=args.flow_shift)

    def save(trained: dict, step: int | None = None) -> Path:
        folder = out if step is None else out.with_name(f"{out.name}-step{step}")
        modules = {k: copy.deepcopy(m).cpu() if isinstance(m, torch.nn.Module) else m for k, m in trained.items()}
        comps = Components(args.name, {**modules, "vae": copy.deepcopy(vae).cpu()},
                           {**sched.config, "_class_name": type(sched).__name__}, torch.device("cpu"), torch.float32,
                           family_name="sd" if args.arch == "unet" else "sd3")
        save_components(comps, folder)
        if step is not None:  # loadable like the final folder: a flow model's T5 length is in its training args
            _write_training_args(args, folder, start, step=step)
            log(f"checkpoint at step {step}: {folder}")
        return folder

    trained = train_denoiser(mods, latents, prompts, args, log, save)
    save(trained)
    _finish(args, out, start, log)


def _write_training_args(args, folder: Path, start: float, step: int | None = None) -> None:
    skip = ("out", "overwrite_bundled", "device", "vae_from", "vae_only", "world")
    train_info = {k: v for k, v in vars(args).items() if k not in skip}
    train_info["world"] = args.world.name
    if step is not None:
        train_info["checkpoint_step"] = step
    train_info["train_seconds"] = round(time.time() - start, 1)
    (folder / "training_args.json").write_text(json.dumps(train_info, indent=2) + "\n")


def _finish(args, out: Path, start: float, log) -> None:
    _write_training_args(args, out, start)
    log(f"saved to {out} ({sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 1e6:.1f} MB)")
    if args.eval:
        ev = importlib.import_module(args.world.evaluate)
        for line in ev.quality_report(str(out)):
            log(line)


if __name__ == "__main__":
    main()
