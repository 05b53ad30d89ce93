"""Do the solvers of a sweep agree? Rank agreement of their scores, per damping, read from the jobs' score files.

``influencelab-report`` on a solver x damping sweep (``influencelab -m solver=lissa,ekfac 'solver.damping=[1e-3,1e-2]'
stages=[train,fit,pairwise,self]``) compares every two jobs that scored the same points with the same trained model,
at every damping both scored (a damping list in one job, or one damping per job, alike):

* **Spearman ρ** of the two score vectors: for ``pairwise``, over the training points of each query, then the mean
  (and the minimum) over queries; for ``self``, over the training points;
* **top-k overlap**: the fraction of the k highest scores (most helpful / most self-influential) that both give,
  ``k`` = 1% of the training set, at least 10 (:func:`top_k`); pairwise: the mean over queries.

Each pair is written with its more accurate member second (``b``, the pair's reference), and at each damping and
pass one job is *the* reference: the most accurate one that scored it, by :func:`standing`:

    exact or gram (dense solves) > CG converged > LiSSA converged > EK-FAC > K-FAC > another direct solver
    > CG or LiSSA not converged (the lower residual first) > identity (no curvature)

("converged": the score file's convergence record for that pass and damping; a preconditioned CG or LiSSA counts as
CG or LiSSA). Where the best is EK-FAC or worse, the numbers measure agreement, not accuracy, and the report says so.

Figures mark convergence one way everywhere (the notebook's and the ihvp figure's too): **hollow** = the reference the
point is measured against did not converge (the number is not a valid accuracy); an **X** marker = the compared
solver itself did not converge; a filled circle = every solve behind the point converged (or was direct).

Jobs are compared only when their solver settings differ (:func:`solver_setting`) and they share the trained model (``model.safetensors``' model key; for jobs without one,
the config sections the model depends on: dataset, model, trainer, task, seed) and the same training and query
points; :func:`comparison_notes` says which jobs could not be compared and why.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from .metric_names import damping_value

if TYPE_CHECKING:
    import pandas as pd

PASSES = ("pairwise", "self")

#: the order of :func:`standing` (lower = more accurate); a solver not named here: ``OTHER_DIRECT`` / iterative
TIERS = {"exact": 0, "gram": 0, "cg": 1, "lissa": 2, "ekfac": 3, "kfac": 4, "identity": 7}
OTHER_DIRECT, UNCONVERGED, OTHER_CONVERGED = 5, 6, 2.5


@dataclass
class JobScores:
    """One job's score file: scores per damping (pairwise ``[n_query, n_train]``, self ``[n_train]``) and the
    convergence record per damping (``None``: a direct solver)."""

    job: str
    solver: str
    scores: dict[Any, np.ndarray]
    convergence: dict[Any, dict | None]
    model: str
    points: str  # digest of the training (and query) indices
    label: str = ""
    overrides: dict[str, str] = field(default_factory=dict)

    def converged(self, d: Any) -> bool:
        c = self.convergence.get(d)
        return c is None or bool(c.get("converged"))

    def residual(self, d: Any) -> float:
        c = self.convergence.get(d)
        return math.nan if c is None else float(c.get("rel_residual_max", math.nan))


def top_k(n_train: int) -> int:
    """The k of the top-k overlap: 1% of the training set, at least 10 (at most all of it)."""
    return max(1, min(n_train, max(10, math.ceil(0.01 * n_train))))


def standing(js: JobScores, d: Any) -> tuple[float, float]:
    """Sort key of a job's scores at damping ``d``, most accurate first (the module's rule): the tier, then the
    relative residual (the lower first)."""
    base = js.solver.split("+")[0]
    iterative = js.convergence.get(d) is not None
    if TIERS.get(base) == 0:  # a dense solve (exact, gram)
        tier: float = 0
    elif iterative:
        tier = (TIERS[base] if base in ("cg", "lissa") else OTHER_CONVERGED) if js.converged(d) else UNCONVERGED
    else:
        tier = TIERS.get(base, OTHER_DIRECT)
    r = js.residual(d)
    return tier, 0.0 if math.isnan(r) else r


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_identity(job: Path) -> tuple[str | None, str]:
    """``(model key from model.safetensors or None, digest of the config sections the model depends on)``."""
    key = None
    weights = job / "model.safetensors"
    if weights.exists():
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            key = (f.metadata() or {}).get("model_key")
    path = job / ".hydra" / "config.yaml"
    cfg = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
    trainer = {k: v for k, v in (cfg.get("trainer") or {}).items() if k != "device"}
    dataset = {k: v for k, v in (cfg.get("dataset") or {}).items() if k not in ("root", "num_workers", "download")}
    return key, "config:" + _digest([dataset, cfg.get("model"), trainer, cfg.get("task"), cfg.get("seed")])


def read_scores(job: Path, name: str, rel: str) -> JobScores | None:
    """``job``'s ``scores/<name>.safetensors`` (``None`` without one). Reads either layout: ``scores`` for the first
    damping beside ``scores_by_damping``, or ``scores`` with the damping axis first."""
    path = job / "scores" / f"{name}.safetensors"
    if not path.exists():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)
    dampings = [damping_value(d) for d in json.loads(meta.get("dampings", "[]"))] or [None]
    base_ndim = 2 if name == "pairwise" else 1
    s = tensors.get("scores_by_damping", tensors["scores"])
    if s.ndim == base_ndim:
        s = s.unsqueeze(0)
    s = s.double().numpy()
    conv_json = json.loads(meta.get("convergence") or "{}")
    conv = {damping_value(k): v for k, v in conv_json.items()}
    dampings = dampings[: len(s)]
    points = [tensors.get("train_indices"), tensors.get("query_indices")]
    model_key, cfg_key = model_identity(job)
    return JobScores(job=rel, solver=meta.get("solver") or "?", scores=dict(zip(dampings, s, strict=False)),
                     convergence={d: conv.get(d) for d in dampings}, model=model_key or cfg_key,
                     points=_digest([None if t is None else t.tolist() for t in points]))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    with warnings.catch_warnings():  # constant scores (a degenerate solver): NaN, no warning
        warnings.simplefilter("ignore")
        return float(spearmanr(a, b).statistic)


def _overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    ta, tb = np.argpartition(-a, k - 1)[:k], np.argpartition(-b, k - 1)[:k]
    return len(np.intersect1d(ta, tb)) / k


def agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Spearman ρ and top-k overlap of two score arrays (``[n_train]``, or ``[n_query, n_train]``: per query,
    then the mean; ``spearman_min`` the worst query)."""
    a2, b2 = np.atleast_2d(a), np.atleast_2d(b)
    k = top_k(a2.shape[1])
    rho = [_spearman(x, y) for x, y in zip(a2, b2, strict=True)]
    return {"spearman": float(np.mean(rho)), "spearman_min": float(np.min(rho)),
            "top_k_overlap": float(np.mean([_overlap(x, y, k) for x, y in zip(a2, b2, strict=True)])), "k": k}


def _labels(group: list[JobScores]) -> None:
    """Each job's name in the tables: its solver, plus the overrides that tell it apart from the group's other
    jobs of that solver (damping aside), else its job number."""
    skip = {"solver", "solver.damping"}
    for js in group:
        same = [o for o in group if o.solver == js.solver]
        keys = [k for k in dict.fromkeys(k for o in same for k in o.overrides) if k not in skip
                and len({o.overrides.get(k) for o in same}) > 1]
        extra = ", ".join(f"{k}={js.overrides.get(k)}" for k in keys)
        js.label = f"{js.solver} ({extra})" if extra else js.solver
    seen: dict[str, int] = {}
    for js in group:
        seen[js.label] = seen.get(js.label, 0) + 1
    for js in group:
        if seen[js.label] > 1:
            js.label = f"{js.label} [job {js.job}]"


def collect_scores(root: Path, jobs: list[Path]) -> dict[str, list[JobScores]]:
    """Every job's score files, per pass; the model key is the file's where every job has one, else the
    config digest for all (so that jobs with and without ``model.safetensors`` are grouped alike)."""
    from .sweeps import job_overrides

    out: dict[str, list[JobScores]] = {}
    for name in PASSES:
        found = []
        for job in jobs:
            js = read_scores(job, name, str(job.relative_to(root)))
            if js is not None:
                js.overrides = job_overrides(job)
                found.append(js)
        if found and any(js.model.startswith("config:") for js in found):
            for js, job in zip(found, [root / js.job for js in found], strict=True):
                js.model = model_identity(job)[1]
        out[name] = found
    return out


def solver_setting(js: JobScores) -> tuple:
    """What the scores depend on besides the model and the damping: the solver and the job's ``solver.*`` and
    ``score.*`` overrides. Two jobs of one setting (a sweep over something else) give the same scores: they are
    not compared."""
    keys = sorted((k, v) for k, v in js.overrides.items()
                  if (k.startswith("solver.") and k != "solver.damping") or k.startswith("score."))
    return js.solver, tuple(keys)


def _groups(found: list[JobScores]) -> list[list[JobScores]]:
    groups: dict[tuple[str, str], list[JobScores]] = {}
    for js in found:
        groups.setdefault((js.model, js.points), []).append(js)
    return list(groups.values())


def compare(root: Path, jobs: list[Path]) -> tuple[pd.DataFrame, list[str]]:
    """The agreement table (one row per pass, damping and pair of jobs; columns ``pass``, ``damping``, ``a``,
    ``b`` (the pair's more accurate member), ``job_a``, ``job_b``, ``spearman``, ``spearman_min``,
    ``top_k_overlap``, ``k``, ``a_converged``, ``b_converged``, ``a_residual``, ``b_residual``,
    ``b_is_reference`` (b is the most accurate job at that pass and damping), ``reference_kind`` (``accuracy``
    where that reference is exact or a converged CG/LiSSA, else ``agreement``), ``model``) and notes for the
    report (pairs not compared and why)."""
    import pandas as pd

    rows, notes = [], []
    for name, found in collect_scores(root, jobs).items():
        groups = _groups(found)
        if len(groups) > 1 and len({solver_setting(js) for js in found}) > 1:
            desc = "; ".join(f"jobs {', '.join(js.job for js in g)}" for g in groups)
            notes.append(f"{name} scores: the jobs do not all share one trained model and set of points, so only "
                         f"jobs within a group are compared ({desc})")
        for gi, group in enumerate(groups):
            _labels(group)
            dampings = list(dict.fromkeys(d for js in group for d in js.scores))
            for d in dampings:
                have = sorted((js for js in group if d in js.scores), key=lambda js: standing(js, d))
                if len(have) < 2:
                    continue
                ref = have[0]
                kind = "accuracy" if standing(ref, d)[0] <= TIERS["lissa"] else "agreement"
                for b, a in combinations(have, 2):  # b ranks above a
                    if solver_setting(a) == solver_setting(b):
                        continue
                    rows.append({"pass": name, "damping": d, "a": a.label, "b": b.label, "job_a": a.job,
                                 "job_b": b.job, **agreement(a.scores[d], b.scores[d]),
                                 "a_converged": a.converged(d), "b_converged": b.converged(d),
                                 "a_residual": a.residual(d), "b_residual": b.residual(d),
                                 "b_is_reference": b is ref, "reference_kind": kind, "model": gi})
    cols = ["pass", "damping", "a", "b", "job_a", "job_b", "spearman", "spearman_min", "top_k_overlap", "k",
            "a_converged", "b_converged", "a_residual", "b_residual", "b_is_reference", "reference_kind", "model"]
    return pd.DataFrame(rows, columns=cols), notes


def against_reference(table: pd.DataFrame) -> pd.DataFrame:
    """Per job and damping: its agreement with that damping's reference, one column per pass and measure
    (``agree/pairwise_spearman``, ``agree/pairwise_top_k``, ``agree/self_spearman``, ``agree/self_top_k``) and the
    reference's name (``agree/reference``; ``pairwise: X; self: Y`` where they differ)."""
    import pandas as pd

    ref = table[table["b_is_reference"].astype(bool)]
    if ref.empty:
        return pd.DataFrame(columns=["job", "damping"])
    out: dict[tuple[str, Any], dict[str, Any]] = {}
    for r in ref.to_dict("records"):
        row = out.setdefault((r["job_a"], r["damping"]), {"job": r["job_a"], "damping": r["damping"], "_refs": {}})
        row[f"agree/{r['pass']}_spearman"] = r["spearman"]
        row[f"agree/{r['pass']}_top_k"] = r["top_k_overlap"]
        row["_refs"][r["pass"]] = r["b"]
    for r in ref.to_dict("records"):  # the reference's own row names it too
        row = out.setdefault((r["job_b"], r["damping"]), {"job": r["job_b"], "damping": r["damping"], "_refs": {}})
        row["_refs"][r["pass"]] = "(itself)"
    rows = []
    for row in out.values():
        refs = row.pop("_refs")
        row["agree/reference"] = (next(iter(refs.values())) if len(set(refs.values())) == 1
                                  else "; ".join(f"{p}: {v}" for p, v in refs.items()))
        rows.append(row)
    return pd.DataFrame(rows)
