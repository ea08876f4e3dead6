"""Moving Shapes: short clips of Shapes World objects moving left, right, up or down, or staying.

A clip is ``frames`` frames (8 by default, 8-16 allowed) of ``size`` x ``size`` pixels (32 by
default). Each object is a Shapes World colour and shape (:data:`~genalign.toyworld.spec.COLORS`,
:data:`~genalign.toyworld.spec.SHAPES`) of the small size, drawn with the world's renderer
(:func:`~genalign.toyworld.render.draw_objects`: 4x supersampled, antialiased) on the dark
background. A moving object moves at a constant ``speed`` in image widths per frame; a still one
keeps its place. By default (:func:`default_speed`) a moving object crosses :data:`TRAVEL` = 0.49
of the image over the clip, whatever its length: 0.07 widths per frame at 8 frames (about
2 px at 32 px, so the object covers about twice its own width), 0.033 at 16.

Prompts, one or two object clauses (a tiny grammar; :func:`parse_moving_prompt` reads it and
names the first bad word)::

    a red circle moving right
    a blue square staying still
    a red circle moving right and a green square moving up

Directions are in image coordinates: ``x`` grows to the right and ``y`` downwards, so "up"
decreases ``y``. The two objects of a prompt have different colours, so a verifier can tell
them apart by colour alone.

Layout: every object stays at least ``EDGE`` inside the frame for the whole clip (start
positions are drawn so that the whole path fits), and the boxes of two objects are at least
``GAP`` apart in every frame. Rendering is deterministic per seed.

Held-out split: the colour x shape pairs of Shapes World's
:data:`~genalign.toyworld.prompts.HELDOUT_PAIRS` never appear in a train prompt; every
held-out prompt has at least one of them.

A condition is a dict: ``prompt``, ``objects`` (``[{"color", "shape", "direction",
"speed"}]`` in prompt order; ``speed`` in image widths per frame, 0 for a still object),
``key`` (``"moving_shapes/<prompt>"``: equal prompts share it), ``split`` (``"train"`` or
``"heldout"``), ``frames`` (the clip length the source was configured with) and ``scene`` (the
Shapes World prompt of the same objects without their motion, "a red circle and a green
square": what an image reward such as the Shapes World verifier checks on each frame, through
the ``per_frame`` reward's ``condition_field: scene``).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product
from typing import Any, Literal

import numpy as np
from PIL import Image

from genalign.configs import opt

from .prompts import HELDOUT_PAIRS
from .render import BACKGROUND, SIZE_RADIUS, PlacedObject, draw_objects
from .spec import COLORS, SHAPES, PromptError

DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down", "still")
# Unit step of each direction in image coordinates (x right, y down).
DIRECTION_VECTORS: dict[str, tuple[int, int]] = {
    "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0),
}
MIN_FRAMES, MAX_FRAMES, DEFAULT_FRAMES = 8, 16, 8
TRAVEL = 0.49  # image widths a moving object crosses over a clip at the default speed


def default_speed(frames: int = DEFAULT_FRAMES) -> float:
    """The world's speed (image widths per frame) for a clip of ``frames`` frames: ``TRAVEL / (frames - 1)``."""
    return TRAVEL / (frames - 1)


SPEED = default_speed(DEFAULT_FRAMES)  # 0.07 image widths per frame at the default 8 frames
MAX_MOVING_OBJECTS = 2
OBJECT_SIZE = "small"  # Shapes World size of every moving object
EDGE = 0.02  # min distance of an object's box to the image border, in every frame
GAP = 0.03  # min distance between the boxes of two objects, in every frame
_ATTEMPTS = 2000
MOVING_SPLITS = ("train", "heldout", "all")


@dataclass(frozen=True)
class MovingObject:
    """One object of a prompt: a colour (key of COLORS), a shape (one of SHAPES) and a
    direction (one of DIRECTIONS)."""

    color: str
    shape: str
    direction: str

    def __post_init__(self) -> None:
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; colours: {', '.join(COLORS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; shapes: {', '.join(SHAPES)}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {self.direction!r}; directions: {', '.join(DIRECTIONS)}")

    @property
    def phrase(self) -> str:
        """'a red circle moving right' / 'a blue square staying still'."""
        motion = "staying still" if self.direction == "still" else f"moving {self.direction}"
        return f"a {self.color} {self.shape} {motion}"


@dataclass(frozen=True)
class MovingSpec:
    """One or two objects with distinct colours, in prompt order."""

    objects: tuple[MovingObject, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= MAX_MOVING_OBJECTS:
            raise ValueError(f"a Moving Shapes prompt has 1 or 2 objects, got {len(self.objects)}")
        colors = [o.color for o in self.objects]
        if len(set(colors)) < len(colors):
            raise ValueError(f"the objects of a Moving Shapes prompt have distinct colours, got {colors}")

    @property
    def prompt(self) -> str:
        return " and ".join(o.phrase for o in self.objects)

    @property
    def scene(self) -> str:
        """The still Shapes World prompt of the objects: 'a red circle and a blue square'."""
        return " and ".join(f"a {o.color} {o.shape}" for o in self.objects)

    @property
    def heldout(self) -> bool:
        """Whether an object is a held-out colour x shape pair."""
        return any((o.color, o.shape) in HELDOUT_PAIRS for o in self.objects)


def parse_moving_prompt(prompt: str) -> MovingSpec:
    """Read a prompt of the grammar above; a :class:`PromptError` names the first bad word."""
    words = prompt.strip().lower().split()
    objects: list[MovingObject] = []
    i = 0

    def fail(message: str) -> PromptError:
        return PromptError(f"{prompt!r}: {message}")

    def expect(choices: Sequence[str], what: str) -> str:
        nonlocal i
        if i >= len(words):
            raise fail(f"ends early: expected {what} ({', '.join(choices)})")
        word = words[i]
        if word not in choices:
            raise fail(f"unexpected word {word!r} at position {i + 1}: expected {what} ({', '.join(choices)})")
        i += 1
        return word

    while True:
        expect(["a"], "the article")
        color = expect(list(COLORS), "a colour")
        if color in {o.color for o in objects}:
            raise fail(f"colour {color!r} appears twice: the objects of a prompt have distinct colours")
        shape = expect(list(SHAPES), "a shape")
        verb = expect(["moving", "staying"], "a motion")
        if verb == "moving":
            direction = expect([d for d in DIRECTIONS if d != "still"], "a direction")
        else:
            direction = expect(["still"], "'still'")
        objects.append(MovingObject(color, shape, direction))
        if i == len(words):
            return MovingSpec(tuple(objects))
        if len(objects) == MAX_MOVING_OBJECTS:
            raise fail(f"unexpected word {words[i]!r} at position {i + 1}: at most {MAX_MOVING_OBJECTS} objects")
        expect(["and"], "'and' or the end")


@functools.lru_cache(maxsize=8)
def _all_specs(n_objects: int, split: str) -> tuple[MovingSpec, ...]:
    if n_objects not in (1, 2):
        raise ValueError(f"a Moving Shapes prompt has 1 or 2 objects, got {n_objects}")
    if split not in MOVING_SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(MOVING_SPLITS)}")
    singles = [MovingObject(c, s, d) for c, s, d in product(COLORS, SHAPES, DIRECTIONS)]
    if n_objects == 1:
        specs = [MovingSpec((o,)) for o in singles]
    else:
        specs = [MovingSpec((a, b)) for a, b in product(singles, singles) if a.color != b.color]
    if split != "all":
        specs = [s for s in specs if s.heldout == (split == "heldout")]
    return tuple(specs)


def all_moving_specs(n_objects: int, split: str = "all") -> list[MovingSpec]:
    """Every spec with ``n_objects`` objects (1: 90 prompts, 2: 6750) in a fixed order, filtered
    by split (train/heldout/all)."""
    return list(_all_specs(n_objects, split))


def all_moving_prompts(n_objects: int, split: str = "all") -> list[str]:
    return [s.prompt for s in _all_specs(n_objects, split)]


@dataclass(frozen=True)
class MovingClip:
    """A rendered clip and its ground truth.

    frames: ``F`` RGB images; tracks: per object (prompt order), its placed object per frame,
    so ``tracks[k][t].x, .y`` is object k's centre (of its box, normalised) in frame t.
    """

    spec: MovingSpec
    frames: list[Image.Image]
    tracks: list[tuple[PlacedObject, ...]]
    speed: float

    def centroids(self) -> list[list[tuple[float, float]]]:
        """Per object, per frame: its centre ``(x, y)`` in normalised coordinates."""
        return [[(p.x, p.y) for p in track] for track in self.tracks]

    def array(self) -> np.ndarray:
        """The clip as a ``[F, 3, H, W]`` float32 array in [0, 1]."""
        return clip_array(self.frames)


def clip_array(frames: Sequence[Image.Image]) -> np.ndarray:
    """``F`` PIL images -> ``[F, 3, H, W]`` float32 in [0, 1]."""
    arr = np.stack([np.asarray(f.convert("RGB"), dtype=np.float32) / 255.0 for f in frames])
    return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))


def _half_extents(shape: str, radius: float, angle: float) -> tuple[float, float]:
    if shape == "circle":
        return radius, radius
    probe = PlacedObject(shape, "red", OBJECT_SIZE, 0.0, 0.0, (0.0, 0.0, 0.0, 0.0), radius, angle, (0, 0, 0))
    verts = probe.vertices()
    return max(abs(x) for x, _ in verts), max(abs(y) for _, y in verts)


def _apart(a: PlacedObject, b: PlacedObject) -> bool:
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    return bx0 - ax1 >= GAP or ax0 - bx1 >= GAP or by0 - ay1 >= GAP or ay0 - by1 >= GAP


def render_clip(spec: MovingSpec | str, seed: int, frames: int = DEFAULT_FRAMES, size: int = 32,
                speed: float | None = None) -> MovingClip:
    """Render ``spec`` (or a prompt) as ``frames`` frames, layout and jitter drawn from ``seed``;
    ``speed`` None: :func:`default_speed` of ``frames``.

    Jitter as in Shapes World: radius ±8 %, rotation ±8° (squares, triangles), colour ±12 per
    channel, background ±4 per channel. The same seed gives the same pixels.
    """
    if isinstance(spec, str):
        spec = parse_moving_prompt(spec)
    if not MIN_FRAMES <= frames <= MAX_FRAMES:
        raise ValueError(f"'frames' must be in {MIN_FRAMES}..{MAX_FRAMES}, got {frames}")
    speed = default_speed(frames) if speed is None else speed
    if speed < 0:
        raise ValueError(f"'speed' must be >= 0, got {speed}")
    rng = random.Random(seed)
    looks = []
    for o in spec.objects:
        radius = SIZE_RADIUS[OBJECT_SIZE] * rng.uniform(0.92, 1.08)
        angle = rng.uniform(-8.0, 8.0) if o.shape != "circle" else 0.0
        r, g, b = (min(255, max(0, c + rng.randint(-12, 12))) for c in COLORS[o.color])
        looks.append((radius, angle, (r, g, b)))
    background = tuple(c + rng.randint(-4, 4) for c in BACKGROUND)
    steps = frames - 1
    for _ in range(_ATTEMPTS):
        tracks: list[tuple[PlacedObject, ...]] = []
        for o, (radius, angle, rgb) in zip(spec.objects, looks):
            hx, hy = _half_extents(o.shape, radius, angle)
            ux, uy = DIRECTION_VECTORS[o.direction]
            dx, dy = ux * speed * steps, uy * speed * steps  # whole path
            lo_x, hi_x = EDGE + hx - min(0.0, dx), 1 - EDGE - hx - max(0.0, dx)
            lo_y, hi_y = EDGE + hy - min(0.0, dy), 1 - EDGE - hy - max(0.0, dy)
            if lo_x > hi_x or lo_y > hi_y:
                raise ValueError(f"{o.phrase!r} leaves the frame: speed {speed} over {frames} frames is too far")
            x0, y0 = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
            track = []
            for t in range(frames):
                x, y = x0 + ux * speed * t, y0 + uy * speed * t
                track.append(PlacedObject(o.shape, o.color, OBJECT_SIZE, x, y, (x - hx, y - hy, x + hx, y + hy),
                                          radius, angle, rgb))
            tracks.append(tuple(track))
        if all(_apart(a[t], b[t]) for i, a in enumerate(tracks) for b in tracks[i + 1:] for t in range(frames)):
            break
    else:
        raise ValueError(f"cannot lay out {spec.prompt!r} in {_ATTEMPTS} attempts")
    images = [draw_objects([track[t] for track in tracks], size, background) for t in range(frames)]
    return MovingClip(spec, images, tracks, speed)


def make_condition(spec: MovingSpec, frames: int = DEFAULT_FRAMES, speed: float | None = None) -> dict[str, Any]:
    """The condition dict of a spec (see the module docstring); ``speed`` None: :func:`default_speed`."""
    speed = default_speed(frames) if speed is None else speed
    return {
        "prompt": spec.prompt,
        "objects": [{"color": o.color, "shape": o.shape, "direction": o.direction,
                     "speed": 0.0 if o.direction == "still" else speed} for o in spec.objects],
        "key": f"moving_shapes/{spec.prompt}",
        "split": "heldout" if spec.heldout else "train",
        "frames": frames,
        "scene": spec.scene,
    }


def sample_moving_conditions(n_objects: int, n: int, split: str = "train", seed: int = 0,
                             frames: int = DEFAULT_FRAMES) -> list[dict[str, Any]]:
    """``n`` conditions with ``n_objects`` objects from ``split``, deterministic per seed; every
    prompt appears before any repeats."""
    pool = list(_all_specs(n_objects, split))
    rng = random.Random(f"moving-shapes/{n_objects}/{split}/{seed}")
    out: list[dict[str, Any]] = []
    while len(out) < n:
        batch = pool[:]
        rng.shuffle(batch)
        out.extend(make_condition(s, frames) for s in batch[: n - len(out)])
    return out


@dataclass
class MovingShapesPrompts:
    """Moving Shapes conditions (dicts with the objects and their directions) as a prompt source."""

    source: Literal["moving_shapes"] = opt("moving_shapes", "Moving Shapes prompts: shapes moving left/right/up/down or staying")
    objects: list[int] = opt([1, 2], "objects per prompt to draw from (1 and/or 2)")
    split: Literal["train", "heldout"] = opt("train", "prompts to train on")
    eval_split: Literal["train", "heldout"] = opt("heldout", "prompts for before/after comparisons and eval")
    frames: int = opt(DEFAULT_FRAMES, f"frames per clip ({MIN_FRAMES}-{MAX_FRAMES}), recorded in each condition")
    pool_size: int = opt(
        0, "if > 0, train on a fixed pool of this many prompts per object count, the first object's directions "
        "in turn (else fresh draws)"
    )

    def validate(self) -> None:
        if not self.objects or any(k not in (1, 2) for k in self.objects):
            raise ValueError(f"'objects' must be a non-empty subset of [1, 2], got {self.objects}")
        if not MIN_FRAMES <= self.frames <= MAX_FRAMES:
            raise ValueError(f"'frames' must be in {MIN_FRAMES}..{MAX_FRAMES}, got {self.frames}")
        if self.pool_size < 0:
            raise ValueError(f"'pool_size' must be >= 0, got {self.pool_size}")

    def pool(self, n_objects: int) -> list[dict[str, Any]]:
        """The fixed training conditions with ``n_objects`` objects when ``pool_size`` > 0 (else
        empty): a seeded order of the split's prompts, taken so that the first object's direction
        cycles through every direction (a pool of 5 names each direction once)."""
        if self.pool_size <= 0:
            return []
        order = sample_moving_conditions(n_objects, len(_all_specs(n_objects, self.split)), self.split, 1000 + n_objects,
                                         self.frames)
        by_direction = {d: [c for c in order if c["objects"][0]["direction"] == d] for d in DIRECTIONS}
        picked: list[dict[str, Any]] = []
        for i in range(self.pool_size):
            queue = by_direction[DIRECTIONS[i % len(DIRECTIONS)]]
            if not queue:
                raise ValueError(f"'pool_size' {self.pool_size} exceeds the {len(order)} {self.split} prompts")
            picked.append(queue.pop(0))
        return picked

    def sample(self, n: int, seed: int) -> list[dict[str, Any]]:
        rng = random.Random(f"moving-shapes/sample/{self.split}/{seed}")
        if self.pool_size > 0:
            pool = [c for k in self.objects for c in self.pool(k)]
            return [rng.choice(pool) for _ in range(n)]
        out = []
        for _ in range(n):
            specs = _all_specs(rng.choice(self.objects), self.split)
            out.append(make_condition(rng.choice(specs), self.frames))
        return out

    def eval_sets(self, n: int) -> dict[str, list[dict[str, Any]]]:
        """``n`` fixed conditions of the eval split per object count, as ``"1 object"`` / ``"2 objects"``.

        When the training pool is drawn from the eval split (``pool_size`` > 0 and
        ``split == eval_split``), each count's conditions are divided, in order, into
        ``"1 object (training pool)"`` and ``"1 object (never trained)"``.
        """
        sets: dict[str, list[dict[str, Any]]] = {}
        for k in self.objects:
            name = f"{k} object{'s' if k > 1 else ''}"
            conds = sample_moving_conditions(k, n, self.eval_split, 12345, self.frames)
            if self.pool_size <= 0 or self.split != self.eval_split:
                sets[name] = conds
                continue
            pool = {c["prompt"] for c in self.pool(k)}
            for part_name, part in ((f"{name} (training pool)", [c for c in conds if c["prompt"] in pool]),
                                    (f"{name} (never trained)", [c for c in conds if c["prompt"] not in pool])):
                if part:
                    sets[part_name] = part
        return sets

    def targets(self, conditions: Sequence[Any], seeds: Sequence[int], like: Any) -> Any:
        """Ground truth of each condition: a fresh render per seed, with the frames and size of
        ``like`` (``[B, F, 3, H, W]`` clips in [0, 1], the samples the targets stand opposite)."""
        import torch

        from genalign.conditions import condition_text

        frames, size = like.shape[1], like.shape[-1]
        clips = [render_clip(condition_text(c), int(s), frames=frames, size=size).array() for c, s in zip(conditions, seeds)]
        return torch.from_numpy(np.stack(clips)).to(like.device)

    def evaluation(self, n: int) -> list[dict[str, Any]]:
        """``n`` fixed conditions of the eval split, interleaved over the object counts."""
        per = -(-n // len(self.objects))
        sets = [sample_moving_conditions(k, per, self.eval_split, 12345, self.frames) for k in self.objects]
        return [c for group in zip(*sets) for c in group][:n]
