"""Image rewards on clips: score sampled frames with any image reward and aggregate per clip.

A clip batch is a float tensor ``[B, F, 3, H, W]`` in [0, 1] (``F`` frames), or a list of
per-clip lists of PIL images (:func:`clips_to_tensor`). :class:`PerFrameReward` (config type
``per_frame``) picks frames with a *frame sampler*, scores them with one image reward
(the ``inner`` component, its condition repeated per frame) and aggregates the frame scores
of each clip into one score.

Frame samplers are pure functions ``num_frames -> FrameSelection(indices, weights)``; the
weights are normalised (they sum to 1) and are used by the weighted mean:

* :func:`all_frames`: every frame, uniform weights.
* :func:`first_middle_last`: frames ``0``, ``(F - 1) // 2`` (the lower middle: frame 3 of 8)
  and ``F - 1``, uniform weights (repeats dropped when ``F < 3``).
* :func:`every_k`: frames ``0, k, 2k, ...`` below ``F`` (the last frame only when ``k``
  divides ``F - 1``), uniform weights.
* :func:`segmental`: the segmental sampling of InstructVideo (Yuan et al., "InstructVideo:
  Instructing Video Diffusion Models with Human Feedback", CVPR 2024): the clip is split into
  ``S`` contiguous segments, segment ``s`` holding frames ``[floor(s F / S), floor((s+1) F / S))``,
  and one frame is taken per segment (its lower middle frame, or with ``pick="random"`` a
  frame drawn uniformly from the segment by ``random.Random(seed)``, the same frames on every
  call). Following the paper's view that the central frames matter most, segment ``s`` is
  weighted ``w_s ∝ exp(-(s - c)^2 / (2 sigma^2))`` with ``c = (S - 1) / 2`` and ``sigma`` in
  segments, normalised to sum to 1.

Aggregations over the sampled frames of a clip: ``mean`` (the weighted mean
``Σ_i w_i r_i``, the default), ``min`` and ``max`` (the weights do not enter). The inner
reward's components are aggregated the same way. A NaN in any sampled frame's score makes
the clip's score NaN (also under ``min``/``max``), so the trainer's non-finite-reward
handling (``train.on_nonfinite_reward``) drops or stops on that clip instead of a partial
score hiding a broken frame.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from PIL import Image

from genalign.configs import opt, tagged
from rewards.base import RewardModel, RewardOutput, images_to_tensor

#: Reward types that score whole clips, not single images: never an ``inner`` reward.
CLIP_REWARDS: frozenset[str] = frozenset({"per_frame", "motion", "temporal_consistency"})


def clips_to_tensor(outputs: Any) -> torch.Tensor:
    """Accept ``[B, F, 3, H, W]`` floats in [0, 1] or a list of per-clip lists of PIL images;
    return the tensor ``[B, F, 3, H, W]``.

    Raises a clear error for another layout or range instead of guessing.
    """
    if isinstance(outputs, torch.Tensor):
        if outputs.ndim != 5 or outputs.shape[2] != 3:
            hint = " (a batch of images, not clips?)" if outputs.ndim == 4 else ""
            raise ValueError(f"expected clips of shape [B, F, 3, H, W], got {tuple(outputs.shape)}{hint}")
        if not outputs.is_floating_point():
            raise ValueError(f"expected float clips in [0, 1], got dtype {outputs.dtype}")
        if outputs.numel():
            lo, hi = float(outputs.detach().min()), float(outputs.detach().max())
            if lo < -1e-3 or hi > 1 + 1e-3:
                raise ValueError(
                    f"expected clips in [0, 1], got values in [{lo:.3f}, {hi:.3f}] "
                    "(decode [-1, 1] outputs with (x + 1) / 2 first)"
                )
        return outputs
    if isinstance(outputs, Sequence) and not isinstance(outputs, str):
        if outputs and all(isinstance(im, Image.Image) for im in outputs):
            raise TypeError(
                "expected a list of per-clip lists of PIL images, got a flat list of PIL images "
                "(one clip? wrap it: [frames])"
            )
        tensors = []
        for b, clip in enumerate(outputs):
            if isinstance(clip, str) or not isinstance(clip, Sequence) or not clip:
                raise TypeError(f"clip {b}: expected a non-empty list of PIL images, got {type(clip).__name__}")
            if not all(isinstance(im, Image.Image) for im in clip):
                kinds = sorted({type(im).__name__ for im in clip})
                raise TypeError(f"clip {b}: expected PIL images as frames, got {', '.join(kinds)}")
            tensors.append(images_to_tensor(list(clip)))  # [F, 3, H, W]
        if not tensors:
            raise ValueError("expected at least one clip, got an empty list")
        first = tuple(tensors[0].shape)
        for b, t in enumerate(tensors):
            if tuple(t.shape) != first:
                raise ValueError(
                    f"clip {b} has {t.shape[0]} frames of {t.shape[3]}x{t.shape[2]} px, clip 0 "
                    f"{first[0]} frames of {first[3]}x{first[2]} px: clips of a batch must match"
                )
        return torch.stack(tensors)  # [B, F, 3, H, W]
    raise TypeError(
        f"cannot score outputs of type {type(outputs).__name__} as clips; expected a tensor "
        "[B, F, 3, H, W] or a list of per-clip lists of PIL images"
    )


class FrameSelection(NamedTuple):
    """Frames to score: ``indices`` into the clip, ``weights`` (same length, summing to 1)."""

    indices: list[int]
    weights: list[float]


def _uniform(indices: Sequence[int]) -> FrameSelection:
    unique = list(dict.fromkeys(indices))  # keeps order, drops repeats (short clips)
    return FrameSelection(unique, [1.0 / len(unique)] * len(unique))


def _check_frames(num_frames: int) -> None:
    if num_frames < 1:
        raise ValueError(f"a clip needs at least one frame, got {num_frames}")


def all_frames(num_frames: int) -> FrameSelection:
    """Every frame, uniform weights ``1 / F``."""
    _check_frames(num_frames)
    return _uniform(range(num_frames))


def first_middle_last(num_frames: int) -> FrameSelection:
    """Frames ``0``, ``(F - 1) // 2`` (the lower middle for even ``F``) and ``F - 1``, weights 1/3."""
    _check_frames(num_frames)
    return _uniform([0, (num_frames - 1) // 2, num_frames - 1])


def every_k(num_frames: int, k: int) -> FrameSelection:
    """Frames ``0, k, 2k, ...`` below ``F``, uniform weights."""
    _check_frames(num_frames)
    if k < 1:
        raise ValueError(f"every_k needs k >= 1, got {k}")
    return _uniform(range(0, num_frames, k))


def segment_bounds(num_frames: int, segments: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each of ``segments`` contiguous, near-equal segments of ``F`` frames."""
    _check_frames(num_frames)
    if not 1 <= segments <= num_frames:
        raise ValueError(f"segmental sampling needs 1 <= segments <= frames, got {segments} segments of a "
                         f"{num_frames}-frame clip")
    return [(s * num_frames // segments, (s + 1) * num_frames // segments) for s in range(segments)]


def centre_weights(segments: int, sigma: float) -> list[float]:
    """``w_s ∝ exp(-(s - c)^2 / (2 sigma^2))``, ``c = (S - 1) / 2``, normalised to sum to 1."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    centre = (segments - 1) / 2
    raw = [math.exp(-((s - centre) ** 2) / (2 * sigma**2)) for s in range(segments)]
    total = sum(raw)
    return [w / total for w in raw]


def segmental(num_frames: int, segments: int, sigma: float = 1.0, pick: str = "middle",
              seed: int = 0) -> FrameSelection:
    """InstructVideo's segmental sampling: one frame per segment, centre-peaked weights.

    ``pick="middle"`` takes frame ``start + (end - start - 1) // 2`` of each segment (for
    8 frames in 4 segments: 0, 2, 4, 6); ``pick="random"`` draws one frame per segment with
    ``random.Random(seed)`` (the same frames for the same seed).
    """
    bounds = segment_bounds(num_frames, segments)
    if pick == "middle":
        indices = [a + (b - a - 1) // 2 for a, b in bounds]
    elif pick == "random":
        rng = random.Random(seed)
        indices = [rng.randrange(a, b) for a, b in bounds]
    else:
        raise ValueError(f"pick must be 'middle' or 'random', got {pick!r}")
    return FrameSelection(indices, centre_weights(segments, sigma))


def aggregate(scores: torch.Tensor, weights: torch.Tensor, how: str) -> torch.Tensor:
    """Frame scores ``[B, K]`` and weights ``[K]`` -> clip scores ``[B]``; NaN in a row gives NaN."""
    scores = scores.float()
    # NaN propagates through all three: a NaN times any weight is NaN, and amin / amax return NaN
    if how == "mean":
        return (scores * weights.to(scores.device, scores.dtype)).sum(1)
    if how == "min":
        return scores.amin(1)
    if how == "max":
        return scores.amax(1)
    raise ValueError(f"aggregate must be 'mean', 'min' or 'max', got {how!r}")


class _ImageRewardConfigs(Mapping):
    """The reward registry's config classes minus the clip rewards, read when first used
    (the registry imports this module)."""

    def _choices(self) -> dict[str, type]:
        from rewards.registry import REWARDS

        return {k: v[0] for k, v in REWARDS.items() if k not in CLIP_REWARDS}

    def __getitem__(self, key: str) -> type:
        return self._choices()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._choices())

    def __len__(self) -> int:
        return len(self._choices())


@dataclass
class PerFrameConfig:
    type: Literal["per_frame"] = opt("per_frame", "an image reward applied to sampled frames of each clip, aggregated per clip")
    weight: float = opt(1.0, "weight (> 0) of this component in the summed reward (the inner reward's own weight must stay 1)", gt=0)
    inner: Any = tagged(_ImageRewardConfigs(), "type", help="the image reward scored on each sampled frame, e.g. {type: shapes_verifier}")
    frames: Literal["all", "first_middle_last", "every_k", "segmental"] = opt(
        "all", "frame sampler: every frame, frames 0 / (F-1)//2 / F-1, every k-th from frame 0, or InstructVideo's segments"
    )
    k: int = opt(2, "frames: every_k: the step between scored frames")
    segments: int = opt(4, "frames: segmental: number of segments, one frame scored per segment (at most the clip's frames)")
    sigma: float = opt(1.0, "frames: segmental: width of the Gaussian centre weighting, in segments (large: near-uniform)")
    pick: Literal["middle", "random"] = opt("middle", "frames: segmental: each segment's lower middle frame, or a frame drawn with `seed`")
    seed: int = opt(0, "frames: segmental with pick random: seed of the frame draw (the same frames on every call)")
    aggregate: Literal["mean", "min", "max"] = opt("mean", "per clip: weighted mean of the frame scores, or their min / max (a NaN frame gives NaN)")
    condition_field: str = opt("", "for dict conditions: the entry handed to the inner reward per frame (e.g. prompt); empty: the whole condition")

    def validate(self) -> None:
        if self.inner is None:
            raise ValueError("'inner' is missing: give the image reward to score frames with, e.g. inner: {type: jpeg_compressibility}")
        if self.inner.weight != 1.0:
            raise ValueError(f"'inner.weight' is {self.inner.weight}: weight the per_frame component instead (its 'weight')")
        if self.k < 1:
            raise ValueError(f"'k' must be >= 1, got {self.k}")
        if self.segments < 1:
            raise ValueError(f"'segments' must be >= 1, got {self.segments}")
        if self.sigma <= 0:
            raise ValueError(f"'sigma' must be > 0, got {self.sigma}")

    def select(self, num_frames: int) -> FrameSelection:
        """The frames of an ``F``-frame clip this config scores."""
        if self.frames == "all":
            return all_frames(num_frames)
        if self.frames == "first_middle_last":
            return first_middle_last(num_frames)
        if self.frames == "every_k":
            return every_k(num_frames, self.k)
        return segmental(num_frames, self.segments, self.sigma, self.pick, self.seed)


class PerFrameReward:
    """Any image reward on clips: sampled frames scored by the inner reward, aggregated per clip.

    ``scores`` ``[B]``; ``components`` are the inner reward's components aggregated the same
    way; ``details[b]`` holds the scored frame indices, their weights, the frame scores and
    (when the inner reward gives them) its per-frame details.
    """

    def __init__(self, config: PerFrameConfig, inner: RewardModel):
        self.config, self.inner = config, inner
        self.name = f"per_frame_{inner.name}"
        self.differentiable = inner.differentiable  # indexing and the weighted mean keep gradients

    def _frame_condition(self, condition: Any) -> Any:
        field = self.config.condition_field
        if not field:
            return condition
        if not isinstance(condition, Mapping) or field not in condition:
            keys = sorted(condition) if isinstance(condition, Mapping) else type(condition).__name__
            raise KeyError(f"per_frame 'condition_field' is {field!r}, but a condition has no such entry: {keys}")
        return condition[field]

    def __call__(self, outputs: Any, conditions: Sequence[Any]) -> RewardOutput:
        clips = clips_to_tensor(outputs)  # [B, F, 3, H, W]
        b, f = clips.shape[:2]
        if len(conditions) != b:
            raise ValueError(f"got {b} clips but {len(conditions)} conditions")
        indices, weights = self.config.select(f)
        k = len(indices)
        frames = clips[:, indices].flatten(0, 1)  # [B*K, 3, H, W], clip-major
        frame_conditions = [self._frame_condition(c) for c in conditions for _ in range(k)]  # [B*K]
        out = self.inner(frames, frame_conditions)
        w = torch.tensor(weights, dtype=torch.float32)  # [K]
        frame_scores = out.scores.float().reshape(b, k)  # [B, K]
        scores = aggregate(frame_scores, w, self.config.aggregate)  # [B]
        components = {
            name: aggregate(value.detach().float().reshape(b, k), w, self.config.aggregate)
            for name, value in out.components.items()
        }
        details = []
        for i in range(b):
            row: dict[str, Any] = {"frames": list(indices), "weights": list(weights),
                                   "frame_scores": frame_scores[i].detach().cpu().tolist()}
            if out.details is not None:
                row["inner"] = out.details[i * k : (i + 1) * k]
            details.append(row)
        return RewardOutput(scores=scores, components=components, details=details)
