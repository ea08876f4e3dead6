"""Procedural renderer of Shapes World scenes, deterministic per seed.

A scene is laid out in normalised coordinates (``x`` right, ``y`` down, both in
``[0, 1]``) and drawn 4x supersampled with PIL, then box-filtered down to ``size``
pixels, so edges are antialiased and 32 px and 64 px renders of one seed show the
same scene. Jitter per object: radius ±8 %, rotation ±8° (squares, triangles),
colour ±12 per channel; the dark background varies by ±4 per channel.

The layout is stricter than the checker so ground truth is never borderline:
"on the left" is placed at ``x <= 0.3`` (checker: ``x < 0.4``), and relations are
placed at least 0.25 apart along their direction with at most half that across
(checker: 0.1 apart and more along than across). Objects never overlap: their boxes
are at least 0.03 apart, so two centres never share a cell of an 8x8 grid at 32 px.
Scenes of three or four objects put each object in its own quadrant.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

from .spec import COLORS, SHAPES, SIZES, SceneSpec, relation_offsets

SIZE_RADIUS: dict[str, float] = {"small": 0.11, "large": 0.18}
BACKGROUND: tuple[int, int, int] = (18, 18, 26)
SUPERSAMPLE = 4
EDGE = 0.02  # min distance of an object's box to the image border
GAP = 0.03  # min distance between the boxes of two objects
RENDER_POSITION_BAND = 0.3
RENDER_RELATION_OFFSET = 0.25
RENDER_RELATION_RATIO = 0.5
_ATTEMPTS = 2000


@dataclass(frozen=True)
class PlacedObject:
    """One drawn object, in normalised coordinates.

    x, y: centre of its bounding box; bbox: ``(x0, y0, x1, y1)``; radius: drawn radius
    (circle radius; squares and triangles are scaled to a similar area); angle: rotation
    in degrees; rgb: the jittered fill colour actually drawn.
    """

    shape: str
    color: str
    size: str
    x: float
    y: float
    bbox: tuple[float, float, float, float]
    radius: float
    angle: float
    rgb: tuple[int, int, int]

    def vertices(self) -> list[tuple[float, float]]:
        """Polygon corners in normalised coordinates (empty for a circle)."""
        return [(self.x + vx, self.y + vy) for vx, vy in _local_vertices(self.shape, self.radius, self.angle)]


def _local_vertices(shape: str, radius: float, angle: float) -> list[tuple[float, float]]:
    """Corners relative to the bounding-box centre; [] for a circle."""
    if shape == "circle":
        return []
    if shape == "square":
        h = 0.85 * radius
        corners = [(-h, -h), (h, -h), (h, h), (-h, h)]
    else:  # equilateral triangle pointing up, circumradius 1.2 r
        big = 1.2 * radius
        corners = [(big * math.cos(a), big * math.sin(a)) for a in map(math.radians, (-90, 30, 150))]
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    rotated = [(c * x - s * y, s * x + c * y) for x, y in corners]
    cx = (min(x for x, _ in rotated) + max(x for x, _ in rotated)) / 2
    cy = (min(y for _, y in rotated) + max(y for _, y in rotated)) / 2
    return [(x - cx, y - cy) for x, y in rotated]


def _half_extents(shape: str, radius: float, angle: float) -> tuple[float, float]:
    if shape == "circle":
        return radius, radius
    verts = _local_vertices(shape, radius, angle)
    return max(abs(x) for x, _ in verts), max(abs(y) for _, y in verts)


@dataclass
class _Item:
    shape: str
    color: str
    size: str
    position: str | None
    group: int
    radius: float
    angle: float
    rgb: tuple[int, int, int]


def _position_box(position: str | None) -> tuple[float, float, float, float]:
    band = RENDER_POSITION_BAND
    return {
        None: (0.0, 0.0, 1.0, 1.0),
        "left": (0.0, 0.0, band, 1.0),
        "right": (1 - band, 0.0, 1.0, 1.0),
        "top": (0.0, 0.0, 1.0, band),
        "bottom": (0.0, 1 - band, 1.0, 1.0),
    }[position]


def _apart(a: PlacedObject, b: PlacedObject) -> bool:
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    return bx0 - ax1 >= GAP or ax0 - bx1 >= GAP or by0 - ay1 >= GAP or ay0 - by1 >= GAP


def _relation_clear(a: PlacedObject, relation: str, b: PlacedObject) -> bool:
    along, across = relation_offsets(a, relation, b)
    return along >= RENDER_RELATION_OFFSET and across <= RENDER_RELATION_RATIO * along


def _place(items: list[_Item], relation: str | None, rng: random.Random, what: str) -> list[PlacedObject]:
    """Sample non-overlapping centres meeting positions and the relation (group 0 to group 1)."""
    quadrants = [(0.0, 0.0, 0.5, 0.5), (0.5, 0.0, 1.0, 0.5), (0.0, 0.5, 0.5, 1.0), (0.5, 0.5, 1.0, 1.0)]
    for _ in range(_ATTEMPTS):
        regions = rng.sample(quadrants, len(items)) if len(items) > 2 else [(0.0, 0.0, 1.0, 1.0)] * len(items)
        placed: list[PlacedObject] = []
        for item, (rx0, ry0, rx1, ry1) in zip(items, regions):
            hx, hy = _half_extents(item.shape, item.radius, item.angle)
            px0, py0, px1, py1 = _position_box(item.position)
            # In a quadrant the whole box stays inside it, so quadrant objects never touch.
            inner = GAP / 2 if len(items) > 2 else 0.0
            lo_x = max(EDGE + hx, rx0 + hx + (inner if rx0 > 0 else 0.0), px0)
            hi_x = min(1 - EDGE - hx, rx1 - hx - (inner if rx1 < 1 else 0.0), px1)
            lo_y = max(EDGE + hy, ry0 + hy + (inner if ry0 > 0 else 0.0), py0)
            hi_y = min(1 - EDGE - hy, ry1 - hy - (inner if ry1 < 1 else 0.0), py1)
            if lo_x > hi_x or lo_y > hi_y:
                break
            x, y = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
            obj = PlacedObject(
                item.shape, item.color, item.size, x, y, (x - hx, y - hy, x + hx, y + hy),
                item.radius, item.angle, item.rgb,
            )
            if not all(_apart(obj, other) for other in placed):
                break
            placed.append(obj)
        if len(placed) < len(items):
            continue
        if relation is not None:
            group_a = [o for o, it in zip(placed, items) if it.group == 0]
            group_b = [o for o, it in zip(placed, items) if it.group == 1]
            if not all(_relation_clear(a, relation, b) for a in group_a for b in group_b):
                continue
        return placed
    raise ValueError(f"cannot lay out {what} in {_ATTEMPTS} attempts; the constraints leave no room")


def _make_item(shape: str, color: str, size: str | None, position: str | None, group: int,
               rng: random.Random) -> _Item:
    size = size if size is not None else rng.choice(SIZES)
    radius = SIZE_RADIUS[size] * rng.uniform(0.92, 1.08)
    angle = rng.uniform(-8.0, 8.0) if shape != "circle" else 0.0
    r, g, b = (min(255, max(0, c + rng.randint(-12, 12))) for c in COLORS[color])
    return _Item(shape, color, size, position, group, radius, angle, (r, g, b))


def draw_objects(objects: Sequence[PlacedObject], size: int = 32,
                 background: tuple[int, int, int] = BACKGROUND, supersample: int = SUPERSAMPLE) -> Image.Image:
    """Draw placed objects on a plain background: ``size`` x ``size`` RGB, antialiased by
    drawing ``supersample`` times larger and box-filtering down (1: aliased)."""
    scale = size * supersample
    canvas = Image.new("RGB", (scale, scale), background)
    draw = ImageDraw.Draw(canvas)
    for o in objects:
        if o.shape == "circle":
            r = o.radius
            draw.ellipse([(o.x - r) * scale, (o.y - r) * scale, (o.x + r) * scale, (o.y + r) * scale], fill=o.rgb)
        else:
            draw.polygon([(vx * scale, vy * scale) for vx, vy in o.vertices()], fill=o.rgb)
    return canvas.resize((size, size), Image.Resampling.BOX) if supersample > 1 else canvas


def _background(rng: random.Random) -> tuple[int, int, int]:
    r, g, b = (c + rng.randint(-4, 4) for c in BACKGROUND)
    return r, g, b


def render_scene(spec: SceneSpec, seed: int, size: int = 32) -> tuple[Image.Image, list[PlacedObject]]:
    """Render ``spec`` with layout and jitter drawn from ``seed``.

    Returns the ``size`` x ``size`` RGB image and its ground-truth objects; the same
    seed gives the same pixels, any ``size`` gives the same layout. A clause without a
    size gets a random size per object.
    """
    rng = random.Random(seed)
    items = [
        _make_item(c.shape, c.color, c.size, c.position, g, rng)
        for g, c in enumerate(spec.clauses)
        for _ in range(c.count)
    ]
    background = _background(rng)
    placed = _place(items, spec.relation, rng, repr(spec.prompt))
    return draw_objects(placed, size, background), placed


def render(spec: SceneSpec, seed: int, size: int = 32) -> Image.Image:
    """The image of :func:`render_scene`."""
    return render_scene(spec, seed, size)[0]


def render_objects(objects: Sequence[tuple[str, str, str | None]], seed: int,
                   size: int = 32) -> tuple[Image.Image, list[PlacedObject]]:
    """Render a free list of ``(shape, colour, size or None)`` objects at random places.

    For scenes outside the prompt grammar (e.g. three different objects); at most
    four objects. Returns the image and its ground-truth objects.
    """
    if not 1 <= len(objects) <= 4:
        raise ValueError(f"render_objects draws 1 to 4 objects, got {len(objects)}")
    for shape, color, obj_size in objects:
        if shape not in SHAPES or color not in COLORS or obj_size not in (*SIZES, None):
            raise ValueError(f"unknown object ({shape!r}, {color!r}, {obj_size!r})")
    rng = random.Random(seed)
    items = [_make_item(shape, color, s, None, 0, rng) for shape, color, s in objects]
    background = _background(rng)
    placed = _place(items, None, rng, f"{len(objects)} objects")
    return draw_objects(placed, size, background), placed
