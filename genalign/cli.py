"""The ``genalign`` command line: train, sample, eval, and the Shapes World tools.

    genalign train CONFIG.yaml [key.sub=value ...] [--resume | --overwrite] [--dry-run]
    genalign sample POLICY --prompt "a red circle" [--prompts FILE] [--method svdd_pm] [--out DIR] [--overwrite]
    genalign sample assets/models/tiny-lm --policy-type text_lm --prompt "..." --method self_certainty
    genalign sample CONFIG.yaml [key=value ...]
    genalign eval POLICY_OR_RUN_DIR [--split heldout] [--tiers 1 2 3] [--json FILE]
    genalign list
    genalign label new CONFIG.yaml [--out DIR] | serve DIR [--port N] | train CONFIG.yaml | status DIR | export DIR --out FILE
    genalign toyworld pretrain {sd,verifier,clip,lm,vlm,video,flow} [args ...]
    genalign toyworld distill lcm [--out DIR] [--minutes M] [--steps N] [--seed S] [args ...]

Every config error is reported as one line naming the bad key, before any model loads; any other
error is one line too (``genalign --debug ...`` shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys

from genalign.configs import ConfigError


def _train(args: argparse.Namespace) -> int:
    from genalign.configs import describe, load_config
    from genalign.train_config import TrainConfig

    if args.help_config:
        print(describe(TrainConfig))
        return 0
    if args.config is None:
        raise ConfigError("genalign train needs a CONFIG.yaml (see configs/)")
    config = load_config(TrainConfig, args.config, args.overrides)
    if args.dry_run:
        print(f"{args.config}: valid")
        return 0
    from genalign.trainer import train

    history = train(config, resume=args.resume, overwrite=args.overwrite)
    if history and config.curriculum:
        stages: dict[str, list[dict]] = {}
        for row in history:
            stages.setdefault(row["stage"], []).append(row)
        for name, rows in stages.items():
            print(f"stage {name}: {len(rows)} epochs, reward {rows[0]['reward_mean']:.4f} -> {rows[-1]['reward_mean']:.4f}")
        print(f"done: final policy {config.output_dir}/final; each stage's report in {config.output_dir}/<stage>/report.html")
    elif history:
        first, last = history[0], history[-1]
        print(
            f"done: {len(history)} epochs, reward {first['reward_mean']:.4f} -> {last['reward_mean']:.4f}; "
            f"run directory {config.output_dir} (report.html, final/)"
        )
    return 0


def _sample(args: argparse.Namespace) -> int:
    from genalign.evaluation import sample_command

    return sample_command(args)


def _eval(args: argparse.Namespace) -> int:
    from genalign.evaluation import eval_command

    return eval_command(args)


def _list(args: argparse.Namespace) -> int:
    from genalign.catalog import format_catalog

    print(format_catalog())
    return 0


def _toyworld(args: argparse.Namespace) -> int:
    if args.toyworld_command == "distill":
        from genalign.recipes.distill_lcm import main as distill_lcm

        distill_lcm(args.rest)
        return 0
    if args.what == "sd":
        from genalign.recipes.pretrain_sd import main as pretrain_sd

        pretrain_sd(args.rest)  # returns the output folder, not an exit status
        return 0
    if args.what == "vlm":
        from genalign.recipes.pretrain_vlm import main as pretrain_vlm

        pretrain_vlm(args.rest)  # returns the output folder, not an exit status
        return 0
    if args.what == "flow":
        from genalign.recipes.pretrain_flow import main as pretrain_flow

        pretrain_flow(args.rest)  # returns the output folder, not an exit status
        return 0
    if args.what == "video":
        from genalign.recipes.pretrain_video import main as pretrain_video

        pretrain_video(args.rest)  # returns the output folder, not an exit status
        return 0
    if args.what == "lm":
        from genalign.recipes.pretrain_lm import main as pretrain_lm

        pretrain_lm(args.rest)  # returns the output folder, not an exit status
        return 0
    if args.what == "clip":
        from genalign.recipes.pretrain_clip import main as pretrain_clip

        pretrain_clip(args.rest)  # returns the output folder, not an exit status
        return 0
    from genalign.recipes.train_verifier import main as train_verifier

    return train_verifier(args.rest) or 0


def _label(args: argparse.Namespace) -> int:
    from genalign import labelling

    what = args.label_command
    if what == "new":
        r = labelling.new_round(args.config, args.overrides, args.out)
        print(f"round {r.round} (epoch {r.epoch}): {r.samples} samples, {r.comparisons} comparisons in {r.folder}; "
              f"label them with: genalign label serve {os.path.dirname(r.folder)}")
    elif what == "serve":
        from genalign.label_server import serve

        serve(args.dir, args.host, args.port)
    elif what == "train":
        history = labelling.train_round(args.config, args.overrides, args.out)
        last = history[-1] if history else {}
        print(f"trained epoch {last.get('epoch')}: {last.get('pairs', 0):.0f} labelled pairs, "
              f"{last.get('unlabelled_pairs', 0):.0f} ties or unlabelled; sample the next round with genalign label new")
    elif what == "status":
        print(labelling.format_status(labelling.status(args.dir)))
    else:
        n = labelling.export(args.dir, args.out, args.round)
        print(f"{n} preference pairs written to {args.out}")
    return 0


def _value(args: argparse.Namespace) -> int:
    from genalign.configs import load_config
    from genalign.guidance.train_value import ValueTrainConfig, run

    run(load_config(ValueTrainConfig, args.config, args.overrides))
    return 0


def _judge_check(args: argparse.Namespace) -> int:
    from rewards.robustness import main as judge_check

    return judge_check()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genalign", description="Align generative models with rewards.")
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback instead of one line")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a policy from a YAML config", description="Train a policy from a YAML config.")
    p.add_argument("config", nargs="?", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.epochs=3")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its latest checkpoint (same config; only train.epochs and the checkpoint cadence may change)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in output_dir (its checkpoints, logs, final/ and report are removed)")
    p.add_argument("--dry-run", action="store_true", help="validate the config and exit")
    p.add_argument("--help-config", action="store_true", help="print every config key with its help and exit")
    p.set_defaults(func=_train)

    p = sub.add_parser("sample", help="sample from a policy (optionally reward-guided) and score the samples", description="Sample from a policy (a pipeline or a trained run's final/ directory) with plain sampling, best-of-N or SVDD guidance (token policies also self-certainty best-of-N and Borda voting); score the samples and write images (a JSONL of rewards and per-clause details, a grid) or texts (samples.jsonl), and a compute summary.")
    p.add_argument("policy", help="policy directory or hub id, or a YAML sample config (keys as these flags; see configs/sample/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of a YAML sample config")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", help="text file with one prompt per line")
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the first sample; sample j of a prompt uses seed + j")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the policy's)")
    p.add_argument("--guidance-scale", type=float, default=None, help="CFG weight (default: the policy's)")
    p.add_argument("--reward", default="auto", help="reward to score with: shapes_verifier, jpeg_compressibility (images), motion, temporal_consistency (clips), rule_exact, rule_numeric, rule_choice (texts), none, or auto (images: the verifier when its asset exists; clips: motion; texts: rule_exact when the conditions have answers)")
    p.add_argument("--method", choices=["plain", "best_of_n", "svdd_pm", "svdd_mc", "self_certainty", "borda"], default="plain",
                   help="sampling method (self_certainty, borda: token policies)")
    p.add_argument("--policy-type", default="", help="policy type of a bare model folder or hub id, e.g. text_lm (default: read from the folder)")
    p.add_argument("--chunk", type=int, default=1, help="svdd_pm: steps (tokens) each candidate takes before the candidates are valued")
    p.add_argument("--borda-power", type=float, default=0.5, help="borda: rank r of N casts (N - r + 1)^p votes (0: majority vote)")
    p.add_argument("--value-model", default="", help="svdd_mc: directory written by `genalign value`")
    p.add_argument("--candidates", type=int, default=4, help="best_of_n, self_certainty, borda: N samples per output; svdd_pm: M candidates per decision")
    p.add_argument("--alpha", type=float, default=0.0, help="svdd_pm temperature (0: keep the best candidate)")
    p.add_argument("--out", default="samples", help="output directory (must be empty or new unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.set_defaults(func=_sample)

    p = sub.add_parser("value", help="train SVDD-MC's value function on a policy's rollouts", description="Train a time-conditioned value function v(x_t, t, c) on the policy's own rollouts (Monte Carlo reward targets) for SVDD-MC guidance.")
    p.add_argument("config", nargs="?", help="YAML config (see configs/value/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.set_defaults(func=_value)

    p = sub.add_parser("judge-check", help="false-positive rates of the text rewards on degenerate answers", description="Score degenerate responses (':', 'Thought process:', empty, hedged options, ...) with every shipped text reward and print the false-positive rate per reward.")
    p.set_defaults(func=_judge_check)

    p = sub.add_parser("eval", help="per-tier Shapes World accuracy of a policy", description="Per-tier strict and partial accuracy of a policy on Shapes World prompts, as a table and JSON.")
    p.add_argument("policy", help="policy directory, hub id, or a training run directory (its final/ is used)")
    p.add_argument("--split", choices=["train", "heldout"], default="heldout", help="prompt split")
    p.add_argument("--tiers", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="tiers to evaluate")
    p.add_argument("--prompts-per-tier", type=int, default=32, help="prompts per tier")
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the policy's)")
    p.add_argument("--guidance-scale", type=float, default=None, help="CFG weight (default: the policy's)")
    p.add_argument("--verifier", default="assets/models/shapes-verifier", help="verifier directory")
    p.add_argument("--batch-size", type=int, default=64, help="rows per sampling call")
    p.add_argument("--policy-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a sampling setting of the policy's config (YAML value), e.g. max_sequence_length=1; repeatable")
    p.add_argument("--json", help="also write the table as JSON to this file")
    p.set_defaults(func=_eval)

    p = sub.add_parser("label", help="human feedback rounds for D3PO: sample, label in the browser, train",
                       description="Human feedback for D3PO: sample the run's next epoch, label its pairs in a local web page, train that epoch on the labels, repeat.")
    lab = p.add_subparsers(dest="label_command", required=True)
    for name, what in (("new", "sample the run's next epoch and queue its pairs for labelling"),
                       ("train", "train the latest round's epoch on its labels (resumes the run)")):
        q = lab.add_parser(name, help=what)
        q.add_argument("config", help="training YAML with algorithm.preference: store (e.g. configs/label_shapes.yaml)")
        q.add_argument("overrides", nargs="*", help="key.sub=value overrides")
        q.add_argument("--out", default=None, help="labels folder (default and only value: the folder of algorithm.store_path)")
    q = lab.add_parser("serve", help="serve the labelling page over a labels folder")
    q.add_argument("dir", help="labels folder (holds labels.sqlite)")
    q.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    q.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other prints a warning: there is no login)")
    q = lab.add_parser("status", help="per round: pairs, labels, annotators and their agreement")
    q.add_argument("dir", help="labels folder")
    q = lab.add_parser("export", help="write the decided pairs as JSON lines (prompt, chosen, rejected)")
    q.add_argument("dir", help="labels folder")
    q.add_argument("--out", required=True, help="JSONL file to write")
    q.add_argument("--round", type=int, default=None, help="only this round (default: all)")
    for q in lab.choices.values():
        q.set_defaults(func=_label)

    p = sub.add_parser("list", help="the registered policies, algorithms, rewards and sampling methods",
                       description="Print the registered policies, algorithms, rewards and sampling methods, one line of help each.")
    p.set_defaults(func=_list)

    p = sub.add_parser("toyworld", help="Shapes World tools", description="Shapes World tools: pretrain and distil the tiny models shipped in assets/.")
    tw = p.add_subparsers(dest="toyworld_command", required=True)
    q = tw.add_parser("pretrain", help="train a tiny Shapes World model (sd: the text-to-image pipeline; verifier: the reward; clip: a CLIP and an aesthetic-style head; lm: the Shapes QA language model; vlm: the Shapes VQA vision-language model; video: the Moving Shapes text-to-video pipeline; flow: the rectified-flow SD3 pipeline)")
    q.add_argument("what", choices=["sd", "verifier", "clip", "lm", "vlm", "video", "flow"])
    q.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the pretraining command (see --help after the name)")
    q.set_defaults(func=_toyworld)
    q = tw.add_parser("distill", help="distil a tiny Shapes World model (lcm: a latent consistency model from tiny-sd)")
    q.add_argument("what", choices=["lcm"])
    q.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the distillation command (see --help after the name)")
    q.set_defaults(func=_toyworld)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.func in (_train, _sample, _eval, _toyworld, _value, _label) and not getattr(args, "dry_run", False):
        from genalign.progress import quiet_library_bars

        quiet_library_bars()
    try:
        return args.func(args)
    except KeyboardInterrupt as e:
        print(f"genalign: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    except Exception as e:  # one line per error; --debug shows where it came from
        if args.debug:
            raise
        print(f"genalign: {error_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, (ConfigError, *EXPECTED)) else 1


# Errors about the user's input (a path, a value): their message is the whole story, exit status 2.
EXPECTED = (FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, ValueError)


def error_line(e: BaseException) -> str:
    """The one-line message for an error: config errors say so, expected errors give their text,
    anything else its type too (run with --debug for the traceback)."""
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, ConfigError):
        return f"config error: {text}"
    if isinstance(e, EXPECTED) and type(e).__module__ == "builtins":
        return text
    if isinstance(e, OSError) and getattr(e, "filename", None) and str(e.filename) not in text:
        text = f"{text} ({e.filename})"
    return f"{type(e).__name__}: {text} (run with --debug for the traceback)"

if __name__ == "__main__":
    sys.exit(main())
