"""Token rollouts: the text-LM / VLM policy's rollout (tokens and their log-probs) against
plain ``model.generate`` on the same model, prompts and batch.

Both arms sample at temperature 1 with no top-k / top-p, interleaved (A, B, A, B, ...) after a
warm-up. Responses end at EOS, so the arms produce different lengths: the comparison is in
generated tokens per second (response tokens up to and including EOS), and the ratio is
seconds per token of the policy over ``generate``'s. A third timing is the teacher-forced
recomputation of the rollout's log-probs (the pass a trainer runs per update), per token.

    OMP_NUM_THREADS=1 python benchmarks/text_rollout.py                        # tiny-lm
    OMP_NUM_THREADS=1 python benchmarks/text_rollout.py --model assets/models/tiny-vlm --type vlm --source shapes_vqa
    OMP_NUM_THREADS=1 python benchmarks/text_rollout.py --random-hidden 512 --random-layers 8   # a larger random LM

``--random-hidden`` / ``--random-layers`` build a random Qwen2 model of that size over the
asset's tokenizer (no download). Prints a table and writes JSON to --out.
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
from genalign.policies import POLICIES
from genalign.train_config import TrainConfig


def random_lm(asset: str, hidden: int, layers: int, out: str, intermediate: int = 0, kv_heads: int = 0) -> str:
    """A random Qwen2 causal LM of the given size with ``asset``'s tokenizer, saved to ``out``
    (``hidden=896, layers=24, intermediate=4864, kv_heads=2`` is Qwen2-0.5B's body)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(asset)
    heads = max(1, hidden // 64)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate or 4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                         max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def response_tokens(new: torch.Tensor, eos: int | None, pad: int | None) -> int:
    """Tokens of ``generate``'s new part ``[B, T]`` up to and including each row's first EOS."""
    total = 0
    for row in new.tolist():
        n = len(row)
        if eos is not None and eos in row:
            n = row.index(eos) + 1
        elif pad is not None and pad in row:
            n = row.index(pad)
        total += n
    return total


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="assets/models/tiny-lm")
    ap.add_argument("--type", default="text_lm", choices=["text_lm", "vlm"])
    ap.add_argument("--source", default="shapes_qa", help="prompt source (shapes_qa for text, shapes_vqa for the VLM)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--per-prompt", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--random-hidden", type=int, default=0, help="replace the model by a random Qwen2 of this width")
    ap.add_argument("--random-layers", type=int, default=8)
    ap.add_argument("--random-intermediate", type=int, default=0, help="MLP width (default 4 × hidden)")
    ap.add_argument("--random-kv-heads", type=int, default=0, help="key/value heads (default: all heads)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model weights")
    ap.add_argument("--out", default="benchmarks/results/text_rollout.json")
    return ap.parse_args(argv)


def measure(args: argparse.Namespace) -> dict:
    """Run the comparison; returns the result written to --out."""
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if args.random_hidden:
            model = random_lm(args.model, args.random_hidden, args.random_layers, os.path.join(tmp, "lm"),
                              args.random_intermediate, args.random_kv_heads)
        cfg = load_config(TrainConfig, None, [
            f"policy.type={args.type}", f"policy.pretrained={model}", f"policy.max_new_tokens={args.max_new_tokens}",
            "policy.temperature=1.0", f"policy.weight_dtype={args.dtype}", f"prompts.source={args.source}",
            f"output_dir={tmp}/run",
        ])
        policy = POLICIES[args.type][1].from_pretrained(model, cfg.policy)
        policy.model.to(args.device)
        cuda = args.device.startswith("cuda")

        def sync() -> None:
            if cuda:
                torch.cuda.synchronize()
        conds = cfg.prompts.sample(args.prompts, seed=0)
        rows = [c for c in conds for _ in range(args.per_prompt)]
        module = policy.module
        eos, pad = policy.tokenizer.eos_token_id, policy.pad_id

        def run_policy(r: int) -> tuple[float, int, object]:
            seeds = [r * 100_000 + i for i in range(len(rows))]
            sync()
            t0 = time.perf_counter()
            traj = policy.rollout(conds, args.per_prompt, seeds)
            sync()
            return time.perf_counter() - t0, int(traj.lengths.sum()), traj

        def run_generate(r: int) -> tuple[float, int, None]:
            from genalign.policies.token_sampling import left_pad

            torch.manual_seed(r)
            sync()
            t0 = time.perf_counter()
            prompts, media = policy._encode_prompts(rows)
            ids, mask = left_pad(prompts, pad, policy.device)
            extra = policy._model_inputs(ids, mask, media)
            extra.pop("position_ids", None)
            with torch.no_grad():
                out = module.generate(input_ids=ids, attention_mask=mask, **extra, do_sample=True, temperature=1.0,
                                      top_k=0, top_p=1.0, max_new_tokens=args.max_new_tokens, pad_token_id=pad)
            sync()
            seconds = time.perf_counter() - t0
            return seconds, response_tokens(out[:, ids.shape[1]:], eos, pad), None

        seconds: dict[str, list[float]] = {"generate": [], "rollout": [], "recompute": []}
        tokens: dict[str, list[int]] = {"generate": [], "rollout": [], "recompute": []}
        for r in range(args.repeats + 1):
            for arm in (("rollout", "generate") if r % 2 == 0 else ("generate", "rollout")):
                s, n, traj = run_policy(r) if arm == "rollout" else run_generate(r)
                if arm == "rollout":
                    sync()
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        policy.log_prob(traj, torch.arange(traj.num_steps))
                    sync()
                    rec = time.perf_counter() - t0
                if r > 0:
                    seconds[arm].append(s)
                    tokens[arm].append(n)
                    if arm == "rollout":
                        seconds["recompute"].append(rec)
                        tokens["recompute"].append(n)
                print(f"round {r} {arm:8s} {s:7.3f} s  {n} tokens", file=sys.stderr)

    per_token = {arm: statistics.median(s / max(n, 1) for s, n in zip(seconds[arm], tokens[arm])) for arm in seconds}
    result = {
        "model": args.model, "type": args.type, "random_hidden": args.random_hidden,
        "random_layers": args.random_layers if args.random_hidden else None, "rows": len(rows),
        "max_new_tokens": args.max_new_tokens, "threads": torch.get_num_threads(), "repeats": args.repeats,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu", "dtype": args.dtype,
        "parameters": sum(p.numel() for p in policy.model.parameters()),
        "seconds": seconds, "tokens": tokens, "ms_per_token": {k: 1e3 * v for k, v in per_token.items()},
        "tokens_per_second": {k: 1 / v for k, v in per_token.items()},
        "ratio": per_token["rollout"] / per_token["generate"],
        "torch": torch.__version__, "python": platform.python_version(),
    }
    name = f"random Qwen2 {args.random_hidden}×{args.random_layers}" if args.random_hidden else args.model
    print("| model | arm | tokens/s (median) | ms/token |\n|---|---|---|---|")
    for arm in ("generate", "rollout", "recompute"):
        print(f"| {name} | {arm} | {result['tokens_per_second'][arm]:.0f} | {result['ms_per_token'][arm]:.3f} |")
    print(f"rollout / generate (seconds per token): {result['ratio']:.3f}x")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    measure(parse())
