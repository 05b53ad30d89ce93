"""Experiment tracking: always plain files in the run directory, plus Weights & Biases when enabled.

``metrics.json`` is a flat dict with ``/``-namespaced keys (``train/test_accuracy``, ``time/train_s``),
rewritten atomically on every update; figures go to ``figures/<name>.png``. W&B runs offline by
default (no account needed), one run per Hydra job, grouped by sweep, with the resolved config.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from .cache import atomic_write_bytes, save_tensors
from .errors import check

log = logging.getLogger(__name__)


class Tracker:
    """Writes metrics/figures/tables to the run dir and mirrors them to W&B (``backend: wandb``)."""

    def __init__(self, backend: str = "wandb", mode: str = "offline", project: str = "influencelab",
                 entity: str | None = None, tags: list[str] | None = None):
        check(backend in ("wandb", "none"), "logger.backend", backend, "use wandb or none")
        check(mode in ("offline", "online", "disabled"), "logger.mode", mode, "use offline, online or disabled")
        self.backend, self.mode, self.project, self.entity = backend, mode, project, entity
        self.tags = list(tags or [])
        self.run_dir: Path | None = None
        self.metrics: dict[str, Any] = {}
        self._wandb = None

    def start(self, run_dir: Path, config: dict[str, Any], name: str, group: str | None) -> None:
        """Open the run: loads existing metrics.json (re-runs extend it) and starts W&B if enabled."""
        self.run_dir = Path(run_dir)
        (self.run_dir / "figures").mkdir(parents=True, exist_ok=True)
        mpath = self.run_dir / "metrics.json"
        if mpath.exists():
            self.metrics = json.loads(mpath.read_text())
        mode = os.environ.get("WANDB_MODE", self.mode)
        if self.backend == "wandb" and mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(project=self.project, entity=self.entity, mode=mode, dir=str(self.run_dir),
                                     config=config, name=name, group=group, tags=self.tags,
                                     reinit="finish_previous")

    def log(self, metrics: dict[str, Any]) -> None:
        """Record scalar metrics (flat, ``/``-namespaced)."""
        self.metrics.update(metrics)
        self._flush()
        if self._wandb is not None:
            self._wandb.log(metrics)
            for k, v in metrics.items():
                self._wandb.summary[k] = v

    def figure(self, name: str, fig: Any) -> Path:
        """Save a matplotlib figure as ``figures/<name>.png`` (and to W&B as an image)."""
        import matplotlib.pyplot as plt

        if self.run_dir is None:  # not started (a non-zero rank): nothing is written
            plt.close(fig)
            return Path(os.devnull)
        path = self.run_dir / "figures" / f"{name}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        if self._wandb is not None:
            import wandb

            self._wandb.log({f"figures/{name}": wandb.Image(str(path))})
        return path

    def table(self, name: str, columns: list[str], rows: list[list[Any]], line_x: str | None = None) -> None:
        """A small table: written as ``<name>.csv`` in the run dir and logged to W&B as a Table; with ``line_x``
        (a column), a curve: also a W&B line chart of every other column against it."""
        if self.run_dir is None:
            return
        lines = [",".join(columns)] + [",".join(str(v) for v in r) for r in rows]
        atomic_write_bytes(self.run_dir / f"{name.replace('/', '_')}.csv", ("\n".join(lines) + "\n").encode())
        if self._wandb is not None:
            import wandb

            logged: dict[str, Any] = {name: wandb.Table(columns=columns, data=rows)}
            if line_x is not None:
                cols = list(zip(*rows))  # column-wise values
                ys = [c for c in columns if c != line_x]
                logged[f"{name}_plot"] = wandb.plot.line_series(
                    xs=list(cols[columns.index(line_x)]), ys=[list(cols[columns.index(c)]) for c in ys], keys=ys,
                    title=name, xname=line_x)
            self._wandb.log(logged)

    def artifact(self, name: str, path: Path, kind: str = "scores") -> None:
        """Attach a file (e.g. a score file) to the W&B run as an artifact."""
        if self._wandb is not None:
            import wandb

            art = wandb.Artifact(name, type=kind)
            art.add_file(str(path))
            self._wandb.log_artifact(art)

    def save_tensors(self, relpath: str, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
        """Atomically write a safetensors file under the run dir."""
        if self.run_dir is None:
            return Path(os.devnull)
        path = self.run_dir / relpath
        save_tensors(path, tensors, metadata)
        return path

    def finish(self) -> None:
        self._flush()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def _flush(self) -> None:
        if self.run_dir is not None:
            blob = json.dumps(self.metrics, indent=2, sort_keys=True, default=float)
            atomic_write_bytes(self.run_dir / "metrics.json", (blob + "\n").encode())
