"""Pretrain the tiny Shapes QA language model in ``assets/models/tiny-lm``.

    genalign toyworld pretrain lm --out assets/models/tiny-lm [--steps N] [--seed S]

A transformers ``LlamaForCausalLM`` (a few layers, width 64) over a word-level tokenizer
whose vocabulary is the world's words (:data:`genalign.toyworld.text_qa.WORDS`) plus
``<pad> <eos> <bos> <unk>``. It is trained from scratch by supervised next-token
prediction on ``prompt + gold response + <eos>`` of train-split conditions of all five
tiers (drawn uniformly, fresh every step), with the loss on the response tokens only
(the response's words and the ``<eos>``), AdamW, a linear warm-up then a cosine decay.
No ``<bos>`` is prepended: the tokenizer adds no special tokens, so a prompt tokenizes to
the same ids with or without ``add_special_tokens`` and through the chat template (which
renders a single user message as its content).

The model is *deliberately under-trained*: the step budget is chosen so that, sampled at
temperature 1, it keeps the response format but answers held-out conditions right only
about a third of the time (colour lookup above chance, position lookup just emerging,
counting and relations near their base rates), leaving reward training something to
learn. Measured at the defaults with one torch thread on 2 CPU cores shared with other
jobs: 4000 steps in 7.4 minutes, 7.5 minutes in all.
:func:`evaluate_lm` (a plain batched sampling loop, greedy or at a temperature) measures
it per tier on both splits; the numbers go into ``training_log.json`` and the model card.

**Output folder** (built beside ``--out`` and moved into place when complete): the model
(``config.json``, ``generation_config.json``, ``model.safetensors``, float32), the tokenizer
(``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``), ``training_log.json`` (arguments, architecture, loss and accuracy curves,
evaluation, versions, wall time) and ``README.md`` (the model card). Both load with plain
``AutoModelForCausalLM.from_pretrained(dir)`` / ``AutoTokenizer.from_pretrained(dir)``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from genalign.progress import progress, write
from genalign.recipes.common import (
    Budget,
    LossCurve,
    command_line,
    folder_bytes,
    set_lr,
    staged_folder,
    versions,
)
from genalign.toyworld.text_qa import (
    QA_SPLITS,
    QA_TIERS,
    WORDS,
    draw_condition,
    sample_conditions,
    target_response,
)

SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"}
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
FORMAT_PATTERN = r"<answer>(?: (?!</?answer>)\S+)+ </answer>"  # a well-formed response (then <eos>)
EVAL_SEED = 12345  # seed of the evaluation conditions (sample_conditions) and of the sampling
MAX_NEW_TOKENS = 8  # the longest gold response is 4 words + <eos>


# --------------------------------------------------------------------------- tokenizer and model
def build_tokenizer():
    """The word-level tokenizer of the world as a ``PreTrainedTokenizerFast``.

    Ids: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3, then :data:`WORDS` in order.
    Whitespace splits words; decoding joins tokens with single spaces.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS.values(), *WORDS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, clean_up_tokenization_spaces=False,
                                        model_max_length=128, **SPECIAL_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer, args: argparse.Namespace):
    """A randomly initialised ``LlamaForCausalLM`` sized by ``args`` (tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=128, tie_word_embeddings=True, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


# --------------------------------------------------------------------------- data
def encode_examples(tokenizer, conditions: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids [B, L], labels [B, L] (-100 outside the response), attention_mask [B, L]),
    right padded; each row is prompt + gold response + ``<eos>``."""
    prompts = tokenizer([c["prompt"] for c in conditions], add_special_tokens=False)["input_ids"]
    responses = tokenizer([target_response(c) for c in conditions], add_special_tokens=False)["input_ids"]
    rows = [(p, r + [tokenizer.eos_token_id]) for p, r in zip(prompts, responses)]
    length = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        labels[i, len(p) : len(p) + len(r)] = torch.tensor(r)
        mask[i, : len(p) + len(r)] = 1
    return ids, labels, mask


def response_loss(model, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the response tokens (labels != -100)."""
    logits = model(input_ids=ids, attention_mask=mask).logits  # [B, L, V]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], temperature: float, seed: int,
             max_new_tokens: int = MAX_NEW_TOKENS) -> tuple[list[str], list[bool]]:
    """Complete each prompt: greedy when ``temperature`` is 0, else sampled from
    softmax(logits / temperature) with a CPU generator seeded by ``seed``.

    Returns (the decoded responses without special tokens, whether each ended with ``<eos>``).
    """
    gen = torch.Generator().manual_seed(seed)
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    width = max(map(len, encoded))
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(encoded):  # left padding
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    done = torch.zeros(len(encoded), dtype=torch.bool)
    new: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()  # [B, V]
        if temperature > 0:
            token = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen)[:, 0]
        else:
            token = logits.argmax(-1)
        token = torch.where(done, torch.full_like(token, tokenizer.pad_token_id), token)
        new.append(token)
        done |= token == tokenizer.eos_token_id
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, (~done | (token == tokenizer.eos_token_id)).long()[:, None]], 1)
        if done.all():
            break
    out = torch.stack(new, 1)  # [B, T]
    ended = (out == tokenizer.eos_token_id).any(1)
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    return [t.strip() for t in texts], ended.tolist()


def evaluate_lm(model, tokenizer, conditions: Sequence[dict], temperature: float = 0.0, seed: int = 0,
                samples: int = 1, batch_size: int = 256) -> dict[str, float]:
    """Accuracy and format rate of ``samples`` responses per condition.

    accuracy: the exact-answer rule verifier's mean score (:class:`rewards.rules.RuleVerifier`,
    rule "exact", default answer pattern). format: the fraction of responses that are exactly
    ``<answer> words </answer>`` followed by ``<eos>``. Greedy when ``temperature`` is 0.
    """
    from rewards.rules import RuleVerifier

    verifier = RuleVerifier()
    rows = [c for c in conditions for _ in range(samples)]
    texts, ended = [], []
    was_training = model.training
    model.eval()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        t, e = generate(model, tokenizer, [c["prompt"] for c in chunk], temperature, seed + start)
        texts += t
        ended += e
    model.train(was_training)
    scores = verifier(texts, rows).scores
    fmt = [e and re.fullmatch(FORMAT_PATTERN, t) is not None for t, e in zip(texts, ended)]
    return {"accuracy": round(float(scores.mean()), 4), "format": round(sum(fmt) / len(fmt), 4), "n": len(rows)}


def evaluate_all(model, tokenizer, per_tier: int, samples: int, tiers: Sequence[int] = tuple(QA_TIERS)) -> dict:
    """Per split, mode (greedy / sampled at temperature 1) and tier, plus each mode's mean over tiers."""
    out: dict[str, Any] = {}
    for split in QA_SPLITS:
        for mode, temperature, n in (("greedy", 0.0, 1), ("sampled", 1.0, samples)):
            table = {}
            for tier in tiers:
                conds = sample_conditions(tier, per_tier, split, seed=EVAL_SEED)
                table[f"tier {tier}"] = evaluate_lm(model, tokenizer, conds, temperature, EVAL_SEED + tier, n)
            table["mean"] = {k: round(sum(v[k] for v in table.values()) / len(tiers), 4) for k in ("accuracy", "format")}
            out[f"{split} {mode}"] = table
    return out


# --------------------------------------------------------------------------- training
def train(model, tokenizer, args: argparse.Namespace) -> dict:
    """Supervised response-only training on fresh train-split conditions; returns the curves."""
    rng = random.Random(f"pretrain-lm/{args.seed}")
    tiers = list(QA_TIERS)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    budget = Budget(args.steps, None, args.warmup)
    curve = LossCurve(args.log_every, budget)
    accuracy_curve = []
    model.train()
    bar = progress(total=args.steps, desc="pretrain lm")
    for step in range(1, args.steps + 1):
        conds = [draw_condition(rng, rng.choice(tiers), "train") for _ in range(args.batch_size)]
        ids, labels, mask = encode_examples(tokenizer, conds)
        set_lr(opt, args.lr * budget.lr_factor(step - 1))
        loss = response_loss(model, ids, labels, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        point = curve.add(step, {"loss": loss.item()}, lr=round(opt.param_groups[0]["lr"], 6))
        bar.update(1)
        if point is not None:
            bar.set_postfix(loss=f"{point['loss']:.3f}")
        if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            acc = {f"tier {t}": evaluate_lm(model, tokenizer, sample_conditions(t, 32, "heldout", seed=EVAL_SEED),
                                            1.0, EVAL_SEED + t)["accuracy"] for t in tiers}
            acc["mean"] = round(sum(acc.values()) / len(tiers), 4)
            accuracy_curve.append({"step": step, "heldout_sampled_accuracy": acc})
            write(f"step {step}: held-out sampled accuracy {acc}")
    bar.close()
    return {"loss_curve": curve.points, "accuracy_curve": accuracy_curve, "train_seconds": budget.elapsed()}


# --------------------------------------------------------------------------- model card
def _table(evaluation: dict, tiers: Sequence[int]) -> str:
    cols = [f"{split} {mode}" for split in QA_SPLITS for mode in ("greedy", "sampled")]
    lines = ["| tier | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name in [f"tier {t}" for t in tiers] + ["mean"]:
        label = f"{name[5:]}: {QA_TIERS[int(name[5:])].split(':')[0]}" if name != "mean" else "**mean**"
        cells = [f"{evaluation[c][name]['accuracy']:.3f} (format {evaluation[c][name]['format']:.2f})" for c in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_card(log: dict) -> str:
    a, arch = log["args"], log["architecture"]
    tiers = list(QA_TIERS)
    return f"""# tiny-lm: a tiny causal LM for Shapes QA

A {arch['num_hidden_layers']}-layer `LlamaForCausalLM` (width {arch['hidden_size']}, {arch['num_attention_heads']} heads,
MLP {arch['intermediate_size']}, tied embeddings, {log['parameters']:,} parameters, float32) over a word-level
tokenizer of {arch['vocab_size']} tokens (`<pad> <eos> <bos> <unk>` and the words of the world), pretrained from
scratch on **Shapes QA** (`genalign.toyworld.text_qa`): Shapes World scenes described in words, with a question
in five tiers (1 colour lookup, 2 position lookup, 3 counting, 4 relation yes/no, 5 counting with a relation or two
attributes). Size on disk: {log['size_bytes'] / 1e6:.2f} MB.

It is **deliberately under-trained**, so that reward training has headroom: it nearly always answers in the
right format, but often wrongly. For scale, guessing gives about 1/6 on tier 1 (six colours), 1/9 on tier 2 (nine
cells) and 1/2 on tier 4 (yes / no); on tiers 3 and 5 always answering "1" is right on half to two thirds of the conditions.

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("assets/models/tiny-lm")
tokenizer = AutoTokenizer.from_pretrained("assets/models/tiny-lm")
prompt = "scene : red circle top left , blue square middle center . question : what color is the square ? answer :"
ids = tokenizer(prompt, return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:], skip_special_tokens=True))
```

The expected response is `<answer> X </answer>` then `<eos>`. The tokenizer adds no special tokens (no `<bos>`),
and its chat template renders a single user message as its content, so chat-template code paths see the same ids.

## How it was made

```
{log['command']}
```

Supervised next-token training on prompt + gold response + `<eos>` of fresh train-split conditions (tiers drawn
uniformly), loss on the response tokens only; AdamW (lr {a['lr']}, weight decay {a['weight_decay']}, β = (0.9, 0.98)),
{a['warmup']} warm-up steps then cosine decay, batch {a['batch_size']}, {a['steps']} steps, seed {a['seed']},
{log['threads']} torch thread(s): {log['train_seconds'] / 60:.1f} minutes of training,
{log['wall_seconds'] / 60:.1f} minutes in all on a shared 2-core CPU. The loss and accuracy curves are in
`training_log.json`.

No train-split condition mentions or shows a held-out colour x shape pair (green triangle, blue circle, yellow square,
purple triangle: Shapes World's held-out pairs); every held-out condition asks about one.

## Accuracy

{log['eval_per_tier']} conditions per tier and split (`sample_conditions(tier, n, split, seed={EVAL_SEED})`); greedy,
and sampled at temperature 1 with {log['eval_samples']} samples per condition. Accuracy: the exact-answer rule verifier
(`rewards.rules.RuleVerifier`, rule `exact`); format: the response is exactly `<answer> words </answer>` then `<eos>`.
Measured by `genalign.recipes.pretrain_lm.evaluate_lm` on the saved weights.

{_table(log['evaluation'], tiers)}
"""


# --------------------------------------------------------------------------- command
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="genalign toyworld pretrain lm",
                                description="Pretrain the tiny Shapes QA causal LM (transformers Llama, word-level tokenizer).")
    p.add_argument("--out", default="assets/models/tiny-lm", help="output model folder")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and training data")
    p.add_argument("--steps", type=int, default=4000, help="optimisation steps (the under-training knob)")
    p.add_argument("--batch-size", type=int, default=64, help="conditions per step")
    p.add_argument("--lr", type=float, default=5e-3, help="peak learning rate (warm-up, then cosine to 0)")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decay of matrices (not embeddings, norms)")
    p.add_argument("--hidden", type=int, default=64, help="model width (MLP width is 4x)")
    p.add_argument("--layers", type=int, default=3, help="transformer layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--log-every", type=int, default=50, help="steps per loss-curve point")
    p.add_argument("--eval-every", type=int, default=500,
                   help="steps between held-out sampled accuracy checks (32 conditions per tier; 0: none)")
    p.add_argument("--eval-per-tier", type=int, default=64, help="final evaluation: conditions per tier and split")
    p.add_argument("--eval-samples", type=int, default=4, help="final evaluation: samples per condition at temperature 1")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 is fastest when another job shares the CPU (0: torch's choice)")
    return p.parse_args(argv)


def check_out(out: Path) -> None:
    """Refuse an ``--out`` that is a file or a non-empty folder of something other than a model."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"'--out': {str(out)!r} is a file, expected a model folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise FileExistsError(f"'--out': {str(out)!r} is a non-empty folder without config.json; "
                              "refusing to replace something that is not a model")


def main(argv=None) -> Path:
    """Train, evaluate, save the model, tokenizer, log and card; returns the output folder."""
    import tokenizers
    import transformers

    args = parse_args(argv)
    out = Path(args.out).resolve()
    check_out(out)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.monotonic()
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, args)
    log: dict[str, Any] = dict(
        command=command_line("genalign toyworld pretrain lm", argv),
        args=vars(args),
        architecture={k: getattr(model.config, k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "tie_word_embeddings")},
        parameters=sum(p.numel() for p in model.parameters()),
        threads=torch.get_num_threads(),
        versions=versions(transformers, tokenizers),
    )
    write(f"parameters: {log['parameters']:,}; vocabulary: {len(tokenizer)} tokens")
    log.update(train(model, tokenizer, args))
    with staged_folder(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        portable_tokenizer_class(tmp)
        log["size_bytes"] = folder_bytes(tmp)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        saved, saved_tok = AutoModelForCausalLM.from_pretrained(tmp), AutoTokenizer.from_pretrained(tmp)
        log["evaluation"] = evaluate_all(saved, saved_tok, args.eval_per_tier, args.eval_samples)
        log["eval_per_tier"], log["eval_samples"] = args.eval_per_tier, args.eval_samples
        log["wall_seconds"] = round(time.monotonic() - t0, 1)
        (tmp / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
        (tmp / "README.md").write_text(model_card(log))
    for name, table in log["evaluation"].items():
        write(f"{name}: " + ", ".join(f"{k} {v['accuracy']:.3f}/{v['format']:.2f}" for k, v in table.items()))
    write(f"wrote {out} in {log['wall_seconds'] / 60:.1f} min")
    return out


def portable_tokenizer_class(directory: str) -> None:
    """Record the tokenizer class as ``PreTrainedTokenizerFast``, a name every transformers
    release since 4 resolves (transformers 5 writes its own backend class name, unknown to 4.x)."""
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(path, "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
