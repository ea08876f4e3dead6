"""Package layout: Shapes World (the benchmark) stays apart from the recipes that build its assets."""

import ast
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import genalign.toyworld

ROOT = Path(__file__).resolve().parents[1]
# Nothing that trains: the recipes, the trainer, algorithms and policies, or torch (and so
# torch.optim) and the model libraries. Shapes World is pure Python with PIL.
FORBIDDEN = ("genalign.recipes", "genalign.trainer", "genalign.algorithms", "genalign.policies", "torch",
             "diffusers", "transformers", "open_clip")


def _modules(package) -> list[str]:
    return [package.__name__] + [f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]


def test_toyworld_and_each_of_its_modules_import_no_training_code():
    modules = _modules(genalign.toyworld)
    assert len(modules) >= 5  # the package, spec, render, prompts, questions
    for name in modules:  # each module on its own, in a fresh interpreter
        script = (f"import importlib, json, sys; before = set(sys.modules); importlib.import_module({name!r}); "
                  "print(json.dumps(sorted(set(sys.modules) - before)))")
        run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert run.returncode == 0, run.stderr
        loaded = json.loads(run.stdout)
        assert name in loaded
        bad = [m for m in loaded if m.split(".")[0] in FORBIDDEN or m.startswith(FORBIDDEN)]
        assert not bad, f"importing {name} loads training code: {bad[:8]}"


def test_recipes_import_no_private_names_from_each_other():
    """Shared helpers live in genalign.recipes.common under public names; no recipe reaches
    into another module's private (underscore) names."""
    paths = sorted((ROOT / "genalign" / "recipes").glob("*.py")) + sorted((ROOT / "genalign" / "toyworld").glob("*.py"))
    assert len(paths) >= 5
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                private = [a.name for a in node.names if a.name.startswith("_") and a.name != "__future__"]
                assert not private, f"{path.name} imports private {private} from {node.module}"


def test_recipe_and_benchmark_sources_stay_under_600_lines():
    import genalign.recipes

    for package in (genalign.toyworld, genalign.recipes):
        for path in sorted(Path(package.__path__[0]).glob("*.py")):
            lines = len(path.read_text().splitlines())
            assert lines <= 600, f"{path.relative_to(ROOT)} has {lines} lines (split it by concern)"


def test_every_recipe_module_is_listed_and_imports():
    import genalign.recipes

    names = {m.split(".")[-1] for m in _modules(genalign.recipes)[1:]}
    assert {"common", "pretrain_sd", "sd_pipeline", "sd_training", "pretrain_clip", "train_verifier",
            "distill_lcm"} <= names
    for name in ("pretrain_sd", "pretrain_clip", "train_verifier", "distill_lcm"):
        module = __import__(f"genalign.recipes.{name}", fromlist=["main"])
        assert callable(module.main), name
