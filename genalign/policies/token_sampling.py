"""Token decoding for :mod:`genalign.policies.text_lm`: padding, nucleus draws, stop rules, and
the batched sampling loop with a KV cache.

Randomness is per row: row i draws its token from its own CPU ``torch.Generator`` with one
``torch.multinomial`` call per step while it is active (none once it has finished), so a
row's sample depends only on its seed and its prefix, never on the batch it is drawn in.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of ids -> ``ids`` ``[N, L]`` long and ``mask`` ``[N, L]`` long, left-padded."""
    length = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, length - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, length - len(s):] = 1
    return ids.to(device), mask.to(device)


def right_pad(seqs: Sequence[Sequence[Any]], length: int, value: Any, dtype: torch.dtype) -> torch.Tensor:
    """Sequences -> ``[N, length]`` right-padded with ``value``."""
    out = torch.full((len(seqs), length), value, dtype=dtype)
    for i, s in enumerate(seqs):
        if len(s):
            out[i, : len(s)] = torch.as_tensor(list(s), dtype=dtype)
    return out


def mask_tokens(logits: torch.Tensor, banned: torch.Tensor | None) -> torch.Tensor:
    """``logits`` ``[..., V]`` with the ``banned`` token ids (long ``[K]``; None: none) at -inf:
    tokens outside the action set, never drawn and of probability 0 in the scored distribution."""
    if banned is None or not len(banned):
        return logits
    return logits.index_fill(-1, banned.to(logits.device), float("-inf"))


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``[N, L]`` from an attention mask: 0 at each row's first real token (padding gets 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def cache_kwarg(model: Any) -> str:
    """The keyword a causal LM's forward takes its KV cache by (``cache`` in recent transformers,
    ``past_key_values`` in older ones and in most remote-code models)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def nucleus_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The sampling distribution ``[N, V]`` float32: softmax(logits / temperature), restricted to
    the smallest set of most likely tokens whose mass reaches ``top_p`` (always the top token) and
    renormalised."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass of the more likely tokens
    keep_sorted = before < top_p
    keep_sorted[:, 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    probs = probs * keep
    return probs / probs.sum(-1, keepdim=True)


def draw(probs: torch.Tensor, active: torch.Tensor, generators: Sequence[torch.Generator | None], pad_id: int) -> torch.Tensor:
    """One token per active row ``[N]`` long (``pad_id`` for inactive rows, which draw nothing).
    Each active row calls ``torch.multinomial`` once with its own generator (None: global RNG)."""
    probs = probs.detach().float().cpu()
    out = torch.full((probs.shape[0],), pad_id, dtype=torch.long)
    for i in active.nonzero().flatten().tolist():
        out[i] = torch.multinomial(probs[i], 1, generator=generators[i])[0]
    return out


@dataclass
class StopRule:
    """When a response ends: after an EOS token, or after the token that completes a stop string.

    A response that ends on a stop string keeps that token among its actions (it was sampled
    and is scored); its decoded text is cut before the first stop string.
    """

    tokenizer: Any
    eos_ids: frozenset[int]
    stop_strings: tuple[str, ...] = ()

    def decode(self, tokens: Sequence[int]) -> str:
        """The response text of ``tokens``: special tokens skipped, cut before the first stop string."""
        text = self.tokenizer.decode(list(tokens), skip_special_tokens=True)
        cuts = [text.find(s) for s in self.stop_strings if s in text]
        return text[: min(cuts)] if cuts else text

    def finished(self, tokens: Sequence[int]) -> bool:
        """True when ``tokens`` (a response so far) has ended: last token EOS, or a stop string in its text."""
        if not tokens:
            return False
        if tokens[-1] in self.eos_ids:
            return True
        if not self.stop_strings:
            return False
        text = self.tokenizer.decode(list(tokens), skip_special_tokens=True)
        return any(s in text for s in self.stop_strings)


def sample_tokens(
    model: Callable[..., Any],
    cache_key: str,
    prefix_ids: torch.Tensor,
    prefix_mask: torch.Tensor,
    prior: Sequence[Sequence[int]],
    budget: Sequence[int],
    generators: Sequence[torch.Generator | None],
    stop: StopRule,
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    keep_last: dict[str, int] | None = None,
    position_ids: torch.Tensor | None = None,
    prefix_kwargs: dict[str, Any] | None = None,
    banned: torch.Tensor | None = None,
) -> tuple[list[list[int]], list[list[float]]]:
    """Continue N left-padded prefixes ``[N, L]`` token by token with a KV cache.

    ``prior[i]``: the response tokens already in row i's prefix (for stop rules: a row whose
    prior has ended samples nothing); ``budget[i]``: how many tokens row i may still add.
    Returns each row's new tokens and their log-probs under softmax(logits / temperature), the
    scored distribution (top-p only shapes the draw). ``greedy``: argmax, no randomness.
    ``keep_last``: forward kwargs that ask for the last position's logits only (``logits_to_keep``).
    ``position_ids``: the prefix's positions, ``[N, L]`` or ``[C, N, L]`` (a VLM's multimodal
    positions; default: consecutive from each row's first real token); every new token takes the
    last position + 1 in each component. ``prefix_kwargs``: extra inputs of the prefix's forward
    pass only (a VLM's image patches). ``banned``: token ids outside the action set (long
    ``[K]``), never drawn and at probability 0 in the returned log-probs.
    """
    n = prefix_ids.shape[0]
    device = prefix_ids.device
    new_tokens: list[list[int]] = [[] for _ in range(n)]
    new_lps: list[list[float]] = [[] for _ in range(n)]
    active = torch.tensor([budget[i] > 0 and not stop.finished(prior[i]) for i in range(n)], dtype=torch.bool)
    if not bool(active.any()):
        return new_tokens, new_lps
    mask = prefix_mask.long()
    pos = positions(mask) if position_ids is None else position_ids
    keep = keep_last or {}
    out = model(input_ids=prefix_ids, attention_mask=mask, position_ids=pos, use_cache=True, **keep, **(prefix_kwargs or {}))
    last_pos = pos[..., -1:]  # [N, 1] or [C, N, 1]
    for _ in range(max(budget)):
        logits = mask_tokens(out.logits[:, -1].float(), banned)  # [N, V]
        logp = torch.log_softmax(logits / temperature, dim=-1)
        if greedy:
            tok = torch.where(active.to(device), logits.argmax(-1), torch.full_like(logits[:, 0], pad_id, dtype=torch.long)).cpu()
        else:
            tok = draw(nucleus_probs(logits, temperature, top_p), active, generators, pad_id)
        tok_lp = logp.gather(-1, tok.to(device).unsqueeze(-1)).squeeze(-1).cpu()
        for i in active.nonzero().flatten().tolist():
            new_tokens[i].append(int(tok[i]))
            new_lps[i].append(float(tok_lp[i]))
            if len(new_tokens[i]) >= budget[i] or stop.finished([*prior[i], *new_tokens[i]]):
                active[i] = False
        if not bool(active.any()):
            break
        mask = torch.cat([mask, torch.ones(n, 1, dtype=mask.dtype, device=device)], 1)
        last_pos = last_pos + 1
        out = model(
            input_ids=tok.to(device).unsqueeze(-1),
            attention_mask=mask,
            position_ids=last_pos,
            use_cache=True,
            **{cache_key: output_cache(out)},
        )
    return new_tokens, new_lps
