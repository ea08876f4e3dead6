"""Human feedback rounds for D3PO: sample → label → train → sample again.

A round samples the *next epoch* of a training run exactly as the trainer will (same prompts,
same per-row seeds, same weights: the run's latest checkpoint), saves what each rollout
produced, and queues every pair of samples that share a prompt (and their initial noise) in a
:class:`~genalign.preference_store.PreferenceStore`. People label the pairs in the browser
(:mod:`genalign.label_server`); training that epoch with ``algorithm.preference: store``
regenerates the same samples, checks each against the digest of what was labelled, and reads
the labels (averaged over annotators). Then the next round samples from the updated policy.

Files, under the labels folder ``DIR`` (the folder of ``algorithm.store_path``)::

    DIR/labels.sqlite          the store: rounds, samples, queued pairs, labels, journal
    DIR/round-001/<id>.png     round 1's images (<id>.gif for clips; texts live in the store)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from genalign import checkpoint, runfiles
from genalign.conditions import condition_key, condition_text, jsonable
from genalign.configs import ConfigError
from genalign.preference_store import PreferenceStore, Sample, agreement, sample_digests
from genalign.report import image_grid, is_images, is_video, save_gif
from genalign.train_config import TrainConfig, resolve_config

STORE_NAME = "labels.sqlite"


def round_dir(root: str, number: int) -> str:
    return os.path.join(root, f"round-{number:03d}")


def labels_folder(config: TrainConfig, out: str | None = None) -> str:
    """The labels folder of a config whose D3PO reads stored labels: the folder of
    ``algorithm.store_path``, whose file must be ``labels.sqlite`` (``out``, when given, must
    be that folder). Raises ConfigError naming the key otherwise."""
    alg = config.algorithm
    if getattr(alg, "preference", None) != "store":
        raise ConfigError(
            f"labelling rounds train from stored labels: set 'algorithm.name: d3po' and 'algorithm.preference: store' "
            f"(the config has algorithm {alg.name!r}, preference {getattr(alg, 'preference', None)!r})"
        )
    if os.path.basename(alg.store_path) != STORE_NAME:
        raise ConfigError(f"'algorithm.store_path' must name a file called {STORE_NAME} in the labels folder, got {alg.store_path!r}")
    root = os.path.normpath(os.path.dirname(alg.store_path) or ".")  # as the config names it, for messages
    if out is not None and os.path.abspath(out) != os.path.abspath(root):
        raise ConfigError(
            f"--out {out!r} is not the folder of 'algorithm.store_path' ({alg.store_path!r}): the trainer reads the "
            f"labels from there; give --out {root} or change the config"
        )
    return root


def trained_epochs(config: TrainConfig) -> int:
    """Epochs the run in ``output_dir`` has checkpointed (0: none yet)."""
    path = checkpoint.latest_checkpoint(os.path.join(config.output_dir, "checkpoints"))
    if path is None:
        return 0
    with open(os.path.join(path, "state.json")) as f:
        return int(json.load(f)["epoch"])


@dataclass
class RoundSummary:
    round: int
    epoch: int
    samples: int
    comparisons: int
    folder: str


def save_output(output: Any, path: str) -> None:
    """One image ``[3, H, W]`` as PNG, or one clip ``[F, 3, H, W]`` as GIF, pixel for pixel (the
    8-bit values :func:`~genalign.preference_store.sample_digests` hashes)."""
    if output.dim() == 4:
        save_gif(output, path, scale=1)
    else:
        image_grid(output[None], rows=1, pad=0).save(path)


def _display(condition: Any) -> str:
    try:
        return condition_text(condition)
    except (KeyError, TypeError):
        return condition_key(condition)


def new_round(config: TrainConfig | str, overrides: list[str] | None = None, out: str | None = None) -> RoundSummary:
    """Sample the run's next epoch and queue its pairs for labelling (see the module doc)."""
    from genalign.trainer import Trainer, check_output_dir

    config = resolve_config(config, overrides)
    root = labels_folder(config, out)
    if runfiles.run_contents(config.output_dir):
        check_output_dir(config, resume=True)  # the run there must be this config's
    epoch = trained_epochs(config)  # the round samples epoch `epoch` (0-based), logged as epoch + 1
    os.makedirs(root, exist_ok=True)
    store = PreferenceStore(os.path.join(root, STORE_NAME), create=True)
    try:
        rounds = store.rounds()
        if rounds and rounds[-1]["epoch"] > epoch:
            last = rounds[-1]
            raise FileExistsError(
                f"round {last['round']} (epoch {last['epoch']}) in {root} is sampled but not trained yet (the run has "
                f"{epoch} epochs): label it (genalign label serve {root}) and train it (genalign label train CONFIG)"
            )
        number = (rounds[-1]["round"] if rounds else 0) + 1
        trainer = Trainer(config)
        ckpt = checkpoint.latest_checkpoint(os.path.join(config.output_dir, "checkpoints"))
        if ckpt is not None:
            trainer.load_checkpoint(ckpt)
        plan = trainer.epoch_plan(epoch)
        if plan.kind != "rollouts" or not plan.shared_noise:
            raise ConfigError(f"algorithm {config.algorithm.name!r} does not compare rollouts that share their noise")
        tmp = tempfile.mkdtemp(prefix=".tmp-round-", dir=root)
        try:
            samples, pairs = _sample_round(trainer, epoch, plan, tmp, number)
            final = round_dir(root, number)
            if os.path.exists(final):  # left by a round whose store write failed
                shutil.rmtree(final)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private to this user
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        info = {"output_dir": config.output_dir, "seed": config.seed, "checkpoint": ckpt,
                "samples_per_prompt": config.train.samples_per_prompt}
        store.add_round(epoch + 1, samples, pairs, info)
        return RoundSummary(number, epoch + 1, len(samples), len(pairs), final)
    finally:
        store.close()


def _sample_round(trainer: Any, epoch: int, plan: Any, folder: str, number: int) -> tuple[list[Sample], list[tuple[str, str, str]]]:
    n = trainer.config.train.samples_per_prompt
    samples: list[Sample] = []
    pairs: list[tuple[str, str, str]] = []
    with torch.no_grad():
        for chunk, ids, _traj, outputs, conditions in trainer.epoch_rollouts(epoch, plan):
            digests = sample_digests(outputs)
            kind = "video" if is_video(outputs) else "image" if is_images(outputs) else "text"
            for g, p in enumerate(chunk):
                cond = conditions[g * n]
                key, display = condition_key(cond), _display(cond)
                cond_file, fields = None, None
                if isinstance(cond, dict):
                    fields = json.dumps({k: v for k, v in cond.items() if jsonable(v)}, sort_keys=True)
                    image = cond.get("image")
                    if image is not None and (hasattr(image, "save") or isinstance(image, torch.Tensor)):
                        cond_file = f"round-{number:03d}/prompt-{p}.png"  # a VLM's question image
                        if isinstance(image, torch.Tensor):  # [3, H, W] in [0, 1]
                            save_output(image, os.path.join(folder, f"prompt-{p}.png"))
                        else:
                            image.convert("RGB").save(os.path.join(folder, f"prompt-{p}.png"))
                rows = list(range(g * n, (g + 1) * n))
                for r in rows:
                    file = text = None
                    if kind == "text":
                        text = str(outputs[r])
                    else:
                        file = f"round-{number:03d}/{ids[r]}.{'png' if kind == 'image' else 'gif'}"
                        save_output(outputs[r], os.path.join(folder, os.path.basename(file)))
                    samples.append(Sample(ids[r], number, key, display, kind, digests[r], file, text, cond_file, fields))
                pairs += [(key, ids[i], ids[j]) for i in rows for j in rows if i < j]
    return samples, pairs


def train_round(config: TrainConfig | str, overrides: list[str] | None = None, out: str | None = None) -> list[dict[str, Any]]:
    """Train the epoch of the latest labelled round (resuming the run); returns the metrics."""
    from genalign.trainer import train

    config = resolve_config(config, overrides)
    root = labels_folder(config, out)
    path = os.path.join(root, STORE_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no labelling rounds in {root}: start one with genalign label new CONFIG")
    store = PreferenceStore(path)
    try:
        rounds = store.rounds()
        last = rounds[-1] if rounds else None
        if last is None:
            raise FileNotFoundError(f"no labelling rounds in {root}: start one with genalign label new CONFIG")
        labelled = sum(q["label"] is not None for q in store.queued_labels(last["round"]))
    finally:
        store.close()
    done = trained_epochs(config)
    if done >= last["epoch"]:
        raise FileExistsError(
            f"round {last['round']} (epoch {last['epoch']}) is already trained (the run has {done} epochs): sample the "
            f"next round with genalign label new CONFIG"
        )
    if done != last["epoch"] - 1:
        raise ValueError(f"round {last['round']} sampled epoch {last['epoch']} but the run has {done} epochs: the run "
                         f"in {config.output_dir} is not the one the round sampled")
    if labelled == 0:
        raise ValueError(f"round {last['round']} has no labels yet: label it with genalign label serve {root}")
    config.train.epochs = last["epoch"]
    return train(config, resume=bool(runfiles.run_contents(config.output_dir)))


def status(root: str, round: int | None = None) -> list[dict[str, Any]]:
    """Per round (every round, or only ``round``): comparisons, labelled, decided, per-annotator
    counts, agreement (see :func:`~genalign.preference_store.agreement`)."""
    path = os.path.join(root, STORE_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no labelling rounds in {root} (no {STORE_NAME})")
    store = PreferenceStore(path)
    try:
        out = []
        for r in store.rounds():
            if round is not None and r["round"] != round:
                continue
            queued = store.queued_labels(r["round"])
            out.append({
                "round": r["round"], "epoch": r["epoch"], "comparisons": r["comparisons"],
                "labelled": sum(q["label"] is not None for q in queued),
                "decided": sum(bool(q["label"]) for q in queued),
                "annotators": store.annotators(r["round"]), **agreement(queued),
            })
        return out
    finally:
        store.close()


def format_status(rows: list[dict[str, Any]]) -> str:
    head = f"{'round':>5} {'epoch':>5} {'pairs':>6} {'labelled':>8} {'decided':>7}  {'agreement':>9} {'kappa':>6}  annotators"
    lines = [head]
    for r in rows:
        agree = "-" if r["agreement"] is None else f"{r['agreement']:.2f}"
        kappa = "-" if r["fleiss_kappa"] is None else f"{r['fleiss_kappa']:.2f}"
        who = ", ".join(f"{k} ({v})" for k, v in r["annotators"].items()) or "-"
        lines.append(f"{r['round']:>5} {r['epoch']:>5} {r['comparisons']:>6} {r['labelled']:>8} {r['decided']:>7}  "
                     f"{agree:>9} {kappa:>6}  {who}")
    return "\n".join(lines)


def label_with_reward(root: str, reward: Any, annotator: str, round: int | None = None, flip: float = 0.0,
                      seed: int = 0) -> int:
    """A scripted annotator: answer each comparison of ``round`` (default: the latest) that
    ``annotator`` has not answered, preferring the output ``reward`` scores higher (equal: a
    tie), through the same store calls as the web page. ``flip``: the probability of giving the
    opposite answer (a careless annotator). The reward sees the saved outputs (8-bit images,
    GIF frames, texts) and the conditions as stored: a prompt string, or a dict condition's
    JSON-serialisable fields (its prompt and answer, not its image). Returns the answers written."""
    import random

    from PIL import Image

    def load(sample: Sample) -> Any:
        if sample.kind == "text":
            return sample.text
        with Image.open(os.path.join(root, sample.file)) as im:
            frames = []
            for i in range(getattr(im, "n_frames", 1)):
                im.seek(i)
                frames.append(torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).float() / 255)
        return frames[0] if sample.kind == "image" else torch.stack(frames)

    rng = random.Random(seed)
    store = PreferenceStore(os.path.join(root, STORE_NAME))
    try:
        round = store.latest_round() if round is None else round
        samples = store.samples()
        written = 0
        while (q := store.next_comparison(annotator, round)) is not None:
            a, b = samples[q["sample_a"]], samples[q["sample_b"]]
            outputs = [load(a), load(b)]
            batch = outputs if a.kind == "text" else torch.stack(outputs)
            conditions = [json.loads(s.condition) if s.condition else s.display for s in (a, b)]
            scores = reward(batch, conditions).scores.float()
            action = "tie" if scores[0] == scores[1] else ("a" if scores[0] > scores[1] else "b")
            if action != "tie" and rng.random() < flip:
                action = "b" if action == "a" else "a"
            written += store.record(q["id"], annotator, action)
        return written
    finally:
        store.close()


def export(root: str, path: str, round: int | None = None) -> int:
    """Write the decided comparisons as JSON lines ``{"prompt", "chosen", "rejected", ...}``;
    image and clip paths are relative to the JSONL file's folder. Returns the number of rows."""
    store_path = os.path.join(root, STORE_NAME)
    if not os.path.isfile(store_path):
        raise FileNotFoundError(f"no labelling rounds in {root} (no {STORE_NAME})")
    store = PreferenceStore(store_path)
    try:
        rows = store.export_rows(round)
    finally:
        store.close()
    here = os.path.dirname(os.path.abspath(path))

    def rel(p: str) -> str:
        return os.path.relpath(os.path.join(os.path.abspath(root), p), here)

    for r in rows:
        if r["kind"] != "text":
            r["chosen"], r["rejected"] = rel(r["chosen"]), rel(r["rejected"])
        if "condition_image" in r:
            r["condition_image"] = rel(r["condition_image"])
    os.makedirs(here, exist_ok=True)
    runfiles.write_jsonl(path, rows)
    return len(rows)
