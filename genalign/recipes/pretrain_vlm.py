"""Pretrain the tiny Shapes VQA vision-language model in ``assets/models/tiny-vlm``.

    genalign toyworld pretrain vlm --out assets/models/tiny-vlm [--steps N] [--seed S]

A transformers ``Qwen2VLForConditionalGeneration`` (a 2-block vision tower of width 32 with
16-pixel patches and no patch merge, so a 48x48 Shapes VQA image is 9 image tokens, one per grid cell;
a 3-layer language model of width 64 with multimodal rotary positions) and a
``Qwen2VLProcessor`` (the Qwen2-VL image processor at 48x48, and a word-level tokenizer over
the world's words, :data:`genalign.toyworld.vqa.VQA_WORDS`, plus the Qwen2-VL chat tokens).
The chat template renders a user turn with the image placeholder, then the question, then
opens the assistant turn; ``<|im_end|>`` ends a response.

It is trained from scratch by supervised next-token prediction on chat prompt + gold response
(``<answer> X </answer>``) + ``<|im_end|>`` of fresh train-split (in-domain) conditions, every
format and question type drawn uniformly, loss on the response tokens only; AdamW, a linear
warm-up then cosine decay. The step budget leaves it *deliberately under-trained* (see the
model card): reward training must have something to learn, on open answers, counting and
relations above all.

**Output folder** (built beside ``--out`` and moved into place when complete): the model
(``config.json``, ``generation_config.json``, ``model.safetensors``), the processor (tokenizer,
image and video processor configs, chat template), ``training_log.json`` and ``README.md`` (the
model card with accuracy per format and question type, in-domain and out-of-domain). Both load
with plain ``Qwen2VLForConditionalGeneration.from_pretrained(dir)`` /
``AutoProcessor.from_pretrained(dir)``.
"""

from __future__ import annotations

import argparse
import json
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
from genalign.recipes.pretrain_lm import check_out, portable_tokenizer_class
from genalign.toyworld.text_qa import target_response
from genalign.toyworld.vqa import (
    FORMATS,
    IMAGE_SIZE,
    QTYPES,
    VQA_SPLITS,
    VQA_WORDS,
    draw_vqa_condition,
    sample_vqa_conditions,
)

#: chat and vision tokens of the Qwen2-VL family (names as in the real tokenizers)
SPECIAL_TOKENS = ("<pad>", "<|im_end|>", "<|im_start|>", "<unk>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
ROLES = ("system", "user", "assistant")
#: one user turn: image placeholders, then text; ``add_generation_prompt`` opens the assistant turn
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> {% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %} <|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)
PATCH, MERGE, TEMPORAL_PATCH = 16, 1, 2
FORMAT_PATTERN = r"<answer>(?: (?!</?answer>)\S+)+ </answer>"
EVAL_SEED = 12345
#: weight init std; at transformers' default (0.02) the image tokens of an object and of the background are so
#: alike that the language model never learned to read them (the answer loss stayed at chance for 1000+ steps)
INIT_STD = 0.1
MAX_NEW_TOKENS = 8  # the longest gold response is 4 words + <|im_end|>


# --------------------------------------------------------------------------- processor and model
def build_tokenizer():
    """The word-level tokenizer: :data:`SPECIAL_TOKENS` (ids 0-7), the roles, then the world's words.
    ``<|im_end|>`` is the end-of-sequence token; special tokens split without spaces around them."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *ROLES, *VQA_WORDS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<|im_end|>", unk_token="<unk>", model_max_length=256,
        additional_special_tokens=list(SPECIAL_TOKENS[2:]), clean_up_tokenization_spaces=False,
    )
    return tokenizer


def build_processor(tokenizer=None):
    """A ``Qwen2VLProcessor`` for 48x48 images (9 image tokens) over :func:`build_tokenizer`."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    pixels = IMAGE_SIZE * IMAGE_SIZE
    sizes = dict(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL_PATCH, min_pixels=pixels, max_pixels=pixels)
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**sizes), video_processor=Qwen2VLVideoProcessor(**sizes),
                            tokenizer=tokenizer if tokenizer is not None else build_tokenizer(), chat_template=CHAT_TEMPLATE)


def build_model(processor, hidden: int = 64, layers: int = 3, heads: int = 4, vision_depth: int = 2,
                vision_width: int = 32, seed: int = 0):
    """A randomly initialised tiny ``Qwen2VLForConditionalGeneration`` (tied embeddings)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = hidden // heads
    t_sec = head_dim // 2 // 4  # multimodal rotary sections (temporal, height, width) sum to head_dim / 2
    section = [t_sec, (head_dim // 2 - t_sec) // 2, head_dim // 2 - t_sec - (head_dim // 2 - t_sec) // 2]
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256, rms_norm_eps=1e-5,
            rope_scaling={"type": "mrope", "mrope_section": section, "rope_theta": 10000.0}, tie_word_embeddings=True,
            pad_token_id=ids["<pad>"], eos_token_id=ids["<|im_end|>"], bos_token_id=ids["<|im_start|>"],
        ),
        vision_config=dict(depth=vision_depth, embed_dim=vision_width, hidden_size=hidden, num_heads=2, mlp_ratio=2,
                           patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL_PATCH, in_channels=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
        initializer_range=INIT_STD,
    )
    config.text_config.initializer_range = config.vision_config.initializer_range = INIT_STD
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id, gen.bos_token_id = ids["<pad>"], ids["<|im_end|>"], ids["<|im_start|>"]
    return model


def chat_prompt(processor, question: str) -> str:
    """The chat text of one user turn (image, then the question) with the assistant turn opened."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


# --------------------------------------------------------------------------- data
def encode_examples(processor, conditions: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Model inputs of prompt + gold response + ``<|im_end|>`` (right padded) and ``labels``
    (-100 outside the response)."""
    tok = processor.tokenizer
    prompts = [chat_prompt(processor, c["prompt"]) for c in conditions]
    images = [c["image"] for c in conditions]
    prompt_len = processor(text=prompts, images=images, return_tensors="pt", padding=True)["attention_mask"].sum(1)
    full = [f"{p}{target_response(c)} {tok.eos_token}" for p, c in zip(prompts, conditions)]
    tok.padding_side = "right"
    enc = processor(text=full, images=images, return_tensors="pt", padding=True)
    labels = enc["input_ids"].clone()
    positions = torch.arange(labels.shape[1]).unsqueeze(0)
    labels[(positions < prompt_len.unsqueeze(1)) | (enc["attention_mask"] == 0)] = -100
    enc["labels"] = labels
    return dict(enc)


def response_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the response tokens (labels != -100)."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits  # [B, L, V]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def generate(model, processor, conditions: Sequence[dict], temperature: float, seed: int) -> list[str]:
    """Responses (decoded without special tokens, cut at ``<|im_end|>``); greedy when
    ``temperature`` is 0, else sampled at that temperature after ``torch.manual_seed(seed)``."""
    tok = processor.tokenizer
    tok.padding_side = "left"
    enc = processor(text=[chat_prompt(processor, c["prompt"]) for c in conditions],
                    images=[c["image"] for c in conditions], return_tensors="pt", padding=True)
    torch.manual_seed(seed)
    sample = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    out = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, **sample)
    new = out[:, enc["input_ids"].shape[1]:]
    texts = []
    for row in new.tolist():
        ended = tok.eos_token_id in row
        row = row[: row.index(tok.eos_token_id)] if ended else row
        texts.append(tok.decode(row, skip_special_tokens=True).strip() + ("" if ended else " <no-eos>"))
    return texts


def evaluate_vlm(model, processor, conditions: Sequence[dict], temperature: float = 0.0, seed: int = 0,
                 samples: int = 1, batch_size: int = 128) -> dict[str, float]:
    """Accuracy (exact answer between ``<answer>`` tags, the rule verifier) and format rate
    (exactly ``<answer> words </answer>`` then ``<|im_end|>``) of ``samples`` responses per condition."""
    from rewards.rules import RuleVerifier

    rows = [c for c in conditions for _ in range(samples)]
    texts: list[str] = []
    was_training = model.training
    model.eval()
    for start in range(0, len(rows), batch_size):
        texts += generate(model, processor, rows[start:start + batch_size], temperature, seed + start)
    model.train(was_training)
    scores = RuleVerifier()(texts, rows).scores
    fmt = [re.fullmatch(FORMAT_PATTERN, t) is not None for t in texts]
    return {"accuracy": round(float(scores.mean()), 4), "format": round(sum(fmt) / len(fmt), 4), "n": len(rows)}


def evaluate_all(model, processor, per_cell: int, samples: int) -> dict[str, Any]:
    """Per split and mode (greedy / sampled at temperature 1): accuracy per format x type cell,
    per format, per type, and the mean."""
    out: dict[str, Any] = {}
    for split in VQA_SPLITS:
        for mode, temperature, n in (("greedy", 0.0, 1), ("sampled", 1.0, samples)):
            cells = {}
            for f in FORMATS:
                for q in QTYPES:
                    conds = sample_vqa_conditions(f, q, per_cell, split, seed=EVAL_SEED)
                    cells[f"{f}/{q}"] = evaluate_vlm(model, processor, conds, temperature, EVAL_SEED, n)
            table = dict(cells)
            for f in FORMATS:
                table[f] = _mean([cells[f"{f}/{q}"] for q in QTYPES])
            for q in QTYPES:
                table[q] = _mean([cells[f"{f}/{q}"] for f in FORMATS])
            table["mean"] = _mean(list(cells.values()))
            out[f"{split} {mode}"] = table
    return out


def _mean(rows: Sequence[dict]) -> dict[str, float]:
    return {k: round(sum(r[k] for r in rows) / len(rows), 4) for k in ("accuracy", "format")}


# --------------------------------------------------------------------------- training
def train(model, processor, args: argparse.Namespace) -> dict:
    """Supervised response-only training on fresh in-domain conditions; returns the curves."""
    rng = random.Random(f"pretrain-vlm/{args.seed}")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed_tokens" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    budget = Budget(args.steps, None, args.warmup)
    curve = LossCurve(args.log_every, budget)
    accuracy_curve = []
    model.train()
    bar = progress(total=args.steps, desc="pretrain vlm")
    for step in range(1, args.steps + 1):
        conds = [draw_vqa_condition(rng, rng.choice(FORMATS), rng.choice(QTYPES), "train") for _ in range(args.batch_size)]
        batch = encode_examples(processor, conds)
        set_lr(opt, args.lr * budget.lr_factor(step - 1))
        loss = response_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        point = curve.add(step, {"loss": loss.item()}, lr=round(opt.param_groups[0]["lr"], 6))
        bar.update(1)
        if point is not None:
            bar.set_postfix(loss=f"{point['loss']:.3f}")
        if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            acc = {}
            for f in FORMATS:
                conds = [c for q in QTYPES for c in sample_vqa_conditions(f, q, 8, "heldout", seed=EVAL_SEED)]
                acc[f] = evaluate_vlm(model, processor, conds, 1.0, EVAL_SEED)["accuracy"]
            accuracy_curve.append({"step": step, "heldout_sampled_accuracy": acc})
            write(f"step {step}: out-of-domain sampled accuracy {acc}")
    bar.close()
    return {"loss_curve": curve.points, "accuracy_curve": accuracy_curve, "train_seconds": budget.elapsed()}


# --------------------------------------------------------------------------- model card
def _table(evaluation: dict, rows: Sequence[str]) -> str:
    cols = [f"{split} {mode}" for split in VQA_SPLITS for mode in ("greedy", "sampled")]
    names = {"train": "in-domain", "heldout": "out-of-domain"}
    header = [f"{names[c.split()[0]]} {c.split()[1]}" for c in cols]
    lines = ["| | " + " | ".join(header) + " |", "|---" * (len(cols) + 1) + "|"]
    for name in rows:
        cells = [f"{evaluation[c][name]['accuracy']:.3f}" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_card(log: dict) -> str:
    a, arch = log["args"], log["architecture"]
    ev = log["evaluation"]
    names = {"train": "in-domain", "heldout": "out-of-domain"}
    fmt_rate = ", ".join(f"{names[c.split()[0]]} {c.split()[1]} {ev[c]['mean']['format']:.3f}" for c in ev)
    return f"""# tiny-vlm: a tiny Qwen2-VL for Shapes VQA

A `Qwen2VLForConditionalGeneration` with a {arch['vision_depth']}-block vision tower (width {arch['vision_width']},
{PATCH}-pixel patches, no patch merge: a {IMAGE_SIZE}x{IMAGE_SIZE} image is 9 image tokens, one per grid cell) and a
{arch['layers']}-layer language model (width {arch['hidden']}, {arch['heads']} heads, multimodal rotary positions, tied
embeddings): {log['parameters']:,} parameters, float32, {log['size_bytes'] / 1e6:.2f} MB on disk. Its processor is the
Qwen2-VL image processor at {IMAGE_SIZE}x{IMAGE_SIZE} and a word-level tokenizer of {arch['vocab_size']} tokens (the
Qwen2-VL chat and vision tokens, the roles, and the words of the world).

It is pretrained from scratch on **Shapes VQA** (`genalign.toyworld.vqa`): questions about 48x48 Shapes World
images in three formats (yes/no, multiple choice, open) and five types (colour, shape, count, position, relation),
and is **deliberately under-trained** so that reward training has headroom: it answers most in-domain questions,
but positions poorly, and out of domain (questions about colour x shape pairs it never saw together) it is weak on
multiple choice, open answers, shapes and relations.

## Use

```python
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration
from genalign.toyworld.vqa import sample_vqa_conditions
model = Qwen2VLForConditionalGeneration.from_pretrained("assets/models/tiny-vlm")
processor = AutoProcessor.from_pretrained("assets/models/tiny-vlm")
cond = sample_vqa_conditions("open", "colour", 1)[0]
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": cond["prompt"]}}]}}]
text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
inputs = processor(text=[text], images=[cond["image"]], return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
print(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

The expected response is `<answer> X </answer>` then `<|im_end|>`.

## How it was made

```
{log['command']}
```

Supervised next-token training on chat prompt + gold response + `<|im_end|>` of fresh in-domain conditions (format and
type uniform), loss on the response tokens only; AdamW (lr {a['lr']}, weight decay {a['weight_decay']}, β = (0.9, 0.98)),
{a['warmup']} warm-up steps then cosine decay, batch {a['batch_size']}, {a['steps']} steps, seed {a['seed']},
{log['threads']} torch thread(s): {log['train_seconds'] / 60:.1f} minutes of training, {log['wall_seconds'] / 60:.1f}
minutes in all on a shared 2-core CPU. Curves in `training_log.json`.

In-domain conditions never name, show or offer a held-out colour x shape pair (green triangle, blue circle, yellow
square, purple triangle); every out-of-domain condition asks about one.

## Accuracy

{log['eval_per_cell']} conditions per format x type cell and split (`sample_vqa_conditions(format, type, n, split,
seed={EVAL_SEED})`); greedy, and sampled at temperature 1 with {log['eval_samples']} samples per condition. Accuracy: the
exact answer between the tags (`rewards.rules.RuleVerifier`, rule `exact`). Format rate (the response is exactly `<answer> words </answer>`, mean over cells): {fmt_rate}.
For scale, guessing gives 1/2 on yes/no and 1/3 on multiple choice.

Per format and per type (means over the other axis):

{_table(ev, [*FORMATS, *QTYPES, "mean"])}

Per format x type cell:

{_table(ev, [f"{f}/{q}" for f in FORMATS for q in QTYPES])}
"""


# --------------------------------------------------------------------------- command
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="genalign toyworld pretrain vlm",
                                description="Pretrain the tiny Shapes VQA vision-language model (transformers Qwen2-VL).")
    p.add_argument("--out", default="assets/models/tiny-vlm", help="output model folder")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and training data")
    p.add_argument("--steps", type=int, default=3000, help="optimisation steps (the under-training knob)")
    p.add_argument("--batch-size", type=int, default=64, help="conditions per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (warm-up, then cosine to 0)")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decay of matrices (not embeddings, norms)")
    p.add_argument("--hidden", type=int, default=64, help="language model width (MLP width is 4x)")
    p.add_argument("--layers", type=int, default=3, help="language model layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--vision-depth", type=int, default=2, help="vision tower blocks")
    p.add_argument("--vision-width", type=int, default=32, help="vision tower width")
    p.add_argument("--log-every", type=int, default=50, help="steps per loss-curve point")
    p.add_argument("--eval-every", type=int, default=500, help="steps between out-of-domain accuracy checks (0: none)")
    p.add_argument("--eval-per-cell", type=int, default=24, help="final evaluation: conditions per format x type and split")
    p.add_argument("--eval-samples", type=int, default=2, help="final evaluation: samples per condition at temperature 1")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's choice)")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    """Train, evaluate, save the model, processor, log and card; returns the output folder."""
    import tokenizers
    import transformers

    args = parse_args(argv)
    out = Path(args.out).resolve()
    check_out(out)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.monotonic()
    processor = build_processor()
    model = build_model(processor, args.hidden, args.layers, args.heads, args.vision_depth, args.vision_width, args.seed)
    log: dict[str, Any] = dict(
        command=command_line("genalign toyworld pretrain vlm", argv),
        args=vars(args),
        architecture=dict(vocab_size=len(processor.tokenizer), hidden=args.hidden, layers=args.layers, heads=args.heads,
                          vision_depth=args.vision_depth, vision_width=args.vision_width),
        parameters=sum(p.numel() for p in model.parameters()),
        threads=torch.get_num_threads(),
        versions=versions(transformers, tokenizers),
    )
    write(f"parameters: {log['parameters']:,}; vocabulary: {len(processor.tokenizer)} tokens")
    log.update(train(model, processor, args))
    with staged_folder(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        portable_tokenizer_class(tmp)
        log["size_bytes"] = folder_bytes(tmp)
        from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

        saved, saved_proc = Qwen2VLForConditionalGeneration.from_pretrained(tmp), AutoProcessor.from_pretrained(tmp)
        log["evaluation"] = evaluate_all(saved, saved_proc, args.eval_per_cell, args.eval_samples)
        log["eval_per_cell"], log["eval_samples"] = args.eval_per_cell, args.eval_samples
        log["wall_seconds"] = round(time.monotonic() - t0, 1)
        (tmp / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
        (tmp / "README.md").write_text(model_card(log))
    for name, table in log["evaluation"].items():
        write(f"{name}: " + ", ".join(f"{k} {table[k]['accuracy']:.3f}" for k in (*FORMATS, *QTYPES, "mean")))
    write(f"wrote {out} in {log['wall_seconds'] / 60:.1f} min")
    return out
