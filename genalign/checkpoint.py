"""Resumable checkpoints, written so that a crash mid-write never replaces a good one.

Layout of ``<run>/checkpoints/epoch_00003/``:
    trainable.safetensors   trainable policy parameters
    optimizer.pt            optimizer state (tensors and numbers; loaded with weights_only=True)
    rng.safetensors         torch's global RNG state (CPU, and every CUDA device when present)
    <name>.safetensors      optional named tensor sets (e.g. ``snapshots``: an algorithm's weight pool)
    state.json              epoch, counters, wall time, algorithm state, python/numpy RNG
``<run>/checkpoints/latest`` names the newest complete checkpoint. A checkpoint is built
in a hidden temp folder, then renamed into place, then ``latest`` is replaced atomically.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from genalign.runfiles import write_text

LATEST = "latest"


def write_checkpoint(
    root: str,
    epoch: int,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    keep: int = 2,
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    files: list[str] | None = None,
) -> str:
    """Write ``<root>/epoch_<epoch>`` atomically and point ``latest`` at it; keep the newest ``keep``.

    ``tensors`` maps a name to a tensor set saved as ``<name>.safetensors`` (read back with
    :func:`read_tensors`). The global RNG states (torch, CUDA, numpy, python) are saved too.
    ``optimizer`` None: its state is in ``files`` (already written, e.g. one shard per DeepSpeed
    process), which are moved into the checkpoint before it becomes visible.
    """
    os.makedirs(root, exist_ok=True)
    name = f"epoch_{epoch:05d}"
    final = os.path.join(root, name)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root)
    try:
        save_file({k: v.contiguous() for k, v in trainable.items()}, os.path.join(tmp, "trainable.safetensors"))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        for path in files or []:
            os.replace(path, os.path.join(tmp, os.path.basename(path)))
        for set_name, values in (tensors or {}).items():
            save_file({k: v.detach().cpu().contiguous() for k, v in values.items()}, os.path.join(tmp, f"{set_name}.safetensors"))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, os.path.join(tmp, "rng.safetensors"))
        np_state = np.random.get_state()
        full_state = {
            **state,
            "epoch": epoch,
            "python_rng": _tuples_to_lists(random.getstate()),
            "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        }
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(full_state, f)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text(os.path.join(root, LATEST), name)
    _prune(root, keep, protect=name)
    return final


def latest_checkpoint(root: str) -> str | None:
    """The newest complete checkpoint under ``root`` (None: there is none).

    ``latest`` names it; when that pointer is missing or names a checkpoint that is gone or
    incomplete, the newest ``epoch_*`` folder with its ``state.json`` (written last) is used.
    """
    pointer = os.path.join(root, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            path = os.path.join(root, f.read().strip())
        if _complete(path):
            return path
    if not os.path.isdir(root):
        return None
    names = sorted((n for n in os.listdir(root) if n.startswith("epoch_")), reverse=True)
    return next((os.path.join(root, n) for n in names if _complete(os.path.join(root, n))), None)


def _complete(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, name)) for name in ("state.json", "trainable.safetensors", "rng.safetensors"))


def read_checkpoint(path: str, optimizer: torch.optim.Optimizer | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restore optimizer (unless None: the caller loads it) and RNG state; return (trainable
    params, state dict)."""
    trainable = load_file(os.path.join(path, "trainable.safetensors"))
    if optimizer is not None:
        single = os.path.join(path, "optimizer.pt")
        if not os.path.isfile(single) and any(n.startswith("optimizer.rank") for n in os.listdir(path)):
            raise ValueError(f"{path} was written by a DeepSpeed run (one optimizer file per process); resume it with "
                             f"the same DeepSpeed launch")
        optimizer.load_state_dict(torch.load(single, weights_only=True, map_location="cpu"))
    rng = load_file(os.path.join(path, "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    cuda = [rng[f"cuda/{i}"] for i in range(len(rng) - 1) if f"cuda/{i}" in rng]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    random.setstate(_lists_to_tuples(state["python_rng"]))
    kind, keys, *rest = state["numpy_rng"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    return trainable, state


def read_tensors(path: str, name: str) -> dict[str, torch.Tensor]:
    """A tensor set written with ``write_checkpoint(..., tensors={name: ...})``."""
    file = os.path.join(path, f"{name}.safetensors")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"checkpoint {path} has no {name}.safetensors")
    return load_file(file)


def _prune(root: str, keep: int, protect: str) -> None:
    names = sorted(n for n in os.listdir(root) if n.startswith("epoch_"))
    for name in names[: max(0, len(names) - keep)]:
        if name != protect:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _tuples_to_lists(x: Any) -> Any:
    return [_tuples_to_lists(v) for v in x] if isinstance(x, (list, tuple)) else x


def _lists_to_tuples(x: Any) -> Any:
    return tuple(_lists_to_tuples(v) for v in x) if isinstance(x, list) else x
