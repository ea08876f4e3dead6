"""Pretrain the tiny rectified-flow pipeline shipped in ``assets/models/tiny-flow``.

The result is an ordinary diffusers ``StableDiffusion3Pipeline`` (an MMDiT
``SD3Transformer2DModel``, ``AutoencoderKL``, two CLIP text encoders with projections and no T5,
``FlowMatchEulerDiscreteScheduler``) that draws 32x32 Shapes World images from prompts. It is
made from the tiny image pipeline (``assets/models/tiny-sd``):

- **VAE**: tiny-sd's, weight for weight and frozen; its config gains SD3's ``shift_factor``
  (0: tiny-sd's latents are already centred by its scaling factor).
- **Text encoders**: tiny-sd's trained CLIP text encoder, twice (SD3 reads two CLIP encoders
  side by side), each with an identity projection so its pooled embedding is the encoder's
  end-of-text state; frozen, so every prompt's embeddings are computed once. No T5: the
  pipeline pads with ``max_sequence_length`` zero tokens, 1 here.
- **Scheduler**: flow matching, σ from 1 to 0 with ``--shift``.
- **Transformer**: new, trained with the rectified-flow objective: for an image's latents x0,
  noise ε and σ drawn logit-normal (SD3's training density), x_σ = (1 − σ) x0 + σ ε and the
  transformer regresses the velocity ε − x0 at timestep 1000 σ. 10% of captions are dropped
  for classifier-free guidance; EMA weights are kept.

Every batch is fresh renders of train-split prompts, tiers weighted as tiny-sd's were. Training
stops at ``--steps`` or ``--minutes``, whichever comes first::

    genalign toyworld pretrain flow --out assets/models/tiny-flow

The folder is written beside ``--out`` and moved into place only when complete, with
``training_log.json`` (command, loss curve, versions) and ``samples.png``. Its per-tier
accuracy comes from ``genalign eval`` (the model card lists the commands).
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from genalign.progress import progress

from .common import (
    TIER_WEIGHTS,
    Budget,
    LossCurve,
    ShapesStream,
    command_line,
    count_parameters,
    seed_everything,
    set_lr,
    staged_folder,
    versions,
    write_training_log,
)
from .sd_pipeline import GRID_PROMPTS, copy_tokenizer_source, labelled_grid, save_tokenizer
from .sd_training import EMA, drop_captions, optimizer_step

PROG = "genalign toyworld pretrain flow"
MAX_SEQUENCE_LENGTH = 1  # zero T5 tokens per prompt (the pipeline has no T5 encoder)


# --------------------------------------------------------------------------- components
def clip_with_projection(text_encoder: Any) -> Any:
    """A ``CLIPTextModelWithProjection`` holding ``text_encoder``'s weights and an identity
    projection (pooled output = the end-of-text state after the final layer norm)."""
    from transformers import CLIPTextModelWithProjection

    config = text_encoder.config.to_dict()
    config["projection_dim"] = text_encoder.config.hidden_size
    model = CLIPTextModelWithProjection(type(text_encoder.config).from_dict(config))
    missing = model.text_model.load_state_dict(text_encoder.state_dict()).missing_keys  # [] (strict)
    missing += [k for k in model.state_dict() if not k.startswith("text_model.")]
    if missing != ["text_projection.weight"]:
        raise RuntimeError(f"unexpected text encoder keys left unset: {missing}")
    with torch.no_grad():
        model.text_projection.weight.copy_(torch.eye(config["projection_dim"]))
    return model


def build_flow_components(image_dir: str | Path, tok_dir: Path, layers: int, width: int, heads: int, shift: float,
                          seed: int) -> dict[str, Any]:
    """The SD3 pipeline's parts made from the image pipeline at ``image_dir`` (module docstring)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusionPipeline,
    )

    image = StableDiffusionPipeline.from_pretrained(str(image_dir), safety_checker=None, requires_safety_checker=False)
    copy_tokenizer_source(image.tokenizer, Path(image_dir) / "tokenizer", tok_dir)
    vae = AutoencoderKL.from_config(image.vae.config, shift_factor=0.0)
    vae.load_state_dict(image.vae.state_dict())
    encoders = [clip_with_projection(image.text_encoder) for _ in range(2)]
    hidden = image.text_encoder.config.hidden_size
    if width % heads:
        raise ValueError(f"--width {width} must be a multiple of --heads {heads}")
    torch.manual_seed(seed)
    latent = image.unet.config.sample_size
    transformer = SD3Transformer2DModel(
        sample_size=latent, patch_size=1, in_channels=vae.config.latent_channels, out_channels=vae.config.latent_channels,
        num_layers=layers, attention_head_dim=width // heads, num_attention_heads=heads,
        joint_attention_dim=2 * hidden, caption_projection_dim=width, pooled_projection_dim=2 * hidden,
        pos_embed_max_size=latent,
    )
    return dict(transformer=transformer, vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                tokenizer=image.tokenizer, tokenizer_2=image.tokenizer,
                scheduler=FlowMatchEulerDiscreteScheduler(shift=shift))


def make_flow_pipeline(comps: dict[str, Any]) -> Any:
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(**comps, text_encoder_3=None, tokenizer_3=None)


# --------------------------------------------------------------------------- training
class PromptCache:
    """Frozen-encoder conditioning of each prompt string, computed once: token embeddings
    ``[L, D]`` and pooled ``[D']`` as the pipeline's ``encode_prompt`` gives them."""

    def __init__(self, pipe: Any):
        self.pipe, self.rows = pipe, {}

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = list(dict.fromkeys(p for p in prompts if p not in self.rows))
        if missing:
            embeds, _, pooled, _ = self.pipe.encode_prompt(missing, None, None, device="cpu", do_classifier_free_guidance=False,
                                                           max_sequence_length=MAX_SEQUENCE_LENGTH)
            self.rows.update(zip(missing, zip(embeds, pooled)))
        rows = [self.rows[p] for p in prompts]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def logit_normal(n: int, generator: torch.Generator) -> torch.Tensor:
    """σ ``[n]`` with logit(σ) ~ N(0, 1), SD3's training density over noise levels."""
    return torch.sigmoid(torch.randn(n, generator=generator))


def train_transformer(pipe: Any, stream: ShapesStream, args: argparse.Namespace, log_every: int = 25) -> dict:
    """The rectified-flow objective on the transformer alone (module docstring); EMA weights are
    loaded at the end."""
    transformer, vae = pipe.transformer, pipe.vae
    for frozen in (vae, pipe.text_encoder, pipe.text_encoder_2):
        frozen.requires_grad_(False)
    params = list(transformer.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    ema = EMA([transformer], args.ema_decay)
    gen = torch.Generator().manual_seed(args.seed + 2)
    cache = PromptCache(pipe)
    budget = Budget(args.steps, args.minutes, warmup=100)
    curve, step = LossCurve(log_every, budget), 0
    transformer.train()
    bar = progress(total=args.steps, desc="transformer")
    while not budget.done(step):
        set_lr(opt, args.lr * budget.lr_factor(step))
        x, prompts = stream.batch(args.batch_size)
        prompts = drop_captions(prompts, args.caption_dropout, gen)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(generator=gen)
            x0 = (z - vae.config.shift_factor) * vae.config.scaling_factor  # [B, C, h, w]
        eps = torch.randn(x0.shape, generator=gen)
        sigma = logit_normal(len(x0), gen)  # [B]
        s = sigma.view(-1, 1, 1, 1)
        embeds, pooled = cache(prompts)
        pred = transformer(hidden_states=(1 - s) * x0 + s * eps, timestep=sigma * 1000, encoder_hidden_states=embeds,
                           pooled_projections=pooled).sample
        loss = F.mse_loss(pred, eps - x0)
        optimizer_step(opt, params, loss, ema)
        step += 1
        row = curve.add(step, dict(loss=loss.item()))
        if row:
            bar.set_postfix(loss=f"{row['loss']:.4f}")
        bar.update(1)
    bar.close()
    ema.copy_to_params()
    transformer.eval()
    return dict(steps=step, wall_s=budget.elapsed(), curve=curve.points)


@torch.no_grad()
def sample_grid(pipe: Any, prompts: list[str], seed: int, per_prompt: int = 4, steps: int = 20,
                guidance: float = 4.0) -> Any:
    """A labelled grid: one row per prompt, ``per_prompt`` samples of plain ``pipe(...)`` (the ODE)."""
    size = pipe.transformer.config.sample_size * pipe.vae_scale_factor
    images = pipe([p for p in prompts for _ in range(per_prompt)], height=size, width=size, num_inference_steps=steps,
                  guidance_scale=guidance, generator=torch.Generator().manual_seed(seed),
                  max_sequence_length=MAX_SEQUENCE_LENGTH).images
    return labelled_grid(images, prompts, per_prompt)


# --------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description="Pretrain the tiny Shapes World rectified-flow (SD3) pipeline.")
    p.add_argument("--out", default="assets/models/tiny-flow", help="output pipeline folder")
    p.add_argument("--image-model", default="assets/models/tiny-sd",
                   help="the image pipeline whose VAE, tokenizer and text encoder are reused")
    p.add_argument("--seed", type=int, default=0, help="seed for torch, numpy, python and data")
    p.add_argument("--layers", type=int, default=6, help="MMDiT blocks")
    p.add_argument("--width", type=int, default=128, help="transformer width (heads × head width)")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--shift", type=float, default=1.0, help="the scheduler's σ shift (SD3 uses 3 at 1024 px)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step")
    p.add_argument("--steps", type=int, default=20000, help="optimisation steps")
    p.add_argument("--minutes", type=float, default=40.0, help="wall-clock cap on training")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    p.add_argument("--caption-dropout", type=float, default=0.1, help="P(caption -> '') for CFG")
    p.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay of the transformer's weights")
    p.add_argument("--no-samples", action="store_true", help="skip writing samples.png")
    args = p.parse_args(argv)
    if not math.isfinite(args.shift) or args.shift <= 0:
        p.error(f"--shift must be > 0, got {args.shift}")
    return args


def main(argv=None) -> Path:
    """Train and save the pipeline; returns the output folder."""
    import diffusers
    import transformers

    args = parse_args(argv)
    t0 = time.monotonic()
    seed_everything(args.seed)
    out = Path(args.out).resolve()
    with staged_folder(out) as tmp:
        tok_src = tmp / "_tokenizer_src"
        comps = build_flow_components(args.image_model, tok_src, args.layers, args.width, args.heads, args.shift, args.seed)
        pipe = make_flow_pipeline(comps)
        pipe.set_progress_bar_config(disable=True)
        log: dict = dict(
            command=command_line(PROG, argv), args=vars(args), seed=args.seed, image_model=args.image_model,
            tier_weights=TIER_WEIGHTS, versions=versions(diffusers, transformers), threads=torch.get_num_threads(),
            parameters={k: count_parameters(comps[k]) for k in ("vae", "text_encoder", "text_encoder_2", "transformer")},
        )
        print(f"parameters: {log['parameters']}", flush=True)
        size = pipe.transformer.config.sample_size * pipe.vae_scale_factor
        stream = ShapesStream(args.seed, size=size, tier_weights=TIER_WEIGHTS)
        log["train"] = train_transformer(pipe, stream, args)
        print(f"trained {log['train']['steps']} steps in {log['train']['wall_s']:.0f} s", flush=True)
        pipe.save_pretrained(tmp, safe_serialization=True)
        for folder in ("tokenizer", "tokenizer_2"):
            save_tokenizer(comps["tokenizer"], tmp / folder, tok_src)
        shutil.rmtree(tok_src)
        if not args.no_samples:
            sample_grid(pipe, GRID_PROMPTS, args.seed).save(tmp / "samples.png")
        write_training_log(tmp, log, t0)
    print(f"saved {out} ({log['folder_bytes'] / 1e6:.1f} MB) in {log['total_wall_s'] / 60:.1f} min")
    return out


if __name__ == "__main__":
    main()
