"""What the engine needs to know about a model's loss: the :class:`Task` contract.

Influence is ``I(z, z_q) = ∇m(z_q)^T (G + λI)^-1 ∇L(z)`` with

* ``L``: the per-example training loss, :meth:`Task.loss` (summed over a batch by the engine);
* ``G``: the mean Gauss-Newton / Fisher of ``L``: for ``curvature="fisher"`` the product-based solvers use
  ``J^T H_out J`` with :meth:`Task.output_hessian_product` (``H_out`` = Hessian of the loss w.r.t. the model
  output), and the Kronecker-factored ones estimate it from gradients with targets drawn from the model's own
  predictive distribution, :meth:`Task.sample_targets` (true Fisher; equal to the GGN in expectation for the
  losses below); ``empirical_fisher`` uses the data's targets, ``hessian`` differentiates :meth:`Task.loss` twice;
* ``m``: the query measurement, :meth:`Task.measurement` (default: the query's loss).

Two tasks ship: :class:`ClassificationTask` (cross-entropy; the CLI's) and :class:`RegressionTask` (squared error
``0.5 ||f(x) - y||^2``, the negative log-likelihood of a unit-variance Gaussian, so its Fisher is ``J^T J``).
Subclass :class:`Task` for another loss: implement the four methods, keep them per-example.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Task:
    """The loss contract of a model (see the module docstring). All methods are per example."""

    #: dtype of targets (``torch.long`` for class labels, a float dtype for regression targets)
    target_dtype: torch.dtype = torch.long

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
        """Dense ``H_out`` per example, ``[b, C, C]`` (tiny models / dense references only)."""
        eye = torch.eye(output.shape[-1], dtype=output.dtype, device=output.device)
        return torch.stack([self.output_hessian_product(output, eye[c].expand_as(output))
                            for c in range(output.shape[-1])], dim=-1)

    def measurement(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """What a query's influence is about, per example (default: its loss)."""
        return self.loss(output, target)

    @property
    def measures_loss(self) -> bool:
        """Whether :meth:`measurement` is the training loss (then query gradients are training gradients)."""
        return type(self).measurement is Task.measurement

    def key(self) -> dict:
        """What the task contributes to cache keys (its class and settings)."""
        return {"task": type(self).__name__, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}


class ClassificationTask(Task):
    """Cross-entropy on logits ``[b, C]`` with integer labels; Fisher targets sampled from ``softmax``."""

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target, reduction="none")

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
    targets ``f(x) + ε`` with ``ε ~ N(0, I)``, so the true Fisher equals the GGN ``J^T J``."""

    target_dtype = torch.float32

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        diff = output - target.to(output.dtype).reshape(output.shape)
        return 0.5 * diff.reshape(len(diff), -1).square().sum(1)

    def sample_targets(self, output: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(output.shape, generator=generator, dtype=torch.float64).to(output.device, output.dtype)
        return output.detach() + noise

    def output_hessian_product(self, output: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return u


def resolve_task(task: Task | str | None) -> Task:
    """``None``/``"classification"`` -> :class:`ClassificationTask`, ``"regression"`` -> :class:`RegressionTask`."""
    if isinstance(task, Task):
        return task
    if task in (None, "classification"):
        return ClassificationTask()
    if task == "regression":
        return RegressionTask()
    from .errors import ConfigError

    raise ConfigError(f"task={task!r} is invalid: use classification, regression or a Task instance")
