"""DeepSpeed ZeRO stages 2 and 3 under the trainer's update contract.

The trainer's optimiser step follows ∇(Σ total) / (Σ normaliser) over an accumulation window
(every minibatch, step chunk and process; :mod:`genalign.optimise`). Under DDP it scales the
accumulated ``.grad`` once before stepping. DeepSpeed keeps the gradients in its own
(partitioned) buffers and steps inside ``backward``, so under DeepSpeed the trainer counts the
window's normaliser first (a pass of the algorithm's loss with zero log-probs: a normaliser is
a count of active entries or pairs, never a function of the log-probs) and scales every loss by
``processes / N_global`` before its backward pass; DeepSpeed's mean over processes then gives
the same update. The window's last backward is marked as the accumulation boundary, where the
engine clips (``train.max_grad_norm``) and steps.

What this module adds:

- :func:`wants_deepspeed` / :func:`accelerator_kwargs`: ``accelerate launch`` with a DeepSpeed
  config on machines without CUDA picks no process-group backend (every process would believe
  it is alone); naming gloo fixes that, so the same configs run on CPUs (the test suite does).
- :func:`configure`: the DeepSpeed config keys the trainer owns (micro-batch, accumulation 1,
  clipping), filled in from the run's ``train`` section before the engine is built.
- :func:`keep_models_whole`: models load whole (transformers would shard every model it loads
  under ZeRO-3); the engine shards the trained one.
- :class:`JointPreparer`: policies prepare their module with ``accelerator.prepare_model``;
  DeepSpeed must build model and optimiser together, which this stand-in does.
- :func:`full_weights`: under ZeRO-3 every process holds a shard of each weight; reading or
  writing whole weights (checkpoints, LoRA save, reference snapshots) gathers them.
- :func:`save_optimizer` / :func:`load_optimizer`: each process's optimiser shard, one file per
  process, loaded with ``torch.load(weights_only=True)`` and an explicit allow-list of the three
  DeepSpeed classes its state holds.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

ENV_FLAG = "ACCELERATE_USE_DEEPSPEED"


def wants_deepspeed() -> bool:
    """Whether ``accelerate launch`` was given a DeepSpeed config."""
    return os.environ.get(ENV_FLAG, "false").lower() == "true"


def accelerator_kwargs() -> dict[str, Any]:
    """Extra ``Accelerator`` arguments for DeepSpeed on machines without CUDA: the gloo backend
    (accelerate finds no backend for DeepSpeed on CPUs and would run every process alone)."""
    if not wants_deepspeed() or torch.cuda.is_available():
        return {}
    from accelerate.utils import InitProcessGroupKwargs

    return {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}


def zero_stage(accelerator: Any) -> int:
    """The ZeRO stage of a DeepSpeed accelerator (0 when not DeepSpeed)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage) if plugin is not None else 0


def configure(accelerator: Any, train_batch_size: int, max_grad_norm: float) -> None:
    """Set the DeepSpeed config keys the trainer owns, whatever the launch config says:
    ``train_micro_batch_size_per_gpu`` = ``train.train_batch_size``, ``gradient_accumulation_steps``
    = 1 (the trainer marks each window's end itself, so ``train.gradient_accumulation_steps``
    and step chunks keep their meaning), ``train_batch_size`` to match, and
    ``gradient_clipping`` = ``train.max_grad_norm`` (0: none)."""
    stage = zero_stage(accelerator)
    if stage not in (2, 3):
        raise ValueError(f"DeepSpeed runs with ZeRO stage 2 or 3 (configs/accelerate/zero2.yaml, zero3.yaml), got stage {stage}")
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = train_batch_size
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = train_batch_size * accelerator.num_processes
    ds["gradient_clipping"] = float(max_grad_norm)


def keep_models_whole() -> None:
    """Under ZeRO-3, accelerate registers its DeepSpeed config with transformers, whose
    ``from_pretrained`` then loads every model straight into shards (``zero.Init``), frozen ones
    too (a text encoder, a reward model), which nothing would gather. The trainer loads models
    whole instead; the engine shards the trained module when it is built."""
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


class JointPreparer:
    """What a policy's ``prepare`` sees under DeepSpeed: the accelerator, except that
    ``prepare_model`` builds the engine from the module *and* the optimiser (DeepSpeed owns both);
    the prepared optimiser is then :attr:`optimizer`. One trainable module per run."""

    def __init__(self, accelerator: Any, optimizer: torch.optim.Optimizer):
        self._acc = accelerator
        self._optimizer = optimizer
        self.optimizer: Any = None

    def prepare_model(self, model: torch.nn.Module) -> Any:
        if self.optimizer is not None:
            raise ValueError("DeepSpeed trains one module per run; this policy prepares several")
        engine, self.optimizer = self._acc.prepare(model, self._optimizer)
        return engine

    def __getattr__(self, name: str) -> Any:  # device, is_main_process, ...
        return getattr(self._acc, name)


@contextlib.contextmanager
def full_weights(params: list[torch.nn.Parameter], stage: int, modify: bool = False) -> Iterator[None]:
    """Whole weights inside the block. ZeRO-3: gather ``params`` on every process (a collective:
    every process enters); ``modify`` keeps what the main process writes into them (every process
    must write the same). Other stages hold whole weights already."""
    if stage != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        yield


def local_values(params: list[torch.nn.Parameter], stage: int) -> list[torch.Tensor]:
    """The values this process holds: the whole weights, or under ZeRO-3 its shards."""
    if stage == 3:
        return [p.ds_tensor for p in params if hasattr(p, "ds_tensor")]
    return list(params)


def optimizer_file(rank: int) -> str:
    return f"optimizer.rank{rank:03d}.pt"


def save_optimizer(optimizer: Any, directory: str, rank: int) -> str:
    """This process's optimiser shard as ``<directory>/optimizer.rankNNN.pt``."""
    path = os.path.join(directory, optimizer_file(rank))
    torch.save(optimizer.state_dict(), path)
    return path


def _safe_globals() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_optimizer(optimizer: Any, directory: str, rank: int, num_processes: int) -> None:
    """Load this process's shard from a checkpoint written by :func:`save_optimizer` with the same
    number of processes (a ZeRO shard belongs to one process)."""
    written = sorted(n for n in os.listdir(directory) if n.startswith("optimizer.rank") and n.endswith(".pt"))
    if len(written) != num_processes:
        where = f"{len(written)} DeepSpeed processes" if written else "a run without DeepSpeed (optimizer.pt)"
        raise ValueError(f"{directory} was written by {where}; resume it with the same launch ({num_processes} "
                         f"DeepSpeed process(es) now)")
    with torch.serialization.safe_globals(_safe_globals()):
        state = torch.load(os.path.join(directory, optimizer_file(rank)), weights_only=True, map_location="cpu")
    # DeepSpeed reads the entry of this process's data-parallel rank
    optimizer.load_state_dict([state] * num_processes)
