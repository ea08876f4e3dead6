"""Audit of the shipped code for unsafe loading: torch.load only with weights_only=True, YAML
only through safe_load, no pickle, no allow_pickle, and trust_remote_code only when a config
field (default False) asks for it."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHIPPED = [p for d in ("genalign", "rewards", "benchmarks") for p in (ROOT / d).rglob("*.py")]


def calls(text: str, name: str):
    """The full text of every call ``name(...)`` in ``text`` (parentheses balanced)."""
    for m in re.finditer(re.escape(name) + r"\(", text):
        depth, i = 0, m.end() - 1
        for j in range(i, len(text)):
            depth += {"(": 1, ")": -1}.get(text[j], 0)
            if depth == 0:
                yield text[m.start() : j + 1]
                break


def test_the_audit_sees_the_code():
    assert len(SHIPPED) > 50
    assert any("weights_only=True" in p.read_text() for p in SHIPPED)


def test_no_unsafe_loading_in_shipped_code():
    problems = []
    for path in SHIPPED:
        text = path.read_text()
        rel = path.relative_to(ROOT)
        for call in calls(text, "torch.load"):
            if "weights_only=True" not in call:
                problems.append(f"{rel}: {call[:80]} without weights_only=True")
        for pattern in (r"yaml\.(load|unsafe_load|full_load)\(", r"\bimport pickle\b", r"\bpickle\.loads?\(",
                        r"\bimport dill\b", r"allow_pickle\s*=\s*True", r"(?<![.\w])exec\(", r"(?<![.\w])eval\("):
            for m in re.finditer(pattern, text):
                problems.append(f"{rel}: {m.group(0)}")
        for line in text.splitlines():
            if re.search(r"trust_remote_code[\"']?\s*[:=]\s*True", line) and not re.search(r"\bif\b.*trust_remote_code", line):
                problems.append(f"{rel}: trust_remote_code set True unconditionally: {line.strip()}")
            if re.search(r"trust_remote_code: bool = opt\(", line) and "opt(False" not in line:
                problems.append(f"{rel}: trust_remote_code must default to False: {line.strip()}")
    assert not problems, "\n".join(problems)


def test_the_audit_catches_each_unsafe_form(tmp_path):
    """The patterns above fire on the forms they forbid (so a regex typo cannot hide one)."""
    bad = [
        "state = torch.load(path)",
        "state = torch.load(path, map_location='cpu', weights_only=False)",
        "cfg = yaml.load(f)",
        "import pickle",
        "x = np.load(p, allow_pickle=True)",
        'kwargs = {"trust_remote_code": True}',
    ]
    for line in bad:
        unsafe = any("weights_only=True" not in c for c in calls(line, "torch.load")) or any(
            re.search(p, line) for p in (r"yaml\.(load|unsafe_load|full_load)\(", r"\bimport pickle\b",
                                         r"allow_pickle\s*=\s*True")
        ) or (re.search(r"trust_remote_code[\"']?\s*[:=]\s*True", line) and not re.search(r"\bif\b.*trust_remote_code", line))
        assert unsafe, line
    assert not list(c for c in calls("torch.load(p, weights_only=True, map_location=f(x))", "torch.load")
                    if "weights_only=True" not in c)
