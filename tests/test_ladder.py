"""Pieces of the approximation ladder (issue 29 item 5): EK-FAC/K-FAC factors fitted on a seeded sample of the
training points (solver.max_examples) are the factors of that sample."""

from __future__ import annotations

import pytest
import torch

from influencelab.errors import ConfigError
from influencelab.solvers.ekfac import EKFAC, KFAC
from test_solvers import _data, _model, _short_train


@pytest.mark.parametrize("cls", [EKFAC, KFAC])
def test_factors_fitted_on_a_sample_are_the_samples(cls):
    train, _ = _data()
    model = _short_train(_model("mlp"), train)
    sampled = cls(dtype="float64", max_examples=20, seed=3)
    sampled.fit(model, train)
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(3))[:20].sort().values
    direct = cls(dtype="float64", seed=3)
    direct.fit(model, train.subset(idx))
    assert sampled.state.keys() == direct.state.keys()
    for k in sampled.state:
        assert torch.allclose(sampled.state[k], direct.state[k], rtol=1e-10, atol=1e-12), k
    full = cls(dtype="float64", seed=3)
    full.fit(model, train)
    assert not torch.allclose(full.state["0.lambda"], sampled.state["0.lambda"])
    assert "max_examples" in sampled.fit_config() and "max_examples" not in full.fit_config()
    with pytest.raises(ConfigError, match="solver.max_examples"):
        cls(max_examples=0)
