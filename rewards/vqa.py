"""VQA verifier reward: P("yes") from a vision-language model asked about the image.

Paper: Lin et al., "Evaluating Text-to-Visual Generation with Image-to-Text Generation"
(VQAScore, ECCV 2024), §3: ask a VLM 'Does this figure show "{text}"? Please answer yes or
no.' and score P("Yes" | image, question). Names in the code:

    logits[:, -1]        -> the VLM's next-token logits after the chat prompt, the assistant
                            turn opened (so the answer is the next token, with no leading space)
    yes_ids / no_ids     -> the single-token answer words of ``yes_tokens`` / ``no_tokens``
    p_yes                -> Σ_{y∈yes} P(y) / (Σ_{y∈yes} P(y) + Σ_{n∈no} P(n))   (normalize: true)
                            Σ_{y∈yes} P(y) over the whole vocabulary            (normalize: false)

The paper's number is the unnormalised P("Yes") (= exp(−CE) of the answer token);
``yes_tokens: [Yes]`` with ``normalize: false`` reproduces it. The default renormalises over
{"Yes", "yes"} vs {"No", "no"}, so probability mass the model puts on other tokens (a space,
"The", "I") does not lower the score; that mass is logged as ``yes_no_mass``. An answer word
counts only if the tokenizer encodes it as exactly one token (Qwen2's "Yes", "yes", "No",
"no" each are); the words that qualified are in ``VQAReward.answer_tokens``.

Mode ``question_set`` follows Davidsonian Scene Graph (Cho et al., ICLR 2024, §3): a prompt
becomes several yes/no questions, each with parent ids; a child's answer counts only if its
parents hold. Gating rule (``gating``):

    threshold (default, DSG's rule): a question holds iff its effective score > 0.5;
        effective(q) = p_yes(q) if every parent holds, else 0 (so gating is transitive)
    product: effective(q) = p_yes(q) · Π_{parents} effective(parent)   (smooth in every p_yes)

and the prompt's score is the mean of effective(q) over its questions. Question sets come from
a JSONL file (one ``{"prompt": ..., "questions": [{"id": 1, "text": ..., "parents": []}, ...]}``
per line) or, with no file, from the Shapes World grammar
(:func:`genalign.toyworld.questions.scene_questions`).

Not differentiable: images are quantised to uint8 PIL images and the VLM's image processor
resizes and patchifies them outside autograd (the number of image tokens even depends on the
size), so no gradient reaches the pixels.

Shapes: images ``[B, 3, H, W]`` in [0, 1] or B PIL images; scores ``[B]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from PIL import Image

from genalign.configs import opt
from rewards.base import RewardOutput, images_to_tensor, tensor_to_uint8

VQASCORE_TEMPLATE = 'Does this figure show "{prompt}"? Please answer yes or no.'
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class VQAConfig:
    type: Literal["vqa"] = opt("vqa", "VQA verifier: P(yes) of a vision-language model asked about the image (VQAScore / DSG)")
    weight: float = opt(1.0, "weight (> 0) of this component in the summed reward; every reward is maximised", gt=0)
    model: str = opt("Qwen/Qwen2-VL-2B-Instruct", "transformers image-text-to-text model with a chat template: local directory or hub id")
    mode: Literal["question", "question_set"] = opt("question", "one templated question per prompt (VQAScore), or a DSG question set per prompt")
    template: str = opt(VQASCORE_TEMPLATE, "mode 'question': the question, with {prompt} replaced by the prompt")
    questions_path: str = opt("", "mode 'question_set': JSONL of question sets; empty = generate them from Shapes World prompts")
    gating: Literal["threshold", "product"] = opt("threshold", "mode 'question_set': a child counts only if its parents' score > 0.5 (DSG), or is multiplied by it")
    yes_tokens: list[str] = opt(["Yes", "yes"], "answer words counted as yes; those that are one token in the tokenizer are used")
    no_tokens: list[str] = opt(["No", "no"], "answer words counted as no; those that are one token in the tokenizer are used")
    normalize: bool = opt(True, "score P(yes) / (P(yes) + P(no)); false = P(yes) over the whole vocabulary (the paper's VQAScore)")
    batch_size: int = opt(8, "(image, question) pairs per forward pass")
    dtype: Literal["float32", "bfloat16", "float16"] = opt("float32", "weights' dtype (answer probabilities are computed in float32)")
    trust_remote_code: bool = opt(False, "passed to from_pretrained; only for models whose code you trust")

    def validate(self) -> None:
        from genalign.policies.unet_tuning import check_model_location

        check_model_location(self.model, "model")
        if self.mode == "question" and "{prompt}" not in self.template:
            raise ValueError(f"'template' must contain {{prompt}}, got {self.template!r}")
        if self.mode == "question" and self.questions_path:
            raise ValueError("'questions_path' is only read in mode 'question_set'")
        if self.questions_path and not os.path.isfile(self.questions_path):
            raise FileNotFoundError(f"'questions_path': no question file at {self.questions_path!r}")
        if not self.yes_tokens or not self.no_tokens:
            raise ValueError("'yes_tokens' and 'no_tokens' need at least one word each")
        if self.batch_size < 1:
            raise ValueError(f"'batch_size' must be >= 1, got {self.batch_size}")


def check_question_set(prompt: str, questions: Any) -> list[dict]:
    """Validate one question set; return it with ``parents`` filled in (default ``[]``).

    Ids are unique, parents name ids of the same set, and the parent links have no cycle.
    """
    if not isinstance(questions, list) or not questions:
        raise ValueError(f"prompt {prompt!r}: 'questions' must be a non-empty list")
    out = []
    for q in questions:
        if not isinstance(q, dict) or "id" not in q or not isinstance(q.get("text"), str):
            raise ValueError(f"prompt {prompt!r}: each question needs an 'id' and a 'text', got {q!r}")
        out.append({"id": q["id"], "text": q["text"], "parents": list(q.get("parents") or [])})
    ids = [q["id"] for q in out]
    if len(set(ids)) != len(ids):
        raise ValueError(f"prompt {prompt!r}: question ids repeat: {ids}")
    for q in out:
        unknown = [p for p in q["parents"] if p not in ids]
        if unknown:
            raise ValueError(f"prompt {prompt!r}: question {q['id']} names unknown parents {unknown}")
    gate_questions(out, [1.0] * len(out), "threshold", prompt)  # raises on a cycle
    return out


def load_question_sets(path: str) -> dict[str, list[dict]]:
    """Read a JSONL of ``{"prompt": str, "questions": [{"id", "text", "parents"}]}``, one per line."""
    sets: dict[str, list[dict]] = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f"{where}: each line needs a 'prompt' string and a 'questions' list")
            if row["prompt"] in sets:
                raise ValueError(f"{where}: prompt {row['prompt']!r} has a question set already")
            try:
                sets[row["prompt"]] = check_question_set(row["prompt"], row.get("questions"))
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
    return sets


def gate_questions(questions: Sequence[dict], p_yes: Sequence[float], gating: str,
                   prompt: str = "") -> tuple[float, list[float], list[bool]]:
    """DSG aggregation of one prompt's answers.

    Returns (prompt score = mean effective score, effective score per question, gated per
    question). ``gated`` marks a question with a parent that does not hold (effective ≤ 0.5):
    under ``threshold`` it scores 0, under ``product`` p_yes · Π effective(parents).
    """
    index = {q["id"]: i for i, q in enumerate(questions)}
    effective: list[float | None] = [None] * len(questions)
    gated = [False] * len(questions)

    def resolve(i: int, path: tuple[int, ...]) -> float:
        if effective[i] is not None:
            return effective[i]
        if i in path:
            cycle = [questions[j]["id"] for j in (*path[path.index(i):], i)]
            raise ValueError(f"prompt {prompt!r}: parent links form a cycle {cycle}")
        parents = [resolve(index[p], (*path, i)) for p in questions[i]["parents"]]
        gated[i] = any(e <= 0.5 for e in parents)
        if gating == "threshold":
            effective[i] = 0.0 if gated[i] else float(p_yes[i])
        else:
            effective[i] = float(p_yes[i]) * math.prod(parents)
        return effective[i]

    values = [resolve(i, ()) for i in range(len(questions))]
    return sum(values) / len(values), values, gated


def answer_token_ids(tokenizer: Any, words: Sequence[str], key: str, model: str) -> tuple[list[int], list[str]]:
    """Ids of the words the tokenizer encodes as exactly one token (without special tokens)."""
    ids, used = [], []
    for word in words:
        enc = tokenizer.encode(word, add_special_tokens=False)
        if len(enc) == 1 and enc[0] not in ids:
            ids.append(enc[0])
            used.append(word)
    if not ids:
        raise ValueError(f"'{key}': none of {list(words)} is a single token of {model!r}'s tokenizer; "
                         "give answer words it encodes as one token")
    return ids, used


def _pil_images(outputs: Any) -> list[Image.Image]:
    if isinstance(outputs, Sequence) and outputs and all(isinstance(im, Image.Image) for im in outputs):
        return [im.convert("RGB") for im in outputs]
    arrays = tensor_to_uint8(images_to_tensor(outputs))  # checks layout and [0, 1] range; [B, H, W, 3]
    return [Image.fromarray(a) for a in arrays]


def _chat(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


class VQAReward:
    differentiable = False
    name = "vqa"

    def __init__(self, config: VQAConfig | None = None, device: str | torch.device = "cpu"):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.config = c = config or VQAConfig()
        c.validate()
        self.processor = AutoProcessor.from_pretrained(c.model, trust_remote_code=c.trust_remote_code)
        if getattr(self.processor, "chat_template", None) is None:
            raise ValueError(f"'model': the processor of {c.model!r} has no chat template; use an instruction-tuned VLM")
        # Left padding puts every row's last prompt token in the last column: logits[:, -1].
        self.processor.tokenizer.padding_side = "left"
        self.model = AutoModelForImageTextToText.from_pretrained(
            c.model, dtype=DTYPES[c.dtype], trust_remote_code=c.trust_remote_code
        ).to(device).eval().requires_grad_(False)
        self.yes_ids, yes_used = answer_token_ids(self.processor.tokenizer, c.yes_tokens, "yes_tokens", c.model)
        self.no_ids, no_used = answer_token_ids(self.processor.tokenizer, c.no_tokens, "no_tokens", c.model)
        if set(self.yes_ids) & set(self.no_ids):
            raise ValueError(f"'yes_tokens' {yes_used} and 'no_tokens' {no_used} share a token")
        self.answer_tokens = {"yes": yes_used, "no": no_used}
        self.question_sets = load_question_sets(c.questions_path) if c.questions_path else None

    def questions_for(self, prompt: str) -> list[dict]:
        """The question set of one prompt (``[{"id", "text", "parents"}]``)."""
        c = self.config
        if c.mode == "question":
            return [{"id": 1, "text": c.template.replace("{prompt}", prompt), "parents": []}]
        if self.question_sets is not None:
            if prompt not in self.question_sets:
                raise KeyError(f"prompt {prompt!r} has no question set in {c.questions_path!r}")
            return self.question_sets[prompt]
        from genalign.toyworld.questions import scene_questions
        from genalign.toyworld.spec import PromptError, parse_prompt

        try:
            return scene_questions(parse_prompt(prompt))
        except PromptError as e:
            raise ValueError(f"'questions_path' is empty, so questions are generated from Shapes World prompts, "
                             f"and this is not one: {e}") from None

    @torch.no_grad()
    def answer_probabilities(self, images: Sequence[Image.Image], questions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """P(yes) ``[N]`` and the probability mass on all answer tokens ``[N]`` for N (image, question) pairs."""
        p_yes, mass = [], []
        for lo in range(0, len(questions), self.config.batch_size):
            qs, ims = questions[lo : lo + self.config.batch_size], list(images[lo : lo + self.config.batch_size])
            texts = [self.processor.apply_chat_template(_chat(q), tokenize=False, add_generation_prompt=True) for q in qs]
            batch = self.processor(text=texts, images=ims, padding=True, return_tensors="pt")
            if not bool(batch["attention_mask"][:, -1].all()):
                raise RuntimeError("the processor padded on the right; the answer logits would be read at a pad token")
            batch = batch.to(self.model.device)
            batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
            logits = self.model(**batch, logits_to_keep=1).logits[:, -1].float()  # [n, V]
            logp = logits.log_softmax(-1)  # [n, V]
            log_yes = logp[:, self.yes_ids].logsumexp(-1)  # [n]
            log_no = logp[:, self.no_ids].logsumexp(-1)  # [n]
            log_answer = torch.logaddexp(log_yes, log_no)  # [n]
            p_yes.append((log_yes - log_answer).exp() if self.config.normalize else log_yes.exp())
            mass.append(log_answer.exp())
        return torch.cat(p_yes).cpu(), torch.cat(mass).cpu()

    def __call__(self, outputs: Any, conditions: Sequence[Any]) -> RewardOutput:
        images = _pil_images(outputs)
        prompts = [str(c) for c in conditions]
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} conditions")
        sets = [self.questions_for(p) for p in prompts]
        flat_images = [im for im, qs in zip(images, sets) for _ in qs]
        flat_questions = [q["text"] for qs in sets for q in qs]
        p_flat, mass_flat = self.answer_probabilities(flat_images, flat_questions)  # [N], [N]
        scores, mass, gated_frac, details = [], [], [], []
        lo = 0
        for prompt, qs in zip(prompts, sets):
            p, m = p_flat[lo : lo + len(qs)], mass_flat[lo : lo + len(qs)]
            lo += len(qs)
            score, _, gated = gate_questions(qs, p.tolist(), self.config.gating, prompt)
            scores.append(score)
            mass.append(float(m.mean()))
            gated_frac.append(sum(gated) / len(gated))
            details.append({"questions": [q["text"] for q in qs], "p_yes": p.tolist(), "gated": gated})
        components = {"yes_no_mass": torch.tensor(mass)}
        if self.config.mode == "question_set":
            components["gated_fraction"] = torch.tensor(gated_frac)
        return RewardOutput(scores=torch.tensor(scores, dtype=torch.float32), components=components, details=details)


def main(argv: Sequence[str] | None = None) -> None:
    """Sanity check for real weights: Shapes World renders scored against their own prompt and
    against the next image's prompt; matched scores should be clearly higher."""
    from genalign.toyworld import parse_prompt, render

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", default=VQAConfig.model)
    parser.add_argument("--mode", default="question", choices=["question", "question_set"])
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=224, help="render size in pixels")
    args = parser.parse_args(argv)
    prompts = ["a red circle", "two blue squares", "a green triangle on the left",
               "a red circle to the left of a blue square", "a yellow square and a purple circle"]
    images = [render(parse_prompt(p), seed=0, size=args.size) for p in prompts]
    reward = VQAReward(VQAConfig(model=args.model, mode=args.mode, dtype=args.dtype), device=args.device)
    matched = reward(images, prompts).scores
    mismatched = reward(images, prompts[1:] + prompts[:1]).scores
    print(f"answer tokens: {reward.answer_tokens}")
    print(f"{'prompt':<45} {'matched':>8} {'mismatched':>10}")
    for p, a, b in zip(prompts, matched.tolist(), mismatched.tolist()):
        print(f"{p:<45} {a:8.3f} {b:10.3f}")
    print(f"{'mean':<45} {matched.mean():8.3f} {mismatched.mean():10.3f}")


if __name__ == "__main__":
    main()
