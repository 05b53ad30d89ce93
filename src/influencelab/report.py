"""``influencelab-report DIR``: turn a run or multirun directory into a table (markdown + CSV) and plots.

Every job directory under DIR (one with ``metrics.json``) becomes a row: its Hydra overrides
(``.hydra/overrides.yaml``) as columns, then every metric. Comparison plots are drawn when the metrics
are there: IHVP error vs damping per solver, detection curves across runs, LDS per solver with intervals.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import yaml


def find_jobs(root: Path) -> list[Path]:
    """Job directories under ``root`` (itself included), sorted naturally."""
    jobs = {p.parent for p in root.rglob("metrics.json")}
    return sorted(jobs, key=lambda p: [int(t) if t.isdigit() else t for t in p.relative_to(root).parts])


def overrides(job: Path) -> dict[str, str]:
    """The job's command-line overrides, ``key -> value`` (values unescaped: a sweep job's ``last\\:1`` is ``last:1``)."""
    path = job / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    out = {}
    for item in yaml.safe_load(path.read_text()) or []:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = re.sub(r"\\(.)", r"\1", value)
    return out


def collect(root: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """Rows (one per job) and the column order: ``job``, override keys, metric keys."""
    rows, okeys, mkeys = [], [], []
    for job in find_jobs(root):
        o = overrides(job)
        m = json.loads((job / "metrics.json").read_text())
        if (job / "error.txt").exists():  # a job of the sweep that stopped on bad input
            m = {**m, "error": (job / "error.txt").read_text().strip()}
        okeys += [k for k in o if k not in okeys]
        mkeys += [k for k in m if k not in mkeys]
        rows.append({"job": str(job.relative_to(root)) or ".", **o, **m})
    return ["job", *okeys, *sorted(mkeys)], rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return "" if v is None else str(v)


def markdown(columns: list[str], rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |\n" for r in rows)


def _labels(rows: list[dict[str, Any]], exclude: tuple[str, ...] = (), same: str | None = None) -> list[str]:
    """A short legend label per row: only the overrides that differ between ``rows`` (``same`` when none
    does; default: the job number)."""
    keys = [k for k in dict.fromkeys(k for r in rows for k in r)
            if "/" not in k and k != "job" and k not in exclude]
    varying = [k for k in keys if len({str(r.get(k)) for r in rows}) > 1]
    return [", ".join(f"{k}={r.get(k)}" for k in varying) or (same if same is not None else f"job {r['job']}")
            for r in rows]


def plots(root: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """Comparison figures from whatever metrics the jobs have."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: list[Path] = []
    fig_dir = root / "report_figures"
    # IHVP relative error vs damping, one line per solver
    pts = [(r.get("ihvp/solver", r.get("solver", "?")), r["ihvp/damping"], r["ihvp/rel_error"], r.get("ihvp/time_s"))
           for r in rows if "ihvp/rel_error" in r and "ihvp/damping" in r]
    if pts:
        fig_dir.mkdir(exist_ok=True)
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
        for solver in sorted({p[0] for p in pts}):
            sel = sorted((p for p in pts if p[0] == solver), key=lambda p: p[1])
            a1.plot([p[1] for p in sel], [p[2] for p in sel], marker="o", label=solver)
            a2.scatter([p[3] for p in sel], [p[2] for p in sel], label=solver)
        a1.set(xscale="log", yscale="log", xlabel="damping λ", ylabel="relative error vs CG", title="error vs damping")
        a2.set(xscale="log", yscale="log", xlabel="wall time (s)", ylabel="relative error", title="error vs time")
        a2.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on short ranges
        a1.legend()
        fig.tight_layout()
        out.append(fig_dir / "ihvp_error.png")
        fig.savefig(out[-1], dpi=120)
        plt.close(fig)
    # detection curves across runs
    curves = [(r, root / r["job"] / "mislabel_curve.csv") for r in rows]
    curves = [(r, p) for r, p in curves if p.exists()]
    names = dict(zip((r["job"] for r, _ in curves), _labels([r for r, _ in curves])))
    if curves:
        fig_dir.mkdir(exist_ok=True)
        fig, ax = plt.subplots(figsize=(6, 4.5))
        # several jobs: a colour per job, a line style per ranking (random once, grey); one job: a colour per ranking
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        styles = {"self_influence": "-", "identity": "--", "loss": ":", "random": "-."}
        for j, (r, p) in enumerate(curves):
            with open(p) as f:
                data = list(csv.DictReader(f))
            for m, col in enumerate(c for c in data[0] if c != "fraction"):
                if col == "random" and j > 0:
                    continue
                several = len(curves) > 1
                color = "grey" if col == "random" else colors[(j if several else m) % len(colors)]
                ax.plot([float(d["fraction"]) for d in data], [float(d[col]) for d in data], color=color,
                        linestyle=styles.get(col, "-") if several else "-",
                        label=f"{col} [{names[r['job']]}]" if several and col != "random" else col)
        ax.set(xlabel="fraction inspected", ylabel="fraction of flipped labels found", xlim=(0, 1), ylim=(0, 1.02))
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
        out.append(fig_dir / "detection_curves.png")
        fig.savefig(out[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    # LDS per solver with intervals
    lds = [r for r in rows if "lds/mean" in r]
    if lds:
        fig_dir.mkdir(exist_ok=True)
        fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(lds)), 3.8))
        lo = [r["lds/mean"] - r.get("lds/ci_low", r["lds/mean"]) for r in lds]
        hi = [r.get("lds/ci_high", r["lds/mean"]) - r["lds/mean"] for r in lds]
        ax.bar(range(len(lds)), [r["lds/mean"] for r in lds], yerr=[lo, hi], capsize=4)
        ax.set_xticks(range(len(lds)), _labels(lds), rotation=30, ha="right", fontsize=7)
        ax.set(ylabel="LDS (Spearman, mean over queries)", title="LDS with 95% bootstrap CI")
        fig.tight_layout()
        out.append(fig_dir / "lds.png")
        fig.savefig(out[-1], dpi=120)
        plt.close(fig)
    # unlearning: test accuracy and KL to the retrained model against the size of the edited set
    unl = [r for r in rows if "unlearn/n_points" in r and "unlearn/edited/test_accuracy" in r]
    if unl:
        fig_dir.mkdir(exist_ok=True)
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"wspace": 0.3})
        groups: dict[str, list[dict[str, Any]]] = {}
        for r, name in zip(unl, _labels(unl, exclude=("unlearn.size",), same="all")):
            groups.setdefault(name, []).append(r)
        # references that do not depend on the solver (retraining, fine-tuning, the original model) are drawn
        # once when every group shares them, in the group's colour otherwise
        refs: dict[tuple, list[tuple[str, int]]] = {}
        colors = (lambda i: f"C{i}") if len(groups) <= 10 else (lambda i: plt.cm.tab20(i % 20))
        for i, (name, rs) in enumerate(sorted(groups.items())):
            rs = sorted(rs, key=lambda r: r["unlearn/n_points"])
            n = [r["unlearn/n_points"] for r in rs]
            color = colors(i)
            a1.plot(n, [r["unlearn/edited/test_accuracy"] for r in rs], "-o", color=color,
                    label=f"edited [{name}]", markersize=4)
            a2.plot(n, [r["unlearn/edited/kl_to_retrained"] for r in rs], "-o", color=color,
                    label=f"edited [{name}]", markersize=4)
            for ax, key in ((a1, "finetuned/test_accuracy"), (a1, "retrained/test_accuracy"),
                            (a2, "original/kl_to_retrained")):
                series = (ax, key, tuple(n), tuple(r.get(f"unlearn/{key}", float("nan")) for r in rs))
                refs.setdefault(series, []).append((name, i))
        styles = {"finetuned": ":s", "retrained": "--^", "original": ":"}
        for (ax, key, n, vals), users in refs.items():
            method = key.split("/")[0]
            shared = len(users) == len(groups) and len(groups) > 1
            name, i = users[0]
            ax.plot(n, vals, styles[method], color="black" if shared else colors(i), markersize=4,
                    label=method if shared or len(groups) == 1 else f"{method} [{name}]")
        a1.set(xscale="log", xlabel="points edited |R|", ylabel="test accuracy", title="one Newton step vs retraining")
        a2.set(xscale="log", yscale="log", xlabel="points edited |R|", ylabel="KL(retrained || model), test",
               title="distance to the retrained model")
        for a in (a1, a2):
            a.grid(alpha=0.3)
            a.legend(fontsize=6, loc="upper left", bbox_to_anchor=(0, -0.2), ncol=2 if len(groups) > 4 else 1)
        fig.savefig(fig_dir / "unlearn.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        out.append(fig_dir / "unlearn.png")
    return out


def report(root: Path) -> tuple[Path, Path, list[Path]]:
    """Write ``report.md`` and ``report.csv`` (and figures) into ``root``."""
    columns, rows = collect(root)
    if not rows:
        raise SystemExit(f"error: no runs (metrics.json) under {root}")
    md, csv_path = root / "report.md", root / "report.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    figs = plots(root, rows)
    md.write_text(f"# Report: {root}\n\n{len(rows)} run(s).\n\n" + markdown(columns, rows)
                  + "".join(f"\n![{p.stem}]({p.relative_to(root)})\n" for p in figs))
    return md, csv_path, figs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="influencelab-report", description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="a run or multirun directory")
    args = parser.parse_args(argv)
    if not args.dir.is_dir():
        print(f"error: {args.dir} is not a directory", file=sys.stderr)
        raise SystemExit(2)
    md, csv_path, figs = report(args.dir)
    print(md.read_text() if md.stat().st_size < 20_000 else f"wrote {md}")
    print(f"wrote {md}, {csv_path}" + "".join(f", {p}" for p in figs))


if __name__ == "__main__":
    main()
