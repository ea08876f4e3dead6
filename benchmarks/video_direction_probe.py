"""Does a text-to-video denoiser use the direction word of its prompt?

Renders Moving Shapes clips of one object moving each way (left, right, up, down) or staying,
noises each clip at a few timesteps, and asks the UNet for its prediction under the same prompt
with each of the five direction phrases. A model that uses the direction word predicts the clip
best under the true phrase: the probe reports, per timestep, how often the true phrase gives the
lowest error over the five (chance 0.2), and the mean error under the true phrase relative to the
mean under the wrong ones (1.0: the word makes no difference).

Two more checks print beside it. **Text**: the text encoder's hidden states of prompts that differ
only in the direction word (the mean cosine between the four moving directions' states at the
word itself and at the end-of-text token, beside the same for prompts that differ only in the
colour word): a denoiser cannot follow a word its text encoder maps to the same vectors.
**Samples**: the direction the motion verifier reads off sampled clips of the held-out one-object
prompts (10 DDIM steps, eta 0.5, guidance 5, as the video quickstart samples), against the
prompted one: a confusion matrix whose moving rows show whether samples follow the word at all.

It takes about two minutes on 2 CPU cores, so it checks a base model before anyone spends an
hour of reward training on it: reward training needs a model whose samples follow the word some
of the time, and a denoiser that ignores the word will not draw it.

    python benchmarks/video_direction_probe.py                       # assets/models/tiny-video
    python benchmarks/video_direction_probe.py --model DIR --clips 16
    python benchmarks/video_direction_probe.py --model DIR --speed 0.03   # a model trained on slower clips
    python benchmarks/video_direction_probe.py --samples 0                 # skip the sampled clips
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from genalign.recipes.pretrain_video import encode_clips, load_video_components, trainable_unet  # noqa: E402
from genalign.recipes.sd_training import training_target  # noqa: E402
from genalign.toyworld.moving import DIRECTIONS, MovingObject, MovingSpec, render_clip  # noqa: E402

OBJECTS = (("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle"))


def phrase(color: str, shape: str, direction: str) -> str:
    """The prompt the denoiser is asked with."""
    return MovingSpec((MovingObject(color, shape, direction),)).prompt


@torch.no_grad()
def probe_components(comps: dict, clips: int, timesteps: list[int], seed: int, speed: float | None = None) -> dict:
    """Per timestep: how often the true phrase gives the lowest error, that rate per direction,
    the mean error under the true phrase over the mean under wrong ones, and the 5 x 5 mean
    errors (row: the clip's direction, column: the prompted one). ``comps``: ``unet`` (called
    as ``unet(latents [c, C, F, h, w], t, encoder_hidden_states=[c, L, D]).sample``),
    ``text_encoder``, ``tokenizer``, ``vae``, ``scheduler``; an AnimateDiff UNet, with ``adapter``, is
    given the prompt per frame). ``speed``: of the rendered clips (None: the world's), to match the
    speed a model was trained at."""
    unet = trainable_unet(comps)
    text_encoder, tokenizer, vae, scheduler = (comps[k] for k in ("text_encoder", "tokenizer", "vae", "scheduler"))
    unet.eval()

    def embed(prompts: list[str]) -> torch.Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        return text_encoder(ids)[0]  # [n, L, D]

    # errors[t][i, j, c]: clip c moving DIRECTIONS[i], prompted with DIRECTIONS[j]
    errors = {t: np.zeros((len(DIRECTIONS), len(DIRECTIONS), clips)) for t in timesteps}
    for i, true in enumerate(DIRECTIONS):
        looks = [OBJECTS[c % len(OBJECTS)] for c in range(clips)]
        frames = torch.stack([torch.from_numpy(render_clip(MovingSpec((MovingObject(col, shp, true),)), seed + c,
                                                               speed=speed).array())
                              for c, (col, shp) in enumerate(looks)]) * 2 - 1  # [c, F, 3, S, S]
        latents = encode_clips(vae, frames, sample=False)  # [c, C, F, h, w]
        for t in timesteps:
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed + 7919 * t))
            steps = torch.full((clips,), t)
            noisy = scheduler.add_noise(latents, noise, steps)
            target = training_target(scheduler, latents, noise, steps)
            for j, asked in enumerate(DIRECTIONS):
                text = embed([phrase(col, shp, asked) for col, shp in looks])
                pred = unet(noisy, steps, encoder_hidden_states=text).sample
                errors[t][i, j] = ((pred - target) ** 2).flatten(1).mean(1).numpy()
    rows = {}
    for t, e in errors.items():
        true = np.stack([e[i, i] for i in range(len(DIRECTIONS))])  # [5, c]
        wrong = np.stack([np.delete(e[i], i, axis=0).mean(0) for i in range(len(DIRECTIONS))])  # [5, c]
        picks = np.stack([e[i].argmin(0) == i for i in range(len(DIRECTIONS))])  # [5, c]
        rows[str(t)] = {
            "true_phrase_best": round(float(picks.mean()), 3),
            "true_phrase_best_by_direction": {d: round(float(picks[i].mean()), 3) for i, d in enumerate(DIRECTIONS)},
            "error_true_over_wrong": round(float(true.mean() / wrong.mean()), 4),
            "mse": np.round(e.mean(2), 5).tolist(),
        }
    return rows


@torch.no_grad()
def text_separation(comps: dict) -> dict:
    """Mean cosine similarity of the text encoder's hidden states between prompts that differ
    only in their direction word (the four moving directions, every pair) or only in their colour
    word, at the differing word's position and at the end-of-text token (1.0: the same vectors)."""
    text_encoder, tokenizer = comps["text_encoder"], comps["tokenizer"]
    moving = [d for d in DIRECTIONS if d != "still"]
    colors = sorted({c for c, _ in OBJECTS})

    def states(prompts: list[str]) -> tuple[torch.Tensor, int]:
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        words = len(tokenizer.tokenize(prompts[0]))  # the same for every prompt of a set
        return text_encoder(ids)[0], words  # [n, L, D]; the last word sits at position `words` (after BOS)

    def mean_cos(h: torch.Tensor, pos: int) -> float:
        v = torch.nn.functional.normalize(h[:, pos], dim=-1)  # [n, D]
        sims = v @ v.T  # [n, n]
        n = len(v)
        return round(float((sims.sum() - n) / (n * (n - 1))), 4)

    rows: dict[str, dict[str, float]] = {"direction": {"word": 0.0, "end": 0.0}, "colour": {"word": 0.0, "end": 0.0}}
    for col, shp in OBJECTS:
        h, words = states([phrase(col, shp, d) for d in moving])
        rows["direction"]["word"] += mean_cos(h, words) / len(OBJECTS)
        rows["direction"]["end"] += mean_cos(h, words + 1) / len(OBJECTS)
    for _, shp in OBJECTS:
        h, words = states([phrase(c, shp, "right") for c in colors])
        colour_pos = 2  # "a <colour> <shape> ...": BOS, "a", then the colour word
        rows["colour"]["word"] += mean_cos(h, colour_pos) / len(OBJECTS)
        rows["colour"]["end"] += mean_cos(h, words + 1) / len(OBJECTS)
    return {k: {w: round(v, 4) for w, v in r.items()} for k, r in rows.items()}


@torch.no_grad()
def sampled_directions(model: str, samples: int, seed: int) -> dict:
    """The motion verifier's reading of ``samples`` clips per held-out one-object prompt, sampled
    as the video quickstart samples: ``{"confusion": {wanted: {detected: count}}, "accuracy",
    "moving_accuracy"}`` (detected None: the object was not found in every frame)."""
    from genalign.policies import VideoDiffusionPolicy, VideoDiffusionPolicyConfig
    from genalign.toyworld.moving import all_moving_specs, make_condition
    from rewards.motion import MotionReward

    policy = VideoDiffusionPolicy.from_pretrained(
        model, VideoDiffusionPolicyConfig(num_steps=10, eta=0.5, guidance_scale=5.0, num_frames=8))
    conds = [make_condition(s, 8) for s in all_moving_specs(1, "heldout")]
    verifier = MotionReward()
    keys = [*DIRECTIONS, "none"]
    confusion = {d: dict.fromkeys(keys, 0) for d in DIRECTIONS}
    for i in range(0, len(conds), 10):
        chunk = conds[i : i + 10]
        seeds = [seed + (i + c) * samples + j for c in range(len(chunk)) for j in range(samples)]
        clips = policy.rollout(chunk, samples, seeds).outputs
        for d in verifier(clips, [c for c in chunk for _ in range(samples)]).details:
            obj = d["objects"][0]
            confusion[obj["direction"]][obj["detected"] or "none"] += 1
    right = {d: confusion[d][d] for d in DIRECTIONS}
    total = {d: sum(confusion[d].values()) for d in DIRECTIONS}
    moving = [d for d in DIRECTIONS if d != "still"]
    return {"samples_per_prompt": samples, "confusion": confusion,
            "accuracy": round(sum(right.values()) / sum(total.values()), 4),
            "moving_accuracy": round(sum(right[d] for d in moving) / sum(total[d] for d in moving), 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="assets/models/tiny-video", help="text-to-video pipeline folder")
    ap.add_argument("--clips", type=int, default=12, help="clips per true direction")
    ap.add_argument("--timesteps", type=int, nargs="+", default=[300, 600, 900], help="noise levels (of 1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--speed", type=float, default=None, help="speed of the rendered clips (default: the world's, 0.07 at 8 frames)")
    ap.add_argument("--samples", type=int, default=8,
                    help="sampled clips per held-out one-object prompt for the confusion matrix (0: skip)")
    ap.add_argument("--out", default="benchmarks/results/video_probe", help="folder for results.json")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tok_dir:
        comps = load_video_components(args.model, Path(tok_dir))
        rows = probe_components(comps, args.clips, args.timesteps, args.seed, args.speed)
        text = text_separation(comps)
    samples = sampled_directions(args.model, args.samples, 50_000 + args.seed) if args.samples else None
    wall = time.perf_counter() - start
    print(f"{args.model}: does the denoiser predict a clip best under its true direction phrase? "
          f"({args.clips} clips per direction, chance 0.2)")
    print("| timestep | true phrase best | error true / wrong | " + " | ".join(DIRECTIONS) + " |")
    print("|---|---|---|" + "---|" * len(DIRECTIONS))
    for t, r in rows.items():
        per = " | ".join(f"{r['true_phrase_best_by_direction'][d]:.2f}" for d in DIRECTIONS)
        print(f"| {t} | {r['true_phrase_best']:.3f} | {r['error_true_over_wrong']:.4f} | {per} |")
    print("text encoder, mean cosine between prompts that differ in one word (1.0: the same vectors): "
          f"direction word {text['direction']['word']:.4f}, end of text {text['direction']['end']:.4f}; "
          f"colour word {text['colour']['word']:.4f}, end of text {text['colour']['end']:.4f}")
    if samples:
        print(f"sampled clips ({args.samples} per held-out one-object prompt): direction {samples['accuracy']:.3f}, "
              f"moving prompts only {samples['moving_accuracy']:.3f} (chance 0.25)")
        cols = [*DIRECTIONS, "none"]
        print("| prompted \\ detected | " + " | ".join(cols) + " |")
        print("|---|" + "---|" * len(cols))
        for d in DIRECTIONS:
            print(f"| {d} | " + " | ".join(str(samples["confusion"][d][c]) for c in cols) + " |")
    result = {"model": args.model, "clips_per_direction": args.clips, "seed": args.seed, "wall_s": round(wall, 1),
              "command": "python benchmarks/video_direction_probe.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "timesteps": rows, "text": text, "samples": samples}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'results.json'} ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
