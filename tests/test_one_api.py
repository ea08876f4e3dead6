"""One API: every registered algorithm trains an image, a video, a text and a vision-language policy unchanged.

The same algorithm class, with its defaults (the config's algorithm section is exactly
``{name: NAME}``), goes through the same trainer code path on the image main job
(configs/quickstart.yaml, tiny-sd), the video main job (configs/video_quickstart.yaml,
tiny-video), the text main job (configs/text_grpo.yaml, tiny-lm) and the
Shapes VQA job (configs/vlm_grpo.yaml, tiny-vlm). Only sizes outside the algorithm section are shrunk. A grep keeps algorithm files free of
policy imports and modality branches, and the trainer free of policy type names.
"""

from __future__ import annotations

import ast
import os
import re

import pytest
import torch
import yaml

from genalign.algorithms import ALGORITHMS
from genalign.cli import main
from genalign.policies import POLICIES
from genalign.train_config import resolve_config
from genalign.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VLM_JOB = "configs/vlm_grpo.yaml"
VIDEO_JOB = "configs/video_quickstart.yaml"
FLOW_JOB = "configs/flow_grpo.yaml"
MAIN_JOBS = ["configs/quickstart.yaml", FLOW_JOB, VIDEO_JOB, "configs/text_grpo.yaml", VLM_JOB]
MODALITY_OF = {"configs/quickstart.yaml": "stable_diffusion", FLOW_JOB: "flow_matching", VIDEO_JOB: "video_diffusion",
               "configs/text_grpo.yaml": "text_lm", VLM_JOB: "vlm"}  # policy types

#: tiny sizes, none in the algorithm section. weight_decay 0: a tensor changes only through its
#: gradient, so "every trainable tensor changed" proves every one got a gradient (a LoRA A matrix
#: gets its first nonzero gradient at the second step, once B has moved from zero: 2 epochs).
TINY = [
    "train.prompts_per_epoch=2", "train.samples_per_prompt=4", "train.rollout_batch_size=8",
    "train.train_batch_size=4", "train.gradient_accumulation_steps=1", "train.weight_decay=0.0",
    "train.checkpoint_every=0", "report.enabled=false", "eval.enabled=false",
]
#: at 4 denoising steps tiny-sd scores 0 on most counting prompts (the quickstart's tier 5); on
#: two-object scenes (tier 3) its partial credit varies within a prompt's group, so rewards carry
#: a signal for every algorithm (equal rewards give zero advantages and no preference pairs).
#: tiny-video follows the direction word about half the time, at 4 steps its objects are often
#: too faint to track, and with 2 prompts x 4 clips the 0/1 motion reward can tie within every group: the
#: tiny video job scores temporal consistency instead, a continuous score that always differs between clips; at
#: weight 1.05 the smoothest clips (consistency > 0.95) reach rejection_sft's default threshold of 1.
#: tiny-vlm is right about half of the time on the job's out-of-domain questions, but whole groups
#: of a question often tie: with 8 questions an epoch some group (or B²'s branch set) differs
POLICY_TINY = {"configs/quickstart.yaml": ["policy.num_steps=4", "prompts.tiers=[3]"], "configs/text_grpo.yaml": [],
               FLOW_JOB: ["policy.num_steps=4", "prompts.tiers=[3]"],
               VIDEO_JOB: ["policy.num_steps=4", "reward.components=[{type: temporal_consistency, weight: 1.05}]"],
               VLM_JOB: ["train.prompts_per_epoch=8", "train.rollout_batch_size=32"]}
#: B²-DiffuRL on a denoising chain branches late first (stage 1 resamples the last 20% of each
#: rollout) and moves the branch point back one stage every 4 epochs (its defaults). Resampling
#: only tiny-sd's last denoising step leaves a prefix's branches with one reward: nothing stands
#: out and the trainer makes no update, by design. So its image run goes on into stage 2 (epochs
#: 5-8: the last 2 of 4 steps; a prefix's branches may still tie). On tokens its default branch
#: point is the start of the response (a short answer is decided by its first tokens), so the
#: text run trains from the first epoch. Epochs cost well under a second here.
EPOCHS = {("b2diffurl", "configs/quickstart.yaml"): 8, ("b2diffurl", FLOW_JOB): 8, ("b2diffurl", VIDEO_JOB): 8}


def job_with_algorithm(job: str, name: str, directory) -> str:
    """``job`` with its algorithm section replaced by exactly ``{name: NAME}``, written to ``directory``."""
    with open(os.path.join(ROOT, job)) as f:
        data = yaml.safe_load(f)
    data["algorithm"] = {"name": name}
    path = os.path.join(directory, f"{name}_{os.path.basename(job)}")
    with open(path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    return path


@pytest.mark.parametrize("job", MAIN_JOBS)
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_trains_image_video_text_and_vlm_unchanged(name, job, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs' model paths are relative to the repository
    path = job_with_algorithm(job, name, tmp_path)
    epochs = EPOCHS.get((name, job), 2)
    config = resolve_config(path, [f"output_dir={tmp_path / 'run'}", *TINY, *POLICY_TINY[job], f"train.epochs={epochs}"])
    assert config.policy.type == MODALITY_OF[job]
    defaults = ALGORITHMS[name][0]()
    defaults.resolve_units(POLICIES[config.policy.type][1].log_prob_unit)
    assert config.algorithm == defaults  # the algorithm's defaults (in the policy's log-prob unit), untouched
    trainer = Trainer(config)
    assert type(trainer.algorithm) is ALGORITHMS[name][1]
    before = trainer.policy.trainable_state_dict()
    history = trainer.train()
    after = trainer.policy.trainable_state_dict()

    assert len(history) == epochs
    for epoch in history:
        assert torch.isfinite(torch.tensor(epoch["loss"])), epoch
        if name == "b2diffurl" and job in ("configs/quickstart.yaml", FLOW_JOB, VIDEO_JOB) and epoch["trained_rows"] == 0:
            continue  # an early stage of the chain: no branch stood out, no update (see EPOCHS)
        assert epoch["optimizer_steps"] > 0, f"epoch {epoch['epoch']} made no update: {epoch}"
    assert sum(epoch["optimizer_steps"] for epoch in history) >= 2  # LoRA A moves from the second step on
    assert after.keys() == before.keys() and before
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"{len(unchanged)} of {len(before)} trainable tensors never changed, e.g. {unchanged[:3]}"


@pytest.mark.parametrize("job", MAIN_JOBS)
def test_every_algorithm_validates_on_the_cli(job, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    for name in sorted(ALGORITHMS):
        path = job_with_algorithm(job, name, tmp_path)
        assert main(["train", path, "--dry-run"]) == 0, capsys.readouterr().err
        assert f"{path}: valid" in capsys.readouterr().out


# -- the grep: algorithms know trajectories, not policies ------------------------------------
POLICY_NAMES = sorted(POLICIES) + sorted(cls.__name__ for _, cls in POLICIES.values())
#: an import of a policy module or a model library
IMPORT = re.compile(r"^\s*(from|import)\s+(genalign\.policies|diffusers|transformers|peft)\b", re.M)
#: a policy type or class named in code, a model library named in code, or a branch on a policy's
#: or an output's class
MODALITY = re.compile(
    r"\b(" + "|".join(POLICY_NAMES + ["diffusers", "transformers", "peft"]) + r")\b"
    r"|isinstance\(\s*[\w.\[\]]*(policy|outputs)\b"
    r"|isinstance\([^)]*\b\w*(Policy|Pipeline|Tokenizer|PreTrainedModel)\b"
)
TYPE_NAME = re.compile(r"\b(" + "|".join(POLICY_NAMES) + r")\b")


def code_of(source: str) -> str:
    """``source`` without comments and docstrings (prose may name a policy; code may not)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            body[0] = ast.Pass()
    return ast.unparse(tree)


def violations(source: str, pattern: re.Pattern = MODALITY) -> list[str]:
    code = code_of(source)
    return [m.group(0) for m in IMPORT.finditer(code)] + [m.group(0) for m in pattern.finditer(code)]


def test_grep_catches_policy_imports_and_modality_branches():
    bad = [
        "from genalign.policies import POLICIES",
        "from genalign.policies.text_lm import TextLMPolicy",
        "import genalign.policies.stable_diffusion as sd",
        "import diffusers",
        "from transformers import AutoTokenizer",
        "from peft import LoraConfig",
        "def f(policy):\n    if policy.type == 'text_lm':\n        return 1",
        "def f(config):\n    return 2 if config.policy == \"stable_diffusion\" else 3",
        "def f(batch):\n    if isinstance(batch.outputs, list):\n        return 1",
        "def f(policy):\n    if isinstance(policy, ConsistencyPolicy):\n        return 1",
        "def f(x):\n    if isinstance(x, (int, TextLMPolicy)):\n        return 1",
        "def f(m):\n    return isinstance(m, PreTrainedModel)",
    ]
    for snippet in bad:
        assert violations(snippet), snippet
    good = [
        '"""Applied to a ConsistencyPolicy (RLCM) this is the text_lm loss; see diffusers."""\nx = 1',
        "def f(batch):\n    '''Tokens (text_lm) or latents.'''\n    return batch.aligned  # stable_diffusion rows align",
        "from genalign.trajectory import Trajectory\nfrom genalign.conditions import condition_key",
        "def f(unit):\n    return {'dimension_mean': 1e-4, 'token': 0.2}[unit]",
        "def f(x):\n    return isinstance(x, float)",
    ]
    for snippet in good:
        assert not violations(snippet), snippet


def test_algorithms_import_no_policy_and_never_branch_on_modality():
    folder = os.path.join(ROOT, "genalign", "algorithms")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".py"))
    assert {"ddpo.py", "grpo.py", "raft.py"} <= set(files)
    found = {}
    for f in files:
        with open(os.path.join(folder, f)) as fh:
            hits = violations(fh.read())
        if hits:
            found[f] = hits
    assert not found, f"algorithm files name policies or model libraries: {found}"


def test_trainer_names_no_policy_type():
    with open(os.path.join(ROOT, "genalign", "trainer.py")) as f:
        code = code_of(f.read())
    assert not TYPE_NAME.findall(code), "the trainer must not branch on a policy type"
