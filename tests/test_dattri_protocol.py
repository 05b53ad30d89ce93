"""experiments/dattri_protocol.py (issue #33.2): dattri's MNIST-10 protocol beside influencelab, --tiny mode.

The same model, data and damping go to both libraries. influencelab's TracIn and EK-FAC on dattri's models must be
those methods written out densely (float64, torch.func), so a wrong sign, model, checkpoint, label encoding or
damping convention in the protocol's wiring fails here. The run writes the CSVs RESULTS reads, and the
ground truth is cached by its recipe's hash (a second run reads it back instead of retraining)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import load_script

pytest.importorskip("dattri")
pytest.importorskip("mlxtend")
pd = pytest.importorskip("pandas")

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "dattri_protocol.py"


@pytest.fixture(scope="module")
def dp():
    return load_script(SCRIPT, "dattri_protocol")


def _ctx(dp, kind: str):
    import torch
    from torch.utils.data import TensorDataset
    setup = dp.Setup(model=kind, n_train=120, epochs=2)
    xtr, ytr, xte, yte = dp.load_data(setup)
    full = [dp.train(kind, setup.recipe, xtr, ytr, s) for s in range(2)]
    return {"kind": kind, "model": full[0], "full": full, "half": full, "damping": 0.1,
            "train_ds": TensorDataset(xtr, ytr), "query_ds": TensorDataset(xte[:6], yte[:6]), "tracin_models": 2,
            "cg_iters": 3, "lissa_depth": 5, "lissa_batch": 20, "lissa_scale": 50.0, "arnoldi_k": 6,
            "arnoldi_iters": 6}, torch


def _per_example_grads(model, ds):
    import torch
    from torch.func import functional_call, grad, vmap
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x, y):
        return torch.nn.functional.cross_entropy(functional_call(model, p, x[None]), y[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, *ds.tensors)
    return torch.cat([v.flatten(1) for v in g.values()], 1).double()


def test_tracin_scores_are_tracin(dp):
    """TracIn over dattri's benchmark "checkpoints" (two independently trained MLPs, each weighted 1e-3) is
    sum_t 1e-3 g_q(θ_t)^T g_z(θ_t) with per-example gradients from torch.func, for influencelab exactly; dattri's
    TracInAttributor always projects the gradients to 512 random dimensions (its default projector), so its scores
    only track the same quantity (a wrong sign, model or checkpoint wiring would break the correlation)."""
    ctx, _ = _ctx(dp, "lr")
    ref = sum(1e-3 * _per_example_grads(m, ctx["query_ds"]) @ _per_example_grads(m, ctx["train_ds"]).T
              for m in ctx["full"]).numpy()
    ours = dp.influencelab_scores("tracin", ctx)
    assert ours.shape == ref.shape == (6, 120)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    theirs = dp.dattri_scores("tracin", ctx)
    assert np.corrcoef(theirs.ravel(), ref.ravel())[0, 1] > 0.8


def test_ekfac_scores_are_ekfac(dp):
    """The protocol's influencelab EK-FAC on dattri's logistic regression (empirical Fisher, damping 0.1) equals
    EK-FAC written out densely in float64: Kronecker factors A = E[a a^T] (input with a 1 for the bias), S =
    E[s s^T] (s = dloss/dlogits), their eigenbases, the eigenvalues corrected to E[(Q_S^T g Q_A)^2], and
    score(q, z) = <Q_S ((Q_S^T G_q Q_A) / (Λ + λ)) Q_A^T, G_z>."""
    ctx, torch = _ctx(dp, "lr")
    ours = dp.influencelab_scores("ekfac", ctx)
    lin = ctx["model"].linear
    w = torch.cat([lin.weight, lin.bias[:, None]], 1).detach().double()

    def grads(ds):
        x, y = ds.tensors
        a = torch.cat([x.flatten(1).double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
        s = torch.softmax(a @ w.T, 1) - torch.nn.functional.one_hot(y, 10).double()
        return a, s, torch.einsum("ni,nj->nij", s, a)

    a, s, g = grads(ctx["train_ds"])
    qa = torch.linalg.eigh(a.T @ a / len(a)).eigenvectors
    qs = torch.linalg.eigh(s.T @ s / len(s)).eigenvectors
    lam = ((qs.T @ g @ qa) ** 2).mean(0)
    gq = grads(ctx["query_ds"])[2]
    ref = torch.einsum("qij,nij->qn", qs @ ((qs.T @ gq @ qa) / (lam + 0.1)) @ qa.T, g).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())


def test_tiny_run_writes_csvs_and_reuses_truth(dp, tmp_path):
    args = ["--tiny", "--models", "lr", "--methods", "ekfac,cg,tracin", "--no-mislabel",
            "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]
    res = dp.main(args)
    lds = pd.read_csv(tmp_path / "out" / "lds.csv")
    assert set(zip(lds["method"], lds["library"])) == {(m, lib) for m in ("ekfac", "cg", "tracin")
                                                        for lib in ("influencelab", "dattri")}
    assert lds["lds"].between(-1, 1).all() and (lds["ci_low"] <= lds["lds"]).all() and (lds["lds"] <= lds["ci_high"]).all()
    paired = pd.read_csv(tmp_path / "out" / "paired.csv")
    same = paired[paired["a"].str.startswith("influencelab") & paired["b"].str.startswith("dattri")]
    assert set(same["a"]) == {"influencelab ekfac", "influencelab cg", "influencelab tracin"}
    assert ((same["ci_low"] <= same["diff"]) & (same["diff"] <= same["ci_high"])).all()
    times = pd.read_csv(tmp_path / "out" / "times.csv")
    assert (times["seconds"] > 0).all() and (times["error"].fillna("") == "").all()
    truth = list((tmp_path / "cache").glob("truth_lr_*.pt"))
    assert len(truth) == 1
    stamp = truth[0].stat().st_mtime_ns
    again = dp.main(args)  # the cached truth is read back, not rebuilt: same LDS, file untouched
    assert truth[0].stat().st_mtime_ns == stamp
    assert [r["lds"] for r in again["lds"]] == pytest.approx([r["lds"] for r in res["lds"]], abs=1e-9)


def test_ekfac_over_trak_models_is_the_mean_of_each_models_ekfac(dp):
    """``ekfac-halves-M``: EK-FAC averaged over TRAK's first M half-data models (not the full-data ones)."""
    ctx, torch = _ctx(dp, "mlp")
    full = ctx["full"]
    ctx["half"] = [full[1], full[0]]  # (distinct from "full"'s order: the first half-data model is full[1])
    one = dp.influencelab_scores("ekfac-halves-1", ctx)
    per = [dp.influencelab_scores("ekfac", {**ctx, "model": m}) for m in (full[1], full[0])]
    np.testing.assert_allclose(one, per[0], rtol=1e-5, atol=1e-7 * np.abs(per[0]).max())
    assert np.abs(one - per[1]).max() > 1e-3 * np.abs(per[1]).max()
    two = dp.influencelab_scores("ekfac-halves-2", ctx)
    np.testing.assert_allclose(two, (per[0] + per[1]) / 2, rtol=1e-5, atol=1e-7 * np.abs(two).max())


def test_a_failed_method_is_kept_and_reported_by_a_cached_only_run(dp, tmp_path, monkeypatch):
    """A method that raises is a times.csv row with its error, and a later --cached-only run (what gathers the
    committed CSVs) reports that error again instead of "not run"."""
    real = dp.influencelab_scores

    def failing(method, ctx):
        if method == "cg":
            raise RuntimeError("CG broke down (as on an indefinite Hessian)")
        return real(method, ctx)

    monkeypatch.setattr(dp, "influencelab_scores", failing)
    args = ["--tiny", "--models", "lr", "--methods", "ekfac,cg", "--no-mislabel", "--skip", "dattri:ekfac,dattri:cg",
            "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]
    dp.main(args)
    monkeypatch.setattr(dp, "influencelab_scores", real)
    dp.main([*args, "--cached-only"])
    times = pd.read_csv(tmp_path / "out" / "times.csv").set_index("method")
    assert times.loc["cg", "error"] == "RuntimeError: CG broke down (as on an indefinite Hessian)"
    assert times.loc["ekfac", "seconds"] > 0 and pd.isna(times.loc["ekfac", "error"])  # (read back from the cache)
