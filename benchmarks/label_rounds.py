"""Human-feedback rounds with scripted annotators: does the labelling path train?

Each round runs the same steps a person runs — ``labelling.new_round`` (sample the run's
next epoch, queue its pairs), annotators answer every pair through the store calls the web
page makes, ``labelling.train_round`` (D3PO on the labels) — for ``--rounds`` rounds. Two
annotators: a careful one who prefers the output the Shapes World verifier scores higher, and
a careless one who gives the opposite answer with probability ``--flip``; their votes are
averaged, and their agreement is reported. The run's evaluation after each round (held-out
verifier accuracy) is the measure. A reference run trains the same epochs with the verifier's
labels computed in the trainer (``preference: reward``, one careful annotator on the float
images): the labelling path should track it.

    OMP_NUM_THREADS=1 python benchmarks/label_rounds.py --rounds 20
    OMP_NUM_THREADS=1 python benchmarks/label_rounds.py --screenshot docs/images/label_page.png --rounds 1

Prints a table and writes results.json and rounds.png to --out.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from genalign import labelling, runfiles  # noqa: E402
from genalign.progress import quiet_library_bars  # noqa: E402
from genalign.train_config import resolve_config  # noqa: E402
from rewards.registry import build_reward  # noqa: E402


def eval_rows(out: str) -> dict[int, dict[str, dict]]:
    rows: dict[int, dict[str, dict]] = {}
    for r in runfiles.read_jsonl(os.path.join(out, "eval.jsonl")):
        rows.setdefault(r["epoch"], {})[r["set"]] = r
    return rows


def screenshot(root: str, path: str) -> None:
    """The page as an annotator sees it, in headless Chromium."""
    import shutil

    from playwright.sync_api import expect, sync_playwright

    from genalign import label_server

    server, thread = label_server.start(root)
    args = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=args)
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.goto(server.url)
            page.fill("#name", "alice")
            page.press("#name", "Enter")
            for key in ("ArrowLeft", "ArrowRight", "t"):
                page.keyboard.press(key)
                page.wait_for_timeout(150)
            expect(page.locator("#progress")).to_contain_text("3 /")
            page.wait_for_timeout(300)
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            page.screenshot(path=path)
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "label_shapes.yaml"))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--flip", type=float, default=0.2, help="the careless annotator's probability of the opposite answer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "labelling"))
    ap.add_argument("--no-reference", action="store_true", help="skip the preference: reward run")
    ap.add_argument("--screenshot", default="", help="after sampling round 1, save the page as PNG here")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")
    args = ap.parse_args(argv)
    quiet_library_bars()

    os.makedirs(args.out, exist_ok=True)
    run_dir, labels = os.path.join(args.out, "run"), os.path.join(args.out, "labels")
    common = [f"seed={args.seed}", *args.overrides]
    config = resolve_config(args.config, [*common, f"output_dir={run_dir}",
                                          f"algorithm.store_path={os.path.join(labels, labelling.STORE_NAME)}"])
    careful = build_reward(config.reward.components)
    rounds = []
    done = labelling.trained_epochs(config)
    for number in range(done + 1, args.rounds + 1):
        t0 = time.perf_counter()
        labelling.new_round(config)
        if args.screenshot and number == 1:
            screenshot(labels, args.screenshot)
            from genalign.preference_store import PreferenceStore

            store = PreferenceStore(os.path.join(labels, labelling.STORE_NAME))
            for _ in range(3):  # take back the screenshot's answers
                store.undo("alice")
            store.close()
        t1 = time.perf_counter()
        labelling.label_with_reward(labels, careful, "careful", seed=args.seed)
        labelling.label_with_reward(labels, careful, "careless", flip=args.flip, seed=args.seed + 1000 * number)
        t2 = time.perf_counter()
        history = labelling.train_round(config)
        t3 = time.perf_counter()
        status = labelling.status(labels)[-1]
        rounds.append({**status, "reward_mean": history[-1]["reward_mean"], "pairs": history[-1].get("pairs"),
                       "seconds": {"sample": t1 - t0, "label": t2 - t1, "train": t3 - t2}})
        print(f"round {number}: {status['decided']} of {status['comparisons']} pairs decided, agreement "
              f"{status['agreement']:.2f}, rollout reward {history[-1]['reward_mean']:.3f} ({t3 - t0:.0f} s)", flush=True)

    reference = None
    if not args.no_reference:
        ref_dir = os.path.join(args.out, "reference")
        ref = resolve_config(args.config, [*common, f"output_dir={ref_dir}", "algorithm.preference=reward",
                                           "algorithm.store_path=", f"train.epochs={args.rounds}", "eval.every=5"])
        from genalign.trainer import train

        if labelling.trained_epochs(ref) < args.rounds:
            train(ref, resume=bool(runfiles.run_contents(ref_dir)))
        reference = eval_rows(ref_dir)

    labelled = eval_rows(run_dir)
    sets = list(labelled[0])
    metric = "shapes_verifier/strict"
    table = {"labelled": {}, "reference": {}}
    lines = [f"{'set':<28} {'before':>7} {'labelled':>9} {'reward labels':>14}"]
    last = max(labelled)
    for s in sets:
        before, after = labelled[0][s][metric], labelled[last][s][metric]
        ref_after = reference[max(reference)][s][metric] if reference else None
        table["labelled"][s] = {"before": before, "after": after, "se": labelled[last][s].get(metric + "_se")}
        if reference:
            table["reference"][s] = {"before": reference[0][s][metric], "after": ref_after,
                                     "se": reference[max(reference)][s].get(metric + "_se")}
        lines.append(f"{s:<28} {before:>7.3f} {after:>9.3f} {'' if ref_after is None else f'{ref_after:.3f}':>14}")
    print(f"held-out strict accuracy after {last} rounds")
    print("\n".join(lines))
    results = {
        "config": os.path.relpath(args.config, ROOT), "rounds": args.rounds, "flip": args.flip, "seed": args.seed,
        "overrides": args.overrides, "per_round": rounds, "final": table,
        "curve": {str(e): {s: labelled[e][s][metric] for s in sets} for e in sorted(labelled)},
        "reference_curve": {str(e): {s: reference[e][s][metric] for s in sets} for e in sorted(reference)} if reference else None,
    }
    runfiles.write_json(os.path.join(args.out, "results.json"), results)
    plot(results, os.path.join(args.out, "rounds.png"), sets)
    return results


def plot(results: dict, path: str, sets: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, s in enumerate(sets):
        xs = sorted(int(e) for e in results["curve"])
        ax.plot(xs, [results["curve"][str(e)][s] for e in xs], marker="o", ms=3, color=f"C{i}", label=f"{s}: labels")
        if results["reference_curve"]:
            xr = sorted(int(e) for e in results["reference_curve"])
            ax.plot(xr, [results["reference_curve"][str(e)][s] for e in xr], ls="--", color=f"C{i}", alpha=0.6,
                    label=f"{s}: reward labels")
    ax.set_xlabel("round (epoch)")
    ax.set_ylabel("held-out strict accuracy")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
