"""Shapes World verifier: a tiny grid detector whose detections are judged by the world's
own :func:`genalign.toyworld.check_scene`.

The detector (YOLO-v1 style, one object per cell; see :class:`ShapesGridDetector` for
its colour-blind geometry branch and shape-blind colour branch) sees the image at
32x32 (larger inputs are resized with antialiasing) and predicts, for each cell of an
8x8 grid,

    objectness (1) | shape logits (3 + "other") | colour logits (6) | size logits (2) | centre offset (2)

The extra shape class ``"other"`` is trained on elongated ellipses, two-lump smudges,
bars and crescents, the kind of smudge a poorly trained generator draws; an "other" detection matches no
clause, so it fails the prompt as an extra object instead of passing for a shape.
Cells whose objectness, summed over a 2x2 block of cells, clears ``threshold`` become
objects centred at ``(cell + sigmoid(offset)) / grid`` (see :func:`decode_detections`);
of two detections closer than ``nms_distance`` the weaker is dropped. The reward is the strict (0/1) or partial verdict of
``check_scene(parse_prompt(prompt), detections)``.

Weights: ``model.safetensors`` plus ``config.json`` in one folder, made by
``genalign toyworld pretrain verifier --out DIR``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from genalign.toyworld import COLORS, SHAPES, SIZES, SceneSpec, check_scene, parse_prompt

from .base import RewardOutput, images_to_tensor

OTHER_SHAPE = "other"  # shape class of a detected object that is no circle, square or triangle
SHAPE_CLASSES: tuple[str, ...] = (*SHAPES, OTHER_SHAPE)
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Channel layout of the detector head, in order.
HEAD_CHANNELS: dict[str, int] = {
    "objectness": 1,
    "shape": len(SHAPE_CLASSES),
    "color": len(COLORS),
    "size": len(SIZES),
    "offset": 2,
}


@dataclass(frozen=True)
class DetectedObject:
    """One detection in normalised coordinates (x right, y down, in [0, 1]); ``shape`` is
    one of :data:`SHAPE_CLASSES` (``"other"`` for a blob that is no known shape)."""

    shape: str
    color: str
    size: str
    x: float
    y: float
    score: float


def _conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class ShapesGridDetector(nn.Module):
    """Two-branch grid detector: ``[B, 3, S, S]`` -> ``[B, 15, G, G]`` head logits.

    The branches are factorised so that a colour x shape pair never seen in training
    is read as well as seen ones:

    * geometry (objectness, shape, size, offset) sees only the colour-blind intensity
      ``max(R, G, B)``: pixel-unshuffle to S/2, two 3x3 convs of ``channels[0]``,
      max-pool to S/4, three 3x3 convs of ``channels[1]``, a 1x1 head;
    * colour sees only single pixels: a per-pixel MLP (1x1 convs, ``color_hidden``
      wide) gives colour probabilities and a foreground weight; a cell's colour is the
      weighted mean over its 4x4 pixels (returned as log-probabilities).

    ``grid`` must be ``input_size / 4``; inputs of another size are resized to
    ``input_size``.
    """

    def __init__(self, channels: Sequence[int] = (32, 64), color_hidden: int = 16, input_size: int = 32,
                 grid: int = 8) -> None:
        super().__init__()
        if input_size != 4 * grid:
            raise ValueError(f"input_size must be 4 * grid, got input_size={input_size}, grid={grid}")
        c0, c1 = channels
        self.input_size, self.grid, self.channels, self.color_hidden = input_size, grid, tuple(channels), color_hidden
        self.geometry = nn.Sequential(
            nn.PixelUnshuffle(2),  # [B, 4, S/2, S/2]
            _conv(4, c0),
            _conv(c0, c0),
            nn.MaxPool2d(2),  # [B, c0, G, G]
            _conv(c0, c1),
            _conv(c1, c1),
            _conv(c1, c1),
            nn.Conv2d(c1, sum(HEAD_CHANNELS.values()) - len(COLORS), 1),
        )
        self.pixel_color = nn.Sequential(
            nn.Conv2d(3, color_hidden, 1),
            nn.ReLU(),
            nn.Conv2d(color_hidden, color_hidden, 1),
            nn.ReLU(),
            nn.Conv2d(color_hidden, 1 + len(COLORS), 1),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images ``[B, 3, H, W]`` in [0, 1] -> logits ``[B, 15, G, G]`` (layout :data:`HEAD_CHANNELS`)."""
        if images.shape[-2:] != (self.input_size, self.input_size):
            images = F.interpolate(
                images, size=(self.input_size, self.input_size), mode="bilinear", antialias=True, align_corners=False
            )
        intensity = images.amax(1, keepdim=True)  # [B, 1, S, S]
        obj, shape, size, offset = self.geometry((intensity - 0.5) / 0.25).split(
            [HEAD_CHANNELS[k] for k in ("objectness", "shape", "size", "offset")], dim=1
        )  # [B, 1 | 4 | 2 | 2, G, G]
        pixels = self.pixel_color((images - 0.5) / 0.25)  # [B, 1 + 6, S, S]
        weight, probs = pixels[:, :1].sigmoid(), pixels[:, 1:].softmax(1)  # [B, 1, S, S], [B, 6, S, S]
        cell = F.avg_pool2d(weight * probs, 4) / F.avg_pool2d(weight, 4).clamp_min(1e-6)  # [B, 6, G, G]
        color = cell.clamp_min(1e-6).log()
        return torch.cat([obj, shape, color, size, offset], dim=1)

    def split_head(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[B, 15, G, G]`` -> named parts, e.g. ``shape`` ``[B, 4, G, G]``, objectness ``[B, G, G]``."""
        parts = dict(zip(HEAD_CHANNELS, logits.split(list(HEAD_CHANNELS.values()), dim=1)))
        parts["objectness"] = parts["objectness"].squeeze(1)
        return parts


def decode_detections(
    logits: torch.Tensor, grid: int, threshold: float = 0.5, nms_distance: float = 0.12, min_cell: float = 0.15
) -> list[list[DetectedObject]]:
    """Head logits ``[B, 15, G, G]`` -> per-image detections, strongest first.

    An object whose centre lies near a cell border spreads its objectness over the 2 or
    4 cells that meet there, each below ``threshold``. So a cell is a candidate when its
    own objectness is at least ``min_cell`` and the objectness summed over some 2x2
    block of cells containing it reaches ``threshold``; of candidates closer than
    ``nms_distance`` only the one with the highest own objectness is kept.
    """
    sizes = list(HEAD_CHANNELS.values())
    obj, shape, color, size, offset = logits.float().split(sizes, dim=1)
    cell_p = obj.sigmoid()  # [B, 1, G, G]
    block = F.avg_pool2d(F.pad(cell_p, (1, 1, 1, 1)), 2, stride=1) * 4  # [B, 1, G+1, G+1] 2x2 sums
    support = F.max_pool2d(block, 2, stride=1).squeeze(1)  # [B, G, G] best block holding the cell
    cell_p = cell_p.squeeze(1)  # [B, G, G]
    shape_id, color_id, size_id = shape.argmax(1), color.argmax(1), size.argmax(1)  # [B, G, G] each
    cells = torch.arange(grid, dtype=torch.float32, device=logits.device)
    centre_x = (cells.view(1, 1, grid) + offset[:, 0].sigmoid()) / grid  # [B, G, G]
    centre_y = (cells.view(1, grid, 1) + offset[:, 1].sigmoid()) / grid  # [B, G, G]
    colors = list(COLORS)
    out: list[list[DetectedObject]] = []
    for b in range(logits.shape[0]):
        hits = ((cell_p[b] >= min_cell) & (support[b] >= threshold)).nonzero().tolist()
        hits.sort(key=lambda ij: -float(cell_p[b, ij[0], ij[1]]))
        kept: list[DetectedObject] = []
        for i, j in hits:
            x, y = float(centre_x[b, i, j]), float(centre_y[b, i, j])
            if all((x - k.x) ** 2 + (y - k.y) ** 2 >= nms_distance**2 for k in kept):
                kept.append(DetectedObject(
                    SHAPE_CLASSES[int(shape_id[b, i, j])], colors[int(color_id[b, i, j])], SIZES[int(size_id[b, i, j])],
                    x, y, min(1.0, float(support[b, i, j])),
                ))
        out.append(kept)
    return out


class ShapesVerifierReward:
    """Reward 1 when a detector's reading of the image satisfies the prompt's scene spec.

    ``score="strict"`` (default) gives 0/1 per image, ``score="partial"`` the fraction of
    satisfied clauses. Both are in ``components``; ``details`` lists per-clause verdicts
    and detections. Not differentiable (detections are discrete).
    """

    name = "shapes_verifier"
    differentiable = False

    def __init__(
        self,
        detector: ShapesGridDetector,
        score: str = "strict",
        threshold: float = 0.5,
        nms_distance: float = 0.12,
        batch_size: int = 256,
    ) -> None:
        if score not in ("strict", "partial"):
            raise ValueError(f"score must be 'strict' or 'partial', got {score!r}")
        self.detector = detector.float().eval()
        self.score, self.threshold, self.nms_distance, self.batch_size = score, threshold, nms_distance, batch_size

    @classmethod
    def from_pretrained(cls, path: str | Path, score: str = "strict", device: str | torch.device = "cpu",
                        **kwargs: Any) -> ShapesVerifierReward:
        """Load ``config.json`` + ``model.safetensors`` from a folder."""
        path = Path(path)
        config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
        for file in (config_file, weights_file):
            if not file.is_file():
                raise FileNotFoundError(
                    f"no Shapes verifier at {path}: missing {file.name} (train one with "
                    f"`genalign toyworld pretrain verifier --out {path}`)"
                )
        config = json.loads(config_file.read_text())
        vocab = {"shapes": list(SHAPE_CLASSES), "colors": list(COLORS), "sizes": list(SIZES)}
        for key, expected in vocab.items():
            if config.get(key) != expected:
                raise ValueError(f"{config_file}: {key} {config.get(key)} do not match Shapes World's {expected}")
        detector = ShapesGridDetector(config["channels"], config["color_hidden"], config["input_size"], config["grid"])
        detector.load_state_dict(load_file(str(weights_file)))
        kwargs.setdefault("threshold", config.get("threshold", 0.5))
        kwargs.setdefault("nms_distance", config.get("nms_distance", 0.12))
        return cls(detector.to(device), score=score, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.detector.parameters()).device

    def to(self, device: str | torch.device) -> ShapesVerifierReward:
        self.detector.to(device)
        return self

    @torch.no_grad()
    def detect(self, images: Any) -> list[list[DetectedObject]]:
        """Images (``[B, 3, H, W]`` in [0, 1] or PIL list) -> detected objects per image."""
        pixels = images_to_tensor(images)
        out: list[list[DetectedObject]] = []
        for chunk in pixels.split(self.batch_size):
            logits = self.detector(chunk.to(self.device, torch.float32))  # [b, 15, G, G]
            out.extend(decode_detections(logits, self.detector.grid, self.threshold, self.nms_distance))
        return out

    def __call__(self, images: Any, prompts: Sequence[str | SceneSpec]) -> RewardOutput:
        """Score images against prompts (strings or :class:`SceneSpec`); ``scores`` ``[B]``."""
        detections = self.detect(images)
        if len(prompts) != len(detections):
            raise ValueError(f"got {len(detections)} images but {len(prompts)} prompts")
        strict, partial, details = [], [], []
        for prompt, found in zip(prompts, detections):
            spec = prompt if isinstance(prompt, SceneSpec) else parse_prompt(prompt)
            verdict = check_scene(spec, found)
            strict.append(float(verdict.strict))
            partial.append(verdict.partial)
            details.append({"clauses": [list(c) for c in verdict.clauses], "detected": [asdict(d) for d in found]})
        components = {
            "strict": torch.tensor(strict, dtype=torch.float32),
            "partial": torch.tensor(partial, dtype=torch.float32),
        }
        return RewardOutput(scores=components[self.score].clone(), components=components, details=details)
