"""Peak memory of one training epoch, arm by arm, each in its own process.

Arms, all on the same model (by default SD-1.5's UNet layout at half width with random weights,
about 215M UNet parameters, so the weights and not torch's runtime dominate; 64×64 pixels to
keep a CPU epoch short):

- ``ddpo-lora``: DDPO with LoRA (rank 8), the default;
- ``ddpo-full``: DDPO fine-tuning every UNet weight (gradients and AdamW state for all);
- ``ddpo-lora-checkpointing``: LoRA with gradient checkpointing (activations recomputed);
- ``d3po-adapters``: D3PO, whose reference policy is the same UNet with its adapters disabled;
- ``d3po-copy``: D3PO with a deep-copied reference UNet, as the original D3PO code keeps it.

Each arm runs one epoch (rollout, reward, the loss with its reference, the update) in a fresh
subprocess; the table gives the process's peak resident memory (CPU) or peak allocated CUDA
memory, the memory it held before the model loaded (torch and the libraries), and the epoch's
wall time. Ratios are over ``ddpo-full`` and ``d3po-copy``.

    python benchmarks/memory.py                 # CPU, about 3 minutes
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ARMS = {
    "ddpo-lora": ["algorithm.name=ddpo"],
    "ddpo-full": ["algorithm.name=ddpo", "policy.finetune=full"],
    "ddpo-lora-checkpointing": ["algorithm.name=ddpo", "policy.gradient_checkpointing=true"],
    "d3po-adapters": ["algorithm.name=d3po"],
    "d3po-copy": ["algorithm.name=d3po"],
}


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def build_model(out: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from diffusers import UNet2DConditionModel
    from rollout_overhead import build_sd15_random

    pipe = build_sd15_random(torch.float32, tiny=True)  # narrow text encoder and VAE, 64 px
    pipe.unet = UNet2DConditionModel(sample_size=8, cross_attention_dim=pipe.text_encoder.config.hidden_size,
                                     attention_head_dim=8, block_out_channels=(160, 320, 640, 640))
    pipe.save_pretrained(out, safe_serialization=True)


def run_arm(arm: str, model: str, out: str) -> dict:
    """One epoch of ``arm`` in this process; returns its measurements."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from worker_runs import peak_rss_mb

    from genalign.configs import load_config
    from genalign.policies.unet_tuning import set_adapters_enabled
    from genalign.train_config import TrainConfig
    from genalign.trainer import Trainer

    before = rss_mb()
    config = load_config(TrainConfig, None, [
        "policy.type=stable_diffusion", f"policy.pretrained={model}", "policy.num_steps=4", "policy.guidance_scale=4.0",
        *ARMS[arm], "reward.components=[{type: jpeg_compressibility}]", "prompts.source=shapes_world",
        "prompts.tiers=[1]", "train.prompts_per_epoch=2", "train.samples_per_prompt=4", "train.rollout_batch_size=8",
        "train.train_batch_size=4", "eval.enabled=false", "report.enabled=false", f"output_dir={out}",
    ])
    trainer = Trainer(config)
    tuning = trainer.policy.tuning
    if arm == "d3po-copy":  # the reference as a separate frozen UNet, adapters off in the copy
        reference = copy.deepcopy(tuning.model).requires_grad_(False).eval()
        set_adapters_enabled(reference, False)

        @contextlib.contextmanager
        def separate_reference():
            live = tuning.module
            tuning.module = reference
            try:
                yield
            finally:
                tuning.module = live

        tuning.reference = separate_reference
    cuda = trainer.policy.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer._epoch(0)
    seconds = time.perf_counter() - t0
    unet = sum(p.numel() for p in tuning.model.parameters())
    trainable = sum(p.numel() for p in trainer.policy.trainable_parameters())
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb()
    return {"arm": arm, "peak_mb": peak, "before_model_mb": 0.0 if cuda else before, "epoch_seconds": seconds,
            "unet_parameters": unet, "trainable_parameters": trainable, "device": "cuda" if cuda else "cpu"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arm", choices=sorted(ARMS), help="(internal) run one arm in this process and print its JSON")
    ap.add_argument("--model", help="(internal) the pipeline directory")
    ap.add_argument("--out", default="benchmarks/results/memory.json")
    args = ap.parse_args()
    if args.arm:
        with tempfile.TemporaryDirectory() as tmp:
            print("RESULT " + json.dumps(run_arm(args.arm, args.model, os.path.join(tmp, "run"))))
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        build_model(model)
        for arm in ARMS:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--arm", arm, "--model", model],
                                  capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"arm {arm} failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT "))))
            print(f"{arm}: {rows[-1]['peak_mb']:.0f} MB peak", file=sys.stderr)
    by = {r["arm"]: r for r in rows}
    ratios = {
        "ddpo-lora / ddpo-full": by["ddpo-lora"]["peak_mb"] / by["ddpo-full"]["peak_mb"],
        "ddpo-lora-checkpointing / ddpo-lora": by["ddpo-lora-checkpointing"]["peak_mb"] / by["ddpo-lora"]["peak_mb"],
        "d3po-adapters / d3po-copy": by["d3po-adapters"]["peak_mb"] / by["d3po-copy"]["peak_mb"],
    }
    above = {k: (by[a]["peak_mb"] - by[a]["before_model_mb"]) / (by[b]["peak_mb"] - by[b]["before_model_mb"])
             for k, (a, b) in {"ddpo-lora / ddpo-full": ("ddpo-lora", "ddpo-full"),
                               "d3po-adapters / d3po-copy": ("d3po-adapters", "d3po-copy")}.items()}
    print("| arm | UNet params | trainable | peak MB | before model MB | epoch s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {r['unet_parameters'] / 1e6:.0f}M | {r['trainable_parameters'] / 1e6:.2f}M | "
              f"{r['peak_mb']:.0f} | {r['before_model_mb']:.0f} | {r['epoch_seconds']:.1f} |")
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}x peak" + (f", {above[k]:.3f}x above the pre-model baseline" if k in above else ""))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"rows": rows, "ratios": ratios, "ratios_above_baseline": above, "torch": torch.__version__}, f, indent=2)


if __name__ == "__main__":
    main()
