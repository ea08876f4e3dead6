"""Rollout overhead: a policy's rollout (with log-probs) vs the plain diffusers call.

Both run the same pipeline weights, steps, CFG, batch and seeds, interleaved (A, B, A, B, …)
after a warm-up, so machine noise hits both alike. The ratio of medians is the overhead of
keeping states, actions and log-probs. Stable Diffusion pipelines: StableDiffusionPolicy with
the DDIM scheduler and eta on both sides (target ≤ 1.05×). SD3-family pipelines
(``model_index.json`` names StableDiffusion3Pipeline): FlowMatchingPolicy with Flow-GRPO's SDE
at ``--noise-level`` against the pipeline's own Euler ODE sampler (target ≤ 1.02×); the images
differ by the SDE's noise, so no image difference is reported for them.

    python benchmarks/rollout_overhead.py                       # tiny Shapes World SD, CPU
    python benchmarks/rollout_overhead.py --model assets/models/tiny-flow --out benchmarks/results/rollout_overhead_flow.json
    python benchmarks/rollout_overhead.py --arch sd15 --device cuda --batch 8 --steps 50

``--arch sd15`` builds Stable Diffusion 1.5's architecture (UNet 860M, VAE, 12-layer CLIP
text encoder) with random weights at 512×512, so it needs no download. Prints a table and
writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from genalign.policies import StableDiffusionPolicy, StableDiffusionPolicyConfig


def build_sd15_random(dtype: torch.dtype, tiny: bool = False) -> StableDiffusionPipeline:
    """SD-1.5's component configs with random weights and a character-level tokenizer.

    ``tiny``: the same classes and layout with narrow layers at 64×64 pixels, for a CPU dry run
    of scripts meant for the full size."""
    import string

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tmp = tempfile.mkdtemp()
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase]
    with open(os.path.join(tmp, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(tmp, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tokenizer = CLIPTokenizer(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"), model_max_length=77, pad_token="<|endoftext|>")
    width, layers, blocks = (64, 2, (32, 64, 64, 64)) if tiny else (768, 12, (320, 640, 1280, 1280))
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokens), hidden_size=width, intermediate_size=4 * width,
                                                num_hidden_layers=layers, num_attention_heads=width // 64, max_position_embeddings=77,
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(sample_size=8 if tiny else 64, cross_attention_dim=width, attention_head_dim=8,
                                block_out_channels=blocks)
    vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32) if tiny else (128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1 if tiny else 2, latent_channels=4, sample_size=64 if tiny else 512)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe.to(dtype=dtype)


def is_sd3(model: str) -> bool:
    index = os.path.join(model, "model_index.json")
    if not os.path.isfile(index):
        return False
    with open(index) as f:
        return json.load(f).get("_class_name") == "StableDiffusion3Pipeline"


def build_flow(args: argparse.Namespace, dtype: torch.dtype) -> tuple:
    """The SD3 pipeline and a FlowMatchingPolicy on the very same modules."""
    from genalign.policies import FlowMatchingPolicy, FlowMatchingPolicyConfig

    pipe = FlowMatchingPolicy.load_pipeline(args.model, None)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(args.device)
    height = pipe.transformer.config.sample_size * pipe.vae_scale_factor
    config = FlowMatchingPolicyConfig(pretrained=args.model, num_steps=args.steps, guidance_scale=args.guidance_scale,
                                      noise_level=args.noise_level, max_sequence_length=args.max_sequence_length,
                                      weight_dtype=args.dtype)
    return pipe, FlowMatchingPolicy(pipe, config), height


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="assets/models/tiny-sd", help="diffusers pipeline directory or hub id")
    ap.add_argument("--arch", choices=["pretrained", "sd15", "sd15-tiny"], default="pretrained",
                    help="sd15: SD-1.5 architecture, random weights (sd15-tiny: narrow, 64 px, for a CPU dry run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    ap.add_argument("--batch", type=int, default=32, help="images per call")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance-scale", type=float, default=4.0)
    ap.add_argument("--eta", type=float, default=1.0,
                    help="DDIM eta on both sides; below 1 for a zero-terminal-SNR model such as tiny-sd, where "
                         "diffusers' step at eta 1 can round to NaN (tiny-sd's model card)")
    ap.add_argument("--noise-level", type=float, default=0.7, help="SDE noise level of the flow policy (SD3 pipelines)")
    ap.add_argument("--max-sequence-length", type=int, default=1, help="T5 tokens per prompt (SD3 pipelines without T5)")
    ap.add_argument("--repeats", type=int, default=7, help="timed calls per side (after one warm-up each)")
    ap.add_argument("--out", default="benchmarks/results/rollout_overhead.json")
    args = ap.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    flow = args.arch == "pretrained" and is_sd3(args.model)
    if flow:
        pipe, policy, height = build_flow(args, dtype)
    elif args.arch in ("sd15", "sd15-tiny"):
        pipe = build_sd15_random(dtype, tiny=args.arch == "sd15-tiny")
        height = 64 if args.arch == "sd15-tiny" else 512
    else:
        pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None, requires_safety_checker=False, dtype=dtype)
        height = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if not flow:
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        pipe.to(args.device)
        config = StableDiffusionPolicyConfig(pretrained=args.model, num_steps=args.steps, guidance_scale=args.guidance_scale,
                                             weight_dtype=args.dtype, height=height, width=height, eta=args.eta)
        policy = StableDiffusionPolicy(pipe, config)  # shares the very same modules
    prompts = [f"a red circle {i % 4}" for i in range(args.batch)]

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def gens() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(i) for i in range(args.batch)]

    def run_pipeline() -> torch.Tensor:
        if flow:
            return pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, generator=gens(),
                        output_type="pt", height=height, width=height, max_sequence_length=args.max_sequence_length).images
        return pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, eta=args.eta, generator=gens(),
                    output_type="pt", height=height, width=height).images

    def run_policy() -> torch.Tensor:
        return policy.rollout(prompts, 1, gens()).outputs

    times: dict[str, list[float]] = {"diffusers pipeline": [], "genalign rollout": []}
    fns = {"diffusers pipeline": run_pipeline, "genalign rollout": run_policy}
    with torch.no_grad():
        outs = {name: fn() for name, fn in fns.items()}  # warm-up, and check both give the same images
        for name, out in outs.items():
            if not torch.isfinite(out).all():
                raise SystemExit(f"{name} returned non-finite images at eta {args.eta}; try --eta 0.5")
        max_diff = float((outs["diffusers pipeline"].float() - outs["genalign rollout"].float()).abs().max())
        for _ in range(args.repeats):
            for name, fn in fns.items():
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t0)

    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["genalign rollout"] / med["diffusers pipeline"]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    sampler = f"{args.steps} steps: Flow-GRPO SDE a={args.noise_level} vs the Euler ODE" if flow else f"{args.steps} DDIM steps"
    print(f"rollout overhead — {args.arch} {args.model if args.arch == 'pretrained' else ''} on {args.device} ({device_name}), "
          f"{args.dtype}, batch {args.batch}, {sampler}, CFG {args.guidance_scale}, {height}px, {args.repeats} repeats")
    print(f"{'':22s} {'median s':>10s} {'min s':>10s} {'img/s':>8s}")
    for k, v in times.items():
        print(f"{k:22s} {med[k]:10.3f} {min(v):10.3f} {args.batch / med[k]:8.1f}")
    diff = "(the SDE's noise: not comparable)" if flow else f"{max_diff:.2e}"
    print(f"ratio (rollout / pipeline, medians): {ratio:.3f}   max |image difference|: {diff}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "device": device_name, "times": times, "median": med, "ratio": ratio,
                   "max_image_difference": None if flow else max_diff, "torch": torch.__version__, "python": sys.version.split()[0]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
