"""Conditions: what a rollout is asked for. Any object; nothing here turns it into a string.

A condition may be a prompt string, a dict (``{"prompt": ..., "answer": ..., "key": ...}``: a
question with its reference answer, a scene spec, a question with an image) or an object.
Two functions are all the rest of the library needs:

- :func:`condition_key`: a stable string identity, for per-condition statistics (DDPO's
  per-prompt reward history), preference stores and report labels. Two conditions with equal
  keys are the same task.
- :func:`condition_text`: the text a generator is conditioned on (a text-to-image prompt, an
  LM's prompt).
"""

from __future__ import annotations

import json
from typing import Any


def jsonable(value: Any) -> bool:
    """Whether ``value`` serialises to JSON as it is."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def condition_key(condition: Any) -> str:
    """The stable identity of a condition.

    A string is its own key; a dict uses its ``"key"`` entry when it has one, else the JSON of
    its JSON-serialisable items (sorted, so dict order does not matter; an image or a tensor in
    the dict does not take part); an object uses its ``key`` attribute; anything else its repr.
    """
    if isinstance(condition, str):
        return condition
    if isinstance(condition, dict):
        if "key" in condition:
            return str(condition["key"])
        items = {str(k): v for k, v in condition.items() if jsonable(v)}
        return json.dumps(items, sort_keys=True)
    key = getattr(condition, "key", None)
    if key is not None:
        return str(key)
    return repr(condition)


def condition_text(condition: Any) -> str:
    """The text a generator is conditioned on: the string itself, ``condition["prompt"]``, or
    ``condition.prompt``."""
    if isinstance(condition, str):
        return condition
    if isinstance(condition, dict):
        if "prompt" not in condition:
            raise KeyError(f"condition has no 'prompt' to condition a generator on: keys {sorted(condition)}")
        return str(condition["prompt"])
    prompt = getattr(condition, "prompt", None)
    if prompt is None:
        raise TypeError(f"cannot read a prompt from a condition of type {type(condition).__name__} (give a str, "
                        f"a dict with 'prompt', or an object with a .prompt attribute)")
    return str(prompt)
