"""The llama block's weights as generation stores them, and its RMSNorm on the CPU.

At batch 1 a decode step costs its matrix products plus a few microseconds for every
other tensor operation, and the llama block has more of those than GPT-2's: RMSNorm
without a fused CPU kernel, the rotation, the gate. The ``Decoder`` buys them back by
reshaping weights once, when it is built, so each step does less:

- ``pairs_side_by_side``: q and k channels reordered so a rotation is one complex
  multiplication in place, instead of five passes.
- ``fold_norm``: a norm's weight multiplied into the product that reads the norm, so
  the norm itself has no weight (``RowRMSNorm``: three passes on the CPU instead of
  ``F.rms_norm``'s six).
- ``up_then_gate``: c_fc's [gate | up] as [up | gate], so that ``F.glu`` makes
  up * sigmoid(gate) in one pass; times gate, that is silu(gate) * up.

Each is exact in real arithmetic; in floating point the logits move by ~1e-7.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.model.config import ModelConfig


def side_by_side(head_dim: int) -> torch.Tensor:
    """A head's channels in the order that puts rotary pair (i, i + D/2) side by side.

    >>> side_by_side(6).tolist()
    [0, 3, 1, 4, 2, 5]
    """
    return torch.stack([torch.arange(head_dim // 2), torch.arange(head_dim // 2, head_dim)], dim=1).flatten()


def _linear(weight: torch.Tensor) -> nn.Linear:
    """A bias-free layer holding ``weight`` (out, in), on its device and in its dtype."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def pairs_side_by_side(weight: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """c_attn's weight (3C, C) with each head's q and k channels reordered (0, D/2, 1, D/2 + 1, ...).

    Rotary positions turn channel pairs (i, i + D/2) (``gpt.apply_rotary``); side by
    side, each pair is one complex number, and a rotation one complex multiplication.
    Attention only takes dot products of q with k, which the same reordering of both
    leaves as they were; v keeps its order, so the attention output is unchanged.
    """
    C, D = config.d_model, config.head_dim
    order = torch.cat([h * D + side_by_side(D) for h in range(2 * config.n_head)] + [torch.arange(2 * C, 3 * C)])
    return weight[order.to(weight.device)]


def up_then_gate(weight: torch.Tensor) -> torch.Tensor:
    """c_fc's weight [gate | up] (2F, C) as [up | gate], the halves F.glu wants."""
    gate, up = weight.chunk(2, dim=0)
    return torch.cat([up, gate])


def fold_norm(weight: torch.Tensor, norm_weight: torch.Tensor, factor: float) -> nn.Linear:
    """A product that reads a row normed by ``RowRMSNorm``, with the norm's weight and
    factor moved into it: W (x * g * f) = (W * g * f) x, column by column."""
    return _linear(weight.detach() * (norm_weight.detach() * factor))


def llama_products(block: nn.Module, config: ModelConfig, factor: float) -> tuple[nn.Linear, nn.Linear]:
    """A llama block's c_attn and c_fc as generation multiplies them (see the module docstring)."""
    qkv = fold_norm(pairs_side_by_side(block.attn.c_attn.weight.detach(), config), block.ln_1.weight, factor)
    fc = fold_norm(up_then_gate(block.mlp.c_fc.weight.detach()), block.ln_2.weight, factor)
    return qkv, fc


def qk_norm_weights(block: nn.Module, config: ModelConfig, factor: float) -> torch.Tensor:
    """(2H, D): q_norm's weight for the first H heads of the q|k rows, k_norm's for the rest,
    in the side-by-side channel order, times ``RowRMSNorm``'s factor."""
    order = side_by_side(config.head_dim).to(block.attn.q_norm.weight.device)
    return torch.cat([norm.weight.detach()[order].expand(config.n_head, -1)
                      for norm in (block.attn.q_norm, block.attn.k_norm)]) * factor


class RowRMSNorm:
    """RMSNorm over rows of ``width`` values, without its weight and short of a constant
    ``factor``: the product that reads it holds both (``fold_norm``).

    On the CPU, x / hypot(|x|, sqrt(width * eps)), which is RMSNorm's x / sqrt(mean(x^2)
    + eps) divided by sqrt(width). ``F.rms_norm`` makes six passes there (12 us a row);
    this is three, 4 us, against LayerNorm's one fused pass of 2.3 us. Elsewhere
    ``F.rms_norm`` is one fused kernel (factor 1). Each row is normed by itself, as in a
    batch of any size (checked bit for bit up to 300 rows).
    """

    def __init__(self, width: int, eps: float, device: torch.device) -> None:
        self.cpu = device.type == "cpu"
        self.factor = width ** 0.5 if self.cpu else 1.0
        self.eps = eps
        self.root_eps = torch.tensor((width * eps) ** 0.5, device=device)  # made once: a tensor a call costs 1 us

    def __call__(self, x: torch.Tensor, weight: None = None, bias: None = None) -> torch.Tensor:
        if not self.cpu:
            return F.rms_norm(x, x.shape[-1:], None, self.eps)
        # (rows, 1) norms; positional arguments: parsing keywords costs too
        return x / torch.hypot(torch.linalg.vector_norm(x, 2, -1, True), self.root_eps)
