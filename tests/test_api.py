"""The Python API (`influencelab.Attributor`) on a user's own model and data: the same scores as the CLI, dense
ground truth for exact/CG (classification and regression), query sets that change, and a package without import
cycles."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.func import functional_call, jacrev, vmap
from torch.utils.data import DataLoader, TensorDataset

import influencelab
from influencelab import Attributor, RegressionTask
from influencelab.errors import ConfigError


class TinyNet(nn.Module):
    """A user's model: Conv2d + BatchNorm + LayerNorm + GELU + Linear (accepts the CLI's model keys)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, image_size: int = 8, **_):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.norm = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 12)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.bn(self.conv(x))).flatten(1)
        return self.fc2(self.act(self.fc1(self.norm(h))))


def _trained_tiny(n: int = 64, classes: int = 3, out: int | None = None, seed: int = 0):
    """A TinyNet (float64, eval mode, BatchNorm statistics set) and class-dependent data."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64) + y.view(-1, 1, 1, 1).double()
    torch.manual_seed(seed)
    net = TinyNet(num_classes=out or classes).double()
    net.train()
    with torch.no_grad():
        net(x)  # BatchNorm running statistics from the data
    return net.eval(), x, y


def _dense_reference(net: nn.Module, x: torch.Tensor, y: torch.Tensor, loss, out_hessian, damping: float):
    """Influence scores computed from scratch: the dense mean GGN ``J^T H_out J`` over the Linear/Conv2d
    parameters (parameter order), per-example gradients by torch.func, and ``torch.linalg.solve``."""
    names = [n for n, _ in net.named_parameters() if n.split(".")[0] in ("conv", "fc1", "fc2")]
    params = {n: p.detach() for n, p in net.named_parameters() if n in names}
    rest = {n: p.detach() for n, p in net.named_parameters() if n not in names}
    rest.update(dict(net.named_buffers()))

    def flat(d):
        return torch.cat([d[n].reshape(*d[n].shape[: d[n].dim() - params[n].dim()], -1) for n in names], -1)

    def out_one(p, xi):
        return functional_call(net, {**p, **rest}, (xi.unsqueeze(0),))[0]

    J = flat(vmap(jacrev(out_one), in_dims=(None, 0))(params, x))  # [n, C, P]
    out = torch.stack([out_one(params, xi) for xi in x]).detach()
    H = out_hessian(out)  # [n, C, C]
    G = torch.einsum("ncp,ncd,ndq->pq", J, H, J) / len(x)

    def loss_one(p, xi, yi):
        return loss(out_one(p, xi).unsqueeze(0), yi.unsqueeze(0)).sum()

    from torch.func import grad

    g = flat(vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y))  # [n, P]
    inv_g = torch.linalg.solve(G + damping * torch.eye(len(G), dtype=G.dtype), g.T)  # [P, n]
    return g @ inv_g  # [n, n]: I(z_q, z) for every pair


def _ce_hessian(out):
    p = torch.softmax(out, -1)
    return torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)


@pytest.mark.parametrize("solver, args, tol", [("exact", {}, 1e-8),
                                                ("cg", {"tol": 1e-10, "max_iter": 1000}, 1e-6)])
def test_exact_and_cg_through_the_api_equal_a_dense_reference(solver, args, tol):
    net, x, y = _trained_tiny(n=40)
    damping = 1e-2
    ref = _dense_reference(net, x, y, torch.nn.functional.cross_entropy,
                           _ce_hessian, damping)
    attr = Attributor(net, solver=solver, damping=damping, dtype="float64", **args).fit(TensorDataset(x, y))
    got = attr.pairwise(TensorDataset(x[:5], y[:5]))
    assert got.shape == (1, 5, len(x))
    torch.testing.assert_close(got[0], ref[:5], rtol=tol, atol=tol * ref.abs().max().item())
    torch.testing.assert_close(attr.self_influence()[0], ref.diagonal(), rtol=tol, atol=tol * ref.abs().max().item())


def test_regression_task_exact_and_cg_equal_a_dense_mse_ggn_and_ekfac_runs():
    net, x, _ = _trained_tiny(out=2)
    g = torch.Generator().manual_seed(1)
    t = torch.randn(len(x), 2, generator=g, dtype=torch.float64)  # regression targets
    damping = 1e-2

    def mse(out, target):
        return 0.5 * (out - target).square().sum(-1)

    ref = _dense_reference(net, x, t, mse, lambda out: torch.eye(2, dtype=out.dtype).expand(len(out), 2, 2),
                           damping)
    data = TensorDataset(x, t)
    for solver, args, tol in (("exact", {}, 1e-8), ("cg", {"tol": 1e-10, "max_iter": 1000}, 1e-6)):
        attr = Attributor(net, task=RegressionTask(), solver=solver, damping=damping, dtype="float64", **args)
        got = attr.fit(data).pairwise(TensorDataset(x[:4], t[:4]))[0]
        torch.testing.assert_close(got, ref[:4], rtol=tol, atol=tol * ref.abs().max().item())
    # EK-FAC with Gaussian-sampled targets (true Fisher = J^T J in expectation): runs, and ranks like the truth
    ek = Attributor(net, task="regression", solver="ekfac", damping=damping, dtype="float64", fisher_samples=8)
    s = ek.fit(data).self_influence()[0]
    assert torch.isfinite(s).all() and s.shape == (len(x),)
    from scipy.stats import spearmanr

    assert spearmanr(s.numpy(), ref.diagonal().numpy()).statistic > 0.8


def test_damping_lists_lead_the_result_and_equal_single_dampings():
    net, x, y = _trained_tiny()
    data, queries = TensorDataset(x, y), TensorDataset(x[:3], y[:3])
    both = Attributor(net, solver="ekfac", damping=[1e-3, 1e-1]).fit(data)
    s = both.pairwise(queries)
    assert s.shape == (2, 3, len(x)) and both.self_influence().shape == (2, len(x))
    one = Attributor(net, solver="ekfac", damping=1e-1).fit(data).pairwise(queries)
    torch.testing.assert_close(s[1], one[0])
    assert not torch.allclose(s[0], s[1])


def test_one_fitted_solver_scores_two_query_sets_of_the_same_shape_and_an_in_place_change():
    """Preconditioned queries are prepared per call, never memoised by tensor address (the old bug: a second
    query set of the same shape, or a query changed in place, returned the first set's scores)."""
    net, x, y = _trained_tiny()
    attr = Attributor(net, solver="ekfac", damping=1e-2).fit(DataLoader(TensorDataset(x, y), batch_size=16))
    qa = x[:4].clone()
    first = attr.pairwise(TensorDataset(qa, y[:4]))
    second = attr.pairwise(TensorDataset(x[4:8], y[4:8]))
    assert not torch.allclose(first, second)
    fresh = Attributor(net, solver="ekfac", damping=1e-2).fit(TensorDataset(x, y))
    torch.testing.assert_close(second, fresh.pairwise(TensorDataset(x[4:8], y[4:8])))
    qa.copy_(x[4:8])  # the same tensor, changed in place
    torch.testing.assert_close(attr.pairwise(TensorDataset(qa, y[4:8])), second)


@pytest.mark.parametrize("solver", ["ekfac", "kfac", "lissa", "cg", "exact", "identity", "arnoldi"])
def test_every_solver_is_reachable_by_name(solver):
    net, x, y = _trained_tiny(n=32)
    args = {"depth": 20} if solver == "lissa" else {}
    attr = Attributor(net, solver=solver, damping=0.1, dtype="float64", **args).fit(TensorDataset(x, y))
    assert attr.solver.name == solver
    s = attr.self_influence()
    assert s.shape == (1, 32) and torch.isfinite(s).all() and (s > 0).all()  # (G + λI)^-1 is positive definite


def test_api_errors_are_one_line():
    net, x, y = _trained_tiny(n=16)
    with pytest.raises(ConfigError, match="solver='nope' is invalid"):
        Attributor(net, solver="nope")
    with pytest.raises(ConfigError, match="depht is not a key of solver lissa"):
        Attributor(net, solver="lissa", depht=3)
    with pytest.raises(ConfigError, match="fit"):
        Attributor(net).self_influence()


def test_api_scores_equal_the_clis_on_the_same_model_and_data(run_pipeline):
    """The CLI trains the test file's own model class on digits and scores it; the API, given that trained model
    and the same data as plain TensorDatasets (no cache), gives the same pairwise and self-influence scores."""
    run_dir, _ = run_pipeline(["model._target_=test_api.TinyNet", "trainer.epochs=2", "dataset.subset=200",
                               "query.n=4", "solver.damping=[1e-2,1.0]", "stages=[train,fit,pairwise,self]"])
    run = influencelab.load_run(run_dir)
    assert isinstance(run.model, TinyNet)
    cli_pw = load_file(str(run_dir / "scores" / "pairwise.safetensors"))
    cli_self = load_file(str(run_dir / "scores" / "self.safetensors"))
    qpos = torch.searchsorted(run.test.indices, cli_pw["query_indices"])
    attr = Attributor(run.model, solver="ekfac", damping=[1e-2, 1.0], seed=int(run.config.seed))
    attr.fit(TensorDataset(run.train.x, run.train.targets))
    pw = attr.pairwise(TensorDataset(run.test.x[qpos], run.test.targets[qpos]))
    tol = {"rtol": 1e-4, "atol": 1e-5 * float(cli_pw["scores_by_damping"].abs().max())}
    torch.testing.assert_close(pw, cli_pw["scores_by_damping"], **tol)
    torch.testing.assert_close(attr.self_influence(), cli_self["scores_by_damping"], rtol=1e-4,
                               atol=1e-5 * float(cli_self["scores_by_damping"].abs().max()))


def test_every_module_imports_on_its_own():
    """No import cycles: each module of the package, imported first in a fresh interpreter state."""
    code = """
import importlib, pkgutil, sys
import influencelab
names = sorted(m.name for m in pkgutil.walk_packages(influencelab.__path__, "influencelab."))
bad = []
for name in names:
    for k in [k for k in sys.modules if k == "influencelab" or k.startswith("influencelab.")]:
        del sys.modules[k]
    try:
        importlib.import_module(name)
    except Exception as e:
        bad.append(f"{name}: {type(e).__name__}: {e}")
print("MODULES", len(names))
print("\\n".join(bad))
sys.exit(1 if bad else 0)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert int(r.stdout.split("MODULES")[1].split()[0]) >= 30
