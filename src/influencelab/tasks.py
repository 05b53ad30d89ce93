"""What the engine needs to know about a model's loss: the :class:`Task` contract.

Influence is ``I(z, z_q) = ∇m(z_q)^T (G + λI)^-1 ∇L(z)`` with

* ``L``: the per-example training loss, :meth:`Task.loss` (summed over a batch by the engine);
* ``G``: the mean Gauss-Newton / Fisher of ``L``: for ``curvature="fisher"`` the product-based solvers use
  ``J^T H_out J`` with :meth:`Task.output_hessian_product` (``H_out`` = Hessian of the loss w.r.t. the model
  output), and the Kronecker-factored ones estimate it from gradients with targets drawn from the model's own
  predictive distribution, :meth:`Task.sample_targets` (true Fisher; equal to the GGN in expectation for the
  losses below); ``empirical_fisher`` uses the data's targets, ``hessian`` differentiates :meth:`Task.loss` twice;
* ``m``: the query measurement, :meth:`Task.measurement` (default: the query's loss).

The task is also the one owner of everything else that depends on what the model's output means, so that no
other module computes a loss or reads a prediction: training's batch loss (:meth:`Task.mean_loss`), the
prediction (:meth:`Task.predict`), the quality metric reported by training and evaluation (:attr:`Task.metric_name`,
summed over batches with :meth:`Task.metric_terms` and read with :meth:`Task.metric_value`), the distance between two
models' predictive distributions (:meth:`Task.divergence`, unlearning) and the measurements that retraining is
compared on (:meth:`Task.query_measurements`, LDS and leave-one-out).

The task also reads the batches as the user's data yields them (a tuple, or a dict such as ``{"input_ids",
"attention_mask", "labels"}``): :meth:`Task.inputs` is what the model is called with, by :meth:`Task.forward`, and
:meth:`Task.targets` what the loss compares its output to (defaults: ``(x, y)`` pairs, ``model(x)``). The engine
computes every per-example gradient and curvature product through these, never indexing ``x`` and ``y`` itself.

Two tasks ship, chosen in the CLI by the ``task`` config group (``conf/task/``): :class:`ClassificationTask`
(cross-entropy on logits, accuracy; the default) and :class:`RegressionTask` (squared error ``0.5 ||f(x) - y||^2``,
the negative log-likelihood of a unit-variance Gaussian, so its Fisher is ``J^T J``; R²); the Python API has a third,
:class:`LanguageModelingTask` (a causal LM's summed next-token cross-entropy per sequence, padding masked). Subclass
:class:`Task` for another loss: implement :meth:`~Task.loss`, :meth:`~Task.sample_targets` and
:meth:`~Task.output_hessian_product` (keep them per-example), and :meth:`~Task.inputs`/:meth:`~Task.targets`/
:meth:`~Task.forward` for batches that are not ``(x, y)`` pairs; the rest has defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn


class Task:
    """The loss contract of a model (see the module docstring). All methods are per example."""

    #: how the task is named in the CLI (``task=<name>``) and in messages
    name: ClassVar[str] = "custom"
    #: dtype of targets (``torch.long`` for class labels, a float dtype for regression targets)
    target_dtype: torch.dtype = torch.long
    #: whether targets are class labels (label noise, mislabel detection, label repair and class names need them)
    has_classes: ClassVar[bool] = False
    #: the quality metric of :meth:`metric_value` (higher is better), as it appears in metric names
    metric_name: ClassVar[str] = "neg_loss"
    #: the measurements of :meth:`query_measurements` and, for each, the sign relating it to an influence score:
    #: a positive (helpful) score predicts the measurement to change by ``sign`` when the point is kept
    measurements: ClassVar[dict[str, float]] = {"loss": -1.0}

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Training loss of each example: ``[b]`` from outputs ``[b, ...]`` and targets ``[b, ...]``."""
        raise NotImplementedError

    def sample_targets(self, output: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Targets drawn from the model's predictive distribution at ``output`` (detached), for the true Fisher."""
        raise NotImplementedError

    def output_hessian_product(self, output: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``H_out u`` per example: the Hessian of :meth:`loss` w.r.t. the output (``[b, C]``) applied to ``u``."""
        raise NotImplementedError

    def output_hessian(self, output: torch.Tensor) -> torch.Tensor:
        """Dense ``H_out`` per example, ``[b, C, C]`` with ``C`` the number of outputs per example (``output``'s
        ``[b, ...]`` flattened; tiny models / dense references only)."""
        return _dense_hessian(lambda u: self.output_hessian_product(output, u), output)

    # -- the batch: what the model is called with and what the loss compares its output to --------------------
    def inputs(self, batch: Any) -> Any:
        """What :meth:`forward` gets from a batch as the data yields it (collated): default ``batch[0]``, the
        ``x`` of ``(x, y)`` pairs."""
        return batch[0]

    def targets(self, batch: Any) -> torch.Tensor:
        """The targets of a batch, one row per example (what :meth:`loss` compares the output to): default
        ``batch[1]``."""
        return batch[1]

    def forward(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        """The model's output ``[b, ...]`` for :meth:`inputs`: ``model(**inputs)`` for a dict (e.g.
        ``input_ids``/``attention_mask``), else ``model(inputs)``; an output object's ``.logits`` (HuggingFace
        models) is taken."""
        out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
        return getattr(out, "logits", out)

    @property
    def reads_pairs(self) -> bool:
        """Whether batches are ``(x, y)`` pairs read the default way (:meth:`inputs`, :meth:`targets`); then data
        of pairs is kept as :class:`~influencelab.data.base.LabeledData`, as before batches were the task's."""
        return type(self).inputs is Task.inputs and type(self).targets is Task.targets

    # -- what the engine calls: target-aware forms of the contract (defaults: the contract itself) ---------------
    def fisher_targets(self, output: torch.Tensor, target: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Targets for the true Fisher of a batch whose data targets are ``target``: default
        :meth:`sample_targets`. A task whose targets mark positions the loss ignores (padding) keeps them ignored."""
        return self.sample_targets(output, generator)

    def loss_hessian_product(self, output: torch.Tensor, target: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``H u`` per example with ``H`` the Hessian w.r.t. the output of :meth:`loss` against ``target``
        (``u``: ``output``'s shape, with optional leading axes): default :meth:`output_hessian_product`, for
        losses whose output Hessian does not depend on the target. A task whose targets mask positions zeroes them."""
        return self.output_hessian_product(output, u)

    def loss_hessian(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Dense :meth:`loss_hessian_product` per example, ``[b, C, C]`` (dense references only)."""
        if type(self).loss_hessian_product is Task.loss_hessian_product:
            return self.output_hessian(output)
        return _dense_hessian(lambda u: self.loss_hessian_product(output, target, u), output)

    def measurement(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """What a query's influence is about, per example (default: its loss)."""
        return self.loss(output, target)

    def mean_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean training loss of a batch (what the optimiser minimises)."""
        return self.loss(output, target).mean()

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        """The model's prediction from its output (default: the output itself)."""
        return output

    def metric_terms(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Float64 sums of a batch from which :meth:`metric_value` computes the metric; summing the terms of
        several batches gives the terms of their union (so training accumulates the metric as it goes)."""
        loss = self.loss(output.detach(), target).double()
        return torch.stack([loss.sum(), torch.tensor(float(len(loss)), dtype=torch.float64, device=loss.device)])

    def metric_value(self, terms: torch.Tensor) -> float:
        """The metric (:attr:`metric_name`, higher is better) from summed :meth:`metric_terms`; default: minus
        the mean loss."""
        return -float(terms[0] / terms[1].clamp_min(1))

    def divergence(self, output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Per example, ``KL(reference || output)`` of the predictive distributions the two outputs define."""
        raise NotImplementedError(f"{type(self).__name__} defines no divergence between predictive distributions")

    def query_measurements(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """What retraining is compared on (LDS, leave-one-out), per example: one entry per :attr:`measurements`
        key (default: the loss)."""
        return {"loss": self.loss(output, target)}

    @property
    def measures_loss(self) -> bool:
        """Whether :meth:`measurement` is the training loss (then query gradients are training gradients)."""
        return type(self).measurement is Task.measurement

    def key(self) -> dict:
        """What the task contributes to cache keys (its class and settings)."""
        return {"task": type(self).__name__, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}


class ClassificationTask(Task):
    """Cross-entropy on logits ``[b, C]`` with integer labels; Fisher targets sampled from ``softmax``. Prediction:
    the most likely class; metric: accuracy; measurements: the loss and the margin (the correct logit minus the
    best other one)."""

    name = "classification"
    has_classes = True
    metric_name = "accuracy"
    measurements = {"loss": -1.0, "margin": 1.0}

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target, reduction="none")

    def mean_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target)  # (fused: the weights trained before the Task owned this, bit for bit)

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        return output.argmax(-1)

    def metric_terms(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        correct = (self.predict(output) == target).sum().double()
        return torch.stack([correct, torch.tensor(float(len(target)), dtype=torch.float64, device=correct.device)])

    def metric_value(self, terms: torch.Tensor) -> float:
        return float(terms[0]) / max(float(terms[1]), 1.0)

    def divergence(self, output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        logp, ref = torch.log_softmax(output.double(), -1), torch.log_softmax(reference.double(), -1)
        return (ref.exp() * (ref - logp)).sum(-1)

    def query_measurements(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        correct = output.gather(1, target[:, None]).squeeze(1)
        other = output.scatter(1, target[:, None], float("-inf")).amax(1)
        return {"loss": self.loss(output, target), "margin": correct - other}

    def sample_targets(self, output: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        probs = torch.softmax(output.detach().double(), dim=-1).cpu()
        return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(output.device)

    def output_hessian_product(self, output: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(output, dim=-1).detach()
        return p * u - p * (p * u).sum(-1, keepdim=True)

    def output_hessian(self, output: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(output, dim=-1).detach()
        return torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)


class RegressionTask(Task):
    """Squared error ``0.5 ||f(x) - y||^2`` per example (outputs and targets ``[b, D]``, or ``[b]``); Fisher
    targets ``f(x) + ε`` with ``ε ~ N(0, I)``, so the true Fisher equals the GGN ``J^T J``. Prediction: the output;
    metric: R² (``1 - SSE / SST`` over every output dimension, SST around the evaluated data's own mean);
    measurement: the loss; divergence: ``0.5 ||f - f_ref||^2``, the KL between the two unit-variance Gaussians."""

    name = "regression"
    target_dtype = torch.float32
    metric_name = "r2"

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        diff = output - target.to(output.dtype).reshape(output.shape)
        return 0.5 * diff.reshape(len(diff), -1).square().sum(1)

    def sample_targets(self, output: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(output.shape, generator=generator, dtype=torch.float64).to(output.device, output.dtype)
        return output.detach() + noise

    def output_hessian_product(self, output: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return u

    def metric_terms(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out = output.detach().double().reshape(len(output), -1)
        y = target.double().reshape(out.shape)
        n = torch.tensor([float(len(y))], dtype=torch.float64, device=y.device)
        return torch.cat([((out - y) ** 2).sum().reshape(1), n, y.sum(0), (y * y).sum(0)])

    def metric_value(self, terms: torch.Tensor) -> float:
        sse, n = float(terms[0]), max(float(terms[1]), 1.0)
        s, s2 = terms[2:].chunk(2)
        sst = float((s2 - s * s / n).sum())
        return 1.0 - sse / sst if sst > 0 else float("nan")

    def divergence(self, output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        diff = output.double() - reference.double()
        return 0.5 * diff.reshape(len(diff), -1).square().sum(1)


class LanguageModelingTask(Task):
    """Next-token prediction of a causal language model. A batch is a dict with ``input_ids`` ``[b, T]`` and
    optionally ``attention_mask`` and ``labels`` (default: the input ids), as HuggingFace tokenizers and datasets
    give it, or a tuple ``(input_ids[, attention_mask[, labels]])``; the model is called as
    ``model(input_ids=..., attention_mask=...)`` (``input_keys``) and returns logits ``[b, T, V]`` (or an object
    with ``.logits``).

    The targets are the labels shifted by one (``targets[:, t]`` = the token the logits at ``t`` predict), ``-100``
    where nothing is predicted: past the end, at tokens whose ``attention_mask`` is 0 (padding) and where the
    labels are already ``-100``. Per sequence, the loss is the **sum** of the per-token cross-entropies (as
    kronfluence's ``compute_train_loss`` sums them), so influence is about whole sequences; training
    (:meth:`mean_loss`) and the metric average over tokens. Fisher targets are sampled per token from the softmax
    (ignored positions stay ignored); the output Hessian is the softmax Hessian of each counted token, zero
    elsewhere. Prediction: the most likely next token; metric: minus the mean token loss."""

    name = "language_modeling"
    metric_name = "neg_token_loss"
    #: the target of positions the loss ignores (PyTorch's and HuggingFace's ``ignore_index``)
    IGNORE: ClassVar[int] = -100

    def __init__(self, input_keys: tuple[str, ...] = ("input_ids", "attention_mask")):
        self.input_keys = tuple(input_keys)

    @staticmethod
    def _fields(batch: Any) -> dict[str, torch.Tensor]:
        """A batch as a dict (a tuple is ``(input_ids, attention_mask, labels)``, a tensor the input ids)."""
        if isinstance(batch, Mapping):
            return dict(batch)
        if isinstance(batch, torch.Tensor):
            return {"input_ids": batch}
        return dict(zip(("input_ids", "attention_mask", "labels"), batch, strict=False))

    def inputs(self, batch: Any) -> dict[str, torch.Tensor]:
        fields = self._fields(batch)
        return {k: fields[k] for k in self.input_keys if k in fields}

    def targets(self, batch: Any) -> torch.Tensor:
        fields = self._fields(batch)
        labels = fields.get("labels", fields["input_ids"]).long()
        mask = fields.get("attention_mask")
        if mask is not None:
            labels = labels.masked_fill(mask == 0, self.IGNORE)
        return torch.cat([labels[:, 1:], labels.new_full((len(labels), 1), self.IGNORE)], dim=1)

    def _counted(self, target: torch.Tensor) -> torch.Tensor:
        return target != self.IGNORE

    def token_losses(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each position ``[b, T]`` (0 where ignored)."""
        logp = torch.log_softmax(output, dim=-1)
        nll = -logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return nll * self._counted(target).to(nll.dtype)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.token_losses(output, target).sum(1)

    def mean_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.token_losses(output, target).sum() / self._counted(target).sum().clamp_min(1)

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        return output.argmax(-1)

    def metric_terms(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = self.token_losses(output.detach(), target).double().sum()
        return torch.stack([total, self._counted(target).sum().double()])

    def sample_targets(self, output: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        probs = torch.softmax(output.detach().double(), dim=-1).cpu()
        drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
        return drawn.reshape(output.shape[:-1]).to(output.device)

    def fisher_targets(self, output: torch.Tensor, target: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        drawn = self.sample_targets(output, generator)
        return drawn.masked_fill(~self._counted(target.to(drawn.device)), self.IGNORE)

    def output_hessian_product(self, output: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Every position's softmax Hessian ``diag p - p p^T`` applied to ``u`` (no position masked)."""
        p = torch.softmax(output, dim=-1).detach()
        return p * u - p * (p * u).sum(-1, keepdim=True)

    def loss_hessian_product(self, output: torch.Tensor, target: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.output_hessian_product(output, u) * self._counted(target).unsqueeze(-1).to(output.dtype)


def _dense_hessian(product: Callable[[torch.Tensor], torch.Tensor], output: torch.Tensor) -> torch.Tensor:
    """``[b, C, C]`` from a per-example product ``u -> H u`` on outputs ``[b, ...]`` (``C`` outputs per example)."""
    b, c = len(output), output[0].numel()
    eye = torch.eye(c, dtype=output.dtype, device=output.device)
    return torch.stack([product(eye[i].reshape(output.shape[1:]).expand_as(output)).reshape(b, c)
                        for i in range(c)], dim=-1)


def task_key(task: Task) -> dict:
    """What ``task`` adds to the key of an artefact that depends on it (a trained model, fitted factors): nothing for
    the default :class:`ClassificationTask` (keys written before tasks were configurable stay valid), else
    ``{"task": task.key()}``."""
    return {} if type(task) is ClassificationTask else {"task": task.key()}


def resolve_task(task: Task | str | None) -> Task:
    """``None``/``"classification"`` -> :class:`ClassificationTask`, ``"regression"`` -> :class:`RegressionTask`,
    ``"language_modeling"`` -> :class:`LanguageModelingTask`."""
    if isinstance(task, Task):
        return task
    if task in (None, "classification"):
        return ClassificationTask()
    if task == "regression":
        return RegressionTask()
    if task == "language_modeling":
        return LanguageModelingTask()
    from .errors import ConfigError

    raise ConfigError(f"task={task!r} is invalid: use classification, regression, language_modeling or a Task "
                      f"instance")
