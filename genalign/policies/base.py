"""The policy seam. A policy turns conditions into trajectories and scores its own actions.

Protocol only: this module states what a policy must provide and holds no logic. A policy
implements the whole protocol itself (structural typing, no base class to inherit from);
what two policies share lives in plain functions they both call (for the diffusers UNet
policies, :mod:`genalign.policies.unet_tuning`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

import torch

from genalign.policies.window import NoiseWindow
from genalign.trajectory import Trajectory

Generators = torch.Generator | list[torch.Generator] | None


@runtime_checkable
class Policy(Protocol):
    #: how many steps one ``log_prob`` call should score at most (None: all at once).
    step_chunk: int | None

    def rollout(
        self,
        conditions: Sequence[Any],
        n_per_condition: int = 1,
        generator: Generators = None,
        shared_noise: bool = False,
        noise_window: NoiseWindow | None = None,
    ) -> Trajectory:
        """Sample ``len(conditions) * n_per_condition`` rollouts without gradients.

        Rows are ordered condition-major (all samples of condition 0 first) and ``group``
        holds the condition index. ``generator`` is one generator or one per output row.
        ``shared_noise``: the rows of one condition start from the same initial noise (D3PO's
        pairs); a policy with no initial noise (an LM) treats it as a no-op by definition.
        ``noise_window``: noise only at the window's steps of each condition, the deterministic
        kernel elsewhere; only the window's steps are actions (``mask``). A policy whose kernel
        has no deterministic version raises ValueError.
        A policy may take further sampling keywords (StableDiffusionPolicy: ``antithetic``);
        the trainer passes one only when the config sets it, and the config check names the
        policy types that support it.
        """
        ...

    def start(self, conditions: Sequence[Any], n_per_condition: int = 1, generator: Generators = None) -> Trajectory:
        """A partial trajectory before its first step (``mask`` all False): the initial state
        drawn exactly as ``rollout`` draws it. Step-wise samplers (SVDD) build on it."""
        ...

    def step(self, traj: Trajectory, step: int, n: int = 1, generator: Generators = None) -> Trajectory:
        """Take chain step ``step`` from each row's state with ``n`` candidates per row
        (``B * n`` rows, ``group`` = parent row); ``outputs`` are set after the last step.
        ``start`` then T calls with ``n = 1`` and the rollout's generators equal ``rollout``."""
        ...

    def log_prob(self, traj: Trajectory, steps: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """log π_θ(action | state) at ``steps`` (``[K]`` or ``[B, K]``) -> ``[B, K]``, with grad."""
        ...

    def reference(self) -> AbstractContextManager[None]:
        """Context in which ``log_prob`` / ``rollout`` use the frozen reference model."""
        ...

    def continue_from(self, traj: Trajectory, step: int, n: int, generator: Generators = None) -> Trajectory:
        """Branch ``n`` continuations per row from the state before ``step``.

        Returns full-length trajectories (``B * n`` rows): steps before ``step`` are copied
        from the parent, ``group`` is the parent row index, ``extras['branch_step']`` = step.
        """
        ...

    def forward_process(
        self, conditions: Sequence[Any], outputs: Any, steps: torch.Tensor, generator: Generators = None
    ) -> Trajectory:
        """Trajectories whose actions lead to given outputs (off-policy data, e.g. SePPO's winners).

        ``steps`` ``[B, K]`` picks chain steps per row; states/actions at those steps are drawn
        from the forward process conditioned on the output (diffusion: q(x_t' | x_t, x_0);
        an LM: the output's own tokens, teacher-forced). ``log_probs`` are the behaviour
        log-probs of that process.
        """
        ...

    def predict_final(self, traj: Trajectory, step: int) -> Any:
        """Cheap estimate of the finished output from the state before ``step``
        (``step == T``: the finished output itself)."""
        ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def prepare(self, accelerator: Any) -> list[torch.nn.Module]:
        """Move to the accelerator's device, wrap trainable modules (DDP/FSDP), return them."""
        ...

    def trainable_state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def save_pretrained(self, directory: str) -> None: ...
