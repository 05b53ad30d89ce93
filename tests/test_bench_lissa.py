"""benchmarks/bench_lissa.py on a tiny model: the CSV's rows and columns, influencelab vs dattri running the
same recursion (full-batch steps make it deterministic, so a scale or damping mismatch shows), the per-query
convention reproducing the shared one, and convergence to the dense damped Hessian solve."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import TensorDataset

from conftest import load_script
from influencelab.data.base import as_labeled

pd = pytest.importorskip("pandas")
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_lissa.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(BENCH, "bench_lissa")


def tiny(n: int = 48, k: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.Tanh(), nn.Linear(6, 3)).eval()
    x, y = torch.randn(n + k, 1, 4, 4, generator=g), torch.randint(0, 3, (n + k,), generator=g)
    return model, as_labeled(TensorDataset(x[:n], y[:n])), as_labeled(TensorDataset(x[n:], y[n:]))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=1) / b.norm(dim=1)).max())


def test_csv_rows_and_same_recursion_as_dattri(bench, tmp_path):
    pytest.importorskip("dattri")
    model, train, queries = tiny()
    # batch = n: every step of every implementation sees the whole training set, so all run one deterministic
    # recursion; depth 3 is far from converged, so a different scale or damping mapping would change the result
    rows, res = bench.bench(model, train, queries, depth=3, batch=len(train), damping=0.1,
                            meta={"dataset": "tiny", "note": "test"})
    df = pd.read_csv(bench.write_csv(rows, tmp_path / "lissa.csv"))
    assert list(df.columns) == bench.COLUMNS
    assert len(df) == 3 + len(bench.DATTRI_MODES)
    assert set(df.batch_convention) == {"shared", "per-query"}
    assert set(df[df.implementation == "dattri 0.3.0"]["mode"]) == set(bench.DATTRI_MODES)
    assert (df.n_train == len(train)).all() and (df.n_queries == 2).all() and (df.note == "test").all()
    assert df.ratio_vs_dattri_fastest[df.implementation == "dattri 0.3.0"].min() == pytest.approx(1.0)
    assert (df.seconds > 0).all() and df.scale.nunique() == 1 and df.scale[0] > 0.1
    ours = res["influencelab shared"]
    assert ours.abs().max() > 0
    for label in ["influencelab per-query", "influencelab shared seed+1", *(f"dattri {m}" for m in bench.DATTRI_MODES)]:
        assert rel(res[label], ours) < 1e-4, label
    assert (df.rel_diff.dropna() < 1e-4).all()
    assert (df.hvp_rel_diff.dropna() < 1e-4).all()
    # with the whole training set as the held-out set, the diagnostic residual is the full-data one
    ours_rows = df[df.implementation.str.startswith("influencelab")]
    assert (ours_rows.rel_residual_max - ours_rows.rel_residual_full_max).abs().max() < 1e-4


def test_converges_to_dense_damped_hessian_solve(bench):
    model, train, queries = tiny()
    lam = 1.0
    rows, res = bench.bench(model, train, queries, depth=200, batch=len(train), damping=lam, modes=())
    assert len(rows) == 3 and all(r["ratio_vs_dattri_fastest"] != r["ratio_vs_dattri_fastest"] for r in rows)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    net = model.double()

    def loss(t):
        p = {n: s.reshape(sh) for n, s, sh in zip(names, t.split(sizes), shapes, strict=True)}
        return F.cross_entropy(functional_call(net, p, (train.x.double(),)), train.targets)

    H = torch.func.hessian(loss)(theta)
    model.float()
    from influencelab.solvers.layout import ParamLayout

    layout = ParamLayout(model)

    def to_param(flat):
        d = layout.unflatten(flat, model)
        return torch.cat([d[n].reshape(len(flat), -1) for n in names], dim=1).double()

    v = to_param(res["query vectors"])
    exact = torch.linalg.solve(H + lam * torch.eye(len(theta), dtype=H.dtype), v.T).T
    for label in ("influencelab shared", "influencelab per-query"):
        assert rel(to_param(res[label]), exact) < 1e-3, label
    assert all(r["converged"] and r["rel_residual_full_max"] < 1e-3 for r in rows)
