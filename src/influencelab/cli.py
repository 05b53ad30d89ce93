"""The ``influencelab`` command: a Hydra app running the configured stages in the job's run directory.

Errors in user input are printed as one line (``error: ...``) with exit status 2; set
``HYDRA_FULL_ERROR=1`` for the traceback.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from . import schema
from .compose import CONFIG_DIR, build
from .errors import InfluenceLabError
from .progress import heartbeat
from .stages import load_all
from .tracking import RunInfo, Tracker, run_info

log = logging.getLogger("influencelab")
load_all()  # every stage registers itself (and its config schema)
schema.register()  # conf/config.yaml's defaults list the schemas: composition type-checks those sections


def run(cfg: DictConfig, run_dir: Path, job_name: str = "run", group: str | None = None,
        sweep_dampings: list | None = None, info: RunInfo | None = None) -> dict:
    """Run ``cfg.stages`` with outputs in ``run_dir``; returns the metrics. Usable without Hydra's CLI.
    ``sweep_dampings``: the values of ``solver.damping`` that this job's multirun sweeps over (see
    :attr:`Context.score_dampings`). ``info``: the W&B run's identity (name, group, tags, job type; the CLI's
    from :func:`~influencelab.tracking.run_info`), else ``job_name`` and ``group``."""
    from . import distributed
    from .pipeline import Context
    from .registry import STAGES

    # the logger first: a W&B run that could not start (no wandb, online without a login) is a one-line error
    # before anything is read or written
    tracker = build(cfg.logger) if distributed.is_main() else Tracker(backend="none")
    ctx = Context(cfg, run_dir, tracker, sweep_dampings)  # validates the whole config before anything is written
    distributed.maybe_init(ctx.device)
    if not distributed.is_main():
        tracker = ctx.tracker = Tracker(backend="none")
    else:
        tracker.start(run_dir, OmegaConf.to_container(cfg, resolve=True), info or RunInfo(job_name, group))
    try:
        for name in cfg.stages:
            t0 = time.perf_counter()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            with heartbeat(f"stage {name}"):  # a line at least every 30 s off a terminal, however long a step
                STAGES[name].fn(ctx)
            if ctx.partition_pending:  # a score.partition job has cached its share: nothing more to do
                break
            tracker.log(peak_memory(name))
            elapsed = time.perf_counter() - t0
            if f"time/{name}_s" not in tracker.metrics:  # every stage's time in the summary (ihvp, mislabel, ...)
                tracker.log({f"time/{name}_s": elapsed})
            log.info("stage %s done in %.1fs", name, elapsed)
    finally:
        tracker.finish()
    return tracker.metrics


def peak_memory(stage: str) -> dict[str, float]:
    """Peak resident memory of the process so far (and CUDA peak during the stage, when on a GPU), in MB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out = {"mem/peak_rss_mb": rss, f"mem/{stage}_peak_rss_mb": rss}
    if torch.cuda.is_available():
        out[f"mem/{stage}_peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def summary(metrics: dict, run_dir: Path) -> str:
    """A short human summary of the headline metrics."""
    lines = [f"run directory: {run_dir}"]
    if "train/test_accuracy" in metrics:
        how = "cached model" if metrics.get("train/cached") else f"trained in {metrics['time/train_s']:.1f}s"
        lines.append(f"test accuracy {metrics['train/test_accuracy']:.3f} ({how})")
    for key, label in (("self_influence", "self-influence"), ("loss", "loss baseline"), ("random", "random")):
        if f"mislabel/{key}/recall@10" in metrics:
            lines.append(f"flipped labels found by {label:15s}: top 10% {metrics[f'mislabel/{key}/recall@10']:.0%}, "
                         f"top 20% {metrics[f'mislabel/{key}/recall@20']:.0%}")
    timings = [f"{k[5:-2]} {v:.1f}s" for k, v in metrics.items() if k.startswith("time/")]
    if timings:
        lines.append("time: " + ", ".join(timings))
    figs = sorted((run_dir / "figures").glob("*.png")) if (run_dir / "figures").exists() else []
    if figs:
        lines.append("figures: " + ", ".join(str(f) for f in figs))
    return "\n".join(lines)


def sweep_overrides(sweep_dir: Path) -> list[Override]:
    """A multirun's overrides (the command line's and ``hydra.sweeper.params``), parsed, from the sweep's
    ``multirun.yaml``; ``[]`` when the sweeper wrote no such file."""
    path = sweep_dir / "multirun.yaml"
    if not path.exists():
        return []
    hydra_cfg = OmegaConf.load(path).hydra
    params = OmegaConf.select(hydra_cfg, "sweeper.params", default=None) or {}
    overrides = [*hydra_cfg.overrides.task, *(f"{k}={v}" for k, v in params.items())]
    try:
        return OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return []


def swept_values(sweep_dir: Path, key: str) -> list[Any]:
    """The values a multirun sweeps ``key`` over (a command-line sweep such as ``key=a,b,c`` or ``range(...)``,
    or ``hydra.sweeper.params``), read from the sweep's ``multirun.yaml``; ``[]`` when ``key`` is not swept
    or the sweeper wrote no such file."""
    for o in sweep_overrides(sweep_dir):
        if o.key_or_group == key and o.is_discrete_sweep():
            return list(o.sweep_iterator())
    return []


def swept_keys(sweep_dir: Path) -> list[str]:
    """The keys (and config groups) a multirun sweeps over: what tells its jobs apart (their W&B run names)."""
    return [o.key_or_group for o in sweep_overrides(sweep_dir) if o.is_sweep_override()]


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def app(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    sweep_dir = Path(hc.sweep.dir) if hc.mode.name == "MULTIRUN" else None
    name = f"{hc.job.num}" if sweep_dir else run_dir.name
    swept = swept_values(sweep_dir, "solver.damping") if sweep_dir else []
    info = run_info(hc, list(cfg.stages), swept_keys(sweep_dir) if sweep_dir else None)
    try:
        metrics = run(cfg, run_dir, name, sweep_dampings=swept, info=info)
    except InfluenceLabError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        if sweep_dir is None:
            sys.exit(2)
        # in a sweep, one bad job does not stop the others: it is recorded, and the sweep exits 2 at the end
        (run_dir / "error.txt").write_text(f"{e}\n")
        with open(Path(hc.sweep.dir) / FailedJobs.FILE, "a") as f:
            f.write(f"job {name} ({' '.join(hc.overrides.task)}): {e}\n")
        return
    print(summary(metrics, run_dir))


class FailedJobs(Callback):
    """At the end of a sweep, lists the jobs that stopped on bad input and exits with status 2 if any did. At its
    start, a logger that could not start (logger=wandb without wandb, online without a login) stops the sweep
    in one line, exit status 2, before any job runs (unless the sweep sweeps the logger: then each job checks)."""

    FILE = "failed_jobs.txt"

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        (Path(config.hydra.sweep.dir) / self.FILE).unlink(missing_ok=True)  # a re-run starts a fresh list
        params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
        swept = [o.key_or_group for o in OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
                 if o.is_sweep_override()] + [str(k) for k in params]
        if not any(k.split(".")[0] == "logger" for k in swept):
            try:
                build(config.logger)
            except InfluenceLabError as e:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                print(f"error: {e}", file=sys.stderr)
                sys.exit(2)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        path = Path(config.hydra.sweep.dir) / self.FILE
        if path.exists():
            failed = path.read_text().splitlines()
            print(f"error: {len(failed)} job(s) of the sweep failed (the others ran):", file=sys.stderr)
            for line in failed:
                print(f"  {line}", file=sys.stderr)
            sys.exit(2)


def main() -> None:
    """Console-script entry point. Under torchrun, ranks > 0 write no Hydra output directory. The command line's
    config is checked first (:mod:`.preflight`): a bad key, group or value is one line, exit 2, and nothing is
    written."""
    from .preflight import check_command_line

    try:
        check_command_line(sys.argv[1:])
    except InfluenceLabError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if int(os.environ.get("RANK", "0")) > 0:
        import tempfile

        sys.argv += [f"hydra.run.dir={tempfile.mkdtemp(prefix='influencelab-rank')}", "hydra.output_subdir=null",
                     "hydra/job_logging=disabled"]
    app()


if __name__ == "__main__":
    main()
