"""The prepared GPU check (issue #18): EK-FAC/K-FAC fit + self + pairwise against kronfluence on one CUDA device.

    bash benchmarks/gpu/prepare.sh                  # here (no GPU): wheels + FashionMNIST -> .gpu_carry/
    bash benchmarks/gpu/run.sh                      # there: installs the wheels, pytest -m cuda, then this script
    python benchmarks/gpu/run.py --tiny --out DIR   # anywhere, on the CPU at toy sizes (tests/test_gpu_script.py)

For each case (model, data) and each configuration (strategy ekfac/kfac x precision fp32/bf16), influencelab
(the public API, ``Attributor``, as users call it) and kronfluence (``Analyzer``, its defaults for fp32 and its
documented ``smart_low_precision`` presets for bf16) run back to back in this process on the same trained model,
data, queries, damping (1e-3) and curvature (empirical Fisher, so both estimate the same matrix): wall time of
fit, self-influence and pairwise (100 queries) scoring, peak CUDA memory per stage, and the Spearman correlation
of the two implementations' scores.

Cases: ``cnn`` (the paper's CNN, trained, all 60,000 FashionMNIST points), ``resnet18`` (trained, FashionMNIST at
32 px), ``resnet50`` and ``vit_b16`` (224 px, random weights, synthetic data of Flowers102's training size:
2,040 images, 102 classes; timm weights and Flowers102 cannot be fetched there). Configurations run in priority
order (EK-FAC fp32, EK-FAC bf16, K-FAC fp32, K-FAC bf16), each across all cases, and every measurement is
appended to ``OUT/bench.csv`` at once: a run cut short by ``--budget`` (checked before each measurement and
enforced by an alarm inside it) keeps what it finished and says what it skipped.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import math
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from scipy.stats import spearmanr
from torch.utils.data import TensorDataset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/: the shared peer runner

from peers import StageTimes, kronfluence_run, timed_stage  # noqa: E402

from influencelab import Attributor  # noqa: E402
from influencelab.data.base import LabeledData  # noqa: E402
from influencelab.models import cnn, timm_model  # noqa: E402
from influencelab.train import Trainer  # noqa: E402

DAMPING = 1e-3
CONFIGS = [("ekfac", "fp32"), ("ekfac", "bf16"), ("kfac", "fp32"), ("kfac", "bf16")]
COLUMNS = ["case", "model", "n_train", "n_query", "image_size", "batch", "strategy", "precision", "impl",
           "fit_s", "self_s", "pairwise_s", "fit_self_s", "peak_fit_mb", "peak_self_mb", "peak_pairwise_mb",
           "spearman_self", "spearman_pairwise", "spearman_self_vs_fp32", "error", "device", "torch", "date"]


@dataclass
class Case:
    """One model on one data set: what it is built from and how large it is (full and ``--tiny``)."""

    name: str
    build: Callable[[int, int, int], torch.nn.Module]  # (num_classes, in_chans, image_size) -> model
    data: str  # "fashion_mnist" or "synthetic"
    n_train: int
    image_size: int
    channels: int
    num_classes: int
    batch: int
    train_epochs: int  # 0: random weights


def _timm(arch: str, patch: int | None = None, **narrow) -> Callable[[int, int, int], torch.nn.Module]:
    """A timm model as the CLI builds it (``models.timm_model``); with ``narrow`` (``--tiny``) the same
    architecture at a reduced width/depth (timm's own constructor arguments)."""
    if not narrow:
        return lambda c, ch, s: timm_model(arch, c, ch, s, patch_size=patch)
    import timm

    return lambda c, ch, s: timm.create_model(arch, num_classes=c, in_chans=ch, **narrow,
                                              **({"img_size": s} if patch else {}))


def cases(tiny: bool) -> list[Case]:
    if tiny:  # CPU, seconds: the same architectures and code paths, narrowed, at toy sizes
        small = (8, 16, 32, 64)
        return [Case("cnn", cnn, "synthetic", 96, 28, 1, 10, 32, 1),
                Case("resnet18", _timm("resnet18", channels=small), "synthetic", 48, 32, 1, 10, 16, 1),
                Case("resnet50", _timm("resnet50", channels=small), "synthetic", 24, 32, 3, 102, 8, 0),
                Case("vit_b16", _timm("vit_base_patch16_224", 16, embed_dim=48, depth=2, num_heads=2),
                     "synthetic", 24, 32, 3, 102, 8, 0)]
    return [Case("cnn", cnn, "fashion_mnist", 60_000, 28, 1, 10, 512, 2),
            Case("resnet18", _timm("resnet18"), "fashion_mnist", 10_000, 32, 1, 10, 256, 1),
            Case("resnet50", _timm("resnet50"), "synthetic", 2040, 224, 3, 102, 64, 0),
            Case("vit_b16", _timm("vit_base_patch16_224", 16), "synthetic", 2040, 224, 3, 102, 64, 0)]


def load_data(case: Case, n_query: int) -> tuple[LabeledData, LabeledData]:
    """(train, queries) of the case: real FashionMNIST (resized to the case's size) or seeded synthetic images."""
    if case.data == "fashion_mnist":
        from influencelab.data.fashion_mnist import FashionMNIST

        root = os.environ.get("INFLUENCELAB_DATA", "data")
        subset = None if case.n_train >= 60_000 else case.n_train
        train, test = FashionMNIST(root=root, subset=subset, image_size=case.image_size, download=False).load()
        return train, test.subset(torch.arange(n_query))
    g = torch.Generator().manual_seed(0)

    def synth(n: int) -> LabeledData:
        x = torch.randn(n, case.channels, case.image_size, case.image_size, generator=g)
        y = torch.randint(0, case.num_classes, (n,), generator=g)
        return LabeledData(x, y, y.clone(), torch.arange(n), case.num_classes)

    return synth(case.n_train), synth(n_query)


def tensors(data: LabeledData) -> TensorDataset:
    return TensorDataset(data.x, data.targets)


class Budget:
    """Seconds left for the whole run; an alarm interrupts a measurement that would overrun it."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def __enter__(self) -> Budget:
        if hasattr(signal, "SIGALRM"):
            def stop(*_):
                raise TimeoutError("out of budget (--budget)")

            signal.signal(signal.SIGALRM, stop)
            signal.setitimer(signal.ITIMER_REAL, max(self.left(), 0.01))
        return self

    def __exit__(self, *exc) -> None:
        if hasattr(signal, "SIGALRM"):
            signal.setitimer(signal.ITIMER_REAL, 0)


def ours(model: torch.nn.Module, train: LabeledData, queries: LabeledData, strategy: str, precision: str,
         batch: int, device: str, self_scores: bool = True) -> tuple[StageTimes, torch.Tensor | None, torch.Tensor]:
    """influencelab through its public API: fit, self-influence ``[n_train]`` (unless ``self_scores`` is off),
    pairwise ``[n_query, n_train]``."""
    attr = Attributor(model, solver=strategy, damping=DAMPING, curvature="empirical_fisher", device=device,
                      batch_size=batch, score_batch_size=batch, autocast="bf16" if precision == "bf16" else None)
    times = StageTimes()
    timed_stage(times, "fit", device, lambda: attr.fit(train))
    sv = timed_stage(times, "self", device, lambda: attr.self_influence())[0].float().cpu() if self_scores else None
    pw = timed_stage(times, "pairwise", device, lambda: attr.pairwise(queries))[0].float().cpu()
    return times, sv, pw


def spearman(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None or b is None or a.shape != b.shape:
        return math.nan
    return float(spearmanr(a.flatten().double().numpy(), b.flatten().double().numpy()).statistic)


class Writer:
    """Appends rows to OUT/bench.csv (header once) and echoes a one-line summary of each."""

    def __init__(self, path: Path, common: dict):
        self.path, self.common = path, common
        with open(path, "w", newline="") as f:
            csv.writer(f).writerow(COLUMNS)

    def row(self, **values) -> None:
        row = {**self.common, **values}
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, COLUMNS).writerow({k: row.get(k, "") for k in COLUMNS})
        def sec(k: str) -> str:
            return f"{row[k]:8.2f} s" if isinstance(row.get(k), float) else "       – "

        print(f"  {row['case']:9s} {row['strategy']:5s} {row['precision']:4s} {row['impl']:12s} "
              f"fit+self {sec('fit_self_s')}  pairwise {sec('pairwise_s')}  {row.get('error', '')}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_out"), help="where bench.csv and env.json go")
    ap.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (no kronfluence needed)")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for all measurements together")
    ap.add_argument("--device", default=None, help="default: cuda when available (--tiny: cpu)")
    ap.add_argument("--peer", choices=["auto", "on", "off"], default="auto",
                    help="kronfluence: auto = when importable (never with --tiny unless on)")
    ap.add_argument("--cases", default="cnn,resnet18,resnet50,vit_b16", help="in the order to run them")
    ap.add_argument("--configs", default=",".join(f"{s}:{p}" for s, p in CONFIGS))
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--no-self", action="store_true",
                    help="skip self-influence on both sides (fit and pairwise only: the memory table of issue 31)")
    args = ap.parse_args(argv)
    do_self = not args.no_self
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    n_query = min(args.queries, 8) if args.tiny else args.queries
    try:
        import kronfluence  # noqa: F401

        have_peer = True
    except ImportError:
        have_peer = False
    peer = args.peer == "on" or (args.peer == "auto" and have_peer and not args.tiny)
    budget = Budget(args.budget)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"
    env = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "date": datetime.date.today().isoformat(), "tiny": args.tiny,
           "peer": peer, "damping": DAMPING, "curvature": "empirical_fisher", "queries": n_query,
           "tf32": torch.backends.cuda.matmul.allow_tf32, "self": do_self}
    if peer:
        import kronfluence

        env["kronfluence"] = getattr(kronfluence, "__version__", "?")
    (out / "env.json").write_text(json.dumps(env, indent=1))
    print(f"device {name}, torch {torch.__version__}, peer kronfluence: {peer}", flush=True)
    w = Writer(out / "bench.csv", {"device": name, "torch": torch.__version__, "date": env["date"]})
    by_name = {c.name: c for c in cases(args.tiny)}
    wanted = [by_name[n] for n in args.cases.split(",")]  # in the order asked for (a budget cut drops the last)
    configs = [tuple(c.split(":")) for c in args.configs.split(",")]
    loaded: dict[str, tuple[torch.nn.Module, LabeledData, LabeledData]] = {}
    fp32_self: dict[tuple[str, str, str], torch.Tensor] = {}
    for strategy, precision in configs:
        for case in wanted:
            base = dict(case=case.name, model=case.name, n_query=n_query, image_size=case.image_size,
                        batch=case.batch, strategy=strategy, precision=precision)
            if budget.left() < 5:
                w.row(**base, impl="influencelab", n_train=case.n_train, error="skipped: budget spent")
                continue
            try:
                with budget:
                    if case.name not in loaded:
                        loaded[case.name] = prepare(case, n_query, device)
            except Exception as e:  # noqa: BLE001 - one case's failure must not end the run
                w.row(**base, impl="influencelab", n_train=case.n_train, error=f"setup: {type(e).__name__}: {e}"[:300])
                traceback.print_exc()
                continue
            model, train, queries = loaded[case.name]
            base["n_train"] = len(train)
            sv = pw = None
            for impl in ["influencelab", *(["kronfluence"] if peer else [])]:
                if budget.left() < 5:
                    w.row(**base, impl=impl, error="skipped: budget spent")
                    continue
                try:
                    with budget, tempfile.TemporaryDirectory() as tmp:
                        if impl == "influencelab":
                            t, s_self, s_pair = ours(model, train, queries, strategy, precision, case.batch, device,
                                                    do_self)
                        else:
                            t, s_self, s_pair = kronfluence_run(model, tensors(train), tensors(queries), tmp,
                                                                strategy, DAMPING, True, case.batch, device,
                                                                precision, self_scores=do_self)
                    sec, mb = t.seconds, t.peak_mb
                    cols = dict(fit_s=sec["fit"], pairwise_s=sec["pairwise"], peak_fit_mb=mb["fit"],
                                peak_pairwise_mb=mb["pairwise"])
                    if do_self:
                        cols.update(self_s=sec["self"], fit_self_s=sec["fit"] + sec["self"], peak_self_mb=mb["self"])
                    if impl == "influencelab":
                        sv, pw = s_self, s_pair
                    else:
                        cols.update(spearman_self=spearman(s_self, sv), spearman_pairwise=spearman(s_pair, pw))
                    key = (case.name, strategy, impl)
                    if s_self is None:
                        pass
                    elif precision == "fp32":
                        fp32_self[key] = s_self
                    elif key in fp32_self:
                        cols["spearman_self_vs_fp32"] = spearman(s_self, fp32_self[key])
                    w.row(**base, impl=impl, **cols)
                except Exception as e:  # noqa: BLE001 - recorded; the next measurement goes on
                    w.row(**base, impl=impl, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
                    if not isinstance(e, TimeoutError):
                        traceback.print_exc()
                finally:
                    gc.collect()
                    if device.startswith("cuda"):
                        torch.cuda.empty_cache()
    print(f"done with {budget.left():.0f} s of the budget left; rows in {out / 'bench.csv'}", flush=True)
    return 0


def prepare(case: Case, n_query: int, device: str) -> tuple[torch.nn.Module, LabeledData, LabeledData]:
    """The case's data and model (trained for ``train_epochs`` on ``device``; eval mode)."""
    train, queries = load_data(case, n_query)
    torch.manual_seed(0)
    model = case.build(case.num_classes, case.channels, case.image_size)
    if case.train_epochs:
        t0 = time.perf_counter()
        Trainer(epochs=case.train_epochs, batch_size=128, lr=1e-3, seed=0, device=device).fit(model, train)
        print(f"  {case.name}: trained {case.train_epochs} epoch(s) on {len(train)} points in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    return model.to(device).eval(), train, queries


if __name__ == "__main__":
    sys.exit(main())
