"""The full-size GPU check, in one short call: SD-1.5's architecture and a ~0.4B causal LM,
both with random weights built from their configs (no download).

1. Rollout overhead: the SD policy's rollout against the plain ``StableDiffusionPipeline`` call,
   512×512 (64×64 latents), 50 DDIM steps, CFG, fp16 (``rollout_overhead.py --arch sd15``).
2. Training epoch: genalign's DDPO epoch against the straightforward loop
   (``train_epoch.py``) on the same SD-1.5 UNet with LoRA, bf16 autocast: epoch ratio,
   images/s and peak allocated memory of each arm.
3. Token rollouts: the text-LM policy against ``model.generate`` (``text_rollout.py``) on
   Qwen2-0.5B's body (width 896, 24 layers, MLP 4864, 2 key/value heads; tiny-lm's vocabulary
   instead of Qwen's 151k tokens, so about 0.36B parameters), bf16.

It aims to finish in under 5 minutes on one GPU and writes every part's JSON and a summary to
``--out-dir``. ``--dry-run`` runs the same steps on narrow models on the CPU (a minute or two):
what CI can check of this script.

    python benchmarks/gpu_check.py                    # on a GPU machine
    python benchmarks/gpu_check.py --dry-run          # CPU, tiny configs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import rollout_overhead  # noqa: E402
import text_rollout  # noqa: E402
import train_epoch  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, narrow models: check that every step runs")
    ap.add_argument("--out-dir", default="benchmarks/results/gpu_check")
    args = ap.parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --dry-run for the CPU check")
    device = "cpu" if dry else "cuda"
    os.makedirs(args.out_dir, exist_ok=True)

    def out(name: str) -> str:
        return os.path.join(args.out_dir, f"{name}.json")

    summary: dict = {"dry_run": dry, "device": torch.cuda.get_device_name() if not dry else "cpu", "seconds": {}}
    t_all = time.perf_counter()

    # 1. rollout overhead at SD-1.5 size
    t0 = time.perf_counter()
    arch = ["--arch", "sd15-tiny", "--dtype", "float32", "--batch", "2", "--steps", "3", "--repeats", "1", "--eta", "0.5"] if dry \
        else ["--arch", "sd15", "--dtype", "float16", "--batch", "8", "--steps", "50", "--repeats", "3", "--eta", "1.0"]
    rollout_overhead.main([*arch, "--device", device, "--out", out("rollout_overhead")])
    with open(out("rollout_overhead")) as f:
        summary["rollout_ratio"] = json.load(f)["ratio"]
    summary["seconds"]["rollout_overhead"] = time.perf_counter() - t0

    # 2. a DDPO epoch against the straightforward loop on the same architecture
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "sd15")
        rollout_overhead.build_sd15_random(torch.float32, tiny=dry).save_pretrained(model, safe_serialization=True)
        epoch_args = train_epoch.parse([
            "--model", model, "--prompts", "2", "--per-prompt", "2" if dry else "4", "--steps", "3" if dry else "10",
            "--batch", "2" if dry else "4", "--repeats", "1" if dry else "2", "--out", out("train_epoch"),
            *([] if dry else ["--mixed-precision", "bf16"]),
        ])
        result = train_epoch.measure(epoch_args)
    summary["epoch_ratio"] = result["ratio"]
    summary["images_per_second"] = result["images_per_second"]
    summary["peak_allocated_mb"] = result["peak_allocated_mb"]
    summary["seconds"]["train_epoch"] = time.perf_counter() - t0

    # 3. token rollouts of a ~0.4B causal LM
    t0 = time.perf_counter()
    body = ["--random-hidden", "64", "--random-layers", "2", "--random-intermediate", "128", "--random-kv-heads", "1",
            "--prompts", "2", "--per-prompt", "2", "--max-new-tokens", "8", "--repeats", "1"] if dry else \
        ["--random-hidden", "896", "--random-layers", "24", "--random-intermediate", "4864", "--random-kv-heads", "2",
         "--prompts", "8", "--per-prompt", "8", "--max-new-tokens", "64", "--repeats", "3", "--dtype", "bfloat16"]
    text = text_rollout.measure(text_rollout.parse([*body, "--device", device, "--out", out("text_rollout")]))
    summary["text_rollout_ratio"] = text["ratio"]
    summary["text_parameters"] = text["parameters"]
    summary["tokens_per_second"] = text["tokens_per_second"]
    summary["seconds"]["text_rollout"] = time.perf_counter() - t0
    summary["seconds"]["total"] = time.perf_counter() - t_all

    with open(out("summary"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
