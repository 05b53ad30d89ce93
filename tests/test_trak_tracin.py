"""TRAK and TracIn (issue 33 item 1) against dense float64 computations built here with torch.func, the trainer's
checkpoints, and both solvers through the CLI's stages, its cache and a multirun."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.func import functional_call, grad, vmap

from conftest import make_config, run_cli
from influencelab import Attributor
from influencelab.data.digits import Digits
from influencelab.errors import ConfigError
from influencelab.models import cnn, mlp
from influencelab.pipeline import Context
from influencelab.solvers.exact import Exact
from influencelab.solvers.identity import Identity
from influencelab.solvers.tracin import TracIn
from influencelab.solvers.trak import TRAK
from influencelab.tracking import Tracker
from influencelab.train import Checkpoint, Trainer, checkpoint_steps, get_checkpoints, split_checkpoints


def _data(n: int = 40):
    train, test = Digits(subset=n, seed=0).load()
    return train, test.subset(torch.arange(5))


def _trained_mlp(train, hidden: int = 16) -> torch.nn.Module:
    """A float64 MLP after a few full-batch steps (so that p is not uniform and 1 - p varies)."""
    torch.manual_seed(0)
    m = mlp(10, 1, 8, hidden=hidden).double()
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    for _ in range(15):
        opt.zero_grad()
        F.cross_entropy(m(train.x.double()), train.targets).backward()
        opt.step()
    return m.eval()


def layout_grads(model: torch.nn.Module, fn, x: torch.Tensor, y: torch.Tensor, params=None) -> torch.Tensor:
    """Per-example gradients ``[n, P]`` of ``fn(logits [1, C], label [1])`` by torch.func, in the flat order the
    solvers use: each Linear/Conv2d module in registration order as the matrix ``[weight.reshape(out, -1) | bias]``,
    row-major (written out here, not taken from the library)."""
    params = params if params is not None else {k: v.detach() for k, v in model.named_parameters()}

    def f(p, xi, yi):
        return fn(functional_call(model, p, (xi[None],)), yi[None]).sum()

    g = vmap(grad(f), in_dims=(None, 0, 0))(params, x, y)
    parts = []
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            w = g[f"{name}.weight"]
            mat = w.reshape(len(x), w.shape[1], -1)
            if mod.bias is not None:
                mat = torch.cat([mat, g[f"{name}.bias"][..., None]], dim=-1)
            parts.append(mat.reshape(len(x), -1))
    return torch.cat(parts, dim=1)


def ref_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``log(p / (1 - p))`` of the label's probability, from the log-softmax (not the library's formula)."""
    lp = torch.log_softmax(logits, -1).gather(-1, y[:, None])[:, 0]
    return lp - torch.log(-torch.expm1(lp))


def ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def ref_projection(P: int, k: int, kind: str, seed: int) -> torch.Tensor:
    """The documented projection: rows in chunks of 1024, chunk c from ``manual_seed(seed * 1000003 + c)``;
    rademacher ``2 randint(0, 2) - 1``, gaussian float32 ``randn``; divided by ``sqrt(k)``."""
    chunks = []
    for c in range(math.ceil(P / 1024)):
        rows = min(1024, P - 1024 * c)
        g = torch.Generator().manual_seed(seed * 1_000_003 + c)
        r = (torch.randint(0, 2, (rows, k), generator=g).double() * 2 - 1 if kind == "rademacher"
             else torch.randn(rows, k, generator=g, dtype=torch.float32).double())
        chunks.append(r / math.sqrt(k))
    return torch.cat(chunks)


# -- TRAK --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "cache_gb"), [("rademacher", 1.0), ("gaussian", 0.0)])
def test_trak_equals_dense_projected_kernel_solve(kind, cache_gb):
    """Pairwise and self scores = φ_q^T (Φ^T Φ / n + λI)^-1 φ_z (1 - p_z) with φ = R^T ∇margin, R built here by the
    documented seeded rule (P = 1,210 > one chunk of 1,024 rows: the chunk and layer boundaries differ), λ in
    {1e-2, auto = 0.1 trace(G)/k, 0 = pseudo-inverse}; R kept whole (cache_gb=1) or regenerated per batch (0)."""
    train, queries = _data()
    m = _trained_mlp(train)
    attr = Attributor(m, solver="trak", dtype="float64", proj_dim=96, projection=kind, damping=[1e-2, "auto", 0.0],
                      cache_gb=cache_gb, seed=3, batch_size=16, score_batch_size=16).fit(train)
    pairwise, self_inf = attr.pairwise(queries), attr.self_influence()

    x, y, xq, yq = train.x.double(), train.targets, queries.x.double(), queries.targets
    R = ref_projection(1210, 96, kind, 3)
    phi, phi_q = layout_grads(m, ref_margin, x, y) @ R, layout_grads(m, ref_margin, xq, yq) @ R
    w = 1 - torch.softmax(m(x), -1).gather(1, y[:, None])[:, 0].detach()
    G = phi.T @ phi / len(x)
    lams = [1e-2, 0.1 * torch.trace(G) / 96]
    inverses = [torch.linalg.inv(G + lam * torch.eye(96, dtype=G.dtype)) for lam in lams]
    inverses.append(torch.linalg.pinv(G, hermitian=True))  # rank 40 < 96: the pseudo-inverse
    for i, inv in enumerate(inverses):
        ref = phi_q @ inv @ phi.T * w
        torch.testing.assert_close(pairwise[i], ref, rtol=1e-7, atol=1e-9 * ref.abs().max())
        ref_self = ((phi @ inv) * phi).sum(1) * w
        torch.testing.assert_close(self_inf[i], ref_self, rtol=1e-7, atol=1e-9 * ref_self.abs().max())
    assert attr.solver.resolve_damping("auto") == pytest.approx(float(lams[1]), rel=1e-10)


def test_trak_scores_the_fitted_data_from_the_fits_features_and_other_data_from_its_own():
    """A fit that keeps its training features (cache_gb large enough) scores the fitted data from them: the same
    scores as a fit that keeps nothing (cache_gb=0, a second pass), weighted and, in an ensemble, unweighted; other
    training data (the same positions, other points) is scored from its own features, not the fit's."""
    train, queries = _data()
    other, _ = Digits(subset=40, seed=1).load()
    m = _trained_mlp(train)
    kw = dict(solver="trak", dtype="float64", proj_dim=48, damping=1e-2, seed=2, batch_size=16, score_batch_size=16)
    kept = Attributor(m, cache_gb=1.0, **kw).fit(train)
    passed = Attributor(m, cache_gb=0.0, **kw).fit(train)
    assert kept.solver._kept_train is not None and passed.solver._kept_train is None
    a, b = kept.pairwise(queries), passed.pairwise(queries)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12 * b.abs().max())
    c, d = kept.pairwise(queries, train=other), passed.pairwise(queries, train=other)
    torch.testing.assert_close(c, d, rtol=1e-10, atol=1e-12 * d.abs().max())
    assert (c - a).abs().max() > 1e-2 * a.abs().max()
    ens_kept = Attributor([m, m], cache_gb=1.0, **kw).fit(train).pairwise(queries)
    ens_passed = Attributor([m, m], cache_gb=0.0, **kw).fit(train).pairwise(queries)
    torch.testing.assert_close(ens_kept, ens_passed, rtol=1e-10, atol=1e-12 * ens_passed.abs().max())


def test_trak_ensemble_is_traks_estimator_with_a_projection_per_model(tmp_path):
    """An ensemble of M = 3 models (two of them the same weights): TRAK's estimator, the mean over models of the
    unweighted kernel scores φ_q^T (G + λI)^-1 φ_z times the mean over models of 1 - p_z (not the mean of the
    weighted products), pairwise and self; model i's features projected by R drawn from seed ``seed + 10,000 i``
    (as the trak library seeds per model id), all built here. Two equal models' kernel scores differ (independent
    projections, whose error the ensemble averages out); the first model's fit is keyed as a single model's, and a
    single model's cached (weighted) scores are not read back as an ensemble member's (unweighted) ones."""
    train, queries = _data()
    m1 = _trained_mlp(train)
    m2 = _trained_mlp(train, hidden=12)
    models = [m1, m2, m1]
    kw = dict(solver="trak", dtype="float64", proj_dim=64, projection="gaussian", damping=1e-2, seed=5,
              batch_size=16, score_batch_size=16, cache_dir=tmp_path)
    single = Attributor(m1, **kw).fit(train)
    single_pw, single_self = single.pairwise(queries)[0], single.self_influence()[0]  # cached under the cache
    attr = Attributor(models, **kw).fit(train)
    pairwise, self_inf = attr.pairwise(queries)[0], attr.self_influence()[0]
    x, y, xq, yq = train.x.double(), train.targets, queries.x.double(), queries.targets
    kernel, kernel_self, weights = [], [], []
    for i, m in enumerate(models):
        g, gq = layout_grads(m, ref_margin, x, y), layout_grads(m, ref_margin, xq, yq)
        R = ref_projection(g.shape[1], 64, "gaussian", 5 + 10_000 * i)
        phi, phi_q = g @ R, gq @ R
        inv = torch.linalg.inv(phi.T @ phi / len(x) + 1e-2 * torch.eye(64, dtype=phi.dtype))
        kernel.append(phi_q @ inv @ phi.T)
        kernel_self.append(((phi @ inv) * phi).sum(1))
        weights.append(1 - torch.softmax(m(x), -1).gather(1, y[:, None])[:, 0].detach())
    w = torch.stack(weights).mean(0)
    ref, ref_self = torch.stack(kernel).mean(0) * w, torch.stack(kernel_self).mean(0) * w
    torch.testing.assert_close(pairwise, ref, rtol=1e-7, atol=1e-9 * ref.abs().max())
    torch.testing.assert_close(self_inf, ref_self, rtol=1e-7, atol=1e-9 * ref_self.abs().max())
    # not TRAK's estimator: the mean of each model's weighted scores differs from it (1 - p differs across models)
    products = torch.stack([k * wi for k, wi in zip(kernel, weights, strict=True)]).mean(0)
    assert (products - ref).abs().max() > 1e-3 * ref.abs().max()
    assert (kernel[0] - kernel[2]).abs().max() > 1e-3 * kernel[0].abs().max()  # same model, another R
    torch.testing.assert_close(single_pw, kernel[0] * weights[0], rtol=1e-7, atol=1e-9 * ref.abs().max())
    torch.testing.assert_close(single_self, kernel_self[0] * weights[0], rtol=1e-7,
                               atol=1e-9 * ref_self.abs().max())
    assert attr.members[0].solver.fit_config() == single.solver.fit_config()
    assert attr.members[2].solver.fit_config() != single.solver.fit_config()


def test_trak_identity_projection_of_loss_gradients_is_the_exact_empirical_fisher_solve():
    """With no projection (R = I) and output=loss, TRAK's score is g_q^T (F + λI)^-1 g_z with F the empirical Fisher
    (mean g g^T): equal to a dense solve built here and to solver=exact with curvature=empirical_fisher."""
    train, queries = _data()
    m = _trained_mlp(train, hidden=3)
    lam = 1e-3
    trak = TRAK(damping=lam, dtype="float64", projection="identity", output="loss")
    attr = Attributor(m, solver=trak).fit(train)
    s, si = attr.pairwise(queries)[0], attr.self_influence()[0]

    g = layout_grads(m, ce, train.x.double(), train.targets)
    gq = layout_grads(m, ce, queries.x.double(), queries.targets)
    A = g.T @ g / len(g) + lam * torch.eye(g.shape[1], dtype=g.dtype)
    torch.testing.assert_close(s, gq @ torch.linalg.solve(A, g.T), rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(si, (g * torch.linalg.solve(A, g.T).T).sum(1), rtol=1e-6, atol=1e-10)

    exact = Attributor(m, solver=Exact(damping=lam, curvature="empirical_fisher", dtype="float64")).fit(train)
    torch.testing.assert_close(s, exact.pairwise(queries)[0], rtol=1e-6, atol=1e-10)


def test_trak_margin_features_are_minus_loss_gradients_over_one_minus_p():
    """Cross-entropy's gradient is -(1 - p) ∇margin, so TRAK's weighted training side (1 - p) φ with R = I is minus
    the loss gradient; and the torch.func path (modules the hooks cannot take) gives the hooks' features on a CNN."""
    train, _ = _data(12)
    m = _trained_mlp(train, hidden=6)
    trak = TRAK(dtype="float64", projection="identity")
    trak.setup(m)
    torch.testing.assert_close(trak.train_grads(m, train.x, train.targets),
                               -layout_grads(m, ce, train.x.double(), train.targets), rtol=1e-9, atol=1e-12)

    torch.manual_seed(0)
    c = cnn(10, 1, 8, channels=(2, 3), hidden=8).double().eval()
    hooks = TRAK(dtype="float64", proj_dim=32, seed=1)
    hooks.setup(c)
    fallback = TRAK(dtype="float64", proj_dim=32, seed=1)
    fallback.setup(c)
    fallback._hooks = False  # (what setup decides for a grouped conv)
    torch.testing.assert_close(hooks.features(c, train.x, train.targets),
                               fallback.features(c, train.x, train.targets), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"proj_dim": 0}, "solver.proj_dim=0 is invalid"),
    ({"projection": "sparse"}, "solver.projection='sparse' is invalid"),
    ({"output": "logit"}, "solver.output='logit' is invalid"),
    ({"curvature": "fisher"}, "solver.curvature='fisher' is invalid"),
])
def test_trak_config_errors_are_one_line(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TRAK(**kwargs)


def test_trak_margin_needs_classes():
    from influencelab.tasks import RegressionTask

    m = torch.nn.Linear(3, 1).double()
    trak = TRAK(dtype="float64", task=RegressionTask())
    trak.setup(m)
    with pytest.raises(ConfigError, match="solver.output=margin is invalid for task regression"):
        trak.features(m, torch.zeros(2, 3), torch.zeros(2, 1))


# -- the trainer's checkpoints and TracIn ------------------------------------------------------------------------------
def test_trainer_saves_evenly_spaced_checkpoints_with_their_learning_rates():
    """checkpoint_steps spaces them evenly and ends at the last step; a 2-epoch run's checkpoint after epoch 1 is
    the weights of the same run stopped after 1 epoch; the lr is the one the step used (cosine schedule)."""
    assert checkpoint_steps(10, 3) == [4, 7, 10] and checkpoint_steps(6, 6) == list(range(1, 7))
    train, _ = _data(48)
    torch.manual_seed(0)
    a = mlp(10, 1, 8, hidden=8)
    Trainer(epochs=2, batch_size=16, lr=0.01, checkpoints=2, device="cpu").fit(a, train)  # 6 steps: after 3 and 6
    torch.manual_seed(0)
    b = mlp(10, 1, 8, hidden=8)
    Trainer(epochs=1, batch_size=16, lr=0.01, device="cpu").fit(b, train)
    cps = get_checkpoints(a)
    assert [c.step for c in cps] == [3, 6] and [c.lr for c in cps] == [0.01, 0.01]
    for k, v in b.state_dict().items():
        torch.testing.assert_close(cps[0].state[k], v, rtol=0, atol=0)
        torch.testing.assert_close(cps[1].state[k], a.state_dict()[k], rtol=0, atol=0)
    assert not get_checkpoints(b)

    torch.manual_seed(0)
    c = mlp(10, 1, 8, hidden=8)
    Trainer(epochs=2, batch_size=16, lr=0.01, checkpoints=3, schedule="cosine", device="cpu").fit(c, train)
    steps = [cp.step for cp in get_checkpoints(c)]
    assert steps == [2, 4, 6]
    expected = [0.01 * (1 + math.cos(math.pi * (s - 1) / 6)) / 2 for s in steps]
    assert [cp.lr for cp in get_checkpoints(c)] == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ConfigError, match="trainer.checkpoints=7 is invalid"):
        Trainer(epochs=2, batch_size=16, checkpoints=7, device="cpu").fit(mlp(10, 1, 8, hidden=8), train)
    with pytest.raises(ConfigError, match="trainer.checkpoints=-1 is invalid"):
        Trainer(checkpoints=-1)


def test_tracin_equals_explicit_sum_over_checkpoints():
    """Pairwise = sum_t lr_t g_q(θ_t)·g_z(θ_t) and self = sum_t lr_t |g_z(θ_t)|^2, with per-example gradients built
    here by torch.func at each checkpoint; the model's own weights are back afterwards."""
    train, queries = _data(48)
    torch.manual_seed(0)
    m = mlp(10, 1, 8, hidden=8)
    Trainer(epochs=2, batch_size=16, lr=0.02, checkpoints=3, schedule="cosine", device="cpu").fit(m, train)
    attr = Attributor(m, solver="tracin", dtype="float64").fit(train)
    final = {k: v.clone() for k, v in attr.model.state_dict().items()}
    s, si = attr.pairwise(queries)[0], attr.self_influence()[0]

    md = attr.model
    ref, ref_self = 0, 0
    for c in get_checkpoints(m):
        p = {k: v.double() for k, v in c.state.items()}
        g = layout_grads(md, ce, train.x.double(), train.targets, p)
        gq = layout_grads(md, ce, queries.x.double(), queries.targets, p)
        ref, ref_self = ref + c.lr * gq @ g.T, ref_self + c.lr * (g * g).sum(1)
    torch.testing.assert_close(s, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(si, ref_self, rtol=1e-9, atol=1e-12)
    for k, v in attr.model.state_dict().items():
        assert torch.equal(v, final[k])


def test_single_checkpoint_tracin_is_identity_times_lr():
    """One checkpoint (the trained weights) at lr: TracIn = lr x the identity solver (pairwise and self)."""
    train, queries = _data(48)
    torch.manual_seed(0)
    m = mlp(10, 1, 8, hidden=8)
    Trainer(epochs=1, batch_size=16, lr=0.03, checkpoints=1, device="cpu").fit(m, train)
    tr = Attributor(m, solver=TracIn(dtype="float64")).fit(train)
    ident = Attributor(m, solver=Identity(dtype="float64")).fit(train)
    torch.testing.assert_close(tr.pairwise(queries), 0.03 * ident.pairwise(queries), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(tr.self_influence(), 0.03 * ident.self_influence(), rtol=1e-10, atol=1e-14)


def test_tracin_without_checkpoints_is_one_line_error(tmp_path):
    """API: a model without checkpoints; CLI: trainer.checkpoints=0 stops when the config is read (before training)."""
    train, _ = _data(12)
    with pytest.raises(ConfigError, match="solver=tracin needs the training checkpoints"):
        Attributor(mlp(10, 1, 8, hidden=4), solver="tracin").fit(train)
    cfg = make_config(["solver=tracin", "stages=[train,fit]"], tmp_path / "cache")
    with pytest.raises(ConfigError, match="trainer.checkpoints=N"):
        Context(cfg, tmp_path / "run", Tracker(backend="none"))
    assert not (tmp_path / "run").exists()


def test_checkpoints_change_scores_not_the_cache_key_of_other_checkpoints():
    """API keys: two models with the same final weights but other checkpoints do not share TracIn's fit key."""
    train, _ = _data(12)
    torch.manual_seed(0)
    m = mlp(10, 1, 8, hidden=4)
    Trainer(epochs=1, batch_size=4, checkpoints=2, device="cpu").fit(m, train)
    a = TracIn()
    a.setup(m)
    from influencelab.train import set_checkpoints

    cps = get_checkpoints(m)
    set_checkpoints(m, [cps[0], Checkpoint(cps[1].step, cps[1].lr * 2, cps[1].state)])
    b = TracIn()
    b.setup(m)
    assert a.fit_config() != b.fit_config()


# -- the CLI: stages, cache, multirun --------------------------------------------------------------------------------
CLI = ["dataset=digits", "dataset.subset=60", "model=mlp", "model.hidden=8", "trainer.epochs=2", "trainer.device=cpu",
       "trainer.checkpoints=2", "query.n=4", "solver.dtype=float64", "stages=[train,fit,self,pairwise]"]


def test_cli_tracin_and_trak_with_the_cache(run_pipeline, cache_dir):
    """solver=tracin through the pipeline: the cached model entry holds the checkpoints, the self scores equal the
    explicit sum over them, a second run reuses model, fit and scores; solver=trak on the same cached model."""
    run_a, m_a = run_pipeline([*CLI, "solver=tracin"], "a")
    run_b, m_b = run_pipeline([*CLI, "solver=tracin"], "b")
    assert not m_a["fit/cached"] and m_b["fit/cached"]
    a = load_file(str(run_a / "scores" / "self.safetensors"))
    b = load_file(str(run_b / "scores" / "self.safetensors"))
    torch.testing.assert_close(a["scores_by_damping"], b["scores_by_damping"], rtol=0, atol=0)
    pw = load_file(str(run_a / "scores" / "pairwise.safetensors"))["scores"]
    assert pw.shape == (4, 60) and torch.isfinite(pw).all()

    entries = list((cache_dir / "models").glob("*.safetensors"))
    assert len(entries) == 1
    state, cps = split_checkpoints(load_file(str(entries[0])))
    assert len(cps) == 2 and [c.step for c in cps] == [1, 2]  # (2 epochs of one batch; the last: the trained model)
    ctx = Context(make_config([*CLI, "solver=tracin"], cache_dir), run_a, Tracker(backend="none"))
    train = ctx.train_data
    model = ctx.build_model().double()
    ref = 0
    for c in cps:
        g = layout_grads(model, ce, train.x.double(), train.targets, {k: v.double() for k, v in c.state.items()})
        ref = ref + c.lr * (g * g).sum(1)
    torch.testing.assert_close(a["scores"].double(), ref, rtol=1e-9, atol=1e-12)

    _, m_c = run_pipeline([*CLI, "solver=trak", "solver.proj_dim=32", "solver.damping=1e-3"], "c")
    assert len(list((cache_dir / "models").glob("*.safetensors"))) == 1  # the same model, checkpoints and all
    _, m_d = run_pipeline([*CLI, "solver=trak", "solver.proj_dim=32", "solver.damping=1e-3"], "d")
    assert not m_c["fit/cached"] and m_d["fit/cached"]


def test_cli_multirun_over_both_solvers(tmp_path):
    """``influencelab -m solver=trak,tracin``: both jobs train (once: the model is cached), fit and score."""
    r = run_cli(["-m", *CLI, "solver=trak,tracin", "logger=none",
                 f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(list((tmp_path / "cache" / "models").glob("*.safetensors"))) == 1  # trained once, for both
    for job in ("0", "1"):
        s = load_file(str(tmp_path / "sweep" / job / "scores" / "pairwise.safetensors"))["scores"]
        assert s.shape == (4, 60) and torch.isfinite(s).all() and s.abs().max() > 0


def test_checkpoints_key_the_model_entry_not_the_weights(tmp_path):
    """trainer.checkpoints leaves the trainer's key (and so every existing cached model and every retraining key)
    as it was; only the cached model entry's key, which then holds the checkpoints, adds it."""
    assert "checkpoints" not in Trainer().cache_key() and Trainer().cache_key() == Trainer(checkpoints=3).cache_key()
    plain, saved = (Context(make_config(["stages=[train]", *extra], tmp_path / "cache"), tmp_path / "run",
                            Tracker(backend="none")) for extra in ([], ["trainer.checkpoints=3"]))
    assert plain.model_config() == saved.model_config()  # (retraining's ground truth is shared)
    assert plain.model_key != saved.model_key
    assert saved.model_entry_config() == {**plain.model_config(), "checkpoints": 3}
