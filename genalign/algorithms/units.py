"""Hyper-parameters whose meaning depends on what a log-prob entry measures.

A policy declares its ``log_prob_unit`` (genalign.policies.base):

- ``"dimension_mean"``: a diffusion step's Gaussian log-density averaged over the latent's D
  dimensions. A ratio exp(Δ) per step is then close to 1 (a joint ratio over D dimensions is
  about exp(D·Δ)), so clip ranges are tiny (DDPO's 1e-4) and a DPO β weights the joint
  log-ratio by β/D (docs/hyperparameter_units.md).
- ``"token"``: the log-probability of one token. PPO/GRPO clip ranges of 0.2 and a sequence
  DPO β of 0.1 are the usual values.

An algorithm config leaves such a field at None to take the default of the policy's unit;
the config check fills it in (the run's saved config.yaml shows the value used).
"""

from __future__ import annotations

from typing import Any

UNITS = ("dimension_mean", "token")


def unit_default(value: Any, unit: str, defaults: dict[str, Any], key: str) -> Any:
    """``value`` unless it is None, else the default for ``unit`` (ValueError for an unknown unit)."""
    if value is not None:
        return value
    if unit not in defaults:
        raise ValueError(f"'{key}': no default for log-prob unit {unit!r}; set it explicitly (units: {', '.join(defaults)})")
    return defaults[unit]
