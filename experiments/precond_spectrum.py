"""Does EK-FAC/K-FAC precondition the damped system well? The spectrum of ``P^-1 (G + λI)`` against that of
``G + λI`` on small float64 models where both are dense, and the CG iterations each needs (plain vs
preconditioned, same tolerance, same right-hand sides).

    python experiments/precond_spectrum.py            # -> experiments/results/precond_spectrum/spectrum.csv

``G`` is the exact damped Gauss-Newton matrix (or the empirical Fisher) from :class:`~influencelab.solvers.exact.
Exact`; ``P = G_P + λ_P I`` the fitted EK-FAC/K-FAC (true Fisher from sampled labels, ``fisher_samples`` draws per
point, or the empirical Fisher), at ``λ_P = λ`` or ``10 λ``. CG's iterations fall with the condition number of the
(preconditioned) matrix and with how clustered its spectrum is; a preconditioner that raises ``cond`` is a bad one.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from influencelab.data.digits import Digits
from influencelab.models import cnn, mlp
from influencelab.solvers.cg import CG
from influencelab.solvers.ekfac import EKFAC, KFAC
from influencelab.solvers.exact import Exact

OUT = Path(__file__).parent / "results" / "precond_spectrum" / "spectrum.csv"
F64 = {"dtype": "float64"}


def trained(kind: str, train, steps: int = 30) -> torch.nn.Module:
    torch.manual_seed(0)
    m = (mlp(10, 1, 8, hidden=8) if kind == "mlp" else cnn(10, 1, 8, channels=(2, 3), hidden=8)).double()
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    for _ in range(steps):  # a few full-batch steps: the curvature of a (partly) trained model
        opt.zero_grad()
        F.cross_entropy(m(train.x.double()), train.targets).backward()
        opt.step()
    return m.eval()


def cg_iterations(model, train, curvature, lam, v, pre=None, lam_p="same", tol=1e-6) -> int:
    cg = CG(damping=lam, curvature=curvature, tol=tol, max_iter=20_000, preconditioner=pre,
            preconditioner_damping=lam_p, **F64)
    cg.fit(model, train)
    cg.precondition(v, lam)
    c = cg.diagnostics()[lam]
    return c.iterations if c.converged else -1


def rows_for(kind: str, n: int, lams, seed: int = 0):
    train, test = Digits(subset=n, seed=seed).load()
    model = trained(kind, train)
    q = test.subset(torch.arange(4))
    for curvature in ("fisher", "empirical_fisher"):
        ex = Exact(damping=lams, curvature=curvature, **F64)
        ex.fit(model, train)
        st = ex.state_dict()
        G = st["evecs"] @ torch.diag(st["evals"]) @ st["evecs"].T
        eye = torch.eye(len(G), dtype=G.dtype)
        from influencelab.scores import query_gradients

        v = query_gradients(ex, model, q, 64).double()
        variants = [("kfac", KFAC, 1), ("ekfac", EKFAC, 1)] + ([("ekfac", EKFAC, 16)] if curvature == "fisher" else [])
        for (name, cls, samples), lam in itertools.product(variants, lams):
            kw = {"fisher_samples": samples}
            pre = cls(damping=lam, curvature=curvature, seed=seed, **kw, **F64)
            pre.fit(model, train)
            A = G + lam * eye
            ev = torch.linalg.eigvalsh(A)
            plain = cg_iterations(model, train, curvature, lam, v)
            for lam_p in (lam, 10 * lam):
                Pinv = pre.precondition(eye, lam_p)  # symmetric: rows = columns
                mu = torch.linalg.eigvals(Pinv @ A).real.sort().values
                yield {"model": kind, "n_train": n, "params": len(G), "curvature": curvature,
                       "preconditioner": name, "fisher_samples": samples if curvature == "fisher" else 0,
                       "damping": lam, "precond_damping": lam_p, "cond_A": float(ev[-1] / ev[0]),
                       "mu_min": float(mu[0]), "mu_max": float(mu[-1]), "cond_PA": float(mu[-1] / mu[0]),
                       "cg_iters_plain": plain,
                       "cg_iters_pcg": cg_iterations(model, train, curvature, lam, v, pre, lam_p)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--tiny", action="store_true", help="one model, one damping (the test suite's smoke run)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.tiny:
        setups, lams = [("mlp", 48)], [1e-2]
    else:
        setups, lams = [("mlp", 48), ("cnn", 48), ("mlp", 600), ("cnn", 600)], [1e-3, 1e-2, 1e-1, 1.0]
    rows = [r for kind, n in setups for r in rows_for(kind, n, lams)]
    df = pd.DataFrame(rows)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(".tmp")
    df.to_csv(tmp, index=False, float_format="%.6g")
    tmp.replace(a.out)
    with pd.option_context("display.width", 200, "display.max_rows", 500):
        print(df.to_string(index=False))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
