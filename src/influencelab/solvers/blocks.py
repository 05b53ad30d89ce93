"""Per-example gradients of the tracked blocks from one forward/backward pass (hooks), the fast path shared
by the Kronecker-factored solvers (EK-FAC, K-FAC) and the identity baseline.

For a block with inputs ``a`` (Conv2d: unfolded patches) and pre-activation output gradients ``s`` over
positions ``t`` (1 for a plain Linear; conv locations or ViT tokens otherwise), the per-example gradient of the
summed loss is ``G_i = sum_t s_t [a_t, 1]^T``. Capturing ``a`` and ``s`` costs one ordinary backward pass per
batch, instead of torch.func's vmapped per-example graphs, and scores against plain Linear blocks never form
``G_i`` at all.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.base import batch_to
from ..errors import ConfigError
from .base import Solver
from .layout import Block


def capturable(m: nn.Module) -> bool:
    """Whether the hooks can express ``m``'s per-example gradient (grouped or string-padded convs cannot)."""
    return not isinstance(m, nn.Conv2d) or (
        m.groups == 1 and not isinstance(m.padding, str) and m.padding_mode == "zeros")


class _Inputs(dict):
    """``cap.a[name]``: a block's inputs ``[b, T, in]``, made from its raw input on first use (a conv's unfolded
    patches are a copy ``kernel_h x kernel_w`` times the input's size that some paths never need) and kept."""

    def __init__(self, cap: Capture):
        super().__init__()
        self.cap = cap

    def __missing__(self, name: str) -> torch.Tensor:
        value = self[name] = self.cap._inputs(self.cap.modules[name], self.cap.input(name))
        return value


class Capture:
    """Forward/backward hooks that record each tracked block's inputs ``[b, T, in]`` (without the bias column;
    ``x``: the raw module inputs they are made from on first use of ``a``) and output gradients ``[b, T, out]``
    (a conv's: a view of ``[b, out, H, W]``, whose ``(H, W)`` is in ``out_hw``).

    ``on_grad(name)``, when given, consumes block ``name`` inside the backward pass, as soon as its output gradient
    arrives; the block's captured tensors are then released (:meth:`release`), so that the backward pass frees its
    activations as an ordinary one does instead of every block's inputs and output gradients being held to its end
    (what a pass holds is then that of training, plus one block's work)."""

    def __init__(self, modules: dict[str, nn.Module], blocks: list[Block], dtype: torch.dtype,
                 on_grad: Callable[[str], None] | None = None):
        self.blocks = blocks
        self.on_grad = on_grad
        self.modules = modules
        self.dtype = dtype  # captured tensors are cast to it (they are bf16/fp16 under autocast)
        self.x: dict[str, torch.Tensor] = {}
        self.versions: dict[str, int] = {}  # x's version when captured: an in-place change later is caught
        self.a: dict[str, torch.Tensor] = _Inputs(self)
        self.s: dict[str, torch.Tensor] = {}
        self.out_hw: dict[str, tuple[int, int]] = {}
        self.handles: list[Any] = []

    @staticmethod
    def _inputs(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(m, nn.Conv2d):
            a = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2)
        else:
            a = x.reshape(x.shape[0], -1, x.shape[-1])
        return a  # the bias column of ones is implicit (see _cov_a, _rot_a, _block_grads)

    def __enter__(self) -> Capture:
        for blk in self.blocks:
            m = self.modules[blk.name]
            if not capturable(m):
                raise ConfigError(f"solver.modules includes {blk.name!r}: Conv2d with groups={m.groups}, "
                                  f"padding={m.padding!r}, padding_mode={m.padding_mode!r} is not supported by "
                                  f"Kronecker-factored solvers; exclude it with solver.modules=re:PATTERN")
        for blk in self.blocks:
            m = self.modules[blk.name]

            def fwd(mod, inp, out, blk=blk):
                # the input itself (autograd keeps it for the backward pass anyway): cast on use, not copied here
                self.x[blk.name] = inp[0].detach()
                self.versions[blk.name] = self.x[blk.name]._version
                conv = isinstance(mod, nn.Conv2d)
                # the backward pass starts at the tracked outputs: the first one (nothing upstream needs a
                # gradient, since parameters are frozen and the input is not tracked) becomes a leaf that does,
                # so no gradient of the input or of untracked layers before it is ever computed; what the model
                # gets is a copy of it (a later in-place op, e.g. ReLU(inplace=True), may not touch the leaf)
                leaf = None if out.requires_grad else out.detach().requires_grad_(True)

                def bwd(g, blk=blk, conv=conv):
                    g = g.detach().to(self.dtype)
                    if conv:
                        self.out_hw[blk.name] = tuple(g.shape[2:])
                    self.s[blk.name] = (g.flatten(2).transpose(1, 2) if conv
                                        else g.reshape(g.shape[0], -1, g.shape[-1]))
                    if self.on_grad is not None:
                        self.on_grad(blk.name)
                        self.release(blk.name)
                (out if leaf is None else leaf).register_hook(bwd)
                return None if leaf is None else leaf.clone()

            self.handles.append(m.register_forward_hook(fwd))
        return self

    def __exit__(self, *exc) -> None:
        self.on_grad = None  # (a closure over this capture: the cycle would keep its caller's tensors until gc runs)
        for h in self.handles:
            h.remove()
        for d in (self.x, self.versions, self.a, self.s, self.out_hw):
            d.clear()

    def release(self, name: str) -> None:
        """Drop block ``name``'s captured tensors (consumed)."""
        for d in (self.x, self.versions, self.a, self.s):
            d.pop(name, None)

    def input(self, name: str) -> torch.Tensor:
        """The raw input of block ``name`` as its module saw it (in the capture's dtype)."""
        x = self.x[name]
        if x._version != self.versions[name]:
            raise ConfigError(f"the input of {name!r} was changed in place after {name!r} ran (e.g. by an in-place "
                              f"op on a tensor the model reuses); its per-example gradients cannot be formed. Make "
                              f"that op out of place, or exclude {name!r} with solver.modules=re:PATTERN")
        return x.to(self.dtype)


def _conv_example_grads(m: nn.Conv2d, x: torch.Tensor, s: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """Per-example weight gradients ``[b, out, in * kh * kw]`` of a conv from its raw input ``x [b, in, H, W]`` and
    output gradients ``s [b, T, out]``: one weight-gradient convolution with a group per example (on the CPU 3x
    faster than unfolding the patches and multiplying, which this avoids: ``a`` is then never made)."""
    b, c = x.shape[:2]
    out = s.shape[-1]
    w = torch.nn.grad.conv2d_weight(x.reshape(1, b * c, *x.shape[2:]), (b * out, c, *m.kernel_size),
                                    s.transpose(1, 2).reshape(1, b * out, *out_hw), m.stride, m.padding, m.dilation,
                                    groups=b)
    return w.reshape(b, out, -1)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """A batch of images ``[b, c, H, W]`` in channels-last memory order (the same values; explicit strides, since
    with one channel ``.contiguous(memory_format=torch.channels_last)`` keeps NCHW's)."""
    _, c, h, w = x.shape
    return torch.empty_strided(x.shape, (h * w * c, 1, w * c, c), dtype=x.dtype, device=x.device).copy_(x)


_CHANNELS_LAST_OK: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()  # model -> probed


def _cpu_images(x: Any, layout_has_conv: bool) -> bool:
    """Whether a CPU pass would run faster with ``x`` in channels-last order: float32 / bf16 images ``[b, c, H, W]``
    into a model with convolutions (float64, the dense tests' precision, keeps NCHW)."""
    return (layout_has_conv and isinstance(x, torch.Tensor) and x.dim() == 4 and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16))


def _patchify(m: nn.Conv2d) -> bool:
    """Whether the conv cuts its input into non-overlapping patches (kernel = stride, no padding or dilation: a ViT's
    patch embedding). Its unfolded inputs are then a permutation of the input, no larger, and one batched product
    forms the per-example gradients; the grouped weight-gradient convolution of :func:`_conv_example_grads` is for
    overlapping kernels (measured on ViT-B/16's patch embedding in bf16: it took 0.7 GB of work space where the
    whole rest of a pairwise batch took 0.45 GB)."""
    pair = nn.modules.utils._pair
    return (pair(m.kernel_size) == pair(m.stride) and not isinstance(m.padding, str)
            and pair(m.padding) == (0, 0) and pair(m.dilation) == (1, 1))


class PreparedQueries:
    """Preconditioned queries ``[k, P]`` seen block by block as ``[k, out, in]`` views (bias as the last column; no
    copy: for a big model ``k x P`` is gigabytes), made once per score pass by
    :meth:`BlockGradSolver.prepare_queries`. One-position blocks (plain Linear) score fastest from contiguous
    weight / bias parts, which :meth:`split` makes on first use and keeps."""

    def __init__(self, k: int, blocks: list[torch.Tensor]):
        self.k, self.blocks = k, blocks
        self._split: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def __len__(self) -> int:
        return self.k

    def split(self, i: int, bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Contiguous ``(weight [k, out, in - 1], bias [k, out])`` of block ``i`` (``(weight, None)`` without bias)."""
        if i not in self._split:
            Q = self.blocks[i]
            self._split[i] = (Q[..., :-1].contiguous(), Q[..., -1].contiguous()) if bias else (Q.contiguous(), None)
        return self._split[i]


class BlockGradSolver(Solver):
    """A solver whose training gradients, pairwise scores and self-influence come from captured ``a``/``s``.

    Under ``solver.autocast=bf16`` what a scoring pass holds is kept in bf16: the captured inputs and output
    gradients, per-example and query gradients and the preconditioned queries (half of float32's memory; their
    products accumulate in float32). What needs float32's accuracy (covariances, eigenbases, the inverse applied to a
    query block, self-influence) is computed from float32 copies of one block at a time. fp16 keeps float32 storage
    (its range, 6.5e4, does not hold every gradient)."""

    @property
    def store_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.autocast == "bf16" else self.dtype

    def _runs_channels_last(self, model: nn.Module, x: torch.Tensor) -> bool:
        """Whether ``model`` accepts images in channels-last order (one example, once per model; a model that
        ``.view``s a conv's output as NCHW does not, and keeps NCHW). A conv's output keeps its input's order, so
        the whole pass then runs in it: on the CPU, PyTorch's max-pooling is several times faster in it (the CNN's
        first pooling, a batch of 256: 0.95 vs 7.1 ms) and the CNN's forward pass 1.4x faster. The model's own
        parameters are not touched."""
        if model.training:  # (a probe would move a batch norm's running statistics)
            return False
        if model not in _CHANNELS_LAST_OK:
            try:
                with torch.no_grad(), self.amp():
                    self.task.forward(model, _channels_last(x[:1]))
                _CHANNELS_LAST_OK[model] = True
            except RuntimeError:
                _CHANNELS_LAST_OK[model] = False
        return _CHANNELS_LAST_OK[model]

    # -- gradients of a batch, block by block ------------------------------------------------------------
    @contextmanager
    def _captured(self, model: nn.Module, x: Any, y: torch.Tensor, generator: torch.Generator | None = None,
                  each: Callable[[Capture, int, Block], None] | None = None) -> Iterator[Capture]:
        """Run forward (the task's, on the batch inputs ``x``: a tensor or a dict / tuple of them) + backward of the
        summed per-example loss against ``y``; yields the captured a / s per block, or, with ``each``, calls
        ``each(cap, i, block)`` for every block during the backward pass (blocks in reverse order, each released
        once consumed: see :class:`Capture`) and yields the emptied capture. With a ``generator`` and
        ``curvature="fisher"``, targets are sampled from the model's own predictions (the task's
        :meth:`~influencelab.tasks.Task.fisher_targets`: positions the data's targets ignore stay ignored)."""
        assert self.layout is not None
        index = {b.name: (i, b) for i, b in enumerate(self.layout.blocks)}
        cap: Capture

        def on_grad(name: str) -> None:
            each(cap, *index[name])  # type: ignore[misc]

        x = batch_to(x, self.device, self.dtype)  # no gradient of x is needed: see Capture's first output
        if _cpu_images(x, self.layout.has_conv) and self._runs_channels_last(model, x):  # (probed before any hook)
            x = _channels_last(x)
        with Capture(self.layout.modules, self.layout.blocks, self.store_dtype,
                     None if each is None else on_grad) as cap, torch.enable_grad():
            params = list(model.parameters())
            req = [p.requires_grad for p in params]
            for p in params:  # gradients w.r.t. outputs only: no parameter .grad is touched
                p.requires_grad_(False)
            try:
                y = y.to(self.device)
                with self.amp():
                    out = self.task.forward(model, x).to(self.dtype)
                if generator is not None and self.curvature == "fisher":
                    y = self.task.fisher_targets(out.detach(), y, generator)
                self.task.loss(out, y).sum().backward()
            finally:
                for p, r in zip(params, req, strict=True):
                    p.requires_grad_(r)
            yield cap

    def _each_block(self, model: nn.Module, x: Any, y: torch.Tensor, each: Callable[[Capture, int, Block], None],
                    generator: torch.Generator | None = None) -> None:
        """One forward + backward pass of the batch calling ``each(cap, i, block)`` for every block as its output
        gradient arrives (see :meth:`_captured`)."""
        with self._captured(model, x, y, generator, each=each):
            pass

    def _block_grads(self, cap: Capture, blk: Block) -> torch.Tensor:
        """Per-example gradients ``[b, out, in]`` of one block (bias gradient as the last column)."""
        s = cap.s[blk.name]
        m = cap.modules[blk.name]
        if isinstance(m, nn.Conv2d) and s.device.type == "cpu" and blk.name not in cap.a and not _patchify(m):
            g = _conv_example_grads(m, cap.input(blk.name), s, cap.out_hw[blk.name])
        else:
            a = cap.a[blk.name]  # [b, T, in]
            if blk.bias is not None and a.shape[1] <= s.shape[2]:
                # T <= out (Linear layers, a ViT's tokens): a column of ones on the inputs gives the bias column in
                # the same product, for less than a second copy of [b, out, in] that concatenating it would make
                return torch.bmm(s.transpose(1, 2), torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2))
            g = torch.bmm(s.transpose(1, 2), a)
        return torch.cat([g, s.sum(1, keepdim=True).transpose(1, 2)], dim=2) if blk.bias is not None else g

    # -- scoring ---------------------------------------------------------------------------------------------
    def train_grads(self, model: nn.Module, x: Any, y: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Flat ``[b, P]``, each block written into its slice (no list of blocks concatenated: one copy, not two);
        into ``out`` (``[b, P]`` rows of a larger matrix, e.g. every query's gradients) when given."""
        assert self.layout is not None
        if out is None:
            out = torch.empty(len(y), self.layout.size, dtype=self.store_dtype, device=self.device)
        dest = out

        def write(cap: Capture, i: int, b: Block) -> None:
            self.layout.block(dest, b).copy_(self._block_grads(cap, b))

        self._each_block(model, x, y, write)
        return out

    def prepare_queries(self, preconditioned: torch.Tensor) -> PreparedQueries:
        """Per-block ``[k, out, in]`` views of the preconditioned queries (see :class:`PreparedQueries`)."""
        assert self.layout is not None
        pre = preconditioned.to(self.store_dtype)
        return PreparedQueries(len(pre), [self.layout.block(pre, b) for b in self.layout.blocks])

    def pairwise(self, model: nn.Module, preconditioned: torch.Tensor | PreparedQueries, x: Any,
                 y: torch.Tensor) -> torch.Tensor:
        """Block by block, without concatenating per-example gradients; one-position blocks (plain Linear)
        use ``s^T Q a`` and never form ``s a^T``."""
        assert self.layout is not None
        prepared = preconditioned if isinstance(preconditioned, PreparedQueries) else \
            self.prepare_queries(preconditioned)
        k, n = len(prepared), len(y)
        out = torch.zeros(k, n, dtype=self.dtype, device=self.device)

        def score(cap: Capture, i: int, b: Block) -> None:  # (during the backward pass: see _captured)
            s = cap.s[b.name]  # [b, T, out]: T positions (a conv's patches are unfolded only where needed)
            if s.shape[1] == 1:  # [b, in] @ [in, k * out], then each example's [k, out] times its s: [b, k]
                a = cap.a[b.name]
                Qw, Qb = prepared.split(i, b.bias is not None)
                t = (a[:, 0] @ Qw.reshape(k * b.out_dim, -1).T).view(n, k, b.out_dim)
                out.add_(torch.bmm(t, s[:, 0, :, None])[..., 0].T)
                if Qb is not None:
                    out.add_(Qb @ s[:, 0].T)
            else:  # the view [k, out * in] (row stride P) multiplies without a copy
                g = self._block_grads(cap, b)
                out.add_(prepared.blocks[i].reshape(k, -1) @ g.reshape(n, -1).T)

        self._each_block(model, x, y, score)
        return out
