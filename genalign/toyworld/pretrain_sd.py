"""Pretrain the tiny Stable Diffusion pipeline shipped in ``assets/models/tiny-sd``.

The result is an ordinary diffusers ``StableDiffusionPipeline`` (VAE, CLIP text
encoder and tokenizer, UNet, DDIM scheduler) that draws 32x32 Shapes World scenes from
text. It is trained from scratch on renders of train-split prompts only, in two phases:

1. VAE: ``AutoencoderKL`` with block_out_channels (32, 64, 64), images [B, 3, 32, 32]
   -> latents [B, 4, 8, 8], reconstruction (MSE + L1) plus a small KL term. The
   latent ``scaling_factor`` (1 / std of latents) is measured and stored in its config.
2. UNet + text encoder, jointly, with the frozen VAE, 10% of captions dropped to "" for
   classifier-free guidance and an EMA of the weights. The default schedule is SD v1's
   betas rescaled to zero terminal SNR, with v-prediction and trailing timesteps (Lin et al.
   2023, https://arxiv.org/abs/2305.08891): x_T is pure noise, so where objects go must come
   from the prompt. ``--no-v-zero-snr`` trains SD v1's own epsilon schedule with min-SNR-5
   loss weighting (Hang et al. 2023) instead; a model trained that way ignores position words
   (README, "Tier 2").

Every batch is fresh renders (new seeds) of prompts drawn by ``TIER_WEIGHTS``. Each
phase stops at its step count or its wall-clock cap, whichever comes first; the
learning-rate schedule follows the same progress, so it completes either way. The
defaults fit about 48 minutes on 2 CPU cores (VAE 7, UNet 40)::

    python -m genalign.toyworld.pretrain_sd --out assets/models/tiny-sd

The pipeline is written to a temporary folder beside ``--out`` and moved into place
only when complete, together with ``training_log.json`` and ``samples.png``.

``--init DIR`` continues an existing pipeline instead (VAE, tokenizer and scheduler kept, the
UNet phase only) and ``--tier-weights`` changes the prompt mix, e.g. to study whether more
training teaches a skill::

    python -m genalign.toyworld.pretrain_sd --init assets/models/tiny-sd --out /tmp/more \
        --tier-weights 1:0.2,2:0.2,3:0.3,4:0.2,5:0.1 --unet-minutes 20 --unet-steps 100000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

# OpenMP threads that spin while waiting stall for seconds per step when another
# process shares the cores (measured here: 2-11 s/step spinning vs 0.45 s passive).
# Only effective when set before torch first loads, e.g. under `python -m`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_TOKENS = 16
# Characters always in the vocabulary, so that any lowercase word still tokenizes.
BASE_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
# Sampling weight of each prompt tier (1 = one object ... 5 = counts) during training.
TIER_WEIGHTS = {1: 0.35, 2: 0.3, 3: 0.15, 4: 0.1, 5: 0.1}
# Stable Diffusion v1's scheduler config; diffusers' DDIMScheduler defaults differ.
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)
GRID_PROMPTS = [  # train-split prompts of every tier, then one held-out composition
    "a red circle",
    "a blue square",
    "a green circle",
    "a small yellow circle",
    "a purple square",
    "a large white triangle",
    "a red circle on the left",
    "a blue square at the top",
    "a yellow triangle on the right",
    "a red circle and a blue square",
    "a yellow triangle and a green circle",
    "a red circle to the left of a blue square",
    "a green square above a purple circle",
    "two red circles",
    "three blue squares",
    "a green triangle",
]


# --------------------------------------------------------------------------- tokenizer
def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def learn_bpe(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn BPE merges until every word is one token; return (vocab, merges).

    Words end with CLIP's ``</w>`` suffix. Ties between equally frequent pairs break
    lexicographically, so the result depends only on the set of words.
    """
    segments = {w: [*w[:-1], w[-1] + "</w>"] for w in sorted({w.lower() for w in words})}
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(p for s in segments.values() for p in zip(s, s[1:]))
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        segments = {w: _merge_pair(s, pair) for w, s in segments.items()}
    tokens = [BOS, EOS, *BASE_CHARS, *(c + "</w>" for c in BASE_CHARS)]
    tokens += [a + b for a, b in merges]
    tokens += [s[0] for s in segments.values()]  # one-letter words are already single symbols
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab, merges


def build_tokenizer(directory: str | os.PathLike, words=None, max_length: int = MAX_TOKENS):
    """Write ``vocab.json``/``merges.txt`` covering ``words`` to ``directory`` and load a CLIPTokenizer.

    ``words`` defaults to ``genalign.toyworld.VOCAB``; each becomes a single token.
    bos = ``<|startoftext|>``, eos = pad = unk = ``<|endoftext|>`` as in Stable Diffusion v1.
    """
    from transformers import CLIPTokenizer

    if words is None:
        from genalign.toyworld import VOCAB as words
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = learn_bpe(list(words))
    (directory / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    )
    tokenizer = CLIPTokenizer.from_pretrained(str(directory), model_max_length=max_length)
    for w in words:
        ids = tokenizer(w, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"word {w!r} tokenizes to {len(ids)} tokens, expected 1")
    return tokenizer


def save_tokenizer(tokenizer, directory: str | os.PathLike, source_dir: str | os.PathLike) -> None:
    """``tokenizer.save_pretrained`` plus the vocab.json/merges.txt it was built from.

    The two plain files let older transformers (slow CLIPTokenizer) load it too.
    """
    tokenizer.save_pretrained(str(directory))
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(Path(source_dir) / name, Path(directory) / name)


# --------------------------------------------------------------------------- models
def _groups(channels) -> int:
    return min(32, math.gcd(*channels))


def build_components(
    tokenizer,
    *,
    text_hidden: int = 64,
    text_layers: int = 3,
    text_heads: int = 4,
    vae_channels=(32, 64, 64),
    unet_channels=(64, 128),
    attention_heads: int = 4,
    size: int = 32,
    seed: int = 0,
) -> dict:
    """Build freshly initialised ``vae``, ``text_encoder``, ``unet`` and ``scheduler``.

    The VAE downsamples by ``2 ** (len(vae_channels) - 1)``; the UNet's
    ``sample_size`` is the matching latent size and its cross-attention width is
    ``text_hidden``. As in Stable Diffusion, every UNet resolution but the lowest
    cross-attends to the text, and so does the mid block.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vocab_size = len(tokenizer.get_vocab())
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=text_hidden,
            intermediate_size=4 * text_hidden,
            num_hidden_layers=text_layers,
            num_attention_heads=text_heads,
            max_position_embeddings=tokenizer.model_max_length,
            projection_dim=text_hidden,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        block_out_channels=tuple(vae_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=_groups(vae_channels),
        sample_size=size,
    )
    n = len(unet_channels)
    unet = UNet2DConditionModel(
        sample_size=size // 2 ** (len(vae_channels) - 1),
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        block_out_channels=tuple(unet_channels),
        layers_per_block=1,
        norm_num_groups=_groups(unet_channels),
        cross_attention_dim=text_hidden,
        attention_head_dim=attention_heads,  # diffusers' name for the number of heads
    )
    return dict(
        vae=vae,
        text_encoder=text_encoder,
        unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG),
    )


def load_components(path: str | os.PathLike, tok_dir: str | os.PathLike) -> tuple:
    """Tokenizer and ``vae``/``text_encoder``/``unet``/``scheduler`` of a saved pipeline folder.

    The tokenizer's ``vocab.json``/``merges.txt`` are copied to ``tok_dir`` so that
    :func:`save_tokenizer` can write them beside the continued pipeline.
    """
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    missing = [f"{d}/" for d in ("vae", "text_encoder", "unet", "scheduler", "tokenizer") if not (path / d).is_dir()]
    if missing:
        raise FileNotFoundError(f"--init {path}: not a StableDiffusionPipeline folder (missing {', '.join(missing)})")
    pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    tok_dir = Path(tok_dir)
    tok_dir.mkdir(parents=True, exist_ok=True)
    if all((path / "tokenizer" / n).is_file() for n in ("vocab.json", "merges.txt")):
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(path / "tokenizer" / name, tok_dir / name)
    else:  # a folder with tokenizer.json only: write the two plain files from its BPE model
        model = json.loads(pipe.tokenizer.backend_tokenizer.to_str())["model"]
        (tok_dir / "vocab.json").write_text(json.dumps(model["vocab"], indent=0))
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in merges))
    return pipe.tokenizer, dict(vae=pipe.vae, text_encoder=pipe.text_encoder, unet=pipe.unet, scheduler=pipe.scheduler)


def make_pipeline(components: dict, tokenizer):
    """Wrap components in a ``StableDiffusionPipeline`` without a safety checker."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        **components,
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- data
class ShapesStream:
    """Endless batches of (images [B, 3, S, S] in [-1, 1], prompts) from train-split prompts.

    Tiers are drawn with ``tier_weights`` (default ``TIER_WEIGHTS``); each image gets a fresh
    render seed.
    """

    def __init__(self, seed: int, size: int = 32, pool_per_tier: int = 4000, tier_weights: dict | None = None):
        from genalign.toyworld import parse_prompt, render, sample_prompts

        tier_weights = {t: w for t, w in (tier_weights or TIER_WEIGHTS).items() if w > 0}
        self.render, self.parse, self.size = render, parse_prompt, size
        self.rng = np.random.default_rng(seed)
        self.tiers = sorted(tier_weights)
        self.weights = np.array([tier_weights[t] for t in self.tiers]) / sum(tier_weights.values())
        self.pools = {
            t: sample_prompts(t, pool_per_tier, split="train", seed=seed + t) for t in self.tiers
        }
        self.specs: dict[str, object] = {}

    def prompts(self, n: int) -> list[str]:
        tiers = self.rng.choice(self.tiers, size=n, p=self.weights)
        return [self.pools[t][self.rng.integers(len(self.pools[t]))] for t in tiers]

    def batch(self, n: int) -> tuple[torch.Tensor, list[str]]:
        prompts = self.prompts(n)
        seeds = self.rng.integers(0, 2**31 - 1, size=n)
        arrays = []
        for p, s in zip(prompts, seeds):
            if p not in self.specs:
                self.specs[p] = self.parse(p)
            img = self.render(self.specs[p], int(s), size=self.size).convert("RGB")
            arrays.append(np.asarray(img, dtype=np.float32))
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # [B, 3, S, S]
        return x / 127.5 - 1.0, prompts


# --------------------------------------------------------------------------- training
class _Budget:
    """Ends a phase after ``steps`` steps or ``minutes`` of wall time, whichever comes first.

    ``lr_factor`` is a linear warm-up then a cosine decay over the progress fraction
    max(step / steps, elapsed / minutes), so the schedule completes under either limit.
    """

    def __init__(self, steps: int, minutes: float | None, warmup: int):
        self.steps, self.warmup, self.start = steps, warmup, time.monotonic()
        self.seconds = 60 * minutes if minutes else math.inf

    def progress(self, step: int) -> float:
        return min(1.0, max(step / self.steps, (time.monotonic() - self.start) / self.seconds))

    def done(self, step: int) -> bool:
        return self.progress(step) >= 1.0

    def lr_factor(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup)
        return warm * 0.5 * (1 + math.cos(math.pi * self.progress(step)))

    def elapsed(self) -> float:
        return round(time.monotonic() - self.start, 1)


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def train_vae(vae, stream: ShapesStream, args, log_every: int = 25) -> dict:
    """Train the autoencoder on renders; returns its log (loss curve and timings)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    budget = _Budget(args.vae_steps, args.vae_minutes, warmup=50)
    gen = torch.Generator().manual_seed(args.seed + 1)
    curve, acc, step = [], Counter(), 0
    vae.train()
    bar = tqdm(total=args.vae_steps, desc="vae", dynamic_ncols=True)
    while not budget.done(step):
        _set_lr(opt, args.vae_lr * budget.lr_factor(step))
        x, _ = stream.batch(args.vae_batch_size)  # [B, 3, S, S]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample  # [B, 3, S, S]
        mse, l1 = F.mse_loss(recon, x), F.l1_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()  # per pixel, like the reconstruction terms
        loss = mse + l1 + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        acc.update(loss=loss.item(), mse=mse.item(), l1=l1.item(), kl=kl.item(), n=1)
        if step % log_every == 0:
            row = {k: acc[k] / acc["n"] for k in ("loss", "mse", "l1", "kl")}
            curve.append(dict(step=step, wall_s=budget.elapsed(), **row))
            bar.set_postfix(mse=f"{row['mse']:.4f}", kl=f"{row['kl']:.3f}")
            acc.clear()
        bar.update(1)
    bar.close()
    vae.eval()
    with torch.no_grad():
        x, _ = stream.batch(256)
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
        eval_mse = F.mse_loss(recon, x).item()
    return dict(steps=step, wall_s=budget.elapsed(), eval_mse=eval_mse, curve=curve)


@torch.no_grad()
def latent_scaling_factor(vae, stream: ShapesStream, n: int = 1024, batch: int = 128) -> float:
    """1 / std of VAE latents over ``n`` fresh renders (Stable Diffusion's recipe)."""
    gen = torch.Generator().manual_seed(1234)
    latents = [
        vae.encode(stream.batch(batch)[0]).latent_dist.sample(generator=gen)
        for _ in range(max(1, n // batch))
    ]
    return float(1.0 / torch.cat(latents).std())


class _EMA:
    """Exponential moving average of parameters with diffusers' decay warm-up."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.params = [p for m in modules for p in m.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


def multires_noise(shape: tuple, generator: torch.Generator, discount: float) -> torch.Tensor:
    """Gaussian noise ``shape`` ``[B, C, H, W]`` plus upsampled coarser noise at H/2, H/4, … 1
    pixels, level k weighted ``discount ** k``, rescaled to unit std per sample.

    At SD's largest training timestep a fraction sqrt(alpha_bar_T) = 0.07 of the image is left in
    x_T, and its low frequencies tell where objects are; a model trained with white noise can
    learn to take an object's place from that residue instead of from the prompt. Extra
    low-frequency noise hides the residue (the "multi-resolution" or pyramid noise of SD
    fine-tuning practice). On tiny-sd, 15 minutes of it did not make the model follow position
    words (README, "Tier 2: the model does not read position words").
    """
    b, c, h, w = shape
    noise = torch.randn(shape, generator=generator)
    k = 1
    while h >> k >= 1 and w >> k >= 1:
        coarse = torch.randn((b, c, h >> k, w >> k), generator=generator)
        noise = noise + discount**k * F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        k += 1
    return noise / noise.std(dim=(1, 2, 3), keepdim=True)


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet regresses for ``scheduler.add_noise(latents, noise, t)``: the noise (epsilon
    prediction) or the velocity sqrt(a) * noise - sqrt(1 - a) * latents (v-prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    if kind == "epsilon":
        return noise
    raise ValueError(f"pretraining supports epsilon or v_prediction, got prediction_type={kind!r}")


def train_unet(unet, text_encoder, vae, tokenizer, scheduler, stream, args, log_every=25) -> dict:
    """Train UNet and text encoder jointly on VAE latents; EMA weights are loaded at the end.

    ``args.freeze_text_encoder`` trains the UNet alone; ``args.multires_noise`` > 0 draws the
    training noise with :func:`multires_noise` (sampling still starts from white noise).
    """
    freeze_text, discount = args.freeze_text_encoder, args.multires_noise
    text_encoder.requires_grad_(not freeze_text)
    models = [unet] if freeze_text else [unet, text_encoder]
    params = [p for m in models for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=1e-2)
    ema = _EMA(models, args.ema_decay)
    sf = vae.config.scaling_factor
    alphas_cumprod = scheduler.alphas_cumprod  # [T]
    snr = alphas_cumprod / (1 - alphas_cumprod)  # [T]
    gen = torch.Generator().manual_seed(args.seed + 2)
    ids_cache: dict[str, torch.Tensor] = {}

    def token_ids(prompts: list[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in ids_cache]
        if missing:
            ids = tokenizer(
                missing,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            ids_cache.update(zip(missing, ids))
        return torch.stack([ids_cache[p] for p in prompts])  # [B, L]

    budget = _Budget(args.unet_steps, args.unet_minutes, warmup=100)
    curve, acc, step = [], Counter(), 0
    for m in models:
        m.train()
    bar = tqdm(total=args.unet_steps, desc="unet", dynamic_ncols=True)
    while not budget.done(step):
        _set_lr(opt, args.unet_lr * budget.lr_factor(step))
        x, prompts = stream.batch(args.batch_size)
        drop = torch.rand(len(prompts), generator=gen) < args.caption_dropout
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.sample(generator=gen) * sf  # [B, 4, h, w]
        if discount > 0:
            noise = multires_noise(tuple(latents.shape), gen, discount)
        else:
            noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x),), generator=gen)
        noisy = scheduler.add_noise(latents, noise, t)
        text = text_encoder(token_ids(prompts))[0]  # [B, L, D]
        pred = unet(noisy, t, encoder_hidden_states=text).sample  # [B, 4, h, w]
        target = training_target(scheduler, latents, noise, t)  # [B, 4, h, w]
        per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))  # [B]
        weight = torch.clamp(snr[t], max=args.snr_gamma) / snr[t] if args.snr_gamma else 1.0
        loss = (weight * per_sample).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        step += 1
        acc.update(loss=loss.item(), mse=per_sample.mean().item(), n=1)
        if step % log_every == 0:
            row = {k: acc[k] / acc["n"] for k in ("loss", "mse")}
            curve.append(dict(step=step, wall_s=budget.elapsed(), **row))
            bar.set_postfix(loss=f"{row['loss']:.4f}", mse=f"{row['mse']:.4f}")
            acc.clear()
        bar.update(1)
    bar.close()
    ema.copy_to_params()
    for m in models:
        m.eval()
    return dict(steps=step, wall_s=budget.elapsed(), curve=curve)


# --------------------------------------------------------------------------- samples
def sample_grid(
    pipe,
    prompts: list[str],
    per_prompt: int = 4,
    steps: int = 20,
    guidance_scale: float = 4.0,
    seed: int = 0,
    scale: int = 3,
) -> Image.Image:
    """A labelled grid: one row per prompt, ``per_prompt`` samples (DDIM, eta=0.5).

    Not eta=1: from ᾱ_T = 0 (the zero-terminal-SNR schedule) diffusers' DDIM step can round
    its noise-direction weight to the root of −6e-8 and return NaN.
    """
    gen = torch.Generator().manual_seed(seed)
    images = pipe(
        [p for p in prompts for _ in range(per_prompt)],
        height=pipe.unet.config.sample_size * pipe.vae_scale_factor,
        width=pipe.unet.config.sample_size * pipe.vae_scale_factor,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        eta=0.5,
        generator=gen,
    ).images
    tile, label_w, pad = images[0].width * scale, 240, 2
    grid = Image.new(
        "RGB", (label_w + per_prompt * (tile + pad), len(prompts) * (tile + pad)), "white"
    )
    draw = ImageDraw.Draw(grid)
    for row, p in enumerate(prompts):
        y = row * (tile + pad)
        draw.text((4, y + tile // 2 - 5), p or '""', fill="black")
        for col in range(per_prompt):
            img = images[row * per_prompt + col].resize((tile, tile), Image.NEAREST)
            grid.paste(img, (label_w + col * (tile + pad), y))
    return grid


# --------------------------------------------------------------------------- main
def parse_tier_weights(text: str) -> dict[int, float]:
    """``"1:0.3,2:0.4,5:0.3"`` -> ``{1: 0.3, 2: 0.4, 5: 0.3}``; tiers 1-5, weights >= 0, not all 0."""
    weights: dict[int, float] = {}
    for item in text.split(","):
        tier, sep, weight = item.partition(":")
        try:
            t, w = int(tier), float(weight)
        except ValueError:
            t, w = 0, -1.0
        if not sep or t not in (1, 2, 3, 4, 5) or not w >= 0 or t in weights:
            raise argparse.ArgumentTypeError(
                f"--tier-weights: bad entry {item!r}; expected TIER:WEIGHT pairs such as 1:0.4,2:0.2 "
                "with tiers 1-5, each once, and weights >= 0"
            )
        weights[t] = w
    if not sum(weights.values()) > 0:
        raise argparse.ArgumentTypeError(f"--tier-weights: {text!r} gives every tier weight 0")
    return weights


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m genalign.toyworld.pretrain_sd",
        description="Pretrain the tiny Shapes World Stable Diffusion pipeline.",
    )
    p.add_argument("--out", default="assets/models/tiny-sd", help="output pipeline folder")
    p.add_argument(
        "--init",
        default=None,
        help="continue from this pipeline folder (its VAE, tokenizer and scheduler are kept and the "
        "VAE phase is skipped; UNet and text encoder train on from its weights)",
    )
    p.add_argument(
        "--tier-weights",
        type=parse_tier_weights,
        default=dict(TIER_WEIGHTS),
        help="sampling weight of each prompt tier, e.g. 1:0.35,2:0.3,3:0.15,4:0.1,5:0.1 (the default)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for torch, numpy, python and data")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (with --init: the pipeline's)")
    p.add_argument("--batch-size", type=int, default=32, help="UNet images per step")
    p.add_argument("--vae-batch-size", type=int, default=16, help="VAE images per step")
    p.add_argument("--vae-steps", type=int, default=2400, help="VAE optimisation steps")
    p.add_argument("--vae-minutes", type=float, default=7.0, help="wall-clock cap on the VAE phase")
    p.add_argument("--vae-lr", type=float, default=1e-3, help="VAE peak learning rate")
    p.add_argument("--kl-weight", type=float, default=1e-3, help="weight of the per-pixel KL term")
    p.add_argument("--unet-steps", type=int, default=8000, help="UNet + text encoder steps")
    p.add_argument(
        "--unet-minutes", type=float, default=40.0, help="wall-clock cap on the UNet phase"
    )
    p.add_argument(
        "--unet-lr", type=float, default=5e-4, help="UNet + text encoder peak learning rate"
    )
    p.add_argument("--caption-dropout", type=float, default=0.1, help="P(caption -> '') for CFG")
    p.add_argument(
        "--snr-gamma",
        type=float,
        default=None,
        help="min-SNR-gamma weighting; 0 disables (default: 0 with the v/zero-SNR schedule, 5 with SD's)",
    )
    p.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay of UNet/text weights")
    p.add_argument(
        "--multires-noise",
        type=float,
        default=0.0,
        help="if > 0, add coarser noise levels with this discount per level to the UNet's training noise",
    )
    p.add_argument(
        "--freeze-text-encoder", action="store_true", help="train the UNet only (keeps the text encoder)"
    )
    p.add_argument("--text-layers", type=int, default=3, help="CLIP text encoder layers")
    p.add_argument(
        "--unet-channels",
        type=int,
        nargs="+",
        default=[64, 128],
        help="UNet block_out_channels, one per resolution (each level but the lowest cross-attends)",
    )
    p.add_argument(
        "--v-zero-snr",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="v-prediction with a zero-terminal-SNR schedule and trailing timesteps (Lin et al. 2023; "
        "the default for a new pipeline); --no-v-zero-snr trains SD v1's epsilon schedule instead",
    )
    p.add_argument("--no-samples", action="store_true", help="skip writing samples.png")
    args = p.parse_args(argv)
    if args.init:  # the architecture and schedule come from the pipeline being continued
        ignored = [flag for flag, given in (
            ("--v-zero-snr/--no-v-zero-snr", args.v_zero_snr is not None),
            ("--unet-channels", args.unet_channels != [64, 128]),
            ("--text-layers", args.text_layers != 3),
            ("--size", args.size != 32),
        ) if given]
        if ignored:
            p.error(f"{', '.join(ignored)} cannot be combined with --init (the continued pipeline fixes them)")
    elif args.v_zero_snr is None:
        args.v_zero_snr = True
    if args.snr_gamma is None and not args.init:  # with --init: set from the pipeline's schedule
        args.snr_gamma = 0.0 if args.v_zero_snr else 5.0
    if args.v_zero_snr and args.snr_gamma:
        p.error("--v-zero-snr needs --snr-gamma 0 (min-SNR weights give the terminal step, SNR 0, weight 0)")
    return args


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def publish_folder(tmp: Path, out: Path) -> None:
    """Make a finished build folder ``tmp`` the asset at ``out``: readable modes, then a rename.

    A previous ``out`` is moved aside first and deleted only once ``tmp`` is in place, so a
    failed build never leaves a half-written asset and never destroys a good one.
    """
    for path in [tmp, *tmp.rglob("*")]:  # mkdtemp and safetensors leave owner-only modes
        path.chmod(0o755 if path.is_dir() else 0o644)
    if out.exists():
        old = out.with_name(f".{out.name}-old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def main(argv=None) -> Path:
    """Train and save the pipeline; returns the output folder."""
    import diffusers
    import transformers

    args = parse_args(argv)
    t0 = time.monotonic()
    _seed_everything(args.seed)
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        tok_src = tmp / "_tokenizer_src"
        if args.init:
            tokenizer, comps = load_components(args.init, tok_src)
            vae_factor = 2 ** (len(comps["vae"].config.block_out_channels) - 1)
            args.size = comps["unet"].config.sample_size * vae_factor  # the pipeline's image side
            zero_snr = bool(comps["scheduler"].config.get("rescale_betas_zero_snr", False))
            if args.snr_gamma is None:
                args.snr_gamma = 0.0 if zero_snr else 5.0
            elif zero_snr and args.snr_gamma:
                raise ValueError(
                    f"--init {args.init} has a zero-terminal-SNR schedule: min-SNR weighting "
                    f"(--snr-gamma {args.snr_gamma}) would weight its terminal step 0; use --snr-gamma 0"
                )
        else:
            tokenizer = build_tokenizer(tok_src)
            comps = build_components(
                tokenizer,
                text_layers=args.text_layers,
                unet_channels=tuple(args.unet_channels),
                size=args.size,
                seed=args.seed,
            )
            if args.v_zero_snr:
                from diffusers import DDIMScheduler

                comps["scheduler"] = DDIMScheduler(**{
                    **SD_SCHEDULER_CONFIG, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                    "timestep_spacing": "trailing",
                })
        stream = ShapesStream(args.seed, size=args.size, tier_weights=args.tier_weights)
        log: dict = dict(
            command=" ".join(
                [
                    "python -m genalign.toyworld.pretrain_sd",
                    *(argv if argv is not None else sys.argv[1:]),
                ]
            ),
            args=vars(args),
            seed=args.seed,
            tier_weights=args.tier_weights,
            init=args.init,
            versions=dict(
                python=platform.python_version(),
                torch=torch.__version__,
                diffusers=diffusers.__version__,
                transformers=transformers.__version__,
            ),
            threads=torch.get_num_threads(),
            parameters={k: count_parameters(comps[k]) for k in ("vae", "text_encoder", "unet")},
            vocab_size=len(tokenizer.get_vocab()),
        )
        print(f"parameters: {log['parameters']}, vocab {log['vocab_size']}", flush=True)

        if args.init:
            comps["vae"].requires_grad_(False)
            sf = comps["vae"].config.scaling_factor
            print(f"vae kept from {args.init}: scaling_factor {sf:.4f}", flush=True)
        else:
            log["vae"] = train_vae(comps["vae"], stream, args)
            comps["vae"].requires_grad_(False)
            sf = latent_scaling_factor(comps["vae"], stream)
            comps["vae"].register_to_config(scaling_factor=sf)
            print(f"vae done: {log['vae']['steps']} steps, scaling_factor {sf:.4f}", flush=True)
        log["scaling_factor"] = sf

        log["unet"] = train_unet(
            comps["unet"],
            comps["text_encoder"],
            comps["vae"],
            tokenizer,
            comps["scheduler"],
            stream,
            args,
        )
        pipe = make_pipeline(comps, tokenizer)
        pipe.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp / "tokenizer", tok_src)
        shutil.rmtree(tok_src)

        if not args.no_samples:
            s0 = time.monotonic()
            pipe.set_progress_bar_config(disable=True)
            sample_grid(pipe, GRID_PROMPTS, seed=args.seed).save(tmp / "samples.png")
            log["samples_wall_s"] = round(time.monotonic() - s0, 1)
        log["total_wall_s"] = round(time.monotonic() - t0, 1)
        log["folder_bytes"] = _folder_bytes(tmp)
        (tmp / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
        publish_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"saved {out} ({log['folder_bytes'] / 1e6:.1f} MB) in {log['total_wall_s'] / 60:.1f} min")
    return out


if __name__ == "__main__":
    main()
