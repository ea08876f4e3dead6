"""Shapes World prompts as DSG-style yes/no question graphs.

Davidsonian Scene Graph (Cho et al., "Davidsonian Scene Graph: Improving Reliability in
Fine-grained Evaluation for Text-to-Image Generation", ICLR 2024): a prompt becomes atomic
yes/no questions, each with the ids of the questions it depends on (its *parents*); a child
only counts when its parents hold ("is the circle on the left?" means nothing without a
circle). Here the graph comes from the :class:`SceneSpec` instead of an LLM:

* one entity question per clause: "Is there a red circle?" (no parents);
* children of that question: size ("Is the red circle small?"), absolute position
  ("Is the red circle on the left?") and, for counts above one, the exact count
  ("Are there exactly three blue squares?");
* the relation, with both entity questions as parents: "Is the red circle to the left of
  the blue square?".

A bare "a red circle" gets no count question, as in DSG, although the Shapes World checker
reads it as *exactly* one; the checker's "no other objects" clause has no question either.
The output uses the JSONL schema of :mod:`rewards.vqa`: ``{"id", "text", "parents"}``.
"""

from __future__ import annotations

from .spec import COUNT_WORDS, PLURALS, POSITIONS, RELATIONS, ObjectClause, SceneSpec


def _subject(clause: ObjectClause) -> tuple[str, str]:
    """('the red circle', 'Is') or ('the red circles', 'Are')."""
    return f"the {clause.noun}", "Are" if clause.count > 1 else "Is"


def scene_questions(spec: SceneSpec) -> list[dict]:
    """The question graph of ``spec``: a list of ``{"id": int, "text": str, "parents": [int]}``,
    ids from 1, every parent listed before its children."""
    questions: list[dict] = []

    def add(text: str, parents: list[int]) -> int:
        questions.append({"id": len(questions) + 1, "text": text, "parents": parents})
        return len(questions)

    entity_ids = []
    for clause in spec.clauses:
        entity = add(f"Is there a {clause.color} {clause.shape}?", [])
        entity_ids.append(entity)
        subject, verb = _subject(clause)
        if clause.count > 1:
            add(f"Are there exactly {COUNT_WORDS[clause.count]} {clause.color} {PLURALS[clause.shape]}?", [entity])
        if clause.size is not None:
            add(f"{verb} {subject} {clause.size}?", [entity])
        if clause.position is not None:
            add(f"{verb} {subject} {POSITIONS[clause.position]}?", [entity])
    if spec.relation is not None:
        (a, b), (ia, ib) = spec.clauses, entity_ids
        subject, verb = _subject(a)
        add(f"{verb} {subject} {RELATIONS[spec.relation]} {_subject(b)[0]}?", [ia, ib])
    return questions
