"""The paper's qualitative check on real digits: do the top self-influence training images look mislabelled?

Takes a finished run directory with self-influence scores and label noise (e.g. a job of
``experiment=mnist5k_mislabel``) and writes a PNG grid of the top-k training images by self-influence, each
titled with its given (possibly flipped) and true label, plus a CSV of the same points:

    python experiments/mnist5k_selfinfluence_grid.py multirun/mnist5k_mislabel/0 \
        --out experiments/results/mnist5k_mislabel/selfinfluence_grid.png
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

from influencelab import load_run, plots


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a finished run directory (with scores/self.safetensors)")
    ap.add_argument("--k", type=int, default=24, help="how many top self-influence images (default 24)")
    ap.add_argument("--cols", type=int, default=8, help="images per row (default 8)")
    ap.add_argument("--out", type=Path, default=None,
                    help="PNG to write (default RUN_DIR/figures/selfinfluence_grid.png), a CSV beside it")
    args = ap.parse_args(argv)
    if args.k < 1 or args.cols < 1:
        ap.error(f"--k={args.k} and --cols={args.cols} must be positive")
    run = load_run(args.run_dir)
    scores = run.self_scores
    if scores is None:
        print(f"error: {args.run_dir} has no self-influence scores: run it with stage self "
              f"(e.g. experiment=mnist5k_mislabel)", file=sys.stderr)
        return 2
    train = run.train
    k = min(args.k, len(scores))
    top = torch.argsort(scores, descending=True, stable=True)[:k]
    names = train.classes
    given = [names[int(train.targets[i])] for i in top]
    true = [names[int(train.clean_targets[i])] for i in top]
    flipped = train.flipped
    n_flip = int(flipped[top].sum())
    solver = run.scores("self").get("solver") or run.config.solver.get("_target_", "?").rsplit(".", 1)[-1]
    ds = run.config.dataset
    title = (f"{ds.name}: top-{k} of {len(scores)} training images by self-influence ({solver}); "
             f"{n_flip} of {k} flipped (red), {int(flipped.sum())} flipped in all")
    fig = plots.self_influence_grid(train.images(top), given, true, scores[top].tolist(), list(ds.mean),
                                    list(ds.std), ncols=args.cols, title=title)
    out = args.out or args.run_dir / "figures" / "selfinfluence_grid.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "train_position", "split_position", "given", "true", "flipped", "self_influence"])
        for r, i in enumerate(top.tolist(), start=1):
            w.writerow([r, i, int(train.indices[i]), given[r - 1], true[r - 1], bool(flipped[i]),
                        f"{float(scores[i]):.6g}"])
    print(f"{out}: top-{k} self-influence, {n_flip} of {k} flipped "
          f"(random expectation {k * float(flipped.float().mean()):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
