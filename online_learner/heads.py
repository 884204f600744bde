"""Prediction heads over the gated field embeddings ``x0 [B, D]``.

:class:`DCNv2Head` -- DCN-V2 (Wang et al., 2021), parallel form: a low-rank cross network and an
MLP both read ``x0``; their outputs are concatenated into one logit. Low-rank cross layers
(``U [D, r]``, ``V [r, D]``) instead of full ``[D, D]`` matrices keep it CPU-fast: at ``D = 312,
r = 16`` a cross layer costs ``2 * D * r`` multiply-adds per example instead of ``D^2``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["CrossNetworkV2", "DCNv2Head", "mlp"]


class _LowRankCrossFn(torch.autograd.Function):
    """All cross layers in one autograd node, with a hand-written backward.

    Same maths as the layer-by-layer autograd graph, fewer passes over ``[B, D]`` memory: the
    ``x0`` gradient is accumulated in place across layers, and ``grad_x = g + gh @ U`` is one
    ``addmm``. On this 2-core CPU the cross network is memory-bound, not FLOP-bound, so this
    is what makes it cheap (``bench/learner_core.py``).
    """

    @staticmethod
    def forward(ctx: Any, x0: Tensor, *weights: Tensor) -> Tensor:  # weights: (down_w, up_w, up_b) * L
        xs, hs, us = [], [], []
        x = x0
        ones = x0.new_ones(x0.shape[0], 1)
        for i in range(0, len(weights), 3):
            down_w, up_w, up_b = weights[i : i + 3]
            # bias folded into the GEMM: [h, 1] @ [V, b]^T -- no [B, D] broadcast copy of b
            h = torch.cat([x.mm(down_w.t()), ones], dim=1)  # [B, r + 1]
            u = h.mm(torch.cat([up_w, up_b.unsqueeze(1)], dim=1).t())  # [B, D]
            xs.append(x)
            hs.append(h)
            us.append(u)
            x = torch.addcmul(x, x0, u)
        ctx.save_for_backward(x0, *weights, *xs, *hs, *us)
        ctx.num_layers = len(weights) // 3
        return x

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        n = ctx.num_layers
        saved = ctx.saved_tensors
        x0, weights = saved[0], saved[1 : 1 + 3 * n]
        xs, hs, us = saved[1 + 3 * n : 1 + 4 * n], saved[1 + 4 * n : 1 + 5 * n], saved[1 + 5 * n :]
        grads: list[Tensor | None] = [None] * (3 * n)
        g = g.contiguous()
        grad_x0 = torch.zeros_like(x0)
        for layer in reversed(range(n)):
            down_w, up_w, _ = weights[3 * layer : 3 * layer + 3]
            gu = g * x0  # dL/du
            grad_x0.addcmul_(g, us[layer])
            gh = gu.mm(up_w)  # [B, r]
            grads[3 * layer] = gh.t().mm(xs[layer])  # down_w [r, D]
            grad_vb = gu.t().mm(hs[layer])  # [D, r + 1] = [dV, db]
            grads[3 * layer + 1] = grad_vb[:, :-1]
            grads[3 * layer + 2] = grad_vb[:, -1]
            g = torch.addmm(g, gh, down_w)  # dL/dx_layer = g + gh @ down_w
        grad_x0 += g  # x_0 is x0 itself
        return (grad_x0, *grads)


class CrossNetworkV2(nn.Module):
    """``x_{l+1} = x0 * (V_l (U_l x_l) + b_l) + x_l`` (low-rank DCN-V2 cross), ``[B, D] -> [B, D]``.

    >>> CrossNetworkV2(8, num_layers=2, rank=2)(torch.randn(3, 8)).shape
    torch.Size([3, 8])
    """

    def __init__(self, dim: int, num_layers: int = 2, rank: int = 16) -> None:
        super().__init__()
        ups = [nn.Linear(rank, dim) for _ in range(num_layers)]
        for up in ups:  # start as identity: x_{l+1} = x_l
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        self.down = nn.ModuleList(nn.Linear(dim, rank, bias=False) for _ in range(num_layers))
        self.up = nn.ModuleList(ups)

    def forward(self, x0: Tensor) -> Tensor:
        if not torch.is_grad_enabled():  # inference: plain ops, nothing to save
            x = x0
            for down, up in zip(self.down, self.up, strict=True):
                x = torch.addcmul(x, x0, up(down(x)))
            return x
        weights = [w for down, up in zip(self.down, self.up, strict=True) for w in (down.weight, up.weight, up.bias)]
        return _LowRankCrossFn.apply(x0, *weights)


def mlp(in_dim: int, dims: Sequence[int]) -> nn.Sequential:
    """``Linear -> ReLU`` stack, ``[B, in_dim] -> [B, dims[-1]]`` (identity if ``dims`` is empty)."""
    layers: list[nn.Module] = []
    for d in dims:
        layers += [nn.Linear(in_dim, d), nn.ReLU()]
        in_dim = d
    return nn.Sequential(*layers)


class DCNv2Head(nn.Module):
    """Parallel DCN-V2: ``logit = w^T [cross(x0); mlp(x0)] + b``, ``[B, D] -> [B]``.

    >>> head = DCNv2Head(16, cross_layers=2, cross_rank=4, mlp_dims=(8,))
    >>> head(torch.randn(5, 16)).shape
    torch.Size([5])
    """

    def __init__(
        self, dim: int, cross_layers: int = 2, cross_rank: int = 16, mlp_dims: Sequence[int] = (64, 32)
    ) -> None:
        super().__init__()
        self.cross = CrossNetworkV2(dim, cross_layers, cross_rank) if cross_layers > 0 else None
        self.deep = mlp(dim, mlp_dims)
        # w^T [cross; deep] + b as two dot products summed: no [B, D + h] concatenation (and no
        # strided gradient slices in the backward pass).
        self.out_deep = nn.Linear(mlp_dims[-1] if mlp_dims else dim, 1)
        self.out_cross = nn.Linear(dim, 1, bias=False) if self.cross is not None else None
        # The base rate is the model's offset (ctr.online_learner.prior): the head starts centred on it.
        nn.init.zeros_(self.out_deep.bias)

    def forward(self, x0: Tensor) -> Tensor:
        logit = self.out_deep(self.deep(x0))
        if self.cross is not None and self.out_cross is not None:
            logit = logit + self.out_cross(self.cross(x0))
        return logit.squeeze(1)
