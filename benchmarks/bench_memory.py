"""Peak CPU memory (RSS) of EK-FAC's fit, self-influence and pairwise scoring: influencelab (its public
``Attributor``, the path users run) vs kronfluence (its ``Analyzer``, set up as in peers.py) on the same model,
data and queries, fp32 and bf16, each (implementation, model, precision, phase) in a fresh process, back to back.

    OMP_NUM_THREADS=1 python benchmarks/bench_memory.py [--models resnet50,vit_b16] [--precisions fp32,bf16]
                                                        [--n 32] [--queries N] [--image N] [--batch 32] [--tiny]

Models (random init, no weights downloaded; timm, as conf/model builds them), 10 classes, random 3-channel images:
ResNet-50 (64x64, 16 queries) and ViT-B/16 (``img_size`` 48: 9 patches + the class token, 10 positions, past
EK-FAC's few-position path; 4 queries, since one query's gradient is 343 MB there); 32 training points, one batch
of 32. (Sizes for a shared 2-core machine: each process stays under ~6 GB, the whole run within about 30 min.) ``--tiny``: a tiny CNN on 16x16 images (seconds; for tests). Both sides use the
empirical Fisher, λ = 1e-3 and the same batch for fitting and scoring. bf16: influencelab's ``autocast="bf16"``
(its only lower-precision option: bf16 forward/backward; captured tensors, per-example and query gradients and the
preconditioned queries stored in bf16; covariances, eigenbases and the inverse in float32);
kronfluence's documented ``smart_low_precision_{factor,score}_arguments`` (bf16 autocast, covariances, per-sample
gradients and scores; eigendecompositions and preconditioning in float32).

Each phase runs in a process of its own, so peaks do not mix: ``fit`` fits and writes the factors (influencelab to
its cache, ``cache_dir``; kronfluence to its output directory); ``self`` and ``pairwise`` load those factors (inside
the measured phase on both sides) and score. Per row: ``rss_base_mb``, the resident set size after imports, model
and data (before the phase); ``rss_peak_mb``, its peak during the phase: the kernel's high-water mark (``VmHWM``,
reset at the phase's start; exact: a 5 ms sampler misses short spikes of a busy process, by 1.2 GB on ResNet-50's
fit); ``peak_inc_mb`` = the difference (the figure the ratios use); ``sampled_peak_mb``, peers.PeakRSS's sampled
peak beside it; ``seconds``, the phase's wall time. Scores are compared by Spearman: each side's
against kronfluence's fp32 scores (``spearman_vs_kronfluence``), and bf16 against the same side's fp32
(``spearman_vs_fp32``).

Writes benchmarks/results/memory_cpu.csv (``--tiny``: memory_cpu_tiny.csv; or ``--out``) with the date, versions,
threads and every size, and prints the ratios influencelab / kronfluence as a markdown table; the rows done so far
are in ``<out>.partial.csv`` while it runs (precisions outermost, then models).

The committed memory_cpu.csv is ``OMP_NUM_THREADS=1 python benchmarks/bench_memory.py --models resnet50,vit_b16`` on a
shared 2-core, 24 GB machine (wall times there are load-dependent; the memory is not). memory_cpu_before.csv is the
first run (ResNet-50 only: ViT-B/16's fit then held its float64 covariance snapshots as in-memory safetensors bytes,
about 2 more copies, past what a process could take there).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
DAMPING = 1e-3
IMPLS = ("influencelab", "kronfluence")
PHASES = ("fit", "self", "pairwise")
#: per model: builder arguments and default sizes (image side, queries)
MODELS = {
    "resnet50": {"arch": "resnet50", "image": 64, "queries": 16},
    "vit_b16": {"arch": "vit_base_patch16_224", "image": 48, "queries": 4, "patch_size": 16},
    "tiny": {"arch": "cnn", "image": 16, "queries": 4},
}
COLUMNS = ["date", "torch", "kronfluence", "threads", "model", "params", "image", "n_train", "n_query", "batch",
           "precision", "impl", "phase", "rss_base_mb", "rss_peak_mb", "peak_inc_mb", "sampled_peak_mb", "seconds",
           "spearman_vs_kronfluence", "spearman_vs_fp32", "note"]


def build(model: str, image: int, n: int, n_query: int):
    """The model (seeded random init) and random data: ``(model, train x, train y, query x, query y)``."""
    import torch

    from influencelab.models import cnn, timm_model

    spec = MODELS[model]
    torch.manual_seed(0)
    if spec["arch"] == "cnn":
        net = cnn(10, 3, image, channels=(4, 8), hidden=16)
    else:
        net = timm_model(spec["arch"], 10, 3, image, patch_size=spec.get("patch_size"))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, image, image, generator=g), torch.randint(0, 10, (n,), generator=g)
    qx, qy = torch.randn(n_query, 3, image, image, generator=g), torch.randint(0, 10, (n_query,), generator=g)
    return net.eval(), x, y, qx, qy


def reset_high_water_mark() -> bool:
    """Reset the kernel's peak-RSS record of this process (Linux >= 4.0: ``5`` to ``/proc/self/clear_refs``) to its
    current RSS; ``False`` where that is not possible (the sampled peak is then the figure)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def high_water_mark_mb() -> float:
    """The kernel's peak RSS of this process since the last reset (``VmHWM``), in MB: exact, no sampling."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def worker(args: argparse.Namespace) -> None:
    """One (impl, model, precision, phase): builds everything, then measures the phase alone; writes its row (JSON)
    to ``args.row`` and its scores to ``args.scores``."""
    import torch
    from torch.utils.data import TensorDataset

    sys.path.insert(0, str(HERE))
    from peers import StageTimes, _rss_mb, kronfluence_analyzer, timed_stage

    net, x, y, qx, qy = build(args.model, args.image, args.n, args.queries)
    train, queries = TensorDataset(x, y), TensorDataset(qx, qy)
    work = Path(args.work)
    bf16 = args.precision == "bf16"
    if args.impl == "influencelab":
        from influencelab import Attributor

        attr = Attributor(net, solver="ekfac", damping=DAMPING, curvature="empirical_fisher", batch_size=args.batch,
                          score_batch_size=args.batch, cache_dir=work / "influencelab",
                          autocast="bf16" if bf16 else None)

        def fit():
            attr.fit(train)
            if args.phase != "fit" and not attr.fit_info.cached:
                raise RuntimeError("the factors were not in the cache: run the fit phase first")

        phases = {"fit": fit, "self": lambda: (fit(), attr.self_influence()[0])[1],
                  "pairwise": lambda: (fit(), attr.pairwise(queries)[0])[1]}
    else:
        an, fargs, sargs = kronfluence_analyzer(net, str(work / "kronfluence"), "ekfac", DAMPING, empirical=True,
                                                device="cpu", precision=args.precision)
        phases = {
            "fit": lambda: an.fit_all_factors("f", train, per_device_batch_size=args.batch, factor_args=fargs),
            "self": lambda: (an.compute_self_scores("s", "f", train, per_device_train_batch_size=args.batch,
                                                    score_args=sargs), an.load_self_scores("s")["all_modules"])[1],
            "pairwise": lambda: (an.compute_pairwise_scores(
                "p", "f", queries, train, per_device_query_batch_size=len(queries),
                per_device_train_batch_size=args.batch, score_args=sargs),
                an.load_pairwise_scores("p")["all_modules"])[1]}
    base = _rss_mb()
    exact = reset_high_water_mark()
    times = StageTimes()
    out = timed_stage(times, args.phase, "cpu", phases[args.phase])
    sampled = base + times.peak_mb[args.phase]
    peak = max(high_water_mark_mb(), sampled) if exact else sampled
    if out is not None:
        torch.save(out.float().cpu(), args.scores)
    row = {"params": sum(p.numel() for p in net.parameters()), "threads": torch.get_num_threads(),
           "rss_base_mb": base, "rss_peak_mb": peak, "peak_inc_mb": peak - base, "sampled_peak_mb": sampled,
           "seconds": times.seconds[args.phase], **({} if exact else {"note": "peak sampled (no VmHWM reset)"})}
    Path(args.row).write_text(json.dumps(row))


def run(args: argparse.Namespace, out: Path) -> list[dict]:
    """Every (model, precision, impl, phase) in a fresh process, back to back; the rows with score agreement."""
    import pandas as pd
    import torch
    from peers import dist_version
    from scipy.stats import spearmanr

    partial = out.with_suffix(".partial.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    common = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "kronfluence": dist_version("kronfluence"), "n_train": args.n, "batch": args.batch}
    rows: list[dict] = []
    scores: dict[tuple, torch.Tensor] = {}
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        for precision in args.precisions.split(","):
            for model in args.models.split(","):
                image = args.image or MODELS[model]["image"]
                n_query = args.queries or MODELS[model]["queries"]
                work = Path(tmp) / f"{model}_{precision}"
                for impl in args.impls.split(","):
                    for phase in args.phases.split(","):
                        key = (model, precision, impl, phase)
                        row_file, score_file = Path(tmp) / "row.json", Path(tmp) / f"{'_'.join(key)}.pt"
                        row_file.unlink(missing_ok=True)
                        cmd = [sys.executable, __file__, "--worker", "--models", model, "--precisions", precision,
                               "--impls", impl, "--phase", phase, "--n", str(args.n), "--queries", str(n_query),
                               "--image", str(image), "--batch", str(args.batch), "--work", str(work),
                               "--row", str(row_file), "--scores", str(score_file)]
                        t0 = time.perf_counter()
                        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                        row = {**common, "model": model, "image": image, "n_query": n_query,
                               "precision": precision, "impl": impl, "phase": phase}
                        if r.returncode == 0 and row_file.exists():
                            row.update(json.loads(row_file.read_text()))
                            if score_file.exists():
                                scores[key] = torch.load(score_file).flatten()
                        else:
                            last = (r.stderr.strip().splitlines() or ["?"])[-1][:200]
                            row["note"] = f"failed (exit {r.returncode}): {last}"
                        rows.append(row)
                        pd.DataFrame(rows, columns=COLUMNS).to_csv(partial, index=False)  # what is done so far
                        print(f"{model:9s} {precision} {impl:12s} {phase:8s} " + (
                            f"base {row['rss_base_mb']:7.0f} MB, peak {row['rss_peak_mb']:7.0f} MB "
                            f"(+{row['peak_inc_mb']:.0f}; sampled {row['sampled_peak_mb']:.0f} MB), {row['seconds']:.1f} s"
                            if "seconds" in row else row["note"]) + f"  [{time.perf_counter() - t0:.0f} s in all]",
                            flush=True)
    rho = lambda a, b: float(spearmanr(a.numpy(), b.numpy()).statistic)  # noqa: E731
    for row in rows:
        key = (row["model"], row["precision"], row["impl"], row["phase"])
        if key not in scores:
            continue
        peer = (row["model"], "fp32", "kronfluence", row["phase"])
        if peer in scores and peer != key:
            row["spearman_vs_kronfluence"] = rho(scores[key], scores[peer])
        fp32 = (row["model"], "fp32", row["impl"], row["phase"])
        if row["precision"] != "fp32" and fp32 in scores:
            row["spearman_vs_fp32"] = rho(scores[key], scores[fp32])
    return rows


def table(csv: Path) -> str:
    """Markdown: per model, precision and phase, the peak RSS increment of each side and their ratio, the
    absolute peaks, the wall times and their ratio."""
    import pandas as pd

    df = pd.read_csv(csv)
    keys = ["model", "precision", "phase"]
    ours = df[df["impl"] == "influencelab"].set_index(keys)
    peer = df[df["impl"] == "kronfluence"].set_index(keys)
    f = lambda v: "–" if v is None or pd.isna(v) else f"{v:,.0f}"  # noqa: E731
    g = lambda v: "–" if v is None or pd.isna(v) else f"{v:.2f}"  # noqa: E731
    s = lambda v: "–" if v is None or pd.isna(v) else f"{v:.1f}"  # noqa: E731
    lines = ["| model | precision | phase | peak RSS increment MB: influencelab / kronfluence | ratio | "
             "peak RSS MB (absolute) | time s | time ratio | Spearman vs kronfluence fp32 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k, o in ours.iterrows():
        p = peer.loc[k] if k in peer.index else pd.Series(dtype=float)
        inc, peak, sec = (p.get(c) for c in ("peak_inc_mb", "rss_peak_mb", "seconds"))
        ratio_mb = None if inc is None else o.peak_inc_mb / inc
        ratio_s = None if sec is None else o.seconds / sec
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {f(o.peak_inc_mb)} / {f(inc)} | {g(ratio_mb)} | "
                     f"{f(o.rss_peak_mb)} / {f(peak)} | {s(o.seconds)} / {s(sec)} | {g(ratio_s)} | "
                     f"{g(o.spearman_vs_kronfluence)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet50,vit_b16", help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--phases", default=",".join(PHASES), help="fit first: the others load its factors")
    ap.add_argument("--n", type=int, default=32, help="training points")
    ap.add_argument("--queries", type=int, default=None, help="queries (default: per model, see above)")
    ap.add_argument("--image", type=int, default=None, help="image side (default: per model, see above)")
    ap.add_argument("--batch", type=int, default=32, help="fitting and scoring batch, both sides")
    ap.add_argument("--tiny", action="store_true", help="the tiny CNN only, n=32, batch 16: seconds (tests)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per phase process")
    ap.add_argument("--out", default=None, help="CSV (default: benchmarks/results/memory_cpu.csv, replaced)")
    for hidden in ("--phase", "--work", "--row", "--scores"):  # (a worker's)
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.model, args.precision, args.impl = args.models, args.precisions, args.impls
        worker(args)
        return
    if args.tiny:
        args.models, args.n, args.batch = "tiny", 32, 16
    for name, values, allowed in (("--models", args.models, MODELS), ("--precisions", args.precisions,
                                                                      ("fp32", "bf16")), ("--impls", args.impls, IMPLS),
                                   ("--phases", args.phases, PHASES)):
        bad = [v for v in values.split(",") if v not in allowed]
        if bad:
            ap.error(f"{name}: {', '.join(bad)} unknown; use {', '.join(allowed)}")
    results = Path(os.environ.get("INFLUENCELAB_BENCH_RESULTS", HERE / "results"))
    out = Path(args.out or results / ("memory_cpu_tiny.csv" if args.tiny else "memory_cpu.csv"))
    rows = run(args, out)
    import pandas as pd

    pd.DataFrame(rows, columns=COLUMNS).to_csv(out, index=False)  # a finished run replaces the file
    out.with_suffix(".partial.csv").unlink(missing_ok=True)
    print(f"\n{table(out)}\n\nwrote {out}")
    if any(isinstance(r.get("note"), str) and r["note"].startswith("failed") for r in rows):
        raise SystemExit("some phases failed: see the note column")


if __name__ == "__main__":
    main()
