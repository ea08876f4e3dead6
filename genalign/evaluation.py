"""``genalign sample`` and ``genalign eval``: sample a policy, score it, write tables.

``genalign sample`` draws images or, from a token policy (``log_prob_unit == "token"``), texts
(:mod:`genalign.text_sampling`); ``genalign eval`` is for image policies.

Both accept any policy location: a diffusers pipeline directory, a hub id, a training
run's ``final/`` directory, or the run directory itself (its ``final/`` is used). Samples are seeded per row (prompt i, sample j
uses seed + j), so two policies compared with the same arguments see the same noise.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from genalign.conditions import condition_key
from genalign.configs import opt, tagged
from genalign.policies import POLICIES
from genalign.policies.unet_tuning import POLICY_FILE
from genalign.progress import progress
from genalign.prompts import PROMPT_SOURCES
from genalign.report import detach_outputs, image_grid, is_video, save_gif, to_stills
from genalign.trajectory import Trajectory, concat_outputs


def resolve_policy_path(path_or_id: str) -> str:
    """A policy location: a run directory becomes its ``final/``; a folder that holds no policy is an error."""
    if not os.path.isdir(path_or_id):
        return path_or_id  # a hub id, or a missing folder the loader reports
    for name in (POLICY_FILE, "model_index.json", "config.json"):  # config.json: a bare transformers model
        if os.path.isfile(os.path.join(path_or_id, name)):
            return path_or_id
    final = os.path.join(path_or_id, "final")
    if os.path.isfile(os.path.join(final, POLICY_FILE)):
        return final
    if os.path.isfile(os.path.join(path_or_id, "config.yaml")) and os.path.isdir(os.path.join(path_or_id, "checkpoints")):
        raise FileNotFoundError(f"{path_or_id} is a training run without final/ (unfinished? continue it with --resume)")
    raise FileNotFoundError(
        f"{path_or_id} is neither a policy (no {POLICY_FILE}, model_index.json or config.json) nor a training run (no final/)"
    )


def sampler_settings(policy: Any) -> dict[str, Any]:
    """The sampling settings a policy uses (steps, guidance, and eta where the sampler has one)."""
    c = policy.config
    out = {"steps": c.num_steps, "guidance_scale": c.guidance_scale}
    if hasattr(c, "eta"):
        out["eta"] = c.eta
    if getattr(c, "first_step_eta", None) is not None:
        out["first_step_eta"] = c.first_step_eta
    return out


def describe_sampler(policy_path: str, policy: Any, seed: int, n: int) -> str:
    """One line: ``<policy>: 10 steps, guidance 4.0, eta 1.0; seeds 0..3 per prompt``."""
    s = sampler_settings(policy)
    parts = [f"{s['steps']} steps", f"guidance {s['guidance_scale'] if s['guidance_scale'] is not None else 'default'}"]
    if "eta" in s:
        parts.append(f"eta {s['eta']}" + (f" (first step {s['first_step_eta']})" if "first_step_eta" in s else ""))
    seeds = f"seed {seed}" if n == 1 else f"seeds {seed}..{seed + n - 1}"
    return f"{policy_path}: {', '.join(parts)}; {seeds} per prompt (sample j of a prompt uses seed + j)"


def _policy_meta(path_or_id: str, policy_type: str = "") -> tuple[str, dict[str, Any] | None]:
    """The policy type at a resolved location, and its genalign metadata (None for a bare model).
    ``policy_type`` names the type of a bare model folder or hub id (else: a diffusers pipeline)."""
    meta = None
    meta_path = os.path.join(path_or_id, POLICY_FILE)
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
    if meta and policy_type and meta["type"] != policy_type:
        raise ValueError(f"'policy_type' is {policy_type!r} but {meta_path} holds a {meta['type']!r} policy")
    kind = meta["type"] if meta else policy_type or _pipeline_kind(path_or_id)
    if kind not in POLICIES:
        raise ValueError(f"{path_or_id}: unknown policy type {kind!r}; known: {sorted(POLICIES)}")
    return kind, meta


def require_image_policy(path_or_id: str, command: str) -> None:
    """Refuse, before loading it, a policy whose samples are texts (it samples tokens): ``genalign
    sample`` and ``genalign eval`` write PNGs and score them with image rewards."""
    path_or_id = resolve_policy_path(path_or_id)
    kind, _ = _policy_meta(path_or_id)
    if POLICIES[kind][1].log_prob_unit == "token":
        raise ValueError(
            f"policy {path_or_id} is a text policy (type {kind!r}): `genalign {command}` draws and scores images. "
            f"Evaluate a text policy with `genalign train` (its `eval` section writes eval.jsonl and report.html "
            f"before and after training, with policy.pretrained set to this policy)"
        )


def load_policy(path_or_id: str, steps: int | None = None, guidance_scale: float | None = None,
                policy_type: str = "", options: dict[str, Any] | None = None) -> Any:
    """A policy from a pipeline dir / hub id / genalign policy dir / run dir, with sampling overrides
    (``options``: settings of the policy's config, e.g. ``max_new_tokens``)."""
    path_or_id = resolve_policy_path(path_or_id)
    kind, meta = _policy_meta(path_or_id, policy_type)
    config_cls, policy_cls = POLICIES[kind]
    config = config_cls(**meta["config"]) if meta else config_cls(pretrained=path_or_id)
    for key, value in (options or {}).items():
        if key in ("type", "pretrained") or not hasattr(config, key):
            raise ValueError(f"'policy_options.{key}': not a sampling setting of a {kind} policy")
        setattr(config, key, value)
    if steps is not None:
        config.num_steps = steps
    if guidance_scale is not None:
        config.guidance_scale = guidance_scale
    return policy_cls.from_pretrained(path_or_id, config)


def _pipeline_kind(path_or_id: str) -> str:
    """The policy type of a bare diffusers pipeline: ``consistency`` when its scheduler is an
    LCMScheduler (a LatentConsistencyModelPipeline folder), ``video_diffusion`` for a
    TextToVideoSDPipeline or an AnimateDiffPipeline, ``flow_matching`` for a StableDiffusion3Pipeline, else ``stable_diffusion``."""
    if os.path.isfile(os.path.join(path_or_id, "config.json")) and not os.path.isfile(os.path.join(path_or_id, "model_index.json")):
        raise ValueError(f"{path_or_id} is a single model folder, not a diffusers pipeline: name its policy type "
                         f"(--policy-type / policy_type, one of {sorted(POLICIES)})")
    model_index = os.path.join(path_or_id, "model_index.json")
    if os.path.isfile(model_index):
        with open(model_index) as f:
            kind = {"TextToVideoSDPipeline": "video_diffusion", "AnimateDiffPipeline": "video_diffusion",
                    "StableDiffusion3Pipeline": "flow_matching"}.get(
                json.load(f).get("_class_name"))
            if kind:
                return kind
    scheduler_config = os.path.join(path_or_id, "scheduler", "scheduler_config.json")
    if os.path.isfile(scheduler_config):
        with open(scheduler_config) as f:
            if json.load(f).get("_class_name") == "LCMScheduler":
                return "consistency"
    return "stable_diffusion"


@torch.no_grad()
def sample_and_score(
    policy: Any, prompts: Sequence[Any], n: int, seed: int, reward: Any | None, batch_size: int = 64, desc: str = "sampling"
) -> tuple[Any, Any]:
    """Rollout ``n`` samples per condition and score them.

    Row j of a condition's first occurrence uses sampling seed ``seed + j``; a condition listed
    again (same ``condition_key``: eval sets cycle through small pools) continues with
    ``seed + n``, ``seed + 2n``, …, so every row is a distinct sample and the rows can be
    averaged as independent draws.

    Returns the outputs (images ``[len(prompts) * n, 3, H, W]`` on the CPU, or a list of
    ``len(prompts) * n`` texts) and the concatenated RewardOutput (or None).
    """
    from rewards.base import RewardOutput

    occurrence: dict[str, int] = {}
    first_seeds = []  # [len(prompts)]
    for prompt in prompts:
        key = condition_key(prompt)
        k = occurrence.get(key, 0)
        occurrence[key] = k + 1
        first_seeds.append(seed + k * n)
    per_call = max(1, batch_size // n)
    parts, scores, comps, details = [], [], {}, []
    for i in progress(range(0, len(prompts), per_call), desc=desc, leave=False):
        chunk = list(prompts[i : i + per_call])
        seeds = [s + j for s in first_seeds[i : i + per_call] for j in range(n)]
        traj = policy.rollout(chunk, n, seeds)
        parts.append(detach_outputs(traj.outputs))
        if reward is not None:
            out = reward(traj.outputs, traj.conditions)
            scores.append(out.scores.float().cpu())
            for k, v in out.components.items():
                comps.setdefault(k, []).append(v.float().cpu())
            details.extend(out.details or [{} for _ in traj.conditions])
    outputs = concat_outputs(parts)
    if reward is None:
        return outputs, None
    return outputs, RewardOutput(torch.cat(scores), {k: torch.cat(v) for k, v in comps.items()}, details)


def _build_named_reward(name: str, verifier_path: str = "assets/models/shapes-verifier", video: bool = False) -> Any | None:
    from rewards.jpeg import JpegCompressibility, JpegConfig

    if name == "none":
        return None
    if video:  # clips: the video rewards
        from rewards.motion import MotionReward, TemporalConsistency

        if name in ("auto", "motion"):
            return MotionReward()
        if name == "temporal_consistency":
            return TemporalConsistency()
        raise ValueError(f"unknown reward {name!r} for clips; choose motion, temporal_consistency, none or auto "
                         "(any image reward scores clips per frame through a training config's `per_frame` reward)")
    if name == "auto":
        name = "shapes_verifier" if os.path.isdir(verifier_path) else "jpeg_compressibility"
    if name == "shapes_verifier":
        from rewards.shapes_verifier import ShapesVerifierReward

        return ShapesVerifierReward.from_pretrained(verifier_path)
    if name in ("jpeg_compressibility", "jpeg_incompressibility"):
        return JpegCompressibility(JpegConfig(type=name))
    raise ValueError(f"unknown reward {name!r}; choose shapes_verifier, jpeg_compressibility, jpeg_incompressibility, none or auto")


@dataclass
class SampleConfig:
    """``genalign sample CONFIG.yaml``: the same options as the command's flags."""

    policy: str = opt("", "policy directory or hub id (a diffusers pipeline, a model folder, or a genalign final/ directory)")
    policy_type: str = opt("", "policy type of a bare model folder or hub id (e.g. text_lm); default: read from the folder")
    policy_options: dict[str, Any] = opt({}, "settings of the policy's config for sampling, e.g. {max_new_tokens: 8, temperature: 1.0}")
    prompts: list[str] = opt([], "prompts to sample")
    prompts_file: str = opt("", "text file with one prompt per line (added to `prompts`)")
    prompt_source: Any = tagged(PROMPT_SOURCES, "source", help="a prompt source (as a training config's `prompts`); its evaluation conditions are added")
    num_prompts: int = opt(8, "how many conditions to take from `prompt_source`")
    n: int = opt(4, "samples per prompt")
    seed: int = opt(0, "seed of the first sample; sample j of a prompt uses seed + j")
    steps: int | None = opt(None, "denoising steps (default: the policy's)")
    guidance_scale: float | None = opt(None, "CFG weight (default: the policy's)")
    reward: str = opt("auto", "reward that scores (and guides): images: shapes_verifier, jpeg_compressibility; "
                              "clips: motion, temporal_consistency; texts: rule_exact, rule_numeric, rule_choice; "
                              "or none, or auto")
    method: Literal["plain", "best_of_n", "svdd_pm", "svdd_mc", "self_certainty", "borda"] = opt(
        "plain", "plain sampling, best-of-N, SVDD-PM, SVDD-MC guidance (needs value_model); token policies also "
                 "self_certainty (best-of-N by self-certainty, no reward) and borda (Borda vote over answers)"
    )
    value_model: str = opt("", "svdd_mc: directory written by `genalign value`")
    candidates: int = opt(4, "best_of_n, self_certainty, borda: N samples per output; svdd_pm: M candidates per decision")
    alpha: float = opt(0.0, "svdd_pm temperature: 0 keeps the best candidate, > 0 samples softmax(v/α)")
    chunk: int = opt(1, "svdd_pm: steps (tokens) each candidate takes before the candidates are valued")
    borda_power: float = opt(0.5, "borda: rank r of N casts (N - r + 1)^p votes; 0 is a majority vote")
    answer_pattern: str = opt(r"<answer>(.*?)</answer>", "borda: regex whose last match's group 1 is a response's answer")
    out: str = opt("samples", "output directory (must be empty or new unless `overwrite`)")
    overwrite: bool = opt(False, "write into a non-empty `out` (replacing its images, rewards.jsonl, grid.png, summary.json)")

    def validate(self) -> None:
        if not self.policy:
            raise ValueError("'policy' is required")
        if self.method == "svdd_mc" and not self.value_model:
            raise ValueError("'value_model' is required for method svdd_mc (train one with `genalign value`)")
        if self.candidates < 1 or self.n < 1:
            raise ValueError(f"'candidates' and 'n' must be >= 1, got {self.candidates}, {self.n}")
        if self.chunk < 1 or self.num_prompts < 1:
            raise ValueError(f"'chunk' and 'num_prompts' must be >= 1, got {self.chunk}, {self.num_prompts}")
        if self.borda_power < 0:
            raise ValueError(f"'borda_power' must be >= 0, got {self.borda_power}")


def read_prompts(inline: Sequence[str], path: str | None, source: Any = None, count: int = 0) -> list[Any]:
    """Inline prompts, then a file's lines, then ``count`` evaluation conditions of a prompt source."""
    prompts: list[Any] = list(inline)
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"prompt file not found: {path}")
        from genalign.prompts import read_prompt_lines

        from_file = read_prompt_lines(path)
        if not from_file:
            raise ValueError(f"prompt file {path} has no prompts")
        prompts += from_file
    if source is not None:
        prompts += list(source.evaluation(count))
    if not prompts:
        raise ValueError("no prompts: pass --prompt TEXT (repeatable) or --prompts FILE (or a config's prompt_source)")
    return prompts


def sample_command(args: argparse.Namespace) -> int:
    from genalign.configs import load_config

    if args.policy.endswith((".yaml", ".yml")):
        cfg = load_config(SampleConfig, args.policy, args.overrides)
    else:
        if args.overrides:
            raise ValueError(f"key=value overrides need a YAML config, got policy {args.policy!r} and {args.overrides}")
        cfg = SampleConfig(policy=args.policy, prompts=list(args.prompt), prompts_file=args.prompts or "", n=args.n,
                           seed=args.seed, steps=args.steps, guidance_scale=args.guidance_scale, reward=args.reward,
                           method=args.method, candidates=args.candidates, alpha=args.alpha, out=args.out,
                           value_model=args.value_model, overwrite=args.overwrite, policy_type=args.policy_type,
                           chunk=args.chunk, borda_power=args.borda_power)
        cfg.validate()
    return run_sampling(cfg)


def run_sampling(cfg: SampleConfig) -> int:
    from genalign.guidance import ComputeCounter, PMValue, best_of_n, svdd_sample
    from genalign.guidance.value_model import MCValue, ValueNet

    path = resolve_policy_path(cfg.policy)
    kind, _ = _policy_meta(path, cfg.policy_type)
    prompts = read_prompts(cfg.prompts, cfg.prompts_file, cfg.prompt_source, cfg.num_prompts)
    if POLICIES[kind][1].log_prob_unit == "token":  # texts, whatever the policy class
        from genalign.text_sampling import run_token_sampling

        return run_token_sampling(cfg, path, prompts)
    if cfg.method in ("self_certainty", "borda"):
        raise ValueError(f"'method': {cfg.method} needs a token policy's full next-token distribution; {path} draws images")
    reward = _build_named_reward(cfg.reward, video=kind == "video_diffusion")
    if reward is None and cfg.method != "plain":
        raise ValueError(f"method {cfg.method!r} needs a reward to guide with; got reward 'none'")
    check_output_dir(cfg.out, cfg.overwrite)
    policy = load_policy(path, cfg.steps, cfg.guidance_scale, cfg.policy_type, cfg.policy_options)
    print(describe_sampler(path, policy, cfg.seed, cfg.n))
    counter = ComputeCounter()
    value = MCValue(ValueNet.load(cfg.value_model), counter) if cfg.method == "svdd_mc" else PMValue(policy, reward, counter)
    images, rows = [], []
    for p, prompt in enumerate(progress(prompts, desc=f"sampling ({cfg.method})")):
        seeds = [cfg.seed + j for j in range(cfg.n)]
        if cfg.method == "plain":
            t0 = time.perf_counter()
            traj = policy.rollout([prompt], cfg.n, list(seeds))
            counter.model_evals += traj.batch_size * traj.num_steps
            counter.decoder_calls += traj.batch_size
            counter.wall_seconds += time.perf_counter() - t0
        elif cfg.method == "best_of_n":  # output j keeps the best of N samples seeded (seed + j) * N + i
            picks = []
            for s in seeds:
                chosen, _ = best_of_n(policy, [prompt], cfg.candidates, [s * cfg.candidates + i for i in range(cfg.candidates)],
                                      reward, counter)
                picks.append(chosen)
            traj = Trajectory.cat(picks)
        else:
            traj = svdd_sample(policy, [prompt], cfg.n, seeds, value, cfg.candidates, cfg.alpha, counter, chunk=cfg.chunk)
        images.append(traj.outputs.cpu())
        scored = reward(traj.outputs, traj.conditions) if reward is not None else None
        for j in range(cfg.n):
            name = f"images/{p:04d}_{j:02d}.png"
            row: dict[str, Any] = {"prompt": prompt, "seed": seeds[j], "image": name, "method": cfg.method}
            if scored is not None:
                row["reward"] = float(scored.scores[j])
                row["components"] = {k: float(v[j]) for k, v in scored.components.items()}
                row["details"] = scored.details[j] if scored.details else {}
            rows.append(row)
    imgs = torch.cat(images)
    os.makedirs(os.path.join(cfg.out, "images"), exist_ok=True)
    for row, img in zip(rows, imgs):
        if is_video(imgs):  # a clip: an animated GIF beside its frame strip
            save_gif(img, os.path.join(cfg.out, row["image"][: -len(".png")] + ".gif"))
        image_grid(to_stills(img[None]), rows=1, pad=0).save(os.path.join(cfg.out, row["image"]))
    with open(os.path.join(cfg.out, "rewards.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    image_grid(to_stills(imgs), rows=len(prompts), scale=4 if imgs.shape[-1] <= 64 else 1).save(os.path.join(cfg.out, "grid.png"))
    summary: dict[str, Any] = {"prompts": len(prompts), "samples": len(rows), "method": cfg.method,
                               "candidates": cfg.candidates if cfg.method != "plain" else 1, **counter.as_dict()}
    if reward is not None:
        summary["reward_mean"] = sum(r["reward"] for r in rows) / len(rows)
    with open(os.path.join(cfg.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary))
    print(f"wrote {len(rows)} samples to {cfg.out}/ (images/, rewards.jsonl, grid.png, summary.json)")
    return 0


def check_output_dir(out: str, overwrite: bool) -> None:
    """Refuse to write into a non-empty folder unless ``overwrite`` (before any model loads)."""
    if os.path.isfile(out):
        raise FileExistsError(f"output {out} is a file, not a folder")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(f"output folder {out} is not empty: pass --overwrite (config: overwrite: true) or choose another --out")


def evaluate_tiers(
    policy: Any, verifier: Any, tiers: Sequence[int], split: str, prompts_per_tier: int, n: int, seed: int, batch_size: int = 64
) -> list[dict[str, Any]]:
    """Per-tier strict and partial accuracy on Shapes World prompts (prompts drawn with ``seed``)."""
    from genalign.toyworld import sample_prompts

    table = []
    for tier in tiers:
        prompts = sample_prompts(tier, prompts_per_tier, split, seed=seed)
        _, out = sample_and_score(policy, prompts, n, seed, verifier, batch_size, desc=f"tier {tier}")
        strict, partial = out.components["strict"], out.components["partial"]
        table.append(
            {
                "tier": tier,
                "split": split,
                "prompts": len(prompts),
                "samples": len(strict),
                "strict": float(strict.mean()),
                "strict_se": float(strict.std(unbiased=True) / len(strict) ** 0.5) if len(strict) > 1 else 0.0,
                "partial": float(partial.mean()),
            }
        )
    return table


def format_table(table: list[dict[str, Any]]) -> str:
    lines = ["| tier | split | samples | strict | ± s.e. | partial |", "|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['tier']} | {r['split']} | {r['samples']} | {r['strict']:.3f} | {r['strict_se']:.3f} | {r['partial']:.3f} |")
    return "\n".join(lines)


def parse_policy_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> settings (values read as YAML: 1 is an int, true a bool)."""
    import yaml

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--policy-option {pair!r}: expected KEY=VALUE")
        options[key.strip()] = yaml.safe_load(value)
    return options


def eval_command(args: argparse.Namespace) -> int:
    from rewards.shapes_verifier import ShapesVerifierReward

    path = resolve_policy_path(args.policy)  # a folder that holds no policy fails here, in one line
    require_image_policy(path, "eval")
    kind, _ = _policy_meta(path)
    if kind == "video_diffusion":
        raise ValueError(f"policy {path} is a video policy: `genalign eval` scores Shapes World images per tier. "
                         "Evaluate a video policy with `genalign train` (its `eval` section, e.g. the motion reward) or "
                         "benchmarks/video.py, or sample clips with `genalign sample`")
    options = parse_policy_options(getattr(args, "policy_option", []))
    verifier = ShapesVerifierReward.from_pretrained(args.verifier)
    policy = load_policy(path, args.steps, args.guidance_scale, options=options)
    print(describe_sampler(path, policy, args.seed, args.n))
    table = evaluate_tiers(policy, verifier, args.tiers, args.split, args.prompts_per_tier, args.n, args.seed, args.batch_size)
    print(format_table(table))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"policy": path, "seed": args.seed, "sampler": sampler_settings(policy), "table": table}, f, indent=2)
    return 0
