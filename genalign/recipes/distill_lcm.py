"""Distil the tiny Shapes World Stable Diffusion into a latent consistency model (``tiny-lcm``).

Paper: Luo, Tan, Huang, Li, Zhao, "Latent Consistency Models: Synthesizing High-Resolution
Images with Few-Step Inference" (2023), Alg. 1 (latent consistency distillation, LCD), on top
of Song et al., "Consistency Models" (2023). Symbols: ``teacher -> ε_φ`` (the frozen SD UNet),
``student -> f_θ``, ``target -> f_θ⁻`` (EMA of θ, rate μ = ``ema_decay``), ``omega -> ω``,
``skip -> k`` (in solver steps), ``t, t_prev -> t_(n+k), t_n``.

One step, for a batch of Shapes World train-split renders encoded by the teacher's VAE (z)::

    n ~ U{0 … N−1},  t = t_(n+k) on the N-step DDIM solver schedule, t_prev = t − k·(1000/N)
    x_t = √ᾱ_t z + √(1−ᾱ_t) ε                                    (forward diffusion)
    ω ~ U[w_min − 1, w_max − 1]                                   (pipeline guidance_scale = ω + 1)
    x̂_prev = DDIM(x_t, t → t_prev) with ε̂ = (1+ω) ε_φ(x_t, c) − ω ε_φ(x_t, ∅)  (guided teacher solver)
    L = d(f_θ(x_t, ω, c, t), f_θ⁻(x̂_prev, ω, c, t_prev))

f(x, t) = c_skip(t) x + c_out(t) x̂0(x, t) with LCMScheduler's boundary scalings, so the model
is a plain ε-prediction UNet that ``LatentConsistencyModelPipeline`` samples as is. d is the
pseudo-Huber distance √(‖a − b‖² + c²) − c per sample (Song & Dhariwal, "Improved Techniques
for Training Consistency Models", 2023, §3.3, c = 0.00054 √dim) or the squared L2 distance.

The student starts as the teacher with an added guidance embedding (``time_cond_proj_dim``,
its projection zero-initialised, so at step 0 it predicts exactly the teacher's ε); the saved
UNet is the EMA target f_θ⁻. Training stops after ``--steps`` or ``--minutes``, whichever
first; the learning rate warms up then decays with the same progress (as ``pretrain_sd``). The
result is a diffusers ``LatentConsistencyModelPipeline`` (teacher VAE, text encoder and
tokenizer; LCMScheduler with ``original_inference_steps`` = N) plus ``training_log.json``::

    genalign toyworld distill lcm --out assets/models/tiny-lcm --minutes 30
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import time
from pathlib import Path

import torch

from genalign.policies.ddim import x0_eps_from_output
from genalign.policies.lcm import boundary_scalings, guidance_embedding
from genalign.progress import progress

from .common import (
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
from .sd_pipeline import GRID_PROMPTS

TIMESTEP_SCALING = (
    10.0  # LCMScheduler's default; the boundary scalings of training and sampling must agree
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="genalign toyworld distill lcm",
        description="Latent consistency distillation of a Stable Diffusion pipeline on Shapes World renders.",
    )
    p.add_argument(
        "--teacher", default="assets/models/tiny-sd", help="teacher StableDiffusionPipeline folder"
    )
    p.add_argument(
        "--out",
        default="assets/models/tiny-lcm",
        help="output LatentConsistencyModelPipeline folder",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for torch, numpy, python and data")
    p.add_argument(
        "--steps", type=int, default=4000, help="optimisation steps (stops at this or --minutes)"
    )
    p.add_argument("--minutes", type=float, default=30.0, help="wall-clock cap; 0 disables it")
    p.add_argument("--batch-size", type=int, default=32, help="renders per step")
    p.add_argument(
        "--lr",
        type=float,
        default=1e-4,
        help="peak AdamW learning rate (warm-up, then cosine decay)",
    )
    p.add_argument("--warmup", type=int, default=100, help="learning-rate warm-up steps")
    p.add_argument(
        "--ema-decay", type=float, default=0.95, help="EMA rate μ of the target network f_θ⁻"
    )
    p.add_argument(
        "--ddim-steps", type=int, default=50, help="N: steps of the teacher's DDIM solver schedule"
    )
    p.add_argument(
        "--skip-steps",
        type=int,
        default=1,
        help="k: solver steps the teacher takes per consistency pair",
    )
    p.add_argument(
        "--guidance-min",
        type=float,
        default=2.0,
        help="lowest teacher CFG scale (pipeline convention, ω + 1)",
    )
    p.add_argument(
        "--guidance-max",
        type=float,
        default=9.0,
        help="highest teacher CFG scale (pipeline convention, ω + 1); 9 covers the pipeline's default 8.5",
    )
    p.add_argument(
        "--guidance-dim",
        type=int,
        default=256,
        help="width of the guidance embedding (time_cond_proj_dim)",
    )
    p.add_argument(
        "--loss",
        choices=["huber", "l2"],
        default="huber",
        help="distance d: pseudo-Huber or squared L2",
    )
    p.add_argument(
        "--huber-c", type=float, default=None, help="pseudo-Huber c (default 0.00054·√latent dims)"
    )
    p.add_argument(
        "--log-every", type=int, default=25, help="loss-curve points every this many steps"
    )
    p.add_argument("--sample-steps", type=int, default=4, help="sampling steps of samples.png")
    p.add_argument(
        "--sample-guidance", type=float, default=4.0, help="guidance scale of samples.png"
    )
    p.add_argument("--no-samples", action="store_true", help="skip writing samples.png")
    p.add_argument("--unet-dtype", choices=["float16", "float32"], default="float16",
                   help="dtype of the saved UNet weights (trained in float32; half the folder size as float16)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.ddim_steps < 2 or args.skip_steps < 1:
        p.error("--steps, --batch-size and --skip-steps must be >= 1, --ddim-steps >= 2")
    if not 1.0 <= args.guidance_min <= args.guidance_max:
        p.error(
            f"need 1 <= --guidance-min <= --guidance-max, got {args.guidance_min}, {args.guidance_max}"
        )
    if not 0 <= args.ema_decay < 1:
        p.error(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    return args


def load_teacher(path: str):
    from diffusers import StableDiffusionPipeline

    if not os.path.isdir(path):
        raise FileNotFoundError(f"--teacher: no pipeline directory at {path!r}")
    teacher = StableDiffusionPipeline.from_pretrained(
        path,
        safety_checker=None,
        requires_safety_checker=False,
        use_safetensors=True,
        dtype=torch.float32,
    )
    if teacher.unet.config.time_cond_proj_dim is not None:
        raise ValueError(
            f"--teacher {path}: its UNet already has a guidance embedding; give a plain SD teacher"
        )
    for module in (teacher.unet, teacher.vae, teacher.text_encoder):
        module.requires_grad_(False).eval()
    teacher.set_progress_bar_config(disable=True)
    return teacher


def build_student(teacher_unet, guidance_dim: int):
    """The teacher's UNet plus a guidance embedding whose projection starts at zero."""
    from diffusers import UNet2DConditionModel

    student = UNet2DConditionModel.from_config(teacher_unet.config, time_cond_proj_dim=guidance_dim)
    result = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    new = sorted(result.missing_keys)
    if result.unexpected_keys or any(not k.startswith("time_embedding.cond_proj") for k in new):
        raise RuntimeError(
            f"student does not match the teacher: missing {new}, unexpected {result.unexpected_keys}"
        )
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.train().requires_grad_(True)


class SolverSchedule:
    """The teacher's N-step DDIM schedule t_n = (n+1)·(T/N) − 1 (LCMScheduler's ``lcm_origin_timesteps``)."""

    def __init__(
        self, alphas_cumprod: torch.Tensor, num_train_timesteps: int, ddim_steps: int, skip: int
    ):
        self.k = num_train_timesteps // ddim_steps  # train timesteps per solver step
        self.timesteps = torch.arange(1, ddim_steps + 1) * self.k - 1  # [N] long, ascending
        self.skip = skip
        self.alphas_cumprod = alphas_cumprod.float()

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """t_(n+k) and t_n ``[n]``: a solver timestep and the one ``skip`` solver steps earlier (>= 0)."""
        idx = torch.randint(0, len(self.timesteps), (n,), generator=generator)
        t = self.timesteps[idx]
        return t, (t - self.skip * self.k).clamp(min=0)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod[t]


def _expand(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def consistency_output(unet, x_t, t, w_emb, cond, prediction_type, alphas) -> torch.Tensor:
    """f(x_t, t) = c_skip(t) x_t + c_out(t) x̂0 for a guidance-embedded UNet: ``[B, C, h, w]``."""
    out = unet(x_t, t, timestep_cond=w_emb, encoder_hidden_states=cond).sample
    x0, _ = x0_eps_from_output(out, x_t, alphas(t), prediction_type)
    c_skip, c_out = boundary_scalings(t, TIMESTEP_SCALING)
    return _expand(c_skip) * x_t + _expand(c_out) * x0


@torch.no_grad()
def teacher_solver_step(
    teacher_unet, x_t, t, t_prev, omega, cond, uncond, prediction_type, schedule
) -> torch.Tensor:
    """One guided DDIM (η = 0) step t -> t_prev of the teacher: x̂_prev ``[B, C, h, w]``."""
    out = teacher_unet(
        torch.cat([x_t, x_t]), torch.cat([t, t]), encoder_hidden_states=torch.cat([cond, uncond])
    ).sample
    a_t = schedule.alpha(torch.cat([t, t]))
    x0, eps = x0_eps_from_output(out, torch.cat([x_t, x_t]), a_t, prediction_type)  # [2B, ...]
    (x0_c, x0_u), (eps_c, eps_u) = x0.chunk(2), eps.chunk(2)
    w = _expand(omega)
    x0 = x0_c + w * (x0_c - x0_u)  # (1+ω) c − ω u, the LCM paper's form of CFG
    eps = eps_c + w * (eps_c - eps_u)
    a_prev = _expand(schedule.alpha(t_prev))
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def distance(a: torch.Tensor, b: torch.Tensor, kind: str, huber_c: float) -> torch.Tensor:
    """Mean over the batch of d(a, b) for ``[B, C, h, w]`` tensors."""
    sq = ((a.float() - b.float()) ** 2).flatten(1).sum(1)  # [B]
    if kind == "l2":
        return sq.mean() / a[0].numel()
    return (torch.sqrt(sq + huber_c**2) - huber_c).mean()


def distill(teacher, args, log_every: int) -> tuple[torch.nn.Module, dict]:
    """Train the student; returns the EMA target UNet (eval mode) and the training log."""
    unet_t = teacher.unet
    prediction_type = teacher.scheduler.config.prediction_type
    schedule = SolverSchedule(
        teacher.scheduler.alphas_cumprod,
        teacher.scheduler.config.num_train_timesteps,
        args.ddim_steps,
        args.skip_steps,
    )
    student = build_student(unet_t, args.guidance_dim)
    target = copy.deepcopy(student).requires_grad_(False).eval()
    params = list(student.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    vae = teacher.vae
    sf = vae.config.scaling_factor
    size = unet_t.config.sample_size * teacher.vae_scale_factor
    stream = ShapesStream(args.seed, size=size)
    gen = torch.Generator().manual_seed(args.seed + 3)
    uncond_row, _ = teacher.encode_prompt([""], teacher.device, 1, False)  # [1, L, D]
    latent_dims = unet_t.config.in_channels * unet_t.config.sample_size**2
    huber_c = args.huber_c if args.huber_c is not None else 0.00054 * latent_dims**0.5
    budget = Budget(args.steps, args.minutes, warmup=args.warmup)
    curve, step = LossCurve(log_every, budget), 0
    bar = progress(total=args.steps, desc="lcm distillation")
    while not budget.done(step):
        lr = args.lr * budget.lr_factor(step)
        set_lr(opt, lr)
        x, prompts = stream.batch(args.batch_size)  # [B, 3, S, S] in [-1, 1]
        b = len(prompts)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(generator=gen) * sf  # [B, C, h, w]
            cond, _ = teacher.encode_prompt(prompts, teacher.device, 1, False)  # [B, L, D]
        uncond = uncond_row.expand(b, -1, -1)
        t, t_prev = schedule.sample(b, gen)  # [B], [B]
        noise = torch.randn(z.shape, generator=gen)
        a_t = _expand(schedule.alpha(t))
        x_t = a_t.sqrt() * z + (1 - a_t).sqrt() * noise  # [B, C, h, w]
        omega = (
            args.guidance_min
            - 1
            + (args.guidance_max - args.guidance_min) * torch.rand(b, generator=gen)
        )  # [B]
        w_emb = guidance_embedding(omega, args.guidance_dim)  # [B, D_w]

        x_prev = teacher_solver_step(
            unet_t, x_t, t, t_prev, omega, cond, uncond, prediction_type, schedule
        )
        with torch.no_grad():
            f_target = consistency_output(
                target, x_prev, t_prev, w_emb, cond, prediction_type, schedule.alpha
            )
        f_student = consistency_output(
            student, x_t, t, w_emb, cond, prediction_type, schedule.alpha
        )
        loss = distance(f_student, f_target, args.loss, huber_c)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():  # θ⁻ <- μ θ⁻ + (1 − μ) θ
            torch._foreach_lerp_(
                list(target.parameters()), [p.detach() for p in params], 1 - args.ema_decay
            )
        step += 1
        row = curve.add(step, dict(loss=loss.item(), grad_norm=float(grad_norm)), lr=lr)
        if row:
            bar.set_postfix(loss=f"{row['loss']:.4f}")
        bar.update(1)
    bar.close()
    log = dict(
        steps=step,
        wall_s=budget.elapsed(),
        stopped_on="steps" if step >= args.steps else "time",
        huber_c=huber_c if args.loss == "huber" else None,
        solver_timesteps=schedule.timesteps.tolist(),
        train_timesteps_per_solver_step=schedule.k,
        image_size=size,
        curve=curve.points,
    )
    return target, log


def make_lcm_pipeline(teacher, unet, ddim_steps: int):
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    scheduler = LCMScheduler.from_config(
        teacher.scheduler.config,
        original_inference_steps=ddim_steps,
        timestep_scaling=TIMESTEP_SCALING,
    )
    return LatentConsistencyModelPipeline(
        vae=teacher.vae,
        text_encoder=teacher.text_encoder,
        tokenizer=teacher.tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sample_grid(
    pipe, prompts: list[str], steps: int, guidance_scale: float, seed: int, per_prompt: int = 4
):
    """One row per prompt, ``per_prompt`` samples, ``steps``-step consistency sampling."""
    from genalign.report import image_grid

    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    images = pipe(
        [p for p in prompts for _ in range(per_prompt)],
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=[
            torch.Generator().manual_seed(seed + j) for _ in prompts for j in range(per_prompt)
        ],
        output_type="pt",
    ).images
    return image_grid(images, rows=len(prompts), scale=3)


def main(argv=None) -> Path:
    """Distil and save the pipeline; returns the output folder."""
    import diffusers
    import transformers

    args = parse_args(argv)
    t0 = time.monotonic()
    seed_everything(args.seed)
    teacher = load_teacher(args.teacher)
    out = Path(args.out).resolve()
    with staged_folder(out) as tmp:
        log: dict = dict(
            command=command_line("genalign toyworld distill lcm", argv),
            args=vars(args),
            teacher=os.path.abspath(args.teacher),
            versions=versions(diffusers, transformers),
            threads=torch.get_num_threads(),
        )
        unet, log["distillation"] = distill(teacher, args, args.log_every)
        log["parameters"] = {"unet": count_parameters(unet)}
        pipe = make_lcm_pipeline(teacher, unet, args.ddim_steps)
        pipe.unet.to(getattr(torch, args.unet_dtype))  # VAE and text encoder stay the teacher's float32 files
        pipe.save_pretrained(tmp, safe_serialization=True)
        pipe.unet.to(torch.float32)  # diffusers loads float16 files back as float32 too
        for name in (
            "vocab.json",
            "merges.txt",
        ):  # plain files for slow-tokenizer loaders, as in tiny-sd
            src = Path(args.teacher) / "tokenizer" / name
            if src.is_file() and not (tmp / "tokenizer" / name).exists():
                shutil.copyfile(src, tmp / "tokenizer" / name)
        if not args.no_samples:
            s0 = time.monotonic()
            pipe.set_progress_bar_config(disable=True)
            grid = sample_grid(
                pipe, GRID_PROMPTS, args.sample_steps, args.sample_guidance, args.seed
            )
            grid.save(tmp / "samples.png")
            log["samples"] = dict(
                prompts=GRID_PROMPTS,
                steps=args.sample_steps,
                guidance_scale=args.sample_guidance,
                seeds="seed + column",
            )
            log["samples_wall_s"] = round(time.monotonic() - s0, 1)
        write_training_log(tmp, log, t0)
    d = log["distillation"]
    print(
        f"saved {out}: {d['steps']} steps in {d['wall_s'] / 60:.1f} min (stopped on {d['stopped_on']})"
    )
    return out


if __name__ == "__main__":
    main()
