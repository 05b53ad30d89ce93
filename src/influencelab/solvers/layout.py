"""Which parameters influence is computed over, and how their gradients are laid out as one flat vector.

Every tracked module (``nn.Linear``/``nn.Conv2d``, or a selection of them) is one *block*. A block's
gradient is the matrix ``[out, in]`` = ``[dW.reshape(out, -1) | db]`` (bias as an extra last column), the
natural shape for Kronecker factors (``A`` over inputs incl. the bias 1, ``S`` over outputs). The flat
vector is the concatenation of the blocks' row-major matrices, in module registration order; every
solver and every score uses this one layout.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError

log = logging.getLogger(__name__)

TRACKABLE = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class Block:
    """One tracked module: its gradient is an ``[out_dim, in_dim]`` matrix at ``offset`` in the flat vector."""

    name: str
    kind: str  # "linear" | "conv2d"
    weight: str  # parameter name of the weight
    bias: str | None  # parameter name of the bias, if any
    out_dim: int
    in_dim: int  # includes the bias column
    offset: int

    @property
    def size(self) -> int:
        return self.out_dim * self.in_dim

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.size)


class ParamLayout:
    """The tracked blocks of a model and the flat-vector layout of their gradients."""

    def __init__(self, model: nn.Module, modules: str | Sequence[str] = "all"):
        named = [(n, m) for n, m in model.named_modules() if isinstance(m, TRACKABLE)]
        chosen = select_modules([n for n, _ in named], modules)
        by_name = dict(named)
        blocks, offset = [], 0
        for name in chosen:
            m = by_name[name]
            has_bias = m.bias is not None
            out_dim = m.weight.shape[0]
            in_dim = m.weight[0].numel() + int(has_bias)
            prefix = f"{name}." if name else ""
            blocks.append(Block(name, "conv2d" if isinstance(m, nn.Conv2d) else "linear", prefix + "weight",
                                prefix + "bias" if has_bias else None, out_dim, in_dim, offset))
            offset += out_dim * in_dim
        self.blocks: list[Block] = blocks
        self.size: int = offset
        self.modules: dict[str, nn.Module] = {b.name: by_name[b.name] for b in blocks}
        self.has_conv: bool = any(isinstance(m, nn.Conv2d) for _, m in named)  # tracked or not
        tracked = set(self.param_names)
        self.untracked: list[str] = [n for n, p in model.named_parameters()
                                     if p.requires_grad and n not in tracked]

    @property
    def param_names(self) -> list[str]:
        names = []
        for b in self.blocks:
            names += [b.weight] + ([b.bias] if b.bias else [])
        return names

    def log_untracked(self) -> None:
        """Say once which parameters influence ignores (e.g. norms, embeddings), never drop them silently."""
        if self.untracked:
            n = len(self.untracked)
            shown = ", ".join(self.untracked[:8]) + (" ..." if n > 8 else "")
            log.info("influence tracks %d blocks (%d params); %d parameter tensors untracked: %s",
                     len(self.blocks), self.size, n, shown)

    def flatten(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-sample parameter gradients ``{name: [b, *shape]}`` -> flat ``[b, P]``."""
        parts = []
        for blk in self.blocks:
            w = grads[blk.weight]
            mat = w.reshape(w.shape[0], blk.out_dim, -1)
            if blk.bias:
                mat = torch.cat([mat, grads[blk.bias].unsqueeze(-1)], dim=-1)
            parts.append(mat.reshape(w.shape[0], -1))
        return torch.cat(parts, dim=1)

    def unflatten(self, flat: torch.Tensor, model: nn.Module) -> dict[str, torch.Tensor]:
        """Flat ``[b, P]`` -> ``{param name: [b, *shape]}`` (inverse of :meth:`flatten`)."""
        params = dict(model.named_parameters())
        out = {}
        for blk in self.blocks:
            mat = self.block(flat, blk)
            wcols = blk.in_dim - int(blk.bias is not None)
            out[blk.weight] = mat[..., :wcols].reshape(flat.shape[0], *params[blk.weight].shape)
            if blk.bias:
                out[blk.bias] = mat[..., -1]
        return out

    def block(self, flat: torch.Tensor, blk: Block) -> torch.Tensor:
        """View of block ``blk`` in a flat ``[b, P]`` tensor as ``[b, out, in]``."""
        return flat[:, blk.slice].reshape(flat.shape[0], blk.out_dim, blk.in_dim)


def select_modules(names: list[str], spec: str | Sequence[str]) -> list[str]:
    """Resolve ``solver.modules``: ``all``, ``last:K``, ``re:PATTERN`` (regex search) or a list of names."""
    if isinstance(spec, str):
        if spec == "all":
            chosen = list(names)
        elif spec.startswith("last:"):
            try:
                k = int(spec[5:])
            except ValueError:
                k = 0
            if k < 1:
                raise ConfigError(f"solver.modules={spec!r} is invalid: use last:K with an integer K >= 1")
            chosen = names[-k:]
        elif spec.startswith("re:"):
            try:
                pattern = re.compile(spec[3:])
            except re.error as e:
                raise ConfigError(f"solver.modules={spec!r} is invalid: bad regex ({e})") from None
            chosen = [n for n in names if pattern.search(n)]
        else:
            raise ConfigError(f"solver.modules={spec!r} is invalid: use all, last:K, re:PATTERN "
                              f"or a list of module names")
    else:
        unknown = [n for n in spec if n not in names]
        if unknown:
            raise ConfigError(f"solver.modules={list(spec)!r} is invalid: no Linear/Conv2d module named "
                              f"{unknown}; available: {names}")
        chosen = [n for n in names if n in set(spec)]
    if not chosen:
        raise ConfigError(f"solver.modules={spec!r} is invalid: selects none of the Linear/Conv2d modules "
                          f"{names}")
    return chosen
