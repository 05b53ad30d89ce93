"""Regression from the CLI (task=regression, dataset=diabetes): end to end with LDS, scores against a dense float64
GGN solve, the one-line refusals of what needs class labels, and the cached-compute helper with and without a
cache (paths.cache=null)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from scipy.stats import spearmanr
from torch.func import functional_call, jacrev, vmap

from conftest import make_config, run_cli
from influencelab.artifacts import Artifacts
from influencelab.cli import run
from influencelab.errors import ConfigError
from influencelab.run import load_run

#: the preset, small: 10 epochs, 6 queries
SMALL = ["experiment=regression", "trainer.epochs=10", "query.n=6"]


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread (a second thread's hand-offs only slow tiny ops on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_regression_preset_end_to_end(one_thread, run_pipeline):
    """train, fit (EK-FAC), self, pairwise and LDS on diabetes: the task's metric (R²) and loss are reported, LDS has
    the loss measurement only (no margin without classes) and is the statistic recomputed from its saved files, and
    it measures something (measured 0.71 at 8 subsets; the preset's 20 subsets: 0.76)."""
    run_dir, m = run_pipeline([*SMALL, "lds.n_subsets=8", "lds.bootstrap=50"])
    # an MLP on this split: test R² 0.28-0.32 (ordinary least squares on the same split: 0.33)
    assert 0.2 < m["train/test_r2"] < m["train/train_r2"] < 1.0
    assert m["train/test_loss"] > 0 and "train/test_accuracy" not in m and m["train/n_train"] == 353
    assert m["lds/n"] == 6 and "lds_margin/mean" not in m
    truth = load_file(str(run_dir / "scores" / "lds_truth.safetensors"))
    assert set(truth) == {"masks", "loss", "query_indices"}
    scores = load_file(str(run_dir / "scores" / "pairwise.safetensors"))["scores"].double()
    pred = (scores @ truth["masks"].double().T).numpy()
    by_hand = np.mean([spearmanr(p, -a).statistic for p, a in zip(pred, truth["loss"].T.numpy(), strict=True)])
    assert m["lds/mean"] == pytest.approx(by_hand, abs=1e-9)
    assert m["lds/mean"] > 0.4, m["lds/mean"]
    self_scores = load_file(str(run_dir / "scores" / "self.safetensors"))["scores"]
    assert self_scores.shape == (353,) and (self_scores > 0).all()  # g^T (G + λI)^-1 g of a positive definite G
    assert (run_dir / "figures" / "training.png").stat().st_size > 0


def dense_ggn_scores(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor,
                     damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-influence ``[n]`` and pairwise scores ``[n_query, n]`` computed from scratch in float64: the dense damped
    Gauss-Newton ``J^T J / n + λI`` of the squared error (its output Hessian is the identity) from per-example
    Jacobians by torch.func, gradients ``(f(x) - y) J``, and ``torch.linalg.solve``."""
    model = model.double().eval()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def out_one(p, xi):
        return functional_call(model, p, (xi[None],))[0]

    def jacobians(inputs):  # [n, outputs, P]
        J = vmap(jacrev(out_one), in_dims=(None, 0))(params, inputs.double())
        return torch.cat([J[k].reshape(len(inputs), J[k].shape[1], -1) for k in params], -1)

    def grads(inputs, targets, J):
        with torch.no_grad():
            residual = model(inputs.double()) - targets.double().reshape(len(targets), -1)
        return torch.einsum("nc,ncp->np", residual, J)

    J, Jq = jacobians(x), jacobians(xq)
    G = torch.einsum("ncp,ncq->pq", J, J) / len(x)
    g, gq = grads(x, y, J), grads(xq, yq, Jq)
    solved = torch.linalg.solve(G + damping * torch.eye(len(G), dtype=G.dtype), g.T)  # [P, n]
    return (g * solved.T).sum(1), gq @ solved


def _scored(run_pipeline, overrides: list[str], name: str):
    run_dir, _ = run_pipeline([*SMALL, "query.n=5", "solver.damping=1e-2", "stages=[train,fit,self,pairwise]",
                               *overrides], name)
    r = load_run(run_dir)
    qpos = torch.searchsorted(r.test.indices, r.scores("pairwise")["query_indices"])
    ref_self, ref_pairwise = dense_ggn_scores(r.model, r.train.x, r.train.targets, r.test.x[qpos],
                                              r.test.targets[qpos], 1e-2)
    return r, r.self_scores.double(), r.pairwise_scores.double(), ref_self, ref_pairwise


def test_cli_regression_scores_equal_a_dense_ggn_solve(one_thread, run_pipeline):
    """The CLI's exact solver on the trained MLP (153 parameters) is the dense float64 damped GGN solve (measured:
    1e-15 relative), so task=regression reaches the solver's curvature, its gradients and the query measurement; a
    loaded run's attributor scores with the run's task too."""
    r, got_self, got_pairwise, ref_self, ref_pairwise = _scored(run_pipeline, ["solver=exact", "model.hidden=8"],
                                                                "exact")
    assert got_pairwise.shape == ref_pairwise.shape == (5, 353)
    torch.testing.assert_close(got_self, ref_self, rtol=1e-6, atol=1e-6 * float(ref_self.abs().max()))
    torch.testing.assert_close(got_pairwise, ref_pairwise, rtol=1e-6, atol=1e-6 * float(ref_pairwise.abs().max()))
    attr = r.attributor()
    assert attr.task.name == "regression"
    torch.testing.assert_close(attr.self_influence()[0].double(), ref_self, rtol=1e-6, atol=0.0)


def test_cli_regression_ekfac_on_a_linear_model_is_the_dense_ggn_up_to_its_sampling(one_thread, run_pipeline):
    """Linear regression: the GGN is ``E[a a^T]``, whose eigenbasis K-FAC finds exactly, so EK-FAC differs from the
    dense solve only by its Monte-Carlo eigenvalues (targets sampled from the Gaussian, 16 per example; measured
    3% on self-influence, 4.5% on pairwise scores). A classification loss on the one output would give zeros."""
    _, got_self, got_pairwise, ref_self, ref_pairwise = _scored(
        run_pipeline, ["model=linear", "solver=ekfac", "solver.dtype=float64", "solver.fisher_samples=16"], "ekfac")
    assert float((got_self - ref_self).abs().max() / ref_self.abs().max()) < 0.1
    assert float((got_pairwise - ref_pairwise).abs().max() / ref_pairwise.abs().max()) < 0.15
    assert spearmanr(got_self.numpy(), ref_self.numpy()).statistic > 0.999


@pytest.mark.parametrize("overrides, message", [
    (["stages=[train,mislabel]"], "stage mislabel needs class labels: task=regression has none; drop it from stages"),
    (["stages=[train,attribution]"], "stage attribution needs class labels: task=regression has none"),
    (["stages=[train,unlearn]", "unlearn.mode=repair"], "unlearn.mode=repair needs class labels"),
    (["stages=[train,unlearn]", "unlearn.selection=flipped"], "unlearn.selection=flipped needs flipped class labels"),
    (["dataset.label_noise=0.1"], "dataset.label_noise=0.1 is invalid: diabetes's targets are continuous"),
    (["task=classification"], "task=classification is invalid for dataset diabetes: its targets are continuous"),
    (["dataset=digits"], "task=regression is invalid for dataset digits: its targets are class labels"),
    (["model=cnn"], "model=cnn needs images: the dataset gives feature vectors"),
])
def test_what_needs_class_labels_or_images_is_refused_before_anything_is_read(tmp_path, overrides, message):
    cfg = make_config(["experiment=regression", *overrides], tmp_path / "cache")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")) as e:
        run(cfg, tmp_path / "run")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "metrics.json").exists()


def test_regression_refusal_from_the_command_line_is_one_line_exit_2(tmp_path):
    r = run_cli(["experiment=regression", "stages=[train,mislabel]", "logger=none"], tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == ("error: stage mislabel needs class labels: task=regression has none; drop it from "
                                "stages")


def test_cached_computes_once_with_a_cache_and_every_time_without(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"v": torch.arange(3.0)}

    for root, expected in ((tmp_path / "c", [False, True]), (None, [False, False])):
        calls.clear()
        art = Artifacts(root)
        seen = []
        for _ in range(2):
            info: dict = {}
            out = art.cached("things", {"a": 1}, compute, meta={"why": "test"}, info=info)
            torch.testing.assert_close(out["v"], torch.arange(3.0))
            seen.append(info["cached"])
        assert seen == expected and len(calls) == 2 - sum(expected)
    assert len(list((tmp_path / "c" / "things").glob("*.safetensors"))) == 1
    assert not list(tmp_path.glob("cache*"))


def _run(overrides: list[str], run_dir: Path, cache: str) -> dict:
    cfg = make_config([*overrides, f"paths.cache={cache}"])
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    return run(cfg, run_dir)


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_lds_loo_and_unlearn_run_without_a_cache_and_agree_with_a_cached_run(one_thread, tmp_path, monkeypatch, task):
    """``paths.cache=null``: retraining (LDS and LOO ground truth, unlearning's gold standard) computes without
    writing anything, with the same results as a run with a cache. Regression unlearns too (removal; its
    divergence is the Gaussians' KL, ``0.5 (f - f_retrained)²``)."""
    monkeypatch.chdir(tmp_path)
    data = ["dataset=digits", "dataset.subset=100", "dataset.label_noise=0.1"] if task == "classification" else \
        ["task=regression", "dataset=diabetes", "dataset.subset=100"]
    overrides = [*data, "model=mlp", "model.hidden=8", "trainer.epochs=2", "solver=ekfac", "query.n=3",
                 "lds.n_subsets=3", "lds.bootstrap=20", "loo.k=3", "unlearn.mode=remove", "unlearn.selection=random",
                 "unlearn.size=3", "stages=[train,fit,pairwise,lds,loo,unlearn]", "logger=none"]
    without = _run(overrides, tmp_path / "without", "null")
    assert not any(p.name.startswith("cache") for p in tmp_path.iterdir())
    cached = _run(overrides, tmp_path / "with", str(tmp_path / "cache"))
    metric = "accuracy" if task == "classification" else "r2"
    keys = ["lds/mean", "loo/pearson", f"unlearn/retrained/test_{metric}", "unlearn/edited/kl_to_retrained",
            "unlearn/original/param_dist_rel"]
    for k in keys:
        assert without[k] == pytest.approx(cached[k], rel=1e-9, nan_ok=True), k
    assert np.isfinite(without["lds/mean"]) and without["unlearn/original/kl_to_retrained"] > 0
    assert ("unlearn/edited/agreement" in without) == (task == "classification")
    assert len(list((tmp_path / "cache" / "retrain").glob("*.safetensors"))) == 3 + 1 + 3  # 3 subsets; LOO: base + k
    assert len(list((tmp_path / "cache" / "unlearn_retrained").glob("*.safetensors"))) == 1
