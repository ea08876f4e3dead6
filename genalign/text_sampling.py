"""``genalign sample`` for token policies: texts instead of images, scored per response.

Any policy whose ``log_prob_unit`` is ``"token"`` (a causal LM, a VLM) runs here with the
methods

- ``plain``: the policy's own sampler, one response per seed;
- ``best_of_n``: N responses per output, the reward's favourite kept;
- ``self_certainty``: N responses per output, the most self-certain kept (no reward);
- ``borda``: N responses per output, Borda vote over their answers weighted by self-certainty
  rank, the most certain response of the winning answer kept (no reward);
- ``svdd_pm``: SVDD-PM on tokens, M candidates per chunk of ``chunk`` tokens, each valued by
  the reward of its greedy completion.

Output j of a condition uses seed ``seed + j``; a best-of-N style output j draws its N
responses with seeds ``(seed + j) * N + i``. The outputs go to ``samples.jsonl`` (one line per
response: condition key, prompt, gold answer when the condition has one, seed, output, reward
and its components, self-certainty, vote share for ``borda``) and ``summary.json`` (compute).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any

import torch

from genalign.conditions import condition_key, condition_text
from genalign.progress import progress

TOKEN_METHODS = ("plain", "best_of_n", "self_certainty", "borda", "svdd_pm")
TEXT_RULES = ("exact", "numeric", "choice")


def build_text_reward(name: str, conditions: Sequence[Any]) -> Any | None:
    """A named text reward: ``rule_exact`` / ``rule_numeric`` / ``rule_choice`` (the answer between
    <answer> tags against the condition's ``answer``), ``none``, or ``auto`` (``rule_exact`` when
    every condition has an ``answer``, else none)."""
    from rewards.rules import RuleConfig, RuleVerifier

    if name == "auto":
        name = "rule_exact" if all(isinstance(c, dict) and "answer" in c for c in conditions) else "none"
    if name == "none":
        return None
    rule = name.removeprefix("rule_")
    if not name.startswith("rule_") or rule not in TEXT_RULES:
        raise ValueError(f"'reward': unknown text reward {name!r}; choose {', '.join('rule_' + r for r in TEXT_RULES)}, none or auto")
    return RuleVerifier(RuleConfig(rule=rule))


def run_token_sampling(cfg: Any, path: str, conditions: Sequence[Any]) -> int:
    """Sample ``cfg.n`` responses per condition with ``cfg.method``; write samples.jsonl and summary.json."""
    from genalign.evaluation import check_output_dir, load_policy
    from genalign.guidance import ComputeCounter, PMValue, best_of_n, svdd_sample
    from genalign.guidance.self_certainty import (
        borda_vote,
        self_certainty,
        self_certainty_best_of_n,
        tagged_answer,
    )

    if cfg.method not in TOKEN_METHODS:
        raise ValueError(f"'method': {cfg.method!r} does not sample a token policy; choose {', '.join(TOKEN_METHODS)}")
    if cfg.steps is not None or cfg.guidance_scale is not None:
        raise ValueError("'steps' and 'guidance_scale' are image sampler settings; a token policy takes "
                         "policy_options such as max_new_tokens and temperature")
    reward = build_text_reward(cfg.reward, conditions)
    if reward is None and cfg.method in ("best_of_n", "svdd_pm"):
        raise ValueError(f"method {cfg.method!r} needs a reward to guide with; got reward {cfg.reward!r} "
                         f"(self_certainty and borda need none)")
    answer_fn = tagged_answer(cfg.answer_pattern)
    check_output_dir(cfg.out, cfg.overwrite)
    policy = load_policy(path, policy_type=cfg.policy_type, options=cfg.policy_options)
    seeds = [cfg.seed + j for j in range(cfg.n)]
    print(f"{path}: token policy; seeds {seeds[0]}..{seeds[-1]} per condition (output j uses seed + j)")
    counter = ComputeCounter()
    big_n = cfg.candidates
    many = [s * big_n + i for s in seeds for i in range(big_n)]
    rows: list[dict[str, Any]] = []
    for cond in progress(conditions, desc=f"sampling ({cfg.method})"):
        reps = [cond] * cfg.n
        extra: dict[str, torch.Tensor] = {}
        if cfg.method == "plain":
            t0 = time.perf_counter()
            traj = policy.rollout([cond], cfg.n, list(seeds))
            counter.model_evals += traj.batch_size * traj.num_steps
            counter.decoder_calls += traj.batch_size
            counter.wall_seconds += time.perf_counter() - t0
        elif cfg.method == "best_of_n":
            traj, _ = best_of_n(policy, reps, big_n, many, reward, counter)
        elif cfg.method == "self_certainty":
            traj, _ = self_certainty_best_of_n(policy, reps, big_n, many, counter)
        elif cfg.method == "borda":
            traj, extra["vote_share"] = borda_vote(policy, reps, big_n, many, answer_fn, cfg.borda_power, counter)
        else:
            traj = svdd_sample(policy, [cond], cfg.n, seeds, PMValue(policy, reward, counter), big_n, cfg.alpha,
                               counter, chunk=cfg.chunk)
        # reported for every method (not counted as its compute) when the policy gives full distributions
        certainty = self_certainty(policy, traj) if hasattr(policy, "token_logits") else None
        scored = reward(traj.outputs, traj.conditions) if reward is not None else None
        for j in range(cfg.n):
            row: dict[str, Any] = {"key": condition_key(cond), "prompt": condition_text(cond), "seed": seeds[j],
                                   "method": cfg.method, "output": str(traj.outputs[j]), "answer_given": answer_fn(str(traj.outputs[j])),
                                   "self_certainty": float(certainty[j]) if certainty is not None else None}
            if isinstance(cond, dict) and "answer" in cond:
                row["answer"] = cond["answer"]
            row.update({k: float(v[j]) for k, v in extra.items()})
            if scored is not None:
                row["reward"] = float(scored.scores[j])
                row["components"] = {k: float(v[j]) for k, v in scored.components.items()}
                row["details"] = scored.details[j] if scored.details else {}
            rows.append(row)
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "samples.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    summary: dict[str, Any] = {"prompts": len(conditions), "samples": len(rows), "method": cfg.method,
                               "candidates": big_n if cfg.method != "plain" else 1, **counter.as_dict()}
    if certainty is not None:
        summary["self_certainty_mean"] = sum(r["self_certainty"] for r in rows) / len(rows)
    if cfg.method == "svdd_pm":
        summary["chunk"] = cfg.chunk
    if cfg.method == "borda":
        summary["borda_power"] = cfg.borda_power
    if reward is not None:
        summary["reward_mean"] = sum(r["reward"] for r in rows) / len(rows)
    with open(os.path.join(cfg.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary))
    print(f"wrote {len(rows)} samples to {cfg.out}/ (samples.jsonl, summary.json)")
    return 0
