"""Train the bundled ``shapes`` model from scratch: ``python -m stablefused.shapes.train``.

Stages, all seeded (``--seed``) and run with deterministic algorithms:

1. **VAE** (AutoencoderKL, 32x32x3 <-> 8x8x4, downsampling factor 4). The reconstruction loss is balanced
   between foreground and background: each image's shape pixels together weigh as much as its background
   pixels, so the shape's colour is not sacrificed to the (much larger) background. Tiny KL weight.
   Then ``scaling_factor`` = 1 / std of the latents, stored in the VAE config.
2. **Text encoder + UNet** (CLIPTextModel + UNet2DConditionModel with cross-attention) trained jointly on
   epsilon prediction with the DDPM noise schedule of Stable Diffusion (scaled_linear 0.00085..0.012, 1000
   steps), 10% of prompts dropped to "" so classifier-free guidance works; EMA weights are shipped.
3. **Decoder fine-tuning** (encoder frozen, so latents and UNet stay valid): the balanced loss with extra
   weight on shape outlines. Stage 1 alone turned some small circles into rounded squares (95% shape
   accuracy on reconstructions); after stage 3 reconstructions keep every attribute.
4. Saved as a diffusers folder (safetensors) with a DDIM scheduler config, then a quick quality report.

Stages are independent given the seed, so a run can be resumed: ``--vae-from`` (skip stage 1) and
``--finetune-decoder-of`` (only stage 3) give the same weights as the full run.

The tokenizer is a CLIP tokenizer over the dataset vocabulary (:func:`stablefused.text.build_word_tokenizer`).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stablefused.shapes import data

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "models" / "shapes"  # the shipped weights


def schedule(args: argparse.Namespace) -> dict:
    """The noise schedule for training (DDPMScheduler) and sampling (the shipped DDIM config)."""
    return dict(num_train_timesteps=1000, beta_start=args.beta_start, beta_end=args.beta_end, beta_schedule=args.beta_schedule)


def build_models(args: argparse.Namespace):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from stablefused.text import build_word_tokenizer

    tokenizer = build_word_tokenizer(list(data.VOCABULARY), model_max_length=16)
    torch.manual_seed(args.seed)
    vc = tuple(args.vae_channels)
    vae = AutoencoderKL(
        block_out_channels=vc, in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * len(vc), up_block_types=("UpDecoderBlock2D",) * len(vc),
        layers_per_block=1, sample_size=data.IMAGE_SIZE,
    )
    dim = args.text_dim
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=dim, intermediate_size=2 * dim,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=16,
    ))
    uc = tuple(args.unet_channels)
    unet = UNet2DConditionModel(
        block_out_channels=uc, layers_per_block=args.unet_layers, sample_size=data.IMAGE_SIZE // 2 ** (len(vc) - 1),
        in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * len(uc), up_block_types=("CrossAttnUpBlock2D",) * len(uc),
        cross_attention_dim=dim, attention_head_dim=8, norm_num_groups=32,
    )
    return tokenizer, text_encoder, unet, vae


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
        imgs, _, _, masks = data.batch(seeds)
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
        imgs, _, _, masks = data.batch(seeds)
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
def encode_dataset(vae, n: int, device) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Latent means/stds and prompts of dataset items 0..n-1."""
    means, stds, prompts = [], [], []
    for start in range(0, n, 256):
        imgs, _, p, _ = data.batch(range(start, min(n, start + 256)))
        post = vae.encode(to_tensor(imgs).to(device)).latent_dist
        means.append(post.mean.cpu())
        stds.append(post.std.cpu())
        prompts += p
    return torch.cat(means), torch.cat(stds), prompts


def train_unet(unet, text_encoder, tokenizer, latents, prompts, args, log, save=None):
    from diffusers import DDPMScheduler

    means, stds = latents
    noise_sched = DDPMScheduler(**schedule(args))
    alphas = noise_sched.alphas_cumprod.to(args.device)
    ids_all = tokenizer(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=16, return_tensors="pt").input_ids
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.01)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    unet.train()
    text_encoder.train()
    g = torch.Generator().manual_seed(args.seed + 1)
    n = len(prompts)
    t0 = time.time()
    running = 0.0
    for step in range(args.unet_steps):
        idx = torch.randint(0, n, (args.unet_batch,), generator=g)
        z0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)) * args.scaling_factor
        ids = ids_all[idx].clone()
        drop = torch.rand(args.unet_batch, generator=g) < args.p_uncond
        ids[drop] = empty[0]
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (args.unet_batch,), generator=g)
        z0, noise, t, ids = z0.to(args.device), noise.to(args.device), t.to(args.device), ids.to(args.device)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        cond = text_encoder(ids)[0]
        pred = unet(zt, t, cond).sample
        loss = F.mse_loss(pred, noise)
        update(opt, params, loss, lr_at(step, args.unet_steps, args.unet_lr, 200))
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if step % 200 == 0 or step == args.unet_steps - 1:
            log(f"unet step {step}/{args.unet_steps} loss {running:.4f} ({time.time() - t0:.0f}s)")
        if save and args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.unet_steps:
            save(ema_unet, ema_text, step + 1)
    return ema_unet.eval(), ema_text.eval()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=None,
                   help="diffusers folder to write (default: runs/shapes_train/<timestamp> under the current folder)")
    p.add_argument("--overwrite-bundled", action="store_true",
                   help=f"write over the shipped weights in {BUNDLED_DIR} (the only way to write there)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy 2-core machine)")
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
                   help="skip stage 1 and load the VAE of FOLDER's model, trained earlier with the same args")
    p.add_argument("--unet-steps", type=int, default=4000)
    p.add_argument("--unet-batch", type=int, default=64)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--unet-channels", type=int, nargs="+", default=[64, 128])
    p.add_argument("--unet-layers", type=int, default=1)
    p.add_argument("--text-dim", type=int, default=64)
    p.add_argument("--p-uncond", type=float, default=0.1, help="prompt dropout for classifier-free guidance")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--dataset-size", type=int, default=50_000, help="items encoded for UNet training")
    p.add_argument("--decoder-steps", type=int, default=1500, help="stage 3: decoder-only fine-tuning steps")
    p.add_argument("--decoder-lr", type=float, default=5e-4)
    p.add_argument("--edge-weight", type=float, default=4.0, help="extra loss weight on shape outlines in stage 3")
    p.add_argument("--finetune-decoder-of", default=None, metavar="FOLDER",
                   help="only run stage 3 on FOLDER's model (trained with these args) and save to --out; equals "
                        "the full run's result, for resuming")
    p.add_argument("--save-every", type=int, default=0, help="also save EMA checkpoints every N UNet steps (to <out>-step<N>)")
    p.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True, help="quality report at the end")
    args = p.parse_args(argv)
    args.out = str(output_dir(args, p.error))
    return args


def output_dir(args: argparse.Namespace, error=None) -> Path:
    """Where a training run writes: ``--out``, else a fresh ``runs/shapes_train/<timestamp>``. The shipped
    weights are written over only with ``--overwrite-bundled`` (a typo'd or default ``--out`` never does)."""
    if args.overwrite_bundled:
        if args.out and Path(args.out).resolve() != BUNDLED_DIR:
            (error or _fail)("--overwrite-bundled writes to the bundled folder; do not also give --out")
        return BUNDLED_DIR
    if args.out is None:
        return Path("runs") / "shapes_train" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out = Path(args.out)
    if out.resolve() == BUNDLED_DIR:
        (error or _fail)(f"--out {args.out} is the bundled model; add --overwrite-bundled (and drop --out) to "
                         "replace the shipped weights")
    return out


def _fail(msg: str):
    raise SystemExit(f"error: {msg}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - start:7.1f}s] {msg}", flush=True)

    log(f"args: {vars(args)}")
    if args.finetune_decoder_of:
        return _finetune_only(args, out, log)
    tokenizer, text_encoder, unet, vae = build_models(args)
    for m in (text_encoder, unet, vae):
        m.to(args.device)
    log(f"params: vae {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M, unet "
        f"{sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M, text {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M")
    if args.vae_from:  # stage 1 already run with these args (it is independent of everything after it)
        from diffusers import AutoencoderKL

        vae.load_state_dict(AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae").state_dict())
        log(f"vae loaded from {args.vae_from}")
    else:
        train_vae(vae, args, log)
    from stablefused.shapes.evaluate import vae_accuracy

    log(f"vae reconstruction accuracy (fresh items): {vae_accuracy(type('C', (), {'vae': vae})())}")
    means, stds, prompts = encode_dataset(vae, args.dataset_size, args.device)
    scaling = float(1.0 / (means + stds * torch.randn(means.shape, generator=torch.Generator().manual_seed(args.seed))).std())
    vae.register_to_config(scaling_factor=scaling)
    args.scaling_factor = scaling
    log(f"encoded {len(prompts)} items; scaling_factor {scaling:.4f}")
    from diffusers import DDIMScheduler

    from stablefused.models import sd_components, save_components

    sched = DDIMScheduler(**schedule(args), clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")

    def save(unet_, text_, step: int | None = None) -> Path:
        folder = out if step is None else out.with_name(f"{out.name}-step{step}")
        comps = sd_components("shapes", tokenizer, copy.deepcopy(text_).cpu(), copy.deepcopy(unet_).cpu(),
                              copy.deepcopy(vae).cpu(), {**sched.config, "_class_name": type(sched).__name__})
        save_components(comps, folder)
        if step is not None:
            log(f"checkpoint at step {step}: {folder}")
        return folder

    unet, text_encoder = train_unet(unet, text_encoder, tokenizer, (means, stds), prompts, args, log, save)
    if args.decoder_steps > 0:
        save(unet, text_encoder, args.unet_steps)  # before stage 3, to resume from with --finetune-decoder-of
    finetune_decoder(vae, args, log)
    log(f"vae reconstruction accuracy after decoder fine-tuning: {vae_accuracy(type('C', (), {'vae': vae})())}")
    save(unet, text_encoder)
    _finish(args, out, start, log)


def _finish(args, out: Path, start: float, log) -> None:
    train_info = {k: v for k, v in vars(args).items()
                  if k not in ("out", "overwrite_bundled", "device", "finetune_decoder_of", "vae_from")}
    train_info["train_seconds"] = round(time.time() - start, 1)
    (out / "training_args.json").write_text(json.dumps(train_info, indent=2) + "\n")
    log(f"saved to {out} ({sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 1e6:.1f} MB)")
    if args.eval:
        from stablefused.shapes.evaluate import quality_report

        for line in quality_report(str(out)):
            log(line)


def _finetune_only(args, out: Path, log) -> None:
    import shutil

    from diffusers import AutoencoderKL

    from stablefused.shapes.evaluate import vae_accuracy

    src = Path(args.finetune_decoder_of)
    start = time.time()
    vae = AutoencoderKL.from_pretrained(src, subfolder="vae").to(args.device)
    finetune_decoder(vae, args, log)
    log(f"vae reconstruction accuracy after decoder fine-tuning: {vae_accuracy(type('C', (), {'vae': vae})())}")
    if out.resolve() != src.resolve():
        for sub in ("tokenizer", "text_encoder", "unet", "scheduler", "model_index.json"):
            dst = out / sub
            if dst.is_dir():
                shutil.rmtree(dst)
            (shutil.copytree if (src / sub).is_dir() else shutil.copy)(src / sub, dst)
    vae.cpu().save_pretrained(out / "vae", safe_serialization=True)
    _finish(args, out, start, log)


if __name__ == "__main__":
    main()
