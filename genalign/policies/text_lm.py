"""Any transformers causal LM as a policy over token decoding.

State s_j = (prompt, response tokens before j), action a_j = token j, π(a_j | s_j) =
softmax(logits / temperature). Rollouts are batched with left-padded prompts and a KV cache
(:mod:`genalign.policies.token_sampling`); each row samples from its own seeded generator, so a
seed gives the same text alone or in any batch. A response ends after an EOS token, after the
token that completes a stop string (that token stays an action; the decoded text is cut before
the stop string), or after ``max_new_tokens``.

Fine-tuning is LoRA through peft (the reference is the model with adapters disabled) or full
(the reference is a frozen copy of the starting weights). Saved LoRA policies are plain peft
adapter folders: ``PeftModel.from_pretrained(base, directory)`` loads them.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import transformers
from packaging.version import Version
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from genalign.conditions import condition_text
from genalign.configs import opt
from genalign.policies.base import check_options
from genalign.policies.token_sampling import (
    StopRule,
    cache_kwarg,
    draw,
    left_pad,
    mask_tokens,
    nucleus_probs,
    positions,
    right_pad,
    sample_tokens,
)
from genalign.policies.unet_tuning import (
    DTYPES,
    POLICY_FILE,
    check_model_location,
    load_trainable_state,
    merge_runtime,
    portable_location,
    resolve_location,
    trainable_state,
)
from genalign.trajectory import Padded, Trajectory

__all__ = ["TextLMPolicy", "TextLMPolicyConfig"]


@dataclass
class TextLMPolicyConfig:
    type: Literal["text_lm"] = opt("text_lm", "policy kind")
    pretrained: str = opt("", "local directory or hub id of a transformers causal LM (or a genalign policy dir)")
    revision: str | None = opt(None, "hub revision (branch, tag or commit) of `pretrained`")
    max_new_tokens: int = opt(16, "longest response in tokens (the horizon T of `start` / `step`)")
    temperature: float = opt(1.0, "sampling temperature (> 0); log-probs are those of softmax(logits / temperature)")
    top_p: float = opt(1.0, "nucleus sampling mass in (0, 1]; < 1 forces `recompute_log_probs` (the draw is not the scored distribution)")
    stop_strings: list[str] = opt([], "a response ends after the token that completes one of these (cut from the decoded text)")
    chat_template: bool = opt(False, "render each prompt as one user message with the tokenizer's chat template")
    finetune: Literal["lora", "full"] = opt("lora", "train LoRA adapters, or all weights")
    lora_rank: int = opt(8, "LoRA rank r")
    lora_alpha: float | None = opt(None, "LoRA alpha (scale = alpha / r); default: equal to the rank")
    lora_targets: list[str] = opt(["q_proj", "k_proj", "v_proj", "o_proj"], "module names that get LoRA adapters (attention projections by default)")
    weight_dtype: Literal["float32", "float16", "bfloat16"] = opt(
        "float32", "dtype of the frozen base weights (LoRA); trainable weights stay float32"
    )
    trust_remote_code: bool = opt(False, "allow the model's own code from its folder or the hub (never read from a saved policy)")
    recompute_log_probs: bool = opt(False, "recompute rollout log-probs with a teacher-forced forward pass after sampling")

    def validate(self) -> None:
        if not self.pretrained:
            raise ValueError("'pretrained' is required: a local model directory or a hub id")
        check_model_location(self.pretrained, "pretrained")
        self.check_sampling()

    def check_sampling(self) -> None:
        """The checks that do not need a model location (a policy built around an in-memory model)."""
        if self.max_new_tokens < 1:
            raise ValueError(f"'max_new_tokens' must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"'temperature' must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"'top_p' must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop_strings):
            raise ValueError("'stop_strings' must not contain an empty string")
        if self.lora_rank < 1:
            raise ValueError(f"'lora_rank' must be >= 1, got {self.lora_rank}")

    @property
    def recompute(self) -> bool:
        """Whether rollout log-probs are recomputed teacher-forced (asked for, or top-p sampling)."""
        return self.recompute_log_probs or self.top_p < 1


class TextLMPolicy:
    """A transformers causal LM (with its tokenizer) behind the Policy protocol."""

    #: the rows of one condition always share their start state (the prompt), so
    #: ``shared_noise`` is honoured by construction
    capabilities = frozenset({"shared_noise"})
    log_prob_unit = "token"
    step_chunk = None  # a sequence is scored in one forward pass
    #: token ids outside the action set (long ``[K]``): never drawn, probability 0 when scored
    #: (None: every token is an action)
    banned_tokens: torch.Tensor | None = None

    def __init__(self, model: Any, tokenizer: Any, config: TextLMPolicyConfig):
        config.check_sampling()
        self.config = config
        self.tokenizer = tokenizer
        eos = set()
        for source in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
            eos.update([source] if isinstance(source, int) else (source or []))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError(f"the tokenizer of {config.pretrained!r} has neither a pad nor an eos token")
        self.pad_id = int(pad)
        if getattr(config, "chat_template", False) and not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"'chat_template' is true but the tokenizer of {config.pretrained!r} has no chat template")
        self.stop = StopRule(tokenizer, frozenset(eos), tuple(config.stop_strings))
        dtype = DTYPES[config.weight_dtype]
        self.reference_model: torch.nn.Module | None = None
        if config.finetune == "lora":
            if not isinstance(model, PeftModel):
                model.requires_grad_(False)
                if model.dtype != dtype:
                    model.to(dtype=dtype)
                model = get_peft_model(model, self.lora_config())
            for name, p in model.named_parameters():
                trainable = "lora_" in name
                if trainable:
                    p.data = p.data.float()
                p.requires_grad_(trainable)
        else:
            model.requires_grad_(True)
            if model.dtype != torch.float32:
                model.to(dtype=torch.float32)
        self.model = model.eval()  # dropout off: rollouts and recomputed log-probs see one function
        self.module: torch.nn.Module = self.model  # what forward passes call (a DDP/FSDP wrapper after prepare)
        self.cache_key = cache_kwarg(self._base())
        # score only the logits a call needs when the model can (a large vocabulary times a long
        # prompt is most of the memory of a forward pass)
        self.keep_kwarg = "logits_to_keep" if "logits_to_keep" in inspect.signature(self._base().forward).parameters else None

    def lora_config(self) -> LoraConfig:
        c = self.config
        return LoraConfig(r=c.lora_rank, lora_alpha=c.lora_alpha if c.lora_alpha is not None else c.lora_rank,
                          target_modules=list(c.lora_targets), init_lora_weights=True, task_type="CAUSAL_LM")

    def _keep(self, n: int) -> dict[str, int]:
        """Forward kwargs asking for the logits of the last ``n`` positions only (when supported)."""
        return {self.keep_kwarg: n} if self.keep_kwarg else {}

    def _base(self) -> Any:
        return self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model

    @classmethod
    def from_pretrained(cls, path_or_id: str, config: TextLMPolicyConfig | None = None) -> TextLMPolicy:
        """Load a causal LM (local dir or hub id) or a saved genalign policy dir.

        ``trust_remote_code`` always comes from ``config`` (default False), never from a saved file.
        """
        config = copy.deepcopy(config) if config is not None else TextLMPolicyConfig()
        meta_path = os.path.join(path_or_id, POLICY_FILE)
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
            if meta.get("type") != "text_lm":
                raise ValueError(f"{meta_path} holds a {meta.get('type')!r} policy, not text_lm")
            saved = TextLMPolicyConfig(**meta["config"])
            trust = config.trust_remote_code
            if meta["finetune"] == "full":
                merged = merge_runtime(saved, config, path_or_id, base_keys=())
                merged.revision, merged.trust_remote_code = None, trust
                return cls(_load_model(merged), _load_tokenizer(path_or_id, None, trust), merged)
            base = resolve_location(meta["base"], path_or_id)
            merged = merge_runtime(saved, config, base, base_keys=("revision",))
            merged.trust_remote_code = trust
            model = PeftModel.from_pretrained(_load_model(merged), path_or_id, is_trainable=True)
            return cls(model, _load_tokenizer(path_or_id, None, trust), merged)
        config.pretrained = path_or_id
        config.validate()
        return cls(_load_model(config), _load_tokenizer(path_or_id, config.revision, config.trust_remote_code), config)

    # -- protocol: parameters and devices --------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _snapshot_reference(self) -> None:
        """Full fine-tuning: freeze a copy of the weights before anything can change them (the
        first call that hands out, loads or wraps the trainable weights, or asks for the reference)."""
        if self.config.finetune == "full" and self.reference_model is None:
            self.reference_model = copy.deepcopy(self.model).requires_grad_(False).eval()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        self._snapshot_reference()
        return [p for p in self.model.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """LoRA: the adapter tensors; full: every weight (names as in ``model.named_parameters``)."""
        return trainable_state(self.model)

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._snapshot_reference()
        load_trainable_state(self.model, state)

    def prepare(self, accelerator: Any) -> list[torch.nn.Module]:
        self._snapshot_reference()
        self.model.to(accelerator.device)
        if self.reference_model is not None:
            self.reference_model.to(accelerator.device)
        self.module = accelerator.prepare_model(self.model)
        return [self.module]

    def reference(self) -> AbstractContextManager[None]:
        self._snapshot_reference()
        return self._reference()

    @contextmanager
    def _reference(self) -> Iterator[None]:
        if self.config.finetune == "lora":
            with self.model.disable_adapter():
                yield
            return
        saved = self.module
        self.module = self.reference_model
        try:
            yield
        finally:
            self.module = saved

    # -- prompts and decoding --------------------------------------------------------------
    def prompt_tokens(self, conditions: Sequence[Any]) -> list[list[int]]:
        """Each condition's prompt ids (through the chat template when configured)."""
        texts = [condition_text(c) for c in conditions]
        if self.config.chat_template:
            texts = [
                self.tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
                for t in texts
            ]
        ids = self.tokenizer(texts, add_special_tokens=not self.config.chat_template)["input_ids"]
        for i, row in enumerate(ids):
            if not row:
                raise ValueError(f"condition {i} ({conditions[i]!r}) tokenizes to no tokens: an LM needs a prompt token to start from")
        return [list(r) for r in ids]

    # -- the prompt side a multimodal subclass extends ----------------------------------------
    def _encode_prompts(self, conditions: Sequence[Any]) -> tuple[list[list[int]], dict[str, Any]]:
        """Each condition's prompt ids and its per-row inputs besides the ids (``Ragged`` extras,
        such as a VLM's image patches; none for text)."""
        return self.prompt_tokens(conditions), {}

    def _media(self, traj: Trajectory) -> dict[str, Any]:
        """The per-row inputs besides the ids that ``_encode_prompts`` stored in ``traj.extras``."""
        return {}

    def _model_inputs(self, ids: torch.Tensor, mask: torch.Tensor, media: dict[str, Any]) -> dict[str, Any]:
        """Forward kwargs besides ids and mask for left-padded sequences ``ids`` ``[N, L]`` that
        start with their rows' prompts: ``position_ids`` (consecutive from the first real token)."""
        return {"position_ids": positions(mask)}

    def _row_keys(self, prompts: Sequence[Sequence[int]], media: dict[str, Any]) -> list[Sequence[Any]]:
        """What each row's seed is mixed with (:func:`_generators`): its prompt ids."""
        return [list(p) for p in prompts]

    def _mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return mask_tokens(logits, self.banned_tokens)

    def _prompt_extras(self, seqs: Sequence[Sequence[int]]) -> dict[str, Padded]:
        ids, mask = left_pad(seqs, self.pad_id, self.device)
        return {"prompt_ids": Padded(ids, self.pad_id, "left"), "prompt_mask": Padded(mask, 0, "left")}

    @staticmethod
    def _unpad(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
        return [r[m.bool()].tolist() for r, m in zip(ids.cpu(), mask.cpu())]

    def _row_prompts(self, traj: Trajectory) -> list[list[int]]:
        return self._unpad(traj.extras["prompt_ids"].tensor, traj.extras["prompt_mask"].tensor)

    def _responses(self, traj: Trajectory, upto: Sequence[int] | None = None) -> list[list[int]]:
        """Each row's response tokens (its masked actions), cut to ``upto[b]`` when given."""
        rows = self._unpad(traj.actions, traj.mask)
        return rows if upto is None else [r[: int(k)] for r, k in zip(rows, upto)]

    def _continue(self, prompts: Sequence[Sequence[int]], prior: Sequence[Sequence[int]], seeds: Any, greedy: bool = False,
                  media: dict[str, Any] | None = None) -> tuple[list[list[int]], list[list[float]]]:
        """Sample (or greedily decode) each row's continuation of prompt + prior tokens."""
        ids, mask = left_pad([[*p, *q] for p, q in zip(prompts, prior)], self.pad_id, self.device)
        budget = [self.config.max_new_tokens - len(q) for q in prior]
        c = self.config
        media = media or {}
        inputs = self._model_inputs(ids, mask, media)
        pos = inputs.pop("position_ids")
        return sample_tokens(
            self.module, self.cache_key, ids, mask, prior, budget, _generators(seeds, self._row_keys(prompts, media)),
            self.stop, self.pad_id, c.temperature, c.top_p, greedy, self._keep(1), pos, inputs, self.banned_tokens,
        )

    def _build(self, conditions: list[Any], group: torch.Tensor, prompts: list[list[int]], responses: list[list[int]],
               log_probs: list[list[float]], outputs: Any, extras: dict[str, Any] | None = None, steps: int | None = None) -> Trajectory:
        t = steps if steps is not None else max(1, max(len(r) for r in responses))
        n = len(responses)
        return Trajectory(
            conditions=conditions,
            group=group.to(self.device),
            actions=right_pad(responses, t, self.pad_id, torch.long).to(self.device),
            log_probs=right_pad(log_probs, t, 0.0, torch.float32).to(self.device),
            mask=right_pad([[True] * len(r) for r in responses], t, False, torch.bool).to(self.device),
            lengths=torch.tensor([len(r) for r in responses], dtype=torch.long, device=self.device),
            step_ids=torch.arange(t, device=self.device).unsqueeze(0).expand(n, -1).clone(),
            outputs=outputs,
            aligned=False,
            extras={**(extras or {}), **self._prompt_extras(prompts)},
        )

    def _recomputed(self, traj: Trajectory, from_step: torch.Tensor | None = None) -> Trajectory:
        """``traj`` with its log-probs at steps >= ``from_step`` [B] recomputed teacher-forced."""
        if not self.config.recompute:
            return traj
        with torch.no_grad():
            fresh = self.log_prob(traj, torch.arange(traj.num_steps)).detach()
        if from_step is not None:
            keep = traj.step_ids < from_step.to(self.device).unsqueeze(1)
            fresh = torch.where(keep, traj.log_probs, fresh)
        traj.log_probs = fresh.float()
        return traj

    # -- protocol: sampling ----------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, conditions: Sequence[Any], n_per_condition: int = 1, seeds: Sequence[int] | None = None, **options: Any) -> Trajectory:
        """``len(conditions) * n_per_condition`` responses, condition-major. ``shared_noise`` is
        accepted and always holds (a condition's rows share their prompt)."""
        check_options(type(self).__name__, self.capabilities, options)
        rows = [c for c in conditions for _ in range(n_per_condition)]
        prompts, media = self._encode_prompts(rows)
        _check_seeds(seeds, len(rows))
        tokens, lps = self._continue(prompts, [[] for _ in rows], seeds, media=media)
        group = torch.arange(len(conditions)).repeat_interleave(n_per_condition)
        traj = self._build(rows, group, prompts, tokens, lps, [self.stop.decode(t) for t in tokens], media)
        return self._recomputed(traj)

    def log_prob(self, traj: Trajectory, steps: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """log softmax(logits / temperature) at each row's action tokens, one teacher-forced
        forward over [prompt ; response]; ``[B, K]`` float32 with grad (0 at padding)."""
        logits = self._response_logits(traj)  # [B, T, V]
        actions = traj.actions.to(logits.device)
        lp = torch.log_softmax(logits, -1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)
        lp = lp.masked_fill(~traj.mask.to(lp.device), 0.0)  # [B, T]
        idx = torch.as_tensor(steps, dtype=torch.long, device=lp.device)
        if idx.ndim == 1:
            idx = idx.unsqueeze(0).expand(lp.shape[0], -1)
        return lp.gather(1, idx)

    @torch.no_grad()
    def token_logits(self, traj: Trajectory) -> torch.Tensor:
        """log softmax(logits / temperature) over the whole vocabulary at every response step, one
        teacher-forced forward over [prompt ; response]: ``[B, T, V]`` float32, no grad (steps
        where ``traj.mask`` is False hold values of no meaning; tokens outside the action set are -inf)."""
        return torch.log_softmax(self._response_logits(traj), -1)

    def _response_logits(self, traj: Trajectory) -> torch.Tensor:
        """The scored logits ``[B, T, V]`` float32 at each response step: logits / temperature,
        tokens outside the action set at -inf; one teacher-forced forward over [prompt ; response]."""
        p_ids, p_mask = traj.extras["prompt_ids"].tensor, traj.extras["prompt_mask"].tensor
        actions = traj.actions.to(p_ids.device)
        t = actions.shape[1]
        ids = torch.cat([p_ids, actions], 1)  # [B, P + T]
        mask = torch.cat([p_mask.long(), traj.mask.long().to(p_ids.device)], 1)
        inputs = self._model_inputs(ids, mask, self._media(traj))
        logits = self.module(input_ids=ids, attention_mask=mask, **inputs, **self._keep(t + 1)).logits
        logits = logits[:, -t - 1 : -1].float()  # position i predicts token i + 1: [B, T, V]
        return self._mask_logits(logits / self.config.temperature)

    @torch.no_grad()
    def start(self, conditions: Sequence[Any], n_per_condition: int = 1, seeds: Sequence[int] | None = None) -> Trajectory:
        """Prompts encoded, ``max_new_tokens`` empty steps (``mask`` all False, ``outputs`` None)."""
        rows = [c for c in conditions for _ in range(n_per_condition)]
        group = torch.arange(len(conditions)).repeat_interleave(n_per_condition)
        empty = [[] for _ in rows]
        prompts, media = self._encode_prompts(rows)
        return self._build(rows, group, prompts, empty, empty, None, media, steps=self.config.max_new_tokens)

    @torch.no_grad()
    def row_generators(self, conditions: Sequence[Any], n_per_condition: int, seeds: Sequence[int]) -> list[torch.Generator | None]:
        """The generators ``rollout`` builds from ``seeds`` for these rows (each seed mixed with its
        row's prompt): pass them to :meth:`start` and :meth:`step` to continue each row's stream."""
        prompts, media = self._encode_prompts([c for c in conditions for _ in range(n_per_condition)])
        return _generators(seeds, self._row_keys(prompts, media))

    def step(self, traj: Trajectory, step: int, n: int = 1, seeds: Any = None) -> Trajectory:
        """Sample token ``step`` for ``n`` candidates per row (``B * n`` rows, group = parent
        row), with a full forward over each prefix. Rows whose response has ended stay as they
        are and draw nothing. ``seeds``: ints or generators, one per candidate row (the
        generators of ``rollout``'s seeds continue its streams: ``start`` + T steps = ``rollout``).
        ``outputs`` are set after the last step, or once every row has ended."""
        if not 0 <= step < traj.num_steps:
            raise IndexError(f"step {step} outside 0..{traj.num_steps - 1}")
        child = traj[torch.arange(traj.batch_size).repeat_interleave(n)]
        prior = self._responses(child, [step] * child.batch_size)
        if any(len(r) != step and not self.stop.finished(r) for r in prior):
            raise ValueError(f"step {step}: some rows have not taken steps 0..{step - 1} (take steps in order)")
        active = [len(r) == step and not self.stop.finished(r) and step < self.config.max_new_tokens for r in prior]
        prompts, media = self._row_prompts(child), self._media(child)
        gens = _generators(seeds, self._row_keys(prompts, media))
        actions, log_probs, mask = child.actions.clone(), child.log_probs.clone(), child.mask.clone()
        rows = [i for i, a in enumerate(active) if a]
        if rows:
            ids, attn = left_pad([[*prompts[i], *prior[i]] for i in rows], self.pad_id, self.device)
            inputs = self._model_inputs(ids, attn, {k: v.index(torch.tensor(rows)) for k, v in media.items()})
            logits = self._mask_logits(self.module(input_ids=ids, attention_mask=attn, **inputs, **self._keep(1)).logits[:, -1].float())
            probs = nucleus_probs(logits, self.config.temperature, self.config.top_p)
            tok = draw(probs, torch.ones(len(rows), dtype=torch.bool), [gens[i] for i in rows], self.pad_id).to(self.device)
            lp = torch.log_softmax(logits / self.config.temperature, -1).gather(-1, tok.unsqueeze(-1)).squeeze(-1)
            index = torch.tensor(rows, device=self.device)
            actions[index, step] = tok
            log_probs[index, step] = lp
            mask[index, step] = True
        responses = self._unpad(actions, mask)
        done = step + 1 == traj.num_steps or all(self.stop.finished(r) or len(r) < step + 1 for r in responses)
        child.actions, child.log_probs, child.mask, child.lengths = actions, log_probs, mask, mask.sum(1)
        child.group = torch.arange(traj.batch_size, device=self.device).repeat_interleave(n)
        child.outputs = [self.stop.decode(r) for r in responses] if done else None
        return child

    @torch.no_grad()
    def continue_from(self, traj: Trajectory, steps: torch.Tensor, n: int, seeds: Sequence[int] | None = None) -> Trajectory:
        """``n`` continuations per row, row b keeping its first ``steps[b]`` tokens (``B * n`` rows,
        group = parent row, ``extras['branch_step']``). Kept log-probs are the parent's."""
        steps = torch.as_tensor(steps, dtype=torch.long).cpu()
        if steps.shape != (traj.batch_size,):
            raise ValueError(f"steps must be [B={traj.batch_size}] branch steps, got {tuple(steps.shape)}")
        lengths = traj.mask.sum(1).cpu()
        if bool((steps < 0).any() or (steps > lengths).any()):
            raise IndexError(f"branch steps {steps.tolist()} outside each row's response (lengths {lengths.tolist()})")
        idx = torch.arange(traj.batch_size).repeat_interleave(n)
        parent = traj[idx]
        branch = steps[idx]
        _check_seeds(seeds, parent.batch_size)
        kept = self._responses(parent, branch.tolist())
        prompts = self._row_prompts(parent)
        tokens, lps = self._continue(prompts, kept, seeds, media=self._media(parent))
        kept_lp = [r[: int(k)].tolist() for r, k in zip(parent.log_probs.cpu(), branch)]
        responses = [[*a, *b] for a, b in zip(kept, tokens)]
        extras = {k: v for k, v in parent.extras.items() if k not in ("prompt_ids", "prompt_mask")}
        extras["branch_step"] = branch.to(self.device)
        out = self._build(parent.conditions, idx, prompts, responses, [[*a, *b] for a, b in zip(kept_lp, lps)],
                          [self.stop.decode(r) for r in responses], extras)
        return self._recomputed(out, branch)

    @torch.no_grad()
    def forward_process(self, conditions: Sequence[Any], outputs: Sequence[str], seeds: Sequence[int] | None = None) -> Trajectory:
        """Teacher-forced trajectories of given texts: each output's tokens (+ EOS when the
        tokenizer has one) are the actions, every one active; ``log_probs`` are 0 (the data is a
        point mass that produced exactly these tokens). ``seeds`` are unused (nothing is drawn)."""
        conditions = list(conditions)
        if len(outputs) != len(conditions):
            raise ValueError(f"{len(conditions)} conditions but {len(outputs)} outputs")
        eos = self.tokenizer.eos_token_id
        encoded = self.tokenizer(list(outputs), add_special_tokens=False)["input_ids"]
        responses = [[*r, *([eos] if eos is not None else [])] for r in encoded]
        if any(not r for r in responses):
            raise ValueError("an output tokenizes to no tokens and the tokenizer has no eos token to end it")
        zeros = [[0.0] * len(r) for r in responses]
        prompts, media = self._encode_prompts(conditions)
        return self._build(conditions, torch.arange(len(conditions)), prompts, responses, zeros, list(outputs), media)

    @torch.no_grad()
    def predict_final(self, traj: Trajectory, step: int) -> list[str]:
        """The greedy completion of each row from its prompt and tokens before ``step`` (the full
        response text); ``step == T``: the finished outputs."""
        if step == traj.num_steps:
            return list(traj.outputs)
        if not 0 <= step < traj.num_steps:
            raise IndexError(f"step {step} outside 0..{traj.num_steps}")
        kept = self._responses(traj, [step] * traj.batch_size)
        tokens, _ = self._continue(self._row_prompts(traj), kept, None, greedy=True, media=self._media(traj))
        return [self.stop.decode([*a, *b]) for a, b in zip(kept, tokens)]

    # -- saving ----------------------------------------------------------------------------
    def save_pretrained(self, directory: str) -> None:
        """LoRA: a peft adapter folder (``PeftModel.from_pretrained(base, directory)`` loads it);
        full: a transformers model folder. Both get the tokenizer and the genalign policy file
        (a local base is recorded relative to ``directory``)."""
        os.makedirs(directory, exist_ok=True)
        self.model.save_pretrained(directory)  # safetensors
        self.tokenizer.save_pretrained(directory)
        base = portable_location(self.config.pretrained, directory) if self.config.finetune == "lora" else os.curdir
        meta = {"type": "text_lm", "finetune": self.config.finetune, "base": base, "config": asdict(self.config)}
        with open(os.path.join(directory, POLICY_FILE), "w") as f:
            json.dump(meta, f, indent=2)


def _check_seeds(seeds: Any, n: int) -> None:
    if seeds is not None and len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} rows (give one per output row)")


def _generators(seeds: Any, prompts: Sequence[Sequence[int]]) -> list[torch.Generator | None]:
    """One CPU generator per row from ints (generators are passed through); None: the global RNG.

    An int seed is mixed with the row's prompt tokens. A token is drawn with one uniform number
    from a small categorical, so rows of different prompts that shared a seed would share their
    uniforms and answer alike (with the same seed for sample j of every question, all 128
    samples of an evaluation set of yes/no questions came out "yes"). Diffusion policies keep
    the diffusers convention instead (a seed fixes x_T whatever the prompt).
    """
    n = len(prompts)
    if seeds is None:
        return [None] * n
    _check_seeds(seeds, n)
    out: list[torch.Generator | None] = []
    for s, prompt in zip(seeds, prompts):
        if isinstance(s, torch.Generator):
            out.append(s)
            continue
        digest = hashlib.sha256(f"{int(s)}/{','.join(map(str, prompt))}".encode()).digest()
        out.append(torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1)))
    return out


def _load_model(config: TextLMPolicyConfig) -> Any:
    """The causal LM at ``config.pretrained`` from safetensors weights; remote code only when configured."""
    check_model_location(config.pretrained, "pretrained")
    kwargs: dict[str, Any] = {"trust_remote_code": True} if config.trust_remote_code else {}
    dtype = DTYPES[config.weight_dtype] if config.finetune == "lora" else torch.float32
    kwargs["dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"] = dtype
    return AutoModelForCausalLM.from_pretrained(config.pretrained, revision=config.revision, use_safetensors=True, **kwargs)


def _load_tokenizer(path_or_id: str, revision: str | None, trust_remote_code: bool) -> Any:
    kwargs: dict[str, Any] = {"trust_remote_code": True} if trust_remote_code else {}
    return AutoTokenizer.from_pretrained(path_or_id, revision=revision, **kwargs)
