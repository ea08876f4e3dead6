"""Video rewards for Moving Shapes: a motion verifier and a temporal-consistency score.

Clips are ``[B, F, 3, H, W]`` floats in ``[0, 1]`` (or a list of per-clip lists of PIL images).

**motion** scores a clip against its condition (a Moving Shapes condition dict with
``objects``, or a prompt string / dict with a ``prompt`` that
:func:`genalign.toyworld.moving.parse_moving_prompt` reads). Per frame, every pixel takes the
nearest colour of the Shapes World palette or of the dark background (Euclidean RGB distance,
0-255 scale); a pixel counts for a colour when that colour is nearest and lies within
``color_tolerance`` (so antialiased edge pixels, half object and half background, are left
out instead of being read as a third colour). An object is *present* when its colour covers at
least ``min_pixels`` (a fraction of the frame) in every frame; its track is the centroid of its
colour's pixels per frame, and its net displacement is the least-squares slope of the track
times ``F - 1`` (normalised coordinates, ``x`` right, ``y`` down). The detected direction is
``still`` when both components are below ``still_threshold``, else the sign of the larger
component (``up`` is negative ``y``). The objects of a prompt have distinct colours, so
colour alone identifies each; shape is not checked.

Scores: ``strict`` 1 when every object is present and moves the named way, else 0;
``partial`` the fraction of objects that are; ``progress`` a dense score in ``[-1, 1]``, the
mean over objects of how far each went the named way, in units of the full path
(``speed · (F - 1)``: the condition's speed, else the world's
:func:`~genalign.toyworld.moving.default_speed` for the clip's ``F``): for a moving object its
displacement along the named direction over the full path, clipped to ``[-1, 1]``; for a still
object ``1 - 2·|d|/path`` clipped the same way (1 in place, -1 at a full path's move in any
direction); an absent object scores -1. Sign errors and
near-misses thus get graded credit where ``strict`` and ``partial`` give 0. Components:
``strict``, ``partial``, ``progress`` and ``present`` (fraction of objects present); details
list each object's detected direction and displacement.

**temporal_consistency**: ``1 - mean_t mean|x_{t+1} - x_t|``, the mean absolute pixel
difference of consecutive frames (all pixels and channels) subtracted from 1: in ``[0, 1]``,
1 for a static clip, 0 for a clip that flips every pixel between 0 and 1 every frame. It
rewards any stillness, including a prompt's wanted motion, so it is meant as a small-weight
regulariser next to ``motion``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from genalign.conditions import condition_text
from genalign.configs import opt
from genalign.toyworld.moving import DIRECTIONS, default_speed, parse_moving_prompt
from genalign.toyworld.render import BACKGROUND
from genalign.toyworld.spec import COLORS
from rewards.base import RewardOutput
from rewards.video import clips_to_tensor

_COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
# Palette rows: the six colours, then the background (last row).
_PALETTE = torch.tensor([*COLORS.values(), BACKGROUND], dtype=torch.float32)


# Unit vectors of the moving directions (x right, y down).
_UNIT: dict[str, tuple[float, float]] = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}


def _wanted(condition: Any, frames: int) -> list[tuple[str, str, str, float]]:
    """``(colour, shape, direction, speed)`` per object of a condition (speed: the condition's,
    else the world's default for ``frames`` frames; it sets the ``progress`` score's unit)."""
    fallback = default_speed(frames)
    if isinstance(condition, dict) and "objects" in condition:
        wanted = [(o["color"], o["shape"], o["direction"], float(o.get("speed") or fallback)) for o in condition["objects"]]
        for color, _, direction, _ in wanted:
            if color not in COLORS or direction not in DIRECTIONS:
                raise ValueError(f"condition object ({color!r}, {direction!r}) is not a Moving Shapes colour and "
                                 f"direction; colours: {', '.join(COLORS)}; directions: {', '.join(DIRECTIONS)}")
        return wanted
    return [(o.color, o.shape, o.direction, fallback) for o in parse_moving_prompt(condition_text(condition)).objects]


def segment(clip: torch.Tensor, color_tolerance: float) -> torch.Tensor:
    """``[F, 3, H, W]`` in [0, 1] -> ``[F, H, W]`` colour index into COLORS, -1 for background
    or a pixel farther than ``color_tolerance`` (0-255 RGB distance) from its nearest colour."""
    f, _, h, w = clip.shape
    pixels = clip.permute(0, 2, 3, 1).reshape(-1, 3) * 255.0  # [F*H*W, 3]
    palette = _PALETTE.to(pixels.device)
    # squared distances |p|^2 - 2 p.c + |c|^2 as one matmul: [F*H*W, 7]
    dist2 = (pixels * pixels).sum(dim=1, keepdim=True) - 2.0 * pixels @ palette.T + (palette * palette).sum(dim=1)
    best, idx = dist2.min(dim=1)
    idx[(idx == len(_COLOR_NAMES)) | (best > color_tolerance**2)] = -1
    return idx.view(f, h, w)


def progress(displacement: tuple[float, float] | None, direction: str, path: float) -> float:
    """Dense credit in ``[-1, 1]`` for an object asked to move ``direction`` along a full path of
    ``path`` image widths (see the module docstring); -1 when the object is absent (None)."""
    if displacement is None:
        return -1.0
    dx, dy = displacement
    if direction == "still":
        value = 1.0 - 2.0 * (dx * dx + dy * dy) ** 0.5 / path
    else:
        ux, uy = _UNIT[direction]
        value = (dx * ux + dy * uy) / path
    return min(1.0, max(-1.0, value))


def detect_direction(displacement: tuple[float, float], still_threshold: float) -> str:
    """The direction of a net displacement ``(dx, dy)`` (normalised, y down)."""
    dx, dy = displacement
    if max(abs(dx), abs(dy)) < still_threshold:
        return "still"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def track_color(labels: torch.Tensor, color: str, min_pixels: float) -> torch.Tensor | None:
    """Centroid ``[F, 2]`` (x, y normalised) of ``color``'s pixels per frame, or None when some
    frame has fewer than ``min_pixels`` (a fraction of the frame) of it."""
    f, h, w = labels.shape
    mask = (labels == _COLOR_NAMES.index(color)).float()  # [F, H, W]
    counts = mask.sum(dim=(1, 2))
    if bool((counts < min_pixels * h * w).any()) or bool((counts == 0).any()):
        return None
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    cx = (mask * xs[None, None, :]).sum(dim=(1, 2)) / counts
    cy = (mask * ys[None, :, None]).sum(dim=(1, 2)) / counts
    return torch.stack([cx, cy], dim=1)


def net_displacement(track: torch.Tensor) -> tuple[float, float]:
    """Least-squares slope of a ``[F, 2]`` track times ``F - 1``: the fitted start-to-end move."""
    f = track.shape[0]
    t = torch.arange(f, dtype=torch.float32)
    t = t - t.mean()
    slope = (t[:, None] * (track - track.mean(dim=0))).sum(dim=0) / (t * t).sum()
    dx, dy = (slope * (f - 1)).tolist()
    return dx, dy


@dataclass
class MotionConfig:
    type: Literal["motion"] = opt("motion", "Moving Shapes motion verifier: object directions from colour-tracked centroids")
    weight: float = opt(1.0, "weight (> 0) of this component in the summed reward; every reward is maximised", gt=0)
    score: Literal["strict", "partial", "progress"] = opt(
        "strict", "strict 0/1 (every object right), partial (fraction of objects right) or progress (dense, in [-1, 1]: "
        "distance moved the named way over the full path, -1 for an absent object)"
    )
    still_threshold: float = opt(0.05, "net displacement (image widths) below which an object counts as still")
    color_tolerance: float = opt(80.0, "max RGB distance (0-255) of a pixel to its nearest palette colour to count for it")
    min_pixels: float = opt(0.004, "fraction of a frame an object's colour must cover, in every frame, to be present")

    def validate(self) -> None:
        for key in ("still_threshold", "color_tolerance", "min_pixels"):
            if getattr(self, key) <= 0:
                raise ValueError(f"'{key}' must be > 0, got {getattr(self, key)}")


class MotionReward:
    differentiable = False
    name = "motion"

    def __init__(self, config: MotionConfig | None = None):
        self.config = config or MotionConfig()
        self.config.validate()

    def check(self, clip: torch.Tensor, condition: Any) -> dict[str, Any]:
        """Per-object verdicts of one ``[F, 3, H, W]`` clip."""
        return self._verdicts(segment(clip, self.config.color_tolerance), condition)

    def _verdicts(self, labels: torch.Tensor, condition: Any) -> dict[str, Any]:
        c = self.config
        objects = []
        path_frames = labels.shape[0] - 1
        for color, shape, direction, speed in _wanted(condition, labels.shape[0]):
            track = track_color(labels, color, c.min_pixels)
            disp = net_displacement(track) if track is not None else None
            got = detect_direction(disp, c.still_threshold) if disp is not None else None
            objects.append({"color": color, "shape": shape, "direction": direction, "detected": got,
                            "displacement": disp, "correct": got == direction,
                            "progress": progress(disp, direction, speed * path_frames)})
        return {"objects": objects}

    def __call__(self, outputs: Any, conditions: Sequence[Any]) -> RewardOutput:
        clips = clips_to_tensor(outputs).detach().float().cpu()
        if len(conditions) != clips.shape[0]:
            raise ValueError(f"{clips.shape[0]} clips but {len(conditions)} conditions")
        b, f, _, h, w = clips.shape
        labels = segment(clips.reshape(b * f, 3, h, w), self.config.color_tolerance).view(b, f, h, w)
        details = [self._verdicts(lab, cond) for lab, cond in zip(labels, conditions)]
        strict = torch.tensor([float(all(o["correct"] for o in d["objects"])) for d in details])
        partial = torch.tensor([sum(o["correct"] for o in d["objects"]) / len(d["objects"]) for d in details])
        present = torch.tensor([sum(o["detected"] is not None for o in d["objects"]) / len(d["objects"]) for d in details])
        dense = torch.tensor([sum(o["progress"] for o in d["objects"]) / len(d["objects"]) for d in details])
        scores = {"strict": strict, "partial": partial, "progress": dense}[self.config.score]
        return RewardOutput(scores.float(), {"strict": strict.float(), "partial": partial.float(),
                                             "progress": dense.float(), "present": present.float()}, details)


@dataclass
class TemporalConsistencyConfig:
    type: Literal["temporal_consistency"] = opt(
        "temporal_consistency", "temporal consistency of a clip: 1 - mean absolute change between consecutive frames"
    )
    weight: float = opt(1.0, "weight (> 0) of this component in the summed reward; every reward is maximised", gt=0)


class TemporalConsistency:
    differentiable = False
    name = "temporal_consistency"

    def __init__(self, config: TemporalConsistencyConfig | None = None):
        self.config = config or TemporalConsistencyConfig()

    def __call__(self, outputs: Any, conditions: Sequence[Any]) -> RewardOutput:
        clips = clips_to_tensor(outputs).detach().float()  # [B, F, 3, H, W]
        if clips.shape[1] < 2:
            raise ValueError(f"temporal consistency needs clips of at least 2 frames, got {clips.shape[1]}")
        change = (clips[:, 1:] - clips[:, :-1]).abs().mean(dim=(2, 3, 4))  # [B, F-1]
        scores = (1.0 - change.mean(dim=1)).clamp(0.0, 1.0)
        return RewardOutput(scores.float(), {"max_change": change.max(dim=1).values.float()})
