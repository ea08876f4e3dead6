"""Shapes World: a tiny procedural world of coloured shapes with checkable prompts.

The CartPole of text-to-image alignment: scenes of circles, squares and triangles in
six colours and two sizes, rendered at 32x32 (or 64x64) from a GenEval-style spec,
with prompts in five tiers of difficulty and held-out compositions.

This package is the benchmark only (grammar, rendering, prompts, questions) and imports no
training code; the programs that build the shipped models from it are in :mod:`genalign.recipes`.

>>> spec = parse_prompt("a red circle to the left of a blue square")
>>> image, objects = render_scene(spec, seed=0)
>>> check_scene(spec, objects).strict
True
"""

from .prompts import (
    HELDOUT_PAIRS,
    HELDOUT_RELATIONS,
    SPLITS,
    all_prompts,
    all_specs,
    is_heldout,
    sample_prompts,
)
from .render import (
    BACKGROUND,
    SIZE_RADIUS,
    PlacedObject,
    draw_objects,
    render,
    render_objects,
    render_scene,
)
from .spec import (
    COLORS,
    COUNT_WORDS,
    MAX_OBJECTS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    TIERS,
    VOCAB,
    ObjectClause,
    PromptError,
    SceneCheck,
    SceneObject,
    SceneSpec,
    check_scene,
    parse_prompt,
    satisfies_position,
    satisfies_relation,
)

__all__ = [
    "BACKGROUND",
    "COLORS",
    "COUNT_WORDS",
    "HELDOUT_PAIRS",
    "HELDOUT_RELATIONS",
    "MAX_OBJECTS",
    "POSITIONS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SIZE_RADIUS",
    "SPLITS",
    "TIERS",
    "VOCAB",
    "ObjectClause",
    "PlacedObject",
    "PromptError",
    "SceneCheck",
    "SceneObject",
    "SceneSpec",
    "all_prompts",
    "all_specs",
    "check_scene",
    "draw_objects",
    "is_heldout",
    "parse_prompt",
    "render",
    "render_objects",
    "render_scene",
    "sample_prompts",
    "satisfies_position",
    "satisfies_relation",
]
