"""The policy seam. A policy turns conditions into trajectories and scores its own actions.

Protocol only: this module states what a policy must provide (plus one plain check of declared
options, `check_options`); it holds no policy logic. A policy
implements the whole protocol itself (structural typing, no base class to inherit from);
what two policies share lives in plain functions they both call (for the diffusers UNet
policies, :mod:`genalign.policies.unet_tuning`).

Randomness: every sampling method takes ``seeds``, one integer per output row; the policy
builds a CPU ``torch.Generator`` per row from it, so a row's sample depends on its seed and
its condition only, never on the batch it was drawn in, and the same seeds give the same
samples (None: the global RNG). Integers, unlike generator objects, drive any sampling loop
(a UNet chain, a token decoder).

Declared, not inferred: ``capabilities`` names the optional sampling options a policy
honours, and ``log_prob_unit`` what one log-prob entry measures. The config check reads both
from the class before any model loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from genalign.trajectory import Trajectory

Seeds = Sequence[int] | None

#: the optional sampling options of ``rollout`` a policy may declare in ``capabilities``:
#: name -> what it asks for
SAMPLING_OPTIONS = {
    "shared_noise": "the rollouts of one condition start from the same initial state (D3PO's pairs)",
    "noise_window": "noise only at a window of steps, the deterministic kernel elsewhere (MixGRPO)",
    "antithetic": "the rollouts of a condition come in pairs with mirrored step noise",
}

#: what a log-prob entry measures, per unit (hyper-parameters that act on log-ratios, such as
#: a clip range or a DPO β, mean different things in different units)
LOG_PROB_UNITS = {
    "dimension_mean": "a Gaussian step's log-density averaged over the latent's dimensions (diffusion)",
    "token": "the log-probability of one token (an LM's step)",
}


@runtime_checkable
class Policy(Protocol):
    #: optional sampling options this policy honours (keys of SAMPLING_OPTIONS)
    capabilities: frozenset[str]
    #: what one entry of ``log_probs`` measures (a key of LOG_PROB_UNITS)
    log_prob_unit: Literal["dimension_mean", "token"]
    #: how many steps one ``log_prob`` call should score at most in training (None: whole rows
    #: in one call, as an LM scores a sequence in one forward pass)
    step_chunk: int | None

    def rollout(self, conditions: Sequence[Any], n_per_condition: int = 1, seeds: Seeds = None, **options: Any) -> Trajectory:
        """Sample ``len(conditions) * n_per_condition`` rollouts without gradients.

        Rows are ordered condition-major (all samples of condition 0 first), ``group`` holds
        the condition index, and ``conditions`` the condition objects themselves. ``seeds``:
        one per output row. ``options``: only those named in ``capabilities`` (an option the
        policy does not declare raises ValueError naming it):
        ``shared_noise: bool``, ``noise_window: NoiseWindow``, ``antithetic: bool``.
        """
        ...

    def start(self, conditions: Sequence[Any], n_per_condition: int = 1, seeds: Seeds = None) -> Trajectory:
        """A partial trajectory before its first step (``mask`` all False): the initial state
        drawn exactly as ``rollout`` draws it. Step-wise samplers (SVDD) build on it."""
        ...

    def row_generators(self, conditions: Sequence[Any], n_per_condition: int, seeds: Sequence[int]) -> list[torch.Generator]:
        """The per-row generators ``rollout`` builds from ``seeds``. Passed to ``start`` and then to
        ``step`` (n = 1), they continue each row's stream, so the steps reproduce ``rollout``."""
        ...

    def step(self, traj: Trajectory, step: int, n: int = 1, seeds: Any = None) -> Trajectory:
        """Take chain step ``step`` from each row's state with ``n`` candidates per row
        (``B * n`` rows, ``group`` = parent row); ``outputs`` are set after the last step.
        ``seeds``: one per candidate row (or one generator per candidate row, to continue
        a row's own stream: ``start`` then T calls with ``n = 1`` reproduce ``rollout``)."""
        ...

    def log_prob(self, traj: Trajectory, steps: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """log π_θ(action | state) at ``steps`` (``[K]`` or ``[B, K]``) -> ``[B, K]``, with grad,
        in ``log_prob_unit``."""
        ...

    def reference(self) -> AbstractContextManager[None]:
        """Context in which ``log_prob`` / ``rollout`` use the frozen reference model."""
        ...

    def continue_from(self, traj: Trajectory, steps: torch.Tensor, n: int, seeds: Seeds = None) -> Trajectory:
        """Branch ``n`` continuations per row from the state before each row's own step.

        ``steps`` ``[B]`` long: row b branches before its step ``steps[b]``. Returns ``B * n``
        rows: steps before the branch are copied from the parent, ``group`` is the parent row,
        ``extras['branch_step']`` ``[B * n]`` the branch step. ``seeds``: one per output row.
        """
        ...

    def forward_process(self, conditions: Sequence[Any], outputs: Any, seeds: Seeds = None) -> Trajectory:
        """Trajectories that reach given outputs (off-policy data, e.g. SePPO's winners), at every
        step of the chain.

        Diffusion: states and actions of every step drawn from the forward process conditioned
        on the output, q(x_t | x_0) and q(x_t' | x_t, x_0). An LM: the output's own tokens,
        teacher-forced. ``log_probs`` are the behaviour log-probs of that process (0 for a
        teacher-forced text: the data is a point mass). Which steps are trained is the
        algorithm's choice (``Algorithm.train_steps``). ``seeds``: one per row.
        """
        ...

    def predict_final(self, traj: Trajectory, step: int) -> Any:
        """Cheap estimate of the finished output from the state before ``step``
        (diffusion: the decoded Tweedie x̂0; an LM: the greedy completion; ``step == T``: the
        finished output itself)."""
        ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def prepare(self, accelerator: Any) -> list[torch.nn.Module]:
        """Move to the accelerator's device, wrap trainable modules (DDP/FSDP), return them."""
        ...

    def trainable_state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def save_pretrained(self, directory: str) -> None: ...


def check_options(policy_name: str, capabilities: frozenset[str], options: dict[str, Any]) -> None:
    """Raise ValueError naming every sampling option that is set but not declared."""
    unknown = sorted(k for k, v in options.items() if v and k not in capabilities)
    if unknown:
        raise ValueError(
            f"{policy_name} does not support the sampling option(s) {unknown}; it declares {sorted(capabilities) or 'none'}"
        )
