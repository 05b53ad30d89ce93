"""Figures (matplotlib, headless): training curves, detection curves, attribution grids, and the helpers the stages'
``influencelab-report`` figures share (:func:`pyplot`, :func:`labels`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .evaluation import detection_curve  # noqa: E402


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    return plt


def labels(rows: list[dict[str, Any]], exclude: tuple[str, ...] = (), same: str | None = None) -> list[str]:
    """A short legend label per row of a report (one job each): only the overrides that differ between ``rows``
    (``same`` when none does; default: the job number)."""
    keys = [k for k in dict.fromkeys(k for r in rows for k in r)
            if "/" not in k and k != "job" and k not in exclude]
    varying = [k for k in keys if len({str(r.get(k)) for r in rows}) > 1]
    return [", ".join(f"{k}={r.get(k)}" for k in varying) or (same if same is not None else f"job {r['job']}")
            for r in rows]


def training_curves(history: dict[str, list[float]]):
    """Loss and the task's metric (``train_<metric>``/``test_<metric>``: accuracy, r2, ...) per epoch."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3))
    ep = np.arange(1, len(history["loss"]) + 1)
    a1.plot(ep, history["loss"], marker="o")
    a1.set(xlabel="epoch", ylabel="train loss", title="loss")
    metric = next((k[6:] for k in history if k.startswith("train_")), "accuracy")
    a2.plot(ep, history[f"train_{metric}"], marker="o", label="train (stored labels)")
    if history.get(f"test_{metric}"):
        a2.plot(ep, history[f"test_{metric}"], marker="o", label="test")
    a2.set(xlabel="epoch", ylabel=metric, title=metric)
    a2.legend()
    fig.tight_layout()
    return fig


def detection_curves(rankings: dict[str, np.ndarray | torch.Tensor], flipped, title: str = ""):
    """Fraction of flipped labels found vs fraction inspected, one line per ranking (paper Fig. 3)."""
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, scores in rankings.items():
        frac, rec = detection_curve(scores, flipped)
        ax.plot(frac, rec, label=name, linestyle="--" if name == "random" else "-")
    ax.set(xlabel="fraction of training data inspected", ylabel="fraction of flipped labels found",
           xlim=(0, 1), ylim=(0, 1.02), title=title or "mislabel detection")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return fig


def _show(ax, img: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> None:
    x = img.float() * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    x = x.clamp(0, 1)
    if x.shape[0] == 1:
        ax.imshow(x[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(x.permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def score_text(s: float) -> str:
    """The one number format of influence scores in figures: signed, 3 significant digits, scientific
    (``+1.48e+03``, ``-2.31e-01``)."""
    return f"{s:+.2e}"


def attribution_caption(solver: str | None = None, damping: Any = None, n_train: int | None = None) -> str:
    """What an attribution grid's titles mean (its caption): the labels, the score, its units, the damping."""
    how = ", ".join(x for x in (f"solver {solver}" if solver else "",
                                f"damping λ = {float(damping):g}" if isinstance(damping, (int, float))
                                else f"damping λ = {damping}" if damping is not None else "") if x)
    removal = f"n = {n_train:,}" if n_train else "n training points"
    return ("Each row: a test image (titled with its label) and the training images with the highest (green: "
            "helpful) and lowest (red: harmful) influence on its loss. Above each training image: the label it was "
            "trained with, '(true X)' where label noise flipped it from X, and its score "
            "I(z, z_q) = ∇L(z_q)ᵀ (G + λI)⁻¹ ∇L(z)" + (f" ({how})" if how else "") + ", in units of the test "
            "loss (nats): upweighting z by ε lowers the test image's loss by about ε × score; removing z raises "
            f"it by about score / n ({removal}).")


def attribution_grid(queries: torch.Tensor, query_labels: Sequence[str], helpful: list[list[tuple]],
                     harmful: list[list[tuple]], mean: Sequence[float], std: Sequence[float],
                     caption: str | None = None):
    """Rows = test images; columns = the query, its top-k helpful and top-k harmful training images.

    ``helpful[i]``/``harmful[i]`` are lists of ``(image, label_text, score)`` for query ``i`` (paper Fig. 2);
    ``label_text`` is the training label, with ``(true X)`` where it was flipped. Scores are written by
    :func:`score_text`; ``caption`` (default: :func:`attribution_caption` without the solver and damping) is
    printed under the grid.
    """
    import textwrap

    k = max(len(helpful[0]), 1)
    n = len(queries)
    width = 1.6 * (1 + 2 * k)
    fig, axes = plt.subplots(n, 1 + 2 * k, figsize=(width, 1.9 * n + 0.8), squeeze=False, layout="constrained")
    for i in range(n):
        _show(axes[i, 0], queries[i], mean, std)
        axes[i, 0].set_title(f"test image\nlabel {query_labels[i]}", fontsize=7)
        for j, (img, lab, s) in enumerate(helpful[i]):
            _show(axes[i, 1 + j], img, mean, std)
            axes[i, 1 + j].set_title(f"{lab}\n{score_text(s)}", fontsize=7, color="green")
        for j, (img, lab, s) in enumerate(harmful[i]):
            _show(axes[i, 1 + k + j], img, mean, std)
            axes[i, 1 + k + j].set_title(f"{lab}\n{score_text(s)}", fontsize=7, color="red")
    fig.suptitle(f"test image | top-{k} most helpful | top-{k} most harmful training images", fontsize=9)
    text = textwrap.fill(caption if caption is not None else attribution_caption(), width=int(width * 17))
    fig.supxlabel(text, fontsize=6, x=0.01, ha="left", multialignment="left")
    return fig


def loo_scatter(predicted: np.ndarray, actual: np.ndarray, query: np.ndarray, metrics: dict[str, float]):
    """Predicted vs actual leave-one-out change of query loss (Koh & Liang Fig. 2 style), one colour per query.
    Both axes are symmetric-log (queries differ by orders of magnitude; predictions are often far off in scale),
    each fitted to its own data; the dashed curve is y = x."""
    fig, ax = plt.subplots(figsize=(5.8, 4.2))
    for i in np.unique(query):
        ax.scatter(predicted[query == i], actual[query == i], s=14, label=f"query {i}")
    for axis, values in ((ax.xaxis, predicted), (ax.yaxis, actual)):
        nonzero = np.abs(values[values != 0])
        if len(nonzero):
            linthresh = float(np.quantile(nonzero, 0.1))
            (ax.set_xscale if axis is ax.xaxis else ax.set_yscale)("symlog", linthresh=linthresh)
            decades = np.arange(np.ceil(np.log10(linthresh)) + 1, np.floor(np.log10(nonzero.max())) + 1)
            decades = decades[::-1][:: max(1, int(np.ceil(len(decades) / 3)))]
            axis.set_ticks(sorted([0.0, *(10.0**decades), *(-(10.0**decades))]))
    top = float(np.max(np.abs(np.concatenate([predicted, actual])))) or 1.0
    ref = np.geomspace(top * 1e-8, top, 200)
    ax.plot(np.concatenate([-ref[::-1], ref]), np.concatenate([-ref[::-1], ref]), color="gray", lw=0.8, ls="--",
            label="y = x")
    ax.set_xlim(*_padded(predicted))
    ax.set_ylim(*_padded(actual))
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    ax.set(xlabel="predicted Δ query loss (score / n)", ylabel="actual Δ query loss (retrained)")
    ax.set_title(f"leave-one-out: Pearson {metrics['loo/pearson']:.2f} (within queries "
                 f"{metrics['loo/pearson_within']:.2f}),\nSpearman {metrics['loo/spearman']:.2f} "
                 f"(within {metrics['loo/spearman_within']:.2f})", fontsize=9)
    fig.tight_layout()
    return fig


def _padded(values: np.ndarray) -> tuple[float, float]:
    """Axis limits around ``values`` with 20% room (symlog-friendly: scales the extremes)."""
    lo, hi = float(np.min(values)), float(np.max(values))
    return (lo * 1.2 if lo < 0 else lo * 0.8, hi * 1.2 if hi > 0 else hi * 0.8) if lo != hi else (lo - 1, hi + 1)


def unlearn_bars(metrics: dict, mode: str, size: int, selection: str):
    """Original / edited (one Newton step) / fine-tuned / retrained: test accuracy, accuracy on the set,
    agreement with and KL to the retrained model."""
    names = ["original", "edited", "finetuned", "retrained"]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, key, title in ((axes[0], "test_accuracy", "test accuracy"),
                           (axes[1], "set_accuracy", "accuracy on R" + (" (corrected labels)" if mode == "repair"
                                                                       else " (its labels)")),
                           (axes[2], "agreement", "agreement with retrained (test)")):
        vals = [metrics.get(f"unlearn/{n}/{key}", 1.0 if key == "agreement" else np.nan) for n in names]
        ax.bar(names, vals, color=["gray", "tab:blue", "tab:orange", "tab:green"])
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, 1.05)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"{mode} of {size} points ({selection})", fontsize=10)
    fig.tight_layout()
    return fig


def self_influence_grid(images: torch.Tensor, given: Sequence[str], true: Sequence[str],
                        scores: Sequence[float], mean: Sequence[float], std: Sequence[float], ncols: int = 8,
                        title: str = ""):
    """The top self-influence training images, most influential first, each titled ``given A / true B`` (red
    where the given label was flipped, i.e. differs from the true one) and its score (the paper's check that
    the top self-influence points look mislabelled)."""
    n = len(images)
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.45 * ncols, 2.0 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        _show(ax, images[i], mean, std)
        ax.set_title(f"#{i + 1} given {given[i]} / true {true[i]}\n{score_text(scores[i])}", fontsize=7,
                     color="red" if given[i] != true[i] else "black")
    fig.suptitle(title or f"top-{n} self-influence training images (red: flipped label)", fontsize=9)
    fig.tight_layout()
    return fig


#: the one legend text of the convergence markers (report figures, the ihvp figure, the notebook)
HOLLOW = "hollow: its reference did not converge"
CROSS = "X: the solver itself did not converge"


def convergence_marker(solver_converged: bool, reference_converged: bool = True) -> dict[str, Any]:
    """Scatter keywords of a point by the one convention of every figure: an ``X`` where the solver itself did
    not converge (else a circle), hollow where the reference it is measured against did not (else filled)."""
    return {"marker": "o" if solver_converged else "X", "filled": reference_converged}


def agreement_figure(table):
    """Rank agreement of a sweep's solvers against damping (:func:`influencelab.compare.compare`'s table): one
    column per pass (pairwise, self), rows Spearman ρ and top-k overlap, one line per pair of solvers ``a vs b``
    (``b`` the more accurate; solid where ``b`` is the damping's reference, dotted otherwise); markers by
    :func:`convergence_marker` (``X``: ``a`` did not converge; hollow: ``b`` did not)."""
    import pandas as pd

    t = table.assign(_x=pd.to_numeric(table["damping"], errors="coerce")).dropna(subset=["_x"])
    passes = [p for p in ("pairwise", "self") if p in set(t["pass"])]
    fig, axes = plt.subplots(2, len(passes), figsize=(4.6 * len(passes) + 2.6, 6.2), squeeze=False,
                             layout="constrained")
    pairs = list(dict.fromkeys(zip(t["a"], t["b"], strict=True)))
    colors = {p: f"C{i % 10}" for i, p in enumerate(pairs)}
    for j, name in enumerate(passes):
        sub = t[t["pass"] == name]
        for row, (col, ylabel) in enumerate((("spearman", "Spearman ρ"), ("top_k_overlap", "top-k overlap"))):
            ax = axes[row, j]
            for pair in pairs:
                sel = sub[(sub["a"] == pair[0]) & (sub["b"] == pair[1])].sort_values("_x")
                if sel.empty:
                    continue
                ref = bool(sel["b_is_reference"].astype(bool).all())
                ax.plot(sel["_x"], sel[col], color=colors[pair], ls="-" if ref else ":", lw=1.5 if ref else 1.0,
                        label=f"{pair[0]} vs {pair[1]}" + (" (reference)" if ref else ""))
                for r in sel.to_dict("records"):
                    m = convergence_marker(bool(r["a_converged"]), bool(r["b_converged"]))
                    ax.scatter([r["_x"]], [r[col]], marker=m["marker"], s=36, zorder=3, edgecolors=colors[pair],
                               facecolors=colors[pair] if m["filled"] else "none")
            ax.set_xscale("log")
            ax.set_ylim(min(0.0, float(sub[col].min()) - 0.05) if len(sub) else 0.0, 1.02)
            ax.grid(alpha=0.3)
            k = int(sub["k"].iloc[0]) if len(sub) else 0
            what = "mean over queries" if name == "pairwise" else "over training points"
            ax.set(xlabel="damping λ", ylabel=ylabel if col == "spearman" else f"top-{k} overlap",
                   title=f"{name} scores: {ylabel} ({what})" if col == "spearman" else
                   f"{name} scores: top-{k} overlap (share of the {k} highest both give)")
    seen: dict[str, Any] = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(lab, h)
    gray = {"color": "gray", "s": 36}
    seen["circle, filled: both solves converged (or direct)"] = axes[0, 0].scatter([], [], marker="o", **gray)
    seen[CROSS] = axes[0, 0].scatter([], [], marker="X", **gray)
    seen[HOLLOW] = axes[0, 0].scatter([], [], marker="o", facecolors="none", edgecolors="gray", s=36)
    fig.legend(list(seen.values()), list(seen), loc="outside right center", fontsize=8,
               title="a vs b (b: the more accurate)", title_fontsize=8)
    fig.suptitle("Do the solvers rank the training points alike? (jobs sharing one trained model)", fontsize=10)
    return fig
