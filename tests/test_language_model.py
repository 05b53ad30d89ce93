"""Batches as users have them: a tiny causal transformer called with ``input_ids``/``attention_mask`` and trained with a
per-token loss, scored through the API (``LanguageModelingTask``) against a dense float64 reference written from
scratch (per-sequence gradients by torch.func, the damped GGN of per-token softmax Hessians, ``torch.linalg.solve``),
padding that does not count, the hook-captured per-token gradients of 3-D Linear inputs, and kronfluence's EK-FAC on
the same model."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn
from torch.func import functional_call, grad, jacrev
from torch.utils.data import DataLoader, Dataset

from influencelab import Attributor
from influencelab.data.base import BatchData, as_data, index_batch
from influencelab.solvers.ekfac import EKFAC
from influencelab.tasks import LanguageModelingTask

VOCAB, D, T = 11, 8, 6
DAMPING = 1e-3


class TinyLM(nn.Module):
    """A one-layer causal transformer: token + position embeddings, single-head attention written with ``nn.Linear``
    q/k/v/out (padded keys masked), a feed-forward block, a LayerNorm and an lm head; logits ``[b, T, V]``."""

    def __init__(self, vocab: int = VOCAB, d: int = D, length: int = T, ff: int = 16):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(length, d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ff1, self.ff2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        t = input_ids.shape[1]
        h = self.tok(input_ids) + self.pos(torch.arange(t, device=input_ids.device))
        att = self.q(h) @ self.k(h).transpose(1, 2) / math.sqrt(h.shape[-1])
        allowed = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, :].bool()
        att = att.masked_fill(~allowed, -1e9)  # (not -inf: a query that sees no key gets uniform weights, not NaN)
        h = h + self.o(torch.softmax(att, -1) @ self.v(h))
        h = h + self.ff2(torch.tanh(self.ff1(h)))
        return self.head(self.norm(h))


class Sequences(Dataset):
    """What a user's tokenised data looks like: one dict per sequence."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor):
        self.ids, self.mask = ids, mask

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}


def _sequences(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[n, T]`` from a noisy counting rule (learnable), right-padded to lengths 3..T (mask 0; the padded
    ids are arbitrary tokens, not a pad id, so that a test can change them)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    step = torch.randint(1, 3, (n, 1), generator=g)
    ids = (start + step * torch.arange(T)) % VOCAB
    noise = torch.rand(n, T, generator=g) < 0.15
    ids = torch.where(noise, torch.randint(0, VOCAB, (n, T), generator=g), ids)
    lengths = torch.randint(3, T + 1, (n,), generator=g)
    mask = (torch.arange(T) < lengths[:, None]).long()
    return ids, mask


@pytest.fixture(scope="module")
def trained():
    """A TinyLM (float64, eval mode) trained a few steps, 24 training and 5 query sequences."""
    ids, mask = _sequences(24, seed=0)
    qids, qmask = _sequences(5, seed=1)
    torch.manual_seed(0)
    model = TinyLM().double()
    task = LanguageModelingTask()
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    batch = {"input_ids": ids, "attention_mask": mask}
    for _ in range(40):
        opt.zero_grad()
        task.mean_loss(task.forward(model, task.inputs(batch)), task.targets(batch)).backward()
        opt.step()
    return model.eval(), (ids, mask), (qids, qmask)


# -- the dense reference, written without the task's code --------------------------------------------------------
def _counted(mask: torch.Tensor) -> torch.Tensor:
    """Positions ``t`` whose next token counts: ``t < T - 1`` and token ``t + 1`` not padding."""
    return torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], 1).bool()


def _flat_model(model: nn.Module):
    """``(theta, logits(theta, ids, mask))`` over every Linear's weight and bias (parameter order)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    tracked = [f"{n}.{w}" for n in names for w in ("weight", "bias")]
    params = dict(model.named_parameters())
    rest = {n: p.detach() for n, p in params.items() if n not in tracked}
    shapes = [params[n].shape for n in tracked]
    theta = torch.cat([params[n].detach().reshape(-1) for n in tracked])

    def logits(th: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        parts = th.split([s.numel() for s in shapes])
        p = {n: v.reshape(s) for n, v, s in zip(tracked, parts, shapes, strict=True)}
        return functional_call(model, {**p, **rest}, (ids[None], mask[None]))[0]

    return theta, logits


def _reference(model: nn.Module, train: tuple, queries: tuple, damping: float):
    """Pairwise ``[n_query, n_train]`` and self-influence ``[n_train]`` from scratch: per-sequence gradients of the
    summed next-token cross-entropy, ``G = 1/n sum_i sum_t J_it^T (diag p - p p^T) J_it`` over counted tokens."""
    theta, logits = _flat_model(model)

    def seq_loss(th, ids, mask):
        keep = _counted(mask[None])[0]
        ce = F.cross_entropy(logits(th, ids, mask)[:-1], ids[1:], reduction="none")
        return (ce * keep[:-1]).sum()

    def grads(ids, mask):
        return torch.stack([grad(seq_loss)(theta, i, m) for i, m in zip(ids, mask, strict=True)])

    ids, mask = train
    G = torch.zeros(len(theta), len(theta), dtype=torch.float64)
    for i, m in zip(ids, mask, strict=True):
        J = jacrev(logits)(theta, i, m)  # [T, V, P]
        p = torch.softmax(logits(theta, i, m), -1).detach()
        for t in _counted(m[None])[0].nonzero()[:, 0]:
            H = torch.diag(p[t]) - torch.outer(p[t], p[t])
            G += J[t].T @ H @ J[t]
    G /= len(ids)
    gt, gq = grads(*train), grads(*queries)
    solved = torch.linalg.solve(G + damping * torch.eye(len(G), dtype=G.dtype), gt.T)  # [P, n_train]
    return gq @ solved, (gt * solved.T).sum(1), gt, gq


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def reference(trained):
    model, train, queries = trained
    return _reference(model, train, queries, DAMPING)


def _exact_scores(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, queries: Dataset):
    """The API's exact scores (pairwise ``[n_query, n_train]``, self ``[n_train]``) on a Dataset of dicts."""
    attr = Attributor(model, task=LanguageModelingTask(), solver="exact", damping=DAMPING, dtype="float64")
    attr.fit(Sequences(ids, mask))
    return attr.pairwise(queries)[0], attr.self_influence()[0]


@pytest.fixture(scope="module")
def exact(trained):
    model, (ids, mask), (qids, qmask) = trained
    return _exact_scores(model, ids, mask, Sequences(qids, qmask))


def test_exact_scores_of_a_causal_transformer_match_the_dense_reference(trained, reference, exact):
    model, (ids, mask), (qids, qmask) = trained
    ref_pair, ref_self, _, _ = reference
    pair, self_inf = exact  # fitted on a map-style Dataset of dicts
    print(f"exact vs dense: pairwise {_rel(pair, ref_pair):.2e}, self {_rel(self_inf, ref_self):.2e}")
    assert _rel(pair, ref_pair) < 1e-8
    assert _rel(self_inf, ref_self) < 1e-8
    # the same data as a dict of tensors, or a DataLoader (its collate_fn), gives the same scores
    same = Attributor(model, task="language_modeling", solver="exact", damping=DAMPING, dtype="float64")
    same.fit({"input_ids": ids, "attention_mask": mask})
    loader = DataLoader(Sequences(qids, qmask), batch_size=2)
    assert torch.allclose(same.pairwise(loader)[0], pair, rtol=1e-10, atol=0)


def test_padding_does_not_count_and_unmasking_it_does(trained, exact):
    model, (ids, mask), (qids, qmask) = trained
    i, t = int((mask.sum(1) < T).nonzero()[0, 0]), T - 1  # a training sequence with padding at its end
    assert mask[i, t] == 0

    def scores(ids_, mask_):
        return _exact_scores(model, ids_, mask_, Sequences(qids, qmask))

    base = exact
    changed = ids.clone()
    changed[i, t] = (ids[i, t] + 3) % VOCAB
    other = scores(changed, mask)  # a padded token's id: nothing changes
    assert torch.allclose(other[0], base[0], rtol=1e-10, atol=1e-12)
    assert torch.allclose(other[1], base[1], rtol=1e-10, atol=1e-12)
    unmasked = mask.clone()
    unmasked[i, mask[i].sum():] = 1  # the padding becomes text: its tokens count
    moved = scores(changed, unmasked)
    assert _rel(moved[1][i:i + 1], base[1][i:i + 1]) > 1e-3
    assert _rel(moved[0][:, i], base[0][:, i]) > 1e-3


def test_the_task_reads_dict_batches_and_masks_targets():
    task = LanguageModelingTask()
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    batch = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
             "labels": torch.tensor([[1, 2, 3, 4], [5, -100, 7, 8]])}
    assert set(task.inputs(batch)) == {"input_ids", "attention_mask"}
    assert task.targets(batch).tolist() == [[2, 3, -100, -100], [-100, 7, 8, -100]]
    assert task.targets((ids,)).tolist() == [[2, 3, 4, -100], [6, 7, 8, -100]]
    data = as_data(batch, task)
    assert isinstance(data, BatchData) and len(data) == 2 and len(data.subset([1])) == 1
    (x, y, pos), = list(data.subset([1]).batches(4))
    assert torch.equal(x["input_ids"], ids[1:]) and y.tolist() == [[-100, 7, 8, -100]] and pos.tolist() == [0]
    assert torch.equal(index_batch(batch, [1])["labels"], batch["labels"][1:])
    out = torch.randn(2, 4, 5, dtype=torch.float64)
    y = task.targets(batch)
    sampled = task.fisher_targets(out, y, torch.Generator().manual_seed(0))
    assert ((sampled == -100) == (y == -100)).all() and (sampled[y != -100] >= 0).all()
    H = task.loss_hessian(out, y)  # [b, T*V, T*V]: per-token softmax Hessians, zero at ignored positions
    p = torch.softmax(out, -1)
    assert torch.allclose(H[1, 5:10, 5:10], torch.diag(p[1, 1]) - torch.outer(p[1, 1], p[1, 1]))
    assert H[1, :5].abs().max() == 0 and H[0, 10:].abs().max() == 0


def test_hook_captured_gradients_and_ekfac_factors_of_token_linears_match_the_dense_reference(trained, reference):
    """Linear layers see ``[b, T, d]``: the per-sequence gradient is ``sum_t s_t [a_t, 1]^T`` (identity's dot products
    against the reference), A's eigenbasis diagonalises ``mean_i sum_t [a_t, 1][a_t, 1]^T`` and EK-FAC's corrected
    eigenvalues are the mean squared reference gradients in that basis."""
    model, (ids, mask), (qids, qmask) = trained
    _, _, gt, gq = reference
    task = LanguageModelingTask()
    ident = Attributor(model, task=task, solver="identity", dtype="float64")
    ident.fit(Sequences(ids, mask))
    assert _rel(ident.pairwise(Sequences(qids, qmask))[0], gq @ gt.T) < 1e-10
    assert _rel(ident.self_influence()[0], (gt * gt).sum(1)) < 1e-10

    ekfac = EKFAC(damping=DAMPING, curvature="empirical_fisher", dtype="float64", batch_size=10, task=task)
    ekfac.fit(model, as_data(Sequences(ids, mask), task))
    inputs = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: inputs.__setitem__(n, a[0].detach()))
             for n in ("k", "ff2")]
    model(ids, mask)
    for h in hooks:
        h.remove()
    offsets, start = {}, 0  # the reference's parameter order: weight then bias of each Linear
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            offsets[n] = (start, m.out_features, m.in_features)
            start += m.weight.numel() + m.bias.numel()
    for i, b in enumerate(ekfac.layout.blocks):
        if b.name not in inputs:
            continue
        a = inputs[b.name]
        a1 = torch.cat([a, torch.ones_like(a[..., :1])], -1).reshape(-1, a.shape[-1] + 1)
        qa = ekfac.state[f"{i}.QA"]
        rot = qa.T @ (a1.T @ a1 / len(ids)) @ qa
        assert (rot - torch.diag(rot.diagonal())).abs().max() < 1e-10 * rot.abs().max()
        s, out_f, in_f = offsets[b.name]
        w = gt[:, s:s + out_f * in_f].reshape(-1, out_f, in_f)
        g = torch.cat([w, gt[:, s + out_f * in_f:s + out_f * in_f + out_f, None]], 2)  # [n, out, in + 1]
        lam = (ekfac.state[f"{i}.QS"].T @ g @ qa).square().mean(0)
        assert _rel(ekfac.state[f"{i}.lambda"], lam) < 1e-10


def test_ekfac_agrees_with_kronfluence_on_a_causal_transformer(trained, tmp_path):
    try:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task as KTask
    except ImportError:  # pragma: no cover - the bench extra is installed by `make install`
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("kronfluence not installed (pip install -e '.[bench]')")
    model, (ids, mask), (qids, qmask) = trained

    class LM(KTask):  # kronfluence's way: the loss of a batch, summed over tokens and sequences
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(batch["input_ids"], batch["attention_mask"])
            target = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
            return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), target.reshape(-1), reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

    # both sides: the empirical Fisher (training tokens; kronfluence samples its own true-Fisher targets), every
    # position's activations in A (no attention mask given to kronfluence), float64 throughout
    attr = Attributor(model, task=LanguageModelingTask(), solver="ekfac", damping=DAMPING, dtype="float64",
                      curvature="empirical_fisher", batch_size=8)
    ours = attr.fit(Sequences(ids, mask)).pairwise(Sequences(qids, qmask))[0]
    ours_self = attr.self_influence()[0]

    f64 = torch.float64
    kmodel = prepare_model(copy.deepcopy(model), LM())
    analyzer = Analyzer("lm", kmodel, LM(), cpu=True, disable_tqdm=True, output_dir=str(tmp_path), log_level=40)
    fargs = FactorArguments(strategy="ekfac", use_empirical_fisher=True, activation_covariance_dtype=f64,
                            gradient_covariance_dtype=f64, per_sample_gradient_dtype=f64, lambda_dtype=f64)
    sargs = ScoreArguments(damping_factor=DAMPING, per_sample_gradient_dtype=f64, precondition_dtype=f64,
                           score_dtype=f64)
    analyzer.fit_all_factors("f", Sequences(ids, mask), per_device_batch_size=8, factor_args=fargs)
    analyzer.compute_pairwise_scores("p", "f", Sequences(qids, qmask), Sequences(ids, mask),
                                     per_device_query_batch_size=5, per_device_train_batch_size=8, score_args=sargs)
    analyzer.compute_self_scores("s", "f", Sequences(ids, mask), per_device_train_batch_size=8, score_args=sargs)
    theirs = analyzer.load_pairwise_scores("p")["all_modules"]
    theirs_self = analyzer.load_self_scores("s")["all_modules"]
    rho = min(spearmanr(a.numpy(), b.numpy()).statistic for a, b in zip(ours, theirs, strict=True))
    rho_self = spearmanr(ours_self.numpy(), theirs_self.numpy()).statistic
    print(f"kronfluence on a causal transformer: spearman pairwise (min over queries) {rho:.6f}, self "
          f"{rho_self:.6f}, relative difference {_rel(ours, theirs):.2e}")
    assert rho >= 0.999 and rho_self >= 0.999
    assert _rel(ours, theirs) < 1e-8  # the same numbers (float64), not only the same ranking


def test_generic_batches_are_cached_under_content_keys(trained, tmp_path):
    model, (ids, mask), (qids, qmask) = trained

    def run(ids_):
        attr = Attributor(model, task=LanguageModelingTask(), solver="ekfac", damping=DAMPING, dtype="float64",
                          cache_dir=tmp_path)
        return attr, attr.fit(Sequences(ids_, mask)).pairwise(Sequences(qids, qmask))

    first, scores = run(ids)
    again, cached = run(ids.clone())
    assert again.fit_info.cached and torch.equal(cached, scores)
    assert again.train_key == first.train_key
    other = ids.clone()
    other[0, 0] = (ids[0, 0] + 1) % VOCAB
    assert run(other)[0].train_key != first.train_key


def test_the_tiny_lm_example_runs(tmp_path):
    """examples/tiny_lm.py (the README's language-model example), briefly, on a small text file."""
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"line {i}: the quick brown fox jumps over {i % 7} lazy dogs" for i in range(30)))
    script = Path(__file__).resolve().parents[1] / "examples" / "tiny_lm.py"
    run = subprocess.run([sys.executable, str(script), str(text), "--seconds", "1"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("query: ") == 2 and "trained" in run.stdout
