"""Agreement with kronfluence (the peer EK-FAC implementation) on the same trained CNN, same convention and damping."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch.utils.data import TensorDataset

from influencelab.data.digits import Digits
from influencelab.models import cnn
from influencelab.solvers.ekfac import EKFAC
from influencelab.train import Trainer

try:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
except ImportError:  # pragma: no cover - the bench extra is installed by `make install`
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("kronfluence not installed (pip install -e '.[bench]')", allow_module_level=True)

DAMPING = 1e-3


class _Classification(Task):
    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="sum")

    def compute_measurement(self, batch, model):
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="sum")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    train, test = Digits(subset=400, label_noise=0.1, seed=0).load()
    torch.manual_seed(0)
    model = cnn(10, 1, 8, channels=(8, 16), hidden=32)
    Trainer(epochs=8, batch_size=32, lr=3e-3, seed=0, device="cpu").fit(model, train)
    return model.eval(), train, test, tmp_path_factory.mktemp("kronfluence")


def test_self_and_pairwise_scores_agree_with_kronfluence(trained):
    model, train, test, out = trained
    # ours: empirical Fisher (training labels), the convention kronfluence uses with use_empirical_fisher=True
    ours = EKFAC(damping=DAMPING, curvature="empirical_fisher", batch_size=64)
    ours.fit(model, train)
    self_ours = ours.self_influence(model, train.x, train.targets, [DAMPING])[0]
    q = ours.precondition(ours.train_grads(model, test.x[:10], test.targets[:10]), DAMPING)
    pair_ours = ours.pairwise(model, q, train.x, train.targets)

    kmodel = prepare_model(copy.deepcopy(model), _Classification())
    analyzer = Analyzer("agree", kmodel, _Classification(), cpu=True, disable_tqdm=True, output_dir=str(out),
                        log_level=40)
    tr = TensorDataset(train.x, train.targets)
    qs = TensorDataset(test.x[:10], test.targets[:10])
    analyzer.fit_all_factors("f", tr, per_device_batch_size=64,
                             factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True))
    sargs = ScoreArguments(damping_factor=DAMPING)
    analyzer.compute_self_scores("s", "f", tr, per_device_train_batch_size=64, score_args=sargs)
    analyzer.compute_pairwise_scores("p", "f", qs, tr, per_device_query_batch_size=10,
                                     per_device_train_batch_size=64, score_args=sargs)
    self_k = analyzer.load_self_scores("s")["all_modules"]
    pair_k = analyzer.load_pairwise_scores("p")["all_modules"]
    rho_self = spearmanr(self_ours.numpy(), self_k.numpy()).statistic
    rho_pair = min(spearmanr(a.numpy(), b.numpy()).statistic for a, b in zip(pair_ours, pair_k, strict=True))
    print(f"kronfluence agreement: spearman self {rho_self:.5f}, pairwise (min over queries) {rho_pair:.5f}")
    assert rho_self >= 0.99, rho_self
    assert rho_pair >= 0.99, rho_pair
    # not only the ranking: same scale and sign
    rel = (pair_ours - pair_k).norm() / pair_k.norm()
    print(f"relative difference of pairwise scores {float(rel):.2e}")
    assert rel < 0.05, float(rel)
