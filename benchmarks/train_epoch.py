"""A DDPO training epoch: genalign's trainer against a straightforward loop.

The loop is written the way the original DDPO code trains: encode the prompts (the negative
prompt's embedding computed once), draw x_T from one generator, call the UNet once per
timestep with the CFG batch, take a DDIM step with its log-prob, decode, score; then per
minibatch and per timestep one UNet forward and backward of the clipped loss, gradients
accumulated over timesteps and minibatches, one optimizer step. genalign's arm is
``Trainer._epoch`` on the same model, LoRA, batch, steps, reward and optimizer settings, with
every step trained (no noise window) and the on-policy probe off, so both arms make the same
UNet calls (counted by a hook and checked).

Before timing, both losses are computed on one shared trajectory (genalign's rollout and
advantages) and must agree: the loop is the same algorithm, not a cheaper one. Then the arms
alternate (A, B, A, B, ...) after a warm-up, each from the same starting LoRA weights and a
fresh optimizer, so machine noise hits both alike; the table reports medians and the ratio.

    OMP_NUM_THREADS=1 python benchmarks/train_epoch.py                 # tiny-sd, CPU, 1 thread
    python benchmarks/train_epoch.py --arch sd15 --device cuda --dtype bfloat16 --repeats 3

Prints a table and writes JSON to --out.
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

from genalign.configs import load_config
from genalign.seeds import Stream, derive_seed
from genalign.train_config import TrainConfig
from genalign.trainer import Trainer

HALF_LOG_2PI = 0.5 * float(torch.log(torch.tensor(2 * torch.pi)))


# -- the straightforward loop ------------------------------------------------------------------
class Loop:
    """DDPO as the original code writes it, on the trainer's own pipeline and LoRA UNet."""

    def __init__(self, trainer: Trainer, steps: int, guidance: float, eta: float, clip: float, adv_clip: float):
        policy = trainer.policy
        self.pipe, self.unet, self.device = policy.pipe, policy.tuning.module, policy.device
        self.params = policy.trainable_parameters()
        self.latent_shape = policy.backbone.latent_shape()  # [C, h, w]
        self.reward, self.guidance, self.eta, self.clip, self.adv_clip = trainer.reward, guidance, eta, clip, adv_clip
        self.sched = self.pipe.scheduler
        self.sched.set_timesteps(steps, device=self.device)
        self.timesteps = self.sched.timesteps.clone()
        self.step_size = self.sched.config.num_train_timesteps // steps
        self.alphas = self.sched.alphas_cumprod.float()
        self.final_alpha = float(self.sched.final_alpha_cumprod)
        self.v_pred = self.sched.config.prediction_type == "v_prediction"
        self.max_grad_norm = trainer.config.train.max_grad_norm
        self.autocast = trainer.acc.autocast  # the trainer's mixed precision, for a like-for-like loop
        self.negative = None  # the negative prompt's embedding, computed once

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        cond = self.pipe.encode_prompt(prompts, self.device, 1, False)[0]
        if self.negative is None:
            self.negative = self.pipe.encode_prompt([""], self.device, 1, False)[0]
        return cond, self.negative.expand(len(prompts), -1, -1)

    def guided(self, latents, t, cond, neg):
        with self.autocast():
            both = self.unet(torch.cat([latents, latents]), t, encoder_hidden_states=torch.cat([neg, cond])).sample
        uncond, text = both.float().chunk(2)
        return uncond + self.guidance * (text - uncond)

    def step_with_logprob(self, out, t, latents, prev=None, generator=None):
        """The DDIM step (η) and log N(prev; μ, σ²) averaged over latent dims, as DDPO computes it."""
        t_i = int(t)
        a_t = self.alphas[t_i]
        a_prev = self.alphas[t_i - self.step_size] if t_i - self.step_size >= 0 else torch.tensor(self.final_alpha)
        if self.v_pred:
            x0 = a_t.sqrt() * latents - (1 - a_t).sqrt() * out
            eps = a_t.sqrt() * out + (1 - a_t).sqrt() * latents
        else:
            x0 = (latents - (1 - a_t).sqrt() * out) / a_t.sqrt()
            eps = out
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = self.eta * var.sqrt()
        mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
        if prev is None:
            prev = mean + std * torch.randn(latents.shape, generator=generator).to(latents.device)
        lp = -((prev.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - HALF_LOG_2PI
        return prev, lp.flatten(1).mean(1)

    @torch.no_grad()
    def rollout(self, prompts: list[str], generator: torch.Generator):
        cond, neg = self.encode(prompts)
        latents = torch.randn((len(prompts), *self.latent_shape), generator=generator).to(self.device)
        chain, log_probs = [latents], []
        for t in self.timesteps:
            latents, lp = self.step_with_logprob(self.guided(latents, t, cond, neg), t, latents, generator=generator)
            chain.append(latents)
            log_probs.append(lp)
        vae = self.pipe.vae
        images = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample.float()
        return torch.stack(chain, 1), torch.stack(log_probs, 1), (images / 2 + 0.5).clamp(0, 1), cond, neg

    def loss(self, chain, old_lp, adv, cond, neg, j):
        """The clipped DDPO loss of timestep ``j`` for a minibatch (its mean over rows)."""
        t = self.timesteps[j]
        out = self.guided(chain[:, j], t, cond, neg)
        _, lp = self.step_with_logprob(out, t, chain[:, j], prev=chain[:, j + 1])
        ratio = torch.exp(lp - old_lp[:, j])
        adv = adv.clamp(-self.adv_clip, self.adv_clip)
        return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - self.clip, 1 + self.clip)).mean()

    def epoch(self, prompts: list[str], n: int, optimizer, batch: int, generator: torch.Generator, seed: int) -> float:
        rows = [p for p in prompts for _ in range(n)]
        chain, old_lp, images, cond, neg = self.rollout(rows, generator)
        rewards = self.reward(images, rows).scores.float().to(self.device)
        groups = rewards.view(len(prompts), n)
        adv = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).flatten()
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).to(self.device)
        minibatches = [order[i : i + batch] for i in range(0, len(rows), batch)]
        total_calls = len(minibatches) * len(self.timesteps)
        losses = []
        for idx in minibatches:
            for j in range(len(self.timesteps)):
                loss = self.loss(chain[idx], old_lp[idx], adv[idx], cond[idx], neg[idx], j)
                (loss / total_calls).backward()
                losses.append(loss.item())
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return sum(losses) / len(losses)


# -- setup -----------------------------------------------------------------------------------
def build_trainer(args, out: str) -> Trainer:
    n_rows = args.prompts * args.per_prompt
    overrides = [
        "policy.type=stable_diffusion", f"policy.pretrained={args.model}", f"policy.num_steps={args.steps}",
        f"policy.eta={args.eta}", f"policy.guidance_scale={args.guidance}", "policy.finetune=lora",
        f"policy.lora_rank={args.lora_rank}", f"policy.weight_dtype={args.dtype}",
        "algorithm.name=ddpo", f"algorithm.clip_range={args.clip}", "algorithm.adv_clip_max=5.0",
        "algorithm.timestep_fraction=1.0", "algorithm.noise_window=0", "algorithm.group_baseline=true",
        "algorithm.per_prompt_stat_tracking=false",
        "reward.components=[{type: jpeg_compressibility}]",
        "prompts.source=shapes_world", "prompts.tiers=[1, 2]",
        f"train.prompts_per_epoch={args.prompts}", f"train.samples_per_prompt={args.per_prompt}",
        f"train.rollout_batch_size={n_rows}", f"train.train_batch_size={args.batch}",
        f"train.gradient_accumulation_steps={-(-n_rows // args.batch)}", "train.probe_rows=0",
        "train.learning_rate=1e-4", "eval.enabled=false", "report.enabled=false", f"output_dir={out}", f"seed={args.seed}",
    ]
    if args.mixed_precision != "no":
        overrides.append(f"train.mixed_precision={args.mixed_precision}")
    return Trainer(load_config(TrainConfig, None, overrides))


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


def shared_loss_check(trainer: Trainer, loop: Loop, prompts: list[str], n: int) -> dict[str, float]:
    """Both losses on one trajectory (genalign's rollout, its advantages), every step, no update,
    scored with LoRA weights moved off the sampler's (so ratios differ from 1 and some clip)."""
    policy = trainer.policy
    sampler = {k: v.clone() for k, v in policy.trainable_state_dict().items()}
    seeds = [derive_seed(0, Stream.ROLLOUT, 0, r) for r in range(len(prompts) * n)]
    traj = policy.rollout(prompts, n, seeds)
    rewards = trainer.reward(traj.outputs, traj.conditions).scores.float().cpu()
    traj = traj.with_rewards(rewards.to(policy.device))
    traj.advantages = trainer.algorithm.advantages(rewards, list(traj.conditions), traj.group.cpu()).to(policy.device)
    steps = torch.arange(traj.num_steps, device=policy.device).unsqueeze(0).expand(traj.batch_size, -1)
    g = torch.Generator().manual_seed(1)
    policy.load_trainable_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=g).to(v) for k, v in sampler.items()})
    with torch.no_grad():
        terms = trainer.algorithm.loss(traj, policy.log_prob(traj, steps), None)
        ours = float(terms.total) / float(terms.normaliser)
        chain = torch.cat([traj.states, traj.actions[:, -1:]], 1)
        cond, neg = traj.extras["prompt_embeds"], traj.extras["negative_prompt_embeds"]
        theirs = statistics.fmean(float(loop.loss(chain, traj.log_probs, traj.advantages, cond, neg, j))
                                  for j in range(traj.num_steps))
    policy.load_trainable_state_dict(sampler)
    return {"genalign": ours, "loop": theirs, "abs_diff": abs(ours - theirs)}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="assets/models/tiny-sd")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--per-prompt", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--eta", type=float, default=1.0)
    ap.add_argument("--clip", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=8, help="training minibatch (rows)")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5, help="timed epochs per arm (after one warm-up each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", help="weight dtype of the frozen model")
    ap.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"], help="autocast of both arms")
    ap.add_argument("--out", default="benchmarks/results/train_epoch.json")
    return ap.parse_args(argv)


def measure(args: argparse.Namespace) -> dict:
    """Run the comparison (on CUDA when accelerate picks it); returns the result written to --out."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(args, os.path.join(tmp, "run"))
        policy = trainer.policy
        loop = Loop(trainer, args.steps, args.guidance, args.eta, args.clip, 5.0)
        calls = count_calls(policy.tuning.module)
        start = {k: v.clone() for k, v in policy.trainable_state_dict().items()}
        prompts = [p if isinstance(p, str) else p["prompt"] for p in trainer.prompts.sample(args.prompts, seed=args.seed)]
        check = shared_loss_check(trainer, loop, prompts, args.per_prompt)
        scale = max(abs(check["genalign"]), 1e-8)
        if check["abs_diff"] > 1e-4 * scale:
            raise SystemExit(f"the two losses differ on the same trajectory: {check}")
        print(f"loss on a shared trajectory: genalign {check['genalign']:.6g}, loop {check['loop']:.6g}", file=sys.stderr)

        def fresh_optimizer():
            t = trainer.config.train
            return torch.optim.AdamW(policy.trainable_parameters(), lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                     eps=t.adam_eps, weight_decay=t.weight_decay)

        cuda = policy.device.type == "cuda"
        peak: dict[str, int] = {}

        def run(arm: str, epoch: int) -> tuple[float, int]:
            policy.load_trainable_state_dict(start)
            calls[0] = 0
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            if arm == "genalign":
                trainer.optimizer = fresh_optimizer()
                trainer._epoch(epoch)
            else:
                gen = torch.Generator().manual_seed(derive_seed(args.seed, Stream.ROLLOUT, epoch, 0))
                loop.epoch(prompts, args.per_prompt, fresh_optimizer(), args.batch, gen, epoch)
            if cuda:
                torch.cuda.synchronize()
                peak[arm] = max(peak.get(arm, 0), torch.cuda.max_memory_allocated())
            return time.perf_counter() - t0, calls[0]

        times: dict[str, list[float]] = {"genalign": [], "loop": []}
        unet_calls: dict[str, int] = {}
        for r in range(args.repeats + 1):
            for arm in (("genalign", "loop") if r % 2 == 0 else ("loop", "genalign")):
                seconds, n_calls = run(arm, r)
                unet_calls[arm] = n_calls
                if r > 0:  # the first round warms up
                    times[arm].append(seconds)
                print(f"round {r} {arm:8s} {seconds:7.3f} s  {n_calls} UNet calls", file=sys.stderr)
        if unet_calls["genalign"] != unet_calls["loop"]:
            raise SystemExit(f"the arms made different UNet calls: {unet_calls}")

    med = {arm: statistics.median(v) for arm, v in times.items()}
    result = {
        "model": args.model, "device": torch.cuda.get_device_name() if cuda else "cpu", "threads": torch.get_num_threads(),
        "dtype": args.dtype, "mixed_precision": args.mixed_precision,
        "peak_allocated_mb": {k: v / 2**20 for k, v in peak.items()},
        "images_per_second": {arm: args.prompts * args.per_prompt / m for arm, m in med.items()},
        "rows": args.prompts * args.per_prompt, "steps": args.steps, "guidance": args.guidance, "batch": args.batch,
        "lora_rank": args.lora_rank, "repeats": args.repeats, "unet_calls_per_epoch": unet_calls["loop"],
        "loss_check": check, "seconds": times, "median": med, "ratio": med["genalign"] / med["loop"],
        "torch": torch.__version__, "python": platform.python_version(),
    }
    print("| arm | median epoch s | all (s) |\n|---|---|---|")
    for arm in ("loop", "genalign"):
        print(f"| {arm} | {med[arm]:.3f} | {', '.join(f'{s:.2f}' for s in times[arm])} |")
    print(f"ratio genalign / loop: {result['ratio']:.3f}x; {unet_calls['loop']} UNet calls per epoch in each arm; "
          f"loss on a shared trajectory: {check['genalign']:.6g} vs {check['loop']:.6g}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    measure(parse())
