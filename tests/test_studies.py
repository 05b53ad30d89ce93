"""The paper's experiment presets end to end on tiny configurations, the report command and the notebook."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from scipy.stats import pearsonr, spearmanr

from conftest import REPO, make_config, need_fashion_mnist, run_cli

SMALL = ["dataset.subset=200", "trainer.epochs=2", "dataset.test_subset=100"]


@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")))
def test_every_preset_composes_and_resolves(preset):
    """Every ``experiment=`` preset composes with the defaults and all its interpolations resolve."""
    from omegaconf import OmegaConf

    cfg = make_config([f"experiment={preset}"])
    OmegaConf.resolve(cfg)
    assert cfg.stages and all(isinstance(s, str) for s in cfg.stages)


def test_memorisation_preset_fits_the_flipped_labels(run_pipeline):
    """The memorisation preset's schedule (512-unit CNN, 150 epochs, cosine, no weight decay) fits every flipped
    label of real FashionMNIST; here 500 points instead of 5,000."""
    need_fashion_mnist()
    _, m = run_pipeline(["experiment=mislabel_memorize", "dataset.subset=500", "dataset.test_subset=500",
                         "solver=identity"])
    assert m["train/n_flipped"] == 50
    assert m["train/train_accuracy"] == 1.0  # noisy labels, flipped ones included, are all fitted


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread (on a busy 2-core machine, the second thread's hand-offs slow tiny ops
    10-100x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _auc_by_hand(scores: torch.Tensor, flipped: torch.Tensor) -> float:
    """ROC AUC as the Mann-Whitney statistic: P(a flipped point scores above a clean one), ties 1/2."""
    s, f = scores.double(), flipped.bool()
    d = s[f][:, None] - s[~f][None, :]
    return float(((d > 0).double() + 0.5 * (d == 0).double()).mean())


def _recall_by_hand(scores: torch.Tensor, flipped: torch.Tensor, fraction: float) -> float:
    k = int(np.ceil(fraction * len(scores) - 1e-9))
    top = torch.argsort(scores.double(), descending=True, stable=True)[:k]
    return int(flipped[top].sum()) / int(flipped.sum())


def test_attribution_preset(run_pipeline):
    run_dir, m = run_pipeline(["experiment=attribution", "dataset=digits", *SMALL])
    assert (run_dir / "figures" / "attribution.png").stat().st_size > 10_000
    assert (run_dir / "scores" / "pairwise.safetensors").exists()


def test_mislabel_preset_reports_all_baselines(run_pipeline):
    run_dir, m = run_pipeline(["experiment=mislabel", "dataset=digits", *SMALL, "dataset.label_noise=0.1"])
    for method in ("self_influence", "identity", "loss", "random"):
        for key in ("recall@10", "recall@20", "recall@30", "recall@40", "recall@50", "curve_auc", "roc_auc", "ap"):
            assert f"mislabel/{method}/{key}" in m
    with open(run_dir / "mislabel_curve.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 201 and float(rows[-1]["self_influence"]) == 1.0
    assert (run_dir / "figures" / "mislabel_detection.png").exists()
    # the reported detection numbers are those of the saved self-influence scores against the flip mask
    from influencelab import load_run

    run = load_run(run_dir)
    assert int(run.flipped.sum()) == 20
    assert m["mislabel/self_influence/roc_auc"] == pytest.approx(_auc_by_hand(run.self_scores, run.flipped), abs=1e-12)
    for p in (10, 20, 50):
        assert m[f"mislabel/self_influence/recall@{p}"] == pytest.approx(
            _recall_by_hand(run.self_scores, run.flipped, p / 100), abs=1e-12)


def test_mislabel_without_noise_is_one_line_error(tmp_path):
    r = run_cli(["experiment=mislabel", "dataset=digits", *SMALL, "dataset.label_noise=0.0"], tmp_path)
    assert r.returncode == 2 and "dataset.label_noise" in r.stderr and "Traceback" not in r.stderr


def _ihvp_by_hand(run_dir: Path, positions: list[int], dampings: list[float]) -> dict[float, tuple[float, float]]:
    """The ihvp stage's two numbers recomputed independently of it and of its CG reference: the dense GGN
    ``J^T (diag p - p p^T) J`` of the run's saved model on its tracked parameters (torch.func, float64), the query
    gradients and ``torch.linalg.solve(G + λI, g)``; against it the run's solver, refitted from the run's config
    through the public API. Returns ``{λ: (mean relative error, mean cosine)}`` of the solver's IHVPs."""
    import copy

    from hydra.utils import instantiate
    from torch.func import functional_call, grad, jacrev, vmap

    from influencelab import Attributor, load_run

    run = load_run(run_dir)
    attr = Attributor(run.model, solver=instantiate(run.config.solver, _convert_="all")).fit(run.train)
    layout = attr.solver.layout
    model = copy.deepcopy(run.model).double().eval()
    names = [n for n, _ in model.named_parameters() if n in set(layout.param_names)]
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}

    def logits(ps, x):  # untracked parameters stay as trained
        return functional_call(model, ps, (x,))

    def flat(d: dict, k: int) -> torch.Tensor:
        return torch.cat([d[n].reshape(k, -1) for n in names], dim=1)

    x = run.train.x.double()
    jac = vmap(jacrev(lambda ps, xi: logits(ps, xi[None])[0]), in_dims=(None, 0))(params, x)  # {n: [N, C, ...]}
    J = torch.cat([jac[n].reshape(len(x), jac[n].shape[1], -1) for n in names], dim=2)  # [N, C, P]
    prob = torch.softmax(logits(params, x), -1)
    H = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]
    G = torch.einsum("ncp,ncd,ndq->pq", J, H, J) / len(x)
    qx, qy = run.test.x[positions].double(), run.test.targets[positions]
    g = flat(vmap(grad(lambda ps, xi, yi: F.cross_entropy(logits(ps, xi[None]), yi[None])),
                  in_dims=(None, 0, 0))(params, qx, qy), len(positions))
    queries = run.test.subset(torch.tensor(positions))
    pre = attr.precondition(attr.query_gradients(queries), dampings)  # [n_damping, k, P] in the solver's layout
    out = {}
    for i, lam in enumerate(dampings):
        exact = torch.linalg.solve(G + lam * torch.eye(len(G), dtype=G.dtype), g.T).T
        got = flat(layout.unflatten(pre[i].double(), attr.model), len(positions))
        err = ((got - exact).norm(dim=1) / exact.norm(dim=1)).mean().item()
        out[lam] = (err, F.cosine_similarity(got, exact, dim=1).mean().item())
    return out


# a CNN small enough for a dense GGN (1,034 parameters), float64 so that the CG reference is exact to its tolerance
IHVP_SMALL = ["experiment=ihvp_cnn", "dataset=digits", *SMALL, "model.channels=[4,8]", "model.hidden=16",
              "query.indices=[0,17,42]", "solver.damping=[1e-2,100]", "solver.dtype=float64"]


def test_ihvp_preset_against_cg(one_thread, run_pipeline):
    """The stage's error and cosine are those of the solver against an independent dense solve: for solver=exact
    they vanish (the CG reference has converged), for EK-FAC they equal the error of EK-FAC's IHVPs against
    ``torch.linalg.solve`` on the dense GGN, computed here without the stage or CG."""
    _, m = run_pipeline([*IHVP_SMALL, "solver=exact"], "exact")
    for d in ("0.01", "100"):  # measured: error 9e-7 / 4e-9, 1 - cosine < 1e-12
        assert m[f"ihvp/rel_error@{d}"] <= 1e-4 and m[f"ihvp/cosine@{d}"] >= 0.9999
    run_dir, m = run_pipeline([*IHVP_SMALL, "solver=ekfac"], "ekfac")
    by_hand = _ihvp_by_hand(run_dir, [0, 17, 42], [1e-2, 100.0])
    for lam, d in ((1e-2, "0.01"), (100.0, "100")):
        err, cos = by_hand[lam]  # measured: 0.608 / 0.861 at 1e-2, 0.0020 / 0.9999993 at 100; stage equal to 1e-7
        assert abs(m[f"ihvp/rel_error@{d}"] - err) <= 1e-4 * max(err, 1e-2)
        assert abs(m[f"ihvp/cosine@{d}"] - cos) <= 1e-6
    # EK-FAC is not exact on a CNN at small damping; far above the curvature both are ~ v / λ
    assert by_hand[1e-2][0] > 0.1 and by_hand[100.0][0] < 0.01


def test_ihvp_resnet18_preset_on_tiny_config(run_pipeline):
    """The Sec. 6.2 preset itself (ResNet-18 on FashionMNIST), shrunk: 64 points, the classifier tracked (float64,
    so that the dense reference of its 5,130 parameters is exact); the stage's numbers are EK-FAC's error against
    the dense solve, recomputed independently."""
    need_fashion_mnist()
    run_dir, m = run_pipeline(["experiment=ihvp", "dataset.subset=64", "dataset.test_subset=50", "trainer.epochs=1",
                               "query.indices=[3,30]", "solver.modules=re:fc", "solver.damping=[1e-2,100]",
                               "solver.dtype=float64", "ihvp.reference_args.max_examples=64",
                               "+ihvp.reference_args.max_iter=1000"])
    by_hand = _ihvp_by_hand(run_dir, [3, 30], [1e-2, 100.0])
    # measured on the real files: error 0.0416 at 1e-2 (cosine 0.99925), 8.0e-5 at 100; stage and hand agree to 6e-6
    # relative (the CG reference's tolerance, 1e-6 residual, converged in under 1,000 iterations)
    for lam, d in ((1e-2, "0.01"), (100.0, "100")):
        err, cos = by_hand[lam]
        assert abs(m[f"ihvp/rel_error@{d}"] - err) <= 1e-3 * max(err, 1e-2)
        assert abs(m[f"ihvp/cosine@{d}"] - cos) <= 1e-5
    assert m["ihvp/rel_error@100"] < 0.05  # damping far above the curvature: both are ~ v / λ


@pytest.mark.parametrize("preset, model, modules", [("mislabel_flowers102", "resnet50", "re:fc"),
                                                    ("mislabel_flowers102", "vit_b16", "re:head"),
                                                    ("mislabel_food101", "resnet50", "re:fc")])
def test_transfer_mislabel_presets_on_standin_files(run_pipeline, tmp_path, preset, model, modules):
    """The Flowers102 / Food101 presets end to end on stand-in files in torchvision's exact layout (random pixels:
    the archives and the pretrained timm weights cannot be fetched here), shrunk: 32-pixel images, random init,
    one epoch, the classifier tracked."""
    import standins

    root = tmp_path / "data"
    if preset == "mislabel_flowers102":
        standins.flowers102(root, per_split=10)
    else:
        standins.food101(root, per_class=4)
    run_dir, m = run_pipeline([f"experiment={preset}", f"model={model}", f"dataset.root={root}",
                               "dataset.download=false", "model.pretrained=false", "dataset.image_size=32",
                               "trainer.epochs=1", f"solver.modules={modules}"])
    assert m["train/n_flipped"] == 1
    from influencelab import load_run

    run = load_run(run_dir)  # the reported AUC is the saved self-influence ranking of the one flipped point
    assert m["mislabel/self_influence/roc_auc"] == pytest.approx(_auc_by_hand(run.self_scores, run.flipped), abs=1e-12)
    assert (run_dir / "figures" / "mislabel_detection.png").exists()


def test_ihvp_lissa_single_damping_metrics(run_pipeline):
    _, m = run_pipeline(["experiment=ihvp_cnn", "dataset=digits", *SMALL, "query.n=2", "solver=lissa",
                         "solver.damping=0.1", "solver.depth=20", "+ihvp.reference_args.tol=1e-5"])
    assert m["ihvp/solver"] == "lissa" and m["ihvp/damping"] == 0.1 and m["ihvp/time_s"] > 0


def _lds_by_hand(run_dir: Path, shuffle: np.random.Generator | None = None) -> tuple[float, float]:
    """Mean over queries of Spearman(sum of scores over each subset, -retrained loss) (and with the margin), from
    the saved ``scores/pairwise.safetensors`` and ``scores/lds_truth.safetensors`` only; ``shuffle``: with the
    scores permuted over the training points (a control that has no information left)."""
    scores = load_file(str(run_dir / "scores" / "pairwise.safetensors"))["scores"].double()  # [n_query, n_train]
    truth = load_file(str(run_dir / "scores" / "lds_truth.safetensors"))
    if shuffle is not None:
        scores = scores[:, torch.as_tensor(shuffle.permutation(scores.shape[1]))]
    pred = (scores @ truth["masks"].double().T).numpy()  # [n_query, n_subsets]
    loss, margin = truth["loss"].T.numpy(), truth["margin"].T.numpy()
    return (float(np.mean([spearmanr(p, -a).statistic for p, a in zip(pred, loss, strict=True)])),
            float(np.mean([spearmanr(p, a).statistic for p, a in zip(pred, margin, strict=True)])))


def test_lds_preset_on_tiny_config(one_thread, run_pipeline, cache_dir):
    """The stage's LDS is the statistic recomputed from its saved files; and it measures something: after two
    epochs (near the initialisation, where a gradient-based prediction is nearly linear) the real scores' LDS is
    high while the same scores shuffled over the training points give ~0."""
    overrides = ["experiment=lds", "dataset=digits", "dataset.subset=120", "trainer.epochs=2", "query.n=8",
                 "lds.n_subsets=20", "lds.bootstrap=50"]
    for solver in ("ekfac", "identity"):
        run_dir, m = run_pipeline([*overrides, f"solver={solver}"], solver)
        assert m["lds/n"] == 8 and m["lds/ci_low"] <= m["lds/mean"] <= m["lds/ci_high"]
        lds, lds_margin = _lds_by_hand(run_dir)
        assert m["lds/mean"] == pytest.approx(lds, abs=1e-9)
        assert m["lds_margin/mean"] == pytest.approx(lds_margin, abs=1e-9)
        # measured over seeds 0-2 (seed and lds.subset_seed): LDS 0.73-0.88, margin 0.51-0.73; the control (mean of
        # 20 shuffles) -0.025 to +0.041, one shuffle's sd ~0.1
        rng = np.random.default_rng(0)
        control = np.mean([_lds_by_hand(run_dir, rng)[0] for _ in range(20)])
        assert m["lds/mean"] > 0.5 and m["lds_margin/mean"] > 0.3 and abs(control) < 0.15, (m["lds/mean"], control)
        if solver == "ekfac":
            n_truth = len(list((cache_dir / "retrain").glob("*.safetensors")))
            assert n_truth == 20
            truth_s = m["time/lds_truth_s"]
    assert len(list((cache_dir / "retrain").glob("*.safetensors"))) == n_truth  # same ground truth, computed once
    assert m["time/lds_truth_s"] < truth_s
    # lds.csv: the per-query values the mean is over (the queries' test indices, aligned between the runs)
    per = {s: pd.read_csv(run_dir.parent / s / "lds.csv") for s in ("ekfac", "identity")}
    loss = {s: f[f["measurement"] == "loss"].set_index("query")["lds"] for s, f in per.items()}
    assert len(loss["ekfac"]) == 8 and list(loss["ekfac"].index) == list(loss["identity"].index)
    assert loss["identity"].mean() == pytest.approx(m["lds/mean"], abs=1e-12)
    # the report pairs them by query: the difference of the means, with an interval from resampling queries
    from influencelab.report import report

    report(run_dir.parent)
    paired = pd.read_csv(run_dir.parent / "lds_paired.csv")
    row = paired[paired["measurement"] == "loss"].iloc[0]
    a, b = loss[row["job_a"]], loss[row["job_b"]]
    assert row["n"] == 8 and row["diff"] == pytest.approx(a.mean() - b.mean(), abs=1e-12)
    d = (a - b).to_numpy()
    assert d.min() <= row["ci_low"] < row["diff"] < row["ci_high"] <= d.max()


@pytest.mark.parametrize("retrain", ["scratch", "warm"])
def test_loo_preset(one_thread, run_pipeline, retrain):
    """The stage's correlations are those of its saved table, whose predictions are the saved pairwise scores / n of
    each query's top-k |score| points, and whose actual changes are real (not all zero, as when the point is not
    left out)."""
    run_dir, m = run_pipeline(["experiment=loo", "dataset.subset=100", "trainer.epochs=3", "loo.k=3",
                               "loo.n_queries=2", f"loo.retrain={retrain}", "loo.warm_epochs=1"])
    assert m["loo/n_points"] == 6 and (run_dir / "figures" / "loo.png").exists()
    with open(run_dir / "loo.csv") as f:
        rows = list(csv.DictReader(f))
    q = np.array([int(r["query"]) for r in rows])
    p, a = (np.array([float(r[k]) for r in rows]) for k in ("predicted", "actual"))
    scores = load_file(str(run_dir / "scores" / "pairwise.safetensors"))["scores"].double()
    for i in (0, 1):
        top = torch.argsort(scores[i].abs(), descending=True)[:3]
        np.testing.assert_allclose(p[q == i], (scores[i, top] / 100).numpy(), rtol=1e-12)
    # measured: |actual| 0.024-0.17 (scratch), 0.0018-0.012 (warm) over seeds 0-2
    assert np.isfinite(a).all() and np.abs(a).max() > 1e-3
    assert m["loo/pearson"] == pytest.approx(pearsonr(p, a).statistic, abs=1e-9)
    assert m["loo/spearman"] == pytest.approx(spearmanr(p, a).statistic, abs=1e-9)
    assert m["loo/pearson_within"] == pytest.approx(
        np.mean([pearsonr(p[q == i], a[q == i]).statistic for i in (0, 1)]), abs=1e-9)
    assert m["loo/spearman_within"] == pytest.approx(
        np.mean([spearmanr(p[q == i], a[q == i]).statistic for i in (0, 1)]), abs=1e-9)


def test_report_on_a_small_multirun(tmp_path):
    r = run_cli(["-m", "experiment=mislabel", "dataset=digits", *SMALL, "solver=ekfac,identity"], tmp_path)
    assert r.returncode == 0, r.stderr
    (sweep,) = list((tmp_path / "multirun").glob("*/*"))
    from influencelab.report import report

    md, csv_path, figs = report(sweep)
    text = md.read_text()
    assert "solver" in text and "mislabel/self_influence/recall@10" in text
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert {r["solver"] for r in rows} == {"ekfac", "identity"}
    assert any(p.name == "detection_curves.png" for p in figs)


def test_notebook_executes_from_its_directory(monkeypatch):
    """notebooks/explore_run.ipynb started from notebooks/ (not the repository root): it runs its sweeps through the
    CLI (LiSSA vs EK-FAC IHVP across damping, mislabel detection per solver; INFLUENCELAB_NOTEBOOK_RERUN: even where
    finished runs exist, so the commands themselves are tested), plots them and explores a run, with every path
    anchored to the repository (runs in multirun/notebook/, the cache in cache/, both git-ignored): nothing new
    that git would track, no cache or run folder in notebooks/, and the notebook file itself left as it was."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    path = REPO / "notebooks" / "explore_run.ipynb"

    def untracked() -> set[str] | None:
        if not (REPO / ".git").exists() or shutil.which("git") is None:
            return None
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
        return {line[3:] for line in out.splitlines() if line.startswith("??")}

    before, committed = untracked(), path.read_bytes()
    for var in ("INFLUENCELAB_RUN", "INFLUENCELAB_CACHE", "INFLUENCELAB_DATA"):
        monkeypatch.delenv(var, raising=False)  # the notebook's own defaults: the repository's folders
    monkeypatch.setenv("INFLUENCELAB_NOTEBOOK_RERUN", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "runs: multirun/notebook | cache: cache" in text  # found the repository from notebooks/
    assert len(re.findall(r"^ran \d+ jobs", text, re.M)) == 3, text  # the three CLI sweeps ran (not reused)
    assert sum(1 for o in outputs if "image/png" in o.get("data", {})) >= 4
    ihvp = [o for o in outputs if "lissa, batch 128" in o.get("data", {}).get("text/plain", "")]
    assert ihvp, "the IHVP table has a row per solver configuration and damping"
    assert not [p.name for p in (REPO / "notebooks").iterdir() if p.name in ("cache", "outputs", "multirun", "data")]
    assert path.read_bytes() == committed
    if before is not None:
        assert untracked() - before == set()


def test_report_unescapes_sweep_override_values(tmp_path):
    """Hydra escapes ``:`` in a sweep job's overrides (``solver.modules=last\\:1``); the report shows ``last:1``."""
    from influencelab.sweeps import job_overrides as overrides

    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- solver.modules=last\\:1\n- solver.damping=[1e-3,1]\n")
    assert overrides(tmp_path) == {"solver.modules": "last:1", "solver.damping": "[1e-3,1]"}
