"""#33 item 3, the choosing step: more detectors than the mislabel stage reports, computed from one draw's finished
runs (their models, cached fits and saved scores), each against the loss, paired over the flipped points. Only the
choosing draw is read here; the fresh draws are scored by the stage alone, with the detectors chosen here.

    python experiments/detectors_explore.py multirun/detectors_fmnist_choose_ekfac/0 \
        multirun/detectors_fmnist_choose/0 multirun/detectors_fmnist_choose/1 \
        --out experiments/results/detectors_fmnist_choose/explore.csv

Arguments: the EK-FAC job (its self-influence is rescored at more dampings and on the last layer from its cached
fit), then the TracIn and the TRAK jobs of the same draw (their saved self-influence). Detectors: each score alone,
its rank average with the loss (``loss_and_<score>``) and the first-order leave-one-out loss ``loss + score / n``
(``loo_<score>``: the loss the point would have if it were left out, by one Newton step, ``L(z, θ) + (1/n) g^T
(G + λI)^-1 g``; for TRAK its margin analogue).

Influence on a held-out split: 1,000 test points (drawn with seed 123) as queries, scores ``I(q, z)`` with EK-FAC
(λ = 1e-3 and 1), the gradient norm (identity) and TRAK; per training point the mean harm ``-mean_q I(q, z)``
(``heldout_mean_<s>``), the summed negative part ``sum_q max(0, -I(q, z))`` (``heldout_neg_<s>``, the stage's
``heldout_harm``) and how often it is among a query's 10 most harmful points (``heldout_count_<s>``). Influence of the
other training points: the training set as queries (EK-FAC on the last layer at λ = 1e-3 and 1, and TRAK), the self
term left out; per point the share of its 10 strongest proponents in its 10 strongest proponents and opponents
(``proponent_share_<s>``; and its opposite, ``opponent_share_<s>``), the mean of its 10 strongest opponents
(``opponents_<s>``) and of the 10 points it harms most (``harms_others_<s>``). Each with its rank average with the loss.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import numpy as np
import torch

from influencelab.evaluation import paired_recall_difference, recall_at
from influencelab.run import load_run
from influencelab.stages.mislabel import rank_average
from influencelab.train import per_example_loss


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ekfac")
    p.add_argument("tracin")
    p.add_argument("trak")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    run = load_run(a.ekfac)
    flipped = run.flipped.numpy()
    n = len(flipped)
    loss = per_example_loss(run.model, run.train).numpy().astype(np.float64)
    scores: dict[str, np.ndarray] = {}
    for modules in ("all", "last:1"):
        attr = run.attributor("ekfac", modules=modules, damping=[1e-8, 1e-3, 0.1, 1.0])
        s = attr.self_influence().numpy().astype(np.float64)
        for d, row in zip(attr.dampings, s, strict=True):
            scores[f"ekfac_{modules}_{d:g}"] = row
    scores["identity"] = run.attributor("identity").self_influence()[0].numpy().astype(np.float64)
    for name, job in (("tracin", a.tracin), ("trak", a.trak)):
        other = load_run(job)
        assert torch.equal(other.flipped, run.flipped)  # (the same draw)
        scores[name] = other.self_scores.numpy().astype(np.float64)
    detectors = {"loss": loss}
    for name, s in scores.items():
        detectors[name] = s
        detectors[f"loss_and_{name}"] = rank_average(loss, s)
        detectors[f"loo_{name}"] = loss + s / n
    more: dict[str, np.ndarray] = {}
    queries = run.test.subset(torch.randperm(len(run.test), generator=torch.Generator().manual_seed(123))[:1000])
    for tag, solver, kw in (("ekfac_all", "ekfac", {"damping": [1e-3, 1.0]}), ("identity", "identity", {}),
                            ("trak", "trak", {})):
        pw = run.attributor(solver, **kw).pairwise(queries).numpy().astype(np.float64)
        for d, S in zip(kw.get("damping", [None]), pw, strict=True):
            t = tag if d is None else f"{tag}_{d:g}"
            harm = -S.mean(0)
            more[f"heldout_mean_{t}"] = harm
            more[f"heldout_neg_{t}"] = np.clip(-S, 0, None).sum(0)
            count = np.bincount(np.argsort(S, axis=1)[:, :10].ravel(), minlength=n).astype(np.float64)
            more[f"heldout_count_{t}"] = count + 1e-6 * harm  # (ties by the mean harm)
    for tag, solver, kw in (("ekfac_last:1", "ekfac", {"modules": "last:1", "damping": [1e-3, 1.0]}),
                            ("trak", "trak", {})):
        pw = run.attributor(solver, **kw).pairwise(run.train).numpy().astype(np.float64)
        for d, S in zip(kw.get("damping", [None]), pw, strict=True):
            t = tag if d is None else f"{tag}_{d:g}"
            np.fill_diagonal(S, 0.0)
            srt = np.sort(S, axis=1)
            opp, pro = -srt[:, :10].sum(1), srt[:, -10:].sum(1)
            more[f"proponent_share_{t}"] = pro / (opp + pro)
            more[f"opponent_share_{t}"] = opp / (opp + pro)
            more[f"opponents_{t}"] = opp / 10
            more[f"harms_others_{t}"] = -np.sort(S.T, axis=1)[:, :10].mean(1)
        del pw
    for name, s in more.items():
        detectors[name] = s
        detectors[f"loss_and_{name}"] = rank_average(loss, s)
    rows = []
    for name, s in detectors.items():
        d10 = paired_recall_difference(s, loss, flipped, 0.1, "d")
        rows.append({"detector": name, "recall@10": recall_at(s, flipped, 0.1), "recall@20": recall_at(s, flipped, 0.2),
                     "minus_loss_top10": d10["d"], "ci_low": d10["d_ci_low"], "ci_high": d10["d_ci_high"],
                     "p": d10["d_p"]})
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()})
    for r in sorted(rows, key=lambda r: -r["recall@10"]):
        print(f"{r['detector']:32s} {r['recall@10']:.3f} {r['recall@20']:.3f} {r['minus_loss_top10']:+.3f} "
              f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
