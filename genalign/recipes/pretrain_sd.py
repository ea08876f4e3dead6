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
   (the tiny-sd model card's history).

Every batch is fresh renders (new seeds) of prompts drawn by ``TIER_WEIGHTS``. Each
phase stops at its step count or its wall-clock cap, whichever comes first; the
learning-rate schedule follows the same progress, so it completes either way. The
defaults fit about 48 minutes on 2 CPU cores (VAE 7, UNet 40)::

    genalign toyworld pretrain sd --out assets/models/tiny-sd

The pipeline is written to a temporary folder beside ``--out`` and moved into place
only when complete, together with ``training_log.json`` and ``samples.png``.

``--init DIR`` continues an existing pipeline instead (VAE, tokenizer and scheduler kept, the
UNet phase only) and ``--tier-weights`` changes the prompt mix, e.g. to study whether more
training teaches a skill::

    genalign toyworld pretrain sd --init assets/models/tiny-sd --out /tmp/more \
        --tier-weights 1:0.2,2:0.2,3:0.3,4:0.2,5:0.1 --unet-minutes 20 --unet-steps 100000
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from .common import (
    TIER_WEIGHTS,
    ShapesStream,
    command_line,
    count_parameters,
    seed_everything,
    staged_folder,
    versions,
    write_training_log,
)
from .sd_pipeline import (
    GRID_PROMPTS,
    SD_SCHEDULER_CONFIG,
    build_components,
    build_tokenizer,
    load_components,
    make_pipeline,
    sample_grid,
    save_tokenizer,
)
from .sd_training import latent_scaling_factor, train_unet, train_vae

PROG = "genalign toyworld pretrain sd"


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
        prog=PROG,
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
            command=command_line(PROG, argv),
            args=vars(args),
            seed=args.seed,
            tier_weights=args.tier_weights,
            init=args.init,
            versions=versions(diffusers, transformers),
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
        write_training_log(tmp, log, t0)
    print(f"saved {out} ({log['folder_bytes'] / 1e6:.1f} MB) in {log['total_wall_s'] / 60:.1f} min")
    return out


if __name__ == "__main__":
    main()
