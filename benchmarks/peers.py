"""kronfluence, run the way its users run it: one place for every benchmark that measures against it.

``kronfluence_run`` fits its factors, then computes self-influence and pairwise scores with an ``Analyzer`` on
``device`` (``cpu`` or ``cuda``), timing each stage (CUDA synchronised) and recording peak CUDA memory per stage.
``precision="bf16"`` uses kronfluence's own documented low-precision presets
(``smart_low_precision_factor_arguments`` / ``smart_low_precision_score_arguments``: bf16 autocast and bf16
per-sample gradients, eigendecompositions and preconditioning in float32); ``"fp32"`` its defaults.
"""

from __future__ import annotations

import copy
import importlib.metadata
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset


def dist_version(dist: str) -> str:
    """The installed version of distribution ``dist`` ("" when it is not installed), for the benchmarks' CSVs."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


@dataclass
class StageTimes:
    """Wall seconds and peak memory (MB) of fit / self / pairwise: peak CUDA memory allocated on a GPU; on the
    CPU, the peak resident set size above the one at the stage's start (sampled every 5 ms)."""

    seconds: dict[str, float] = field(default_factory=dict)
    peak_mb: dict[str, float] = field(default_factory=dict)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """``with PeakRSS() as p: ...``; then ``p.mb``: the peak resident set size above the one at entry (Linux)."""

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())
        self.mb = self.peak - self.start


def timed_stage(times: StageTimes, stage: str, device: str, fn) -> Any:
    """Run ``fn()`` as ``stage``: synchronised wall time and peak memory go into ``times``."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        times.seconds[stage] = time.perf_counter() - t0
    times.peak_mb[stage] = torch.cuda.max_memory_allocated() / 2**20 if cuda else rss.mb
    return out


def classification_task():
    """kronfluence's ``Task`` for classification: summed cross-entropy, labels sampled from the model for the
    true Fisher."""
    from kronfluence.task import Task

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(batch[0])
            if not sample:
                return F.cross_entropy(logits, batch[1], reduction="sum")
            with torch.no_grad():  # true Fisher: labels sampled from the model
                y = torch.multinomial(torch.softmax(logits.detach().float(), -1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")

    return Classification()


def kronfluence_analyzer(model: nn.Module, out_dir: str, strategy: str = "ekfac", damping: float | None = 1e-3,
                         empirical: bool = True, device: str = "cpu", precision: str = "fp32") -> tuple[Any, Any, Any]:
    """kronfluence's ``Analyzer`` (analysis ``bench`` under ``out_dir``: a later one there reads the factors an
    earlier one fitted) on a copy of ``model``, with its factor and score arguments for ``precision``."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.common.factor_arguments import smart_low_precision_factor_arguments
    from kronfluence.utils.common.score_arguments import smart_low_precision_score_arguments

    if precision == "bf16":
        fargs = smart_low_precision_factor_arguments(strategy=strategy, dtype=torch.bfloat16)
        sargs = smart_low_precision_score_arguments(damping_factor=damping, dtype=torch.bfloat16)
    elif precision == "fp32":
        fargs, sargs = FactorArguments(strategy=strategy), ScoreArguments(damping_factor=damping)
    else:
        raise ValueError(f"precision={precision!r}: use fp32 or bf16")
    fargs.use_empirical_fisher = empirical
    task = classification_task()
    km = prepare_model(copy.deepcopy(model).to(device).eval(), task)
    an = Analyzer("bench", km, task, cpu=not device.startswith("cuda"), disable_tqdm=True, output_dir=out_dir,
                  log_level=40)
    return an, fargs, sargs


def kronfluence_run(model: nn.Module, train: TensorDataset, queries: TensorDataset, out_dir: str,
                    strategy: str = "ekfac", damping: float | None = 1e-3, empirical: bool = True,
                    batch: int = 256, device: str = "cpu", precision: str = "fp32", self_scores: bool = True,
                    pairwise: bool = True, repeats: int = 1) -> tuple[StageTimes, torch.Tensor | None,
                                                                      torch.Tensor | None]:
    """kronfluence's fit, self-influence ``[n_train]`` and pairwise scores ``[n_query, n_train]`` (on the CPU).
    ``repeats``: pairwise scoring runs that many times (``pairwise``, then ``pairwise_2``, ... in the times)."""
    an, fargs, sargs = kronfluence_analyzer(model, out_dir, strategy, damping, empirical, device, precision)
    times = StageTimes()
    timed_stage(times, "fit", device, lambda: an.fit_all_factors("f", train, per_device_batch_size=batch,
                                                                  factor_args=fargs))
    sv = pw = None
    if self_scores:
        timed_stage(times, "self", device, lambda: an.compute_self_scores(
            "s", "f", train, per_device_train_batch_size=batch, score_args=sargs))
        sv = an.load_self_scores("s")["all_modules"].float().cpu()
    if pairwise:
        for i in range(repeats):
            name = "pairwise" if i == 0 else f"pairwise_{i + 1}"
            timed_stage(times, name, device, lambda name=name: an.compute_pairwise_scores(
                name, "f", queries, train, per_device_query_batch_size=len(queries),
                per_device_train_batch_size=batch, score_args=sargs))
        pw = an.load_pairwise_scores("pairwise")["all_modules"].float().cpu()
    return times, sv, pw
