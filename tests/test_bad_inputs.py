"""Every bad input is one clear line, raised before any model loads where the config alone
decides it, with nothing on disk changed. The cases below also write the table in
docs/errors.md: this test fails when the page is out of date (regenerate it with
GENALIGN_WRITE_DOCS=1 pytest tests/test_bad_inputs.py)."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch
import yaml

from genalign import checkpoint
from genalign.cli import main
from genalign.configs import load_config, to_dict
from genalign.train_config import TrainConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "errors.md"
QS = "configs/quickstart.yaml"

# (what is wrong, arguments after `genalign train`, a fragment the message must contain)
CONFIG_CASES = [
    ("malformed YAML", ["{broken}"], "not valid YAML"),
    ("unknown key", [QS, "train.lerning_rate=1e-4"], "did you mean 'learning_rate'"),
    ("wrong type", [QS, "train.epochs=three"], "'train.epochs' must be an integer"),
    ("learning rate <= 0", [QS, "train.learning_rate=0"], "'train.learning_rate' must be > 0"),
    ("non-finite number", [QS, "train.learning_rate=.inf"], "must be a finite number"),
    ("NaN hyper-parameter", [QS, "algorithm.clip_range=.nan"], "'algorithm.clip_range' must be a finite number"),
    ("clip range <= 0", [QS, "algorithm.clip_range=0"], "'clip_range' must be > 0"),
    ("η = 0 (no log-density)", [QS, "policy.eta=0"], "'eta' must be in (0, 1]"),
    ("first-step η above 1", [QS, "policy.first_step_eta=1.5"], "'first_step_eta' must be in (0, 1] or null"),
    ("β < 0", [QS, "algorithm.name=grpo", "algorithm.beta=-0.1"], "'beta' must be >= 0"),
    ("one denoising step", [QS, "policy.num_steps=1"], "'num_steps' must be >= 2"),
    ("batch size 0", [QS, "train.train_batch_size=0"], "'train_batch_size' must be >= 1"),
    ("no eval samples", [QS, "eval.samples_per_prompt=0"], "'eval.samples_per_prompt' must be >= 1"),
    ("no report seeds", [QS, "report.seeds=[]"], "'report.seeds' needs at least 1"),
    ("image size off the latent grid", [QS, "policy.height=7"], "'height' must be a positive multiple of 4"),
    ("negative gradient clip", [QS, "train.max_grad_norm=-1"], "'train.max_grad_norm' must be >= 0"),
    ("no checkpoints kept", [QS, "train.keep_checkpoints=0"], "'train.keep_checkpoints' must be >= 1"),
    ("negative prompt pool", [QS, "prompts.pool_size=-1"], "'prompts.pool_size' must be >= 0"),
    ("negative reward weight", [QS, "reward.components.0.weight=-1"], "'reward.components.0.weight' must be > 0"),
    ("noise window wider than the chain", [QS, "algorithm.noise_window=12"], "wider than the chain"),
    ("missing model directory", [QS, "policy.pretrained=assets/models/nope"], "no model directory at 'assets/models/nope'"),
    ("empty prompt file", [QS, "prompts.source=file", "prompts.path={empty}"], "has no prompts"),
    ("non-UTF-8 prompt file", [QS, "prompts.source=file", "prompts.path={latin1}"], "is not UTF-8 text"),
    ("prompt outside the world's grammar", [QS, "prompts.source=list", "prompts.prompts=[a purple elephant]"],
     "is not a Shapes World prompt"),
]

# (what is wrong, arguments, fragment, how the output directory is prepared)
RUN_DIR_CASES = [
    ("output_dir holds another run", [QS], "already holds a run", "run"),
    ("--resume with a changed config", ["--resume", QS, "seed=5"], "seed: 0 -> 5", "run"),
    ("--resume where there is no run", ["--resume", QS], "holds no run to continue", "empty"),
    ("output_dir under a file", [QS], "is not a writable directory", "file"),
]


def normalise(text: str, tmp: pathlib.Path) -> str:
    return text.replace(str(tmp), "<tmp>")


def prepare(tmp: pathlib.Path, kind: str) -> str:
    out = tmp / "run"
    if kind == "run":  # a run's directory: its config and logs (as a killed or finished run leaves them)
        out.mkdir()
        config = load_config(TrainConfig, QS, [f"output_dir={out}"])
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
        (out / "metrics.jsonl").write_text('{"epoch": 1}\n')
    elif kind == "file":
        (tmp / "plain").write_text("x")
        out = tmp / "plain" / "run"
    return str(out)


def snapshot(tmp: pathlib.Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(tmp.rglob("*")) if p.is_file()}


def run_cli(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, err


def collect(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    (tmp_path / "broken.yaml").write_text("policy: [unclosed\n  type: x\n")
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    (tmp_path / "latin1.txt").write_bytes("a red circle\ncaf\xe9 square\n".encode("latin-1"))
    fill = {"broken": tmp_path / "broken.yaml", "empty": tmp_path / "empty.txt", "latin1": tmp_path / "latin1.txt"}
    rows = []
    for what, args, fragment in CONFIG_CASES:
        out = tmp_path / "out"
        argv = ["train", *(a.format(**fill) for a in args), f"output_dir={out}"]
        before = snapshot(tmp_path)
        rc, err = run_cli(argv, capsys)
        rows.append((what, args, rc, err, fragment))
        assert not out.exists() and snapshot(tmp_path) == before, f"{what}: something was written"
    for i, (what, args, fragment, kind) in enumerate(RUN_DIR_CASES):
        case = tmp_path / f"case{i}"
        case.mkdir()
        out = prepare(case, kind)
        before = snapshot(case)
        rc, err = run_cli(["train", *args, f"output_dir={out}"], capsys)
        rows.append((what, args, rc, err, fragment))
        assert snapshot(case) == before, f"{what}: something changed on disk"
    return rows


def test_every_bad_input_is_one_clear_line(tmp_path, capsys, monkeypatch):
    rows = collect(tmp_path, capsys, monkeypatch)
    for what, _args, rc, err, fragment in rows:
        assert rc == 2, (what, rc, err)
        assert err.count("\n") == 1 and err.startswith("genalign: "), (what, err)
        assert fragment in err, (what, err)
        assert "Traceback" not in err
    table = ["| input | command | message |", "|---|---|---|"]
    for what, args, _rc, err, _fragment in rows:
        shown = [a.format(broken="<a file with broken YAML>", empty="<a file of comments only>",
                          latin1="<a Latin-1 file>") for a in args]
        cmd = "genalign train " + " ".join(shown)
        message = normalise(err.strip(), tmp_path)
        if "not valid YAML: " in message:  # the parser's own words follow (they vary between PyYAML versions)
            message = message.split("not valid YAML: ")[0] + "not valid YAML: <the parser's message, with line and column>"
        message = message.replace("|", "\\|")
        table.append(f"| {what} | `{cmd}` | {message} |")
    page = DOC.read_text() if DOC.is_file() else ""
    start, end = "<!-- table: generated by tests/test_bad_inputs.py -->", "<!-- end of table -->"
    generated = "\n".join(table)
    if os.environ.get("GENALIGN_WRITE_DOCS"):
        head, _, rest = page.partition(start)
        _, _, tail = rest.partition(end)
        DOC.write_text(f"{head}{start}\n{generated}\n{end}{tail}")
        page = DOC.read_text()
    assert f"{start}\n{generated}\n{end}" in page, (
        "docs/errors.md is out of date: GENALIGN_WRITE_DOCS=1 pytest tests/test_bad_inputs.py"
    )


def test_hub_id_while_offline_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "genalign.cli", "train", QS, "policy.pretrained=nobody/no-such-pipeline",
         f"output_dir={tmp_path / 'run'}", "report.enabled=false"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert err[-1].startswith("genalign: 'policy.pretrained': cannot load 'nobody/no-such-pipeline'"), err[-1]
    assert not any("Traceback" in line for line in err)


def test_bad_images_to_a_reward_and_a_full_disk(tmp_path, monkeypatch):
    from rewards.jpeg import JpegCompressibility

    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        JpegCompressibility()(torch.rand(2, 3, 8, 8) * 5, ["a", "b"])
    with pytest.raises(ValueError, match=r"shape \[B, 3, H, W\]"):
        JpegCompressibility()(torch.rand(2, 8, 8), ["a", "b"])
    root = str(tmp_path / "ckpt")
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    checkpoint.write_checkpoint(root, 1, {"w": torch.ones(2)}, opt, {})

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.write_checkpoint(root, 2, {"w": torch.zeros(2)}, opt, {})
    assert checkpoint.latest_checkpoint(root).endswith("epoch_00001")
    assert sorted(os.listdir(root)) == ["epoch_00001", "latest"]
