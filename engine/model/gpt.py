"""The GPT-style network: attention, MLP, the pre-norm block and ``GPT`` itself.

Module names follow GPT-2 (``wte``, ``wpe``, ``h``, ``ln_f``, ``lm_head``, ``c_attn``,
``c_proj``, ``c_fc``) for both block designs (``ModelConfig.arch``), so every weight has
one name whichever block holds it; the exports map them onto GPT-2's and Llama's layouts.
The ``llama`` block differs in four places, each marked where it happens: rotary
positions instead of ``wpe``, RMSNorm instead of LayerNorm, a SwiGLU MLP (``c_fc`` holds
the gate and up projections side by side, so one product makes both), and no biases.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.model import layers
from engine.model.config import NORM_EPS, ModelConfig
from engine.model.layers import (
    Dropout,
    FusedHeadLoss,
    causal_attention_with_dropout,
    fused_loss_applies,
    segment_positions_and_mask,
)


class RMSNorm(nn.Module):
    """Scale by the reciprocal root mean square, then by a learned weight: LayerNorm
    without the mean and the bias (Llama's norm)."""

    def __init__(self, dim: int, eps: float = NORM_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The weight in x's dtype: under autocast x can be bf16 (QK-norm's queries), and a
        # dtype mismatch sends rms_norm to its slow unfused path.
        return F.rms_norm(x, (x.size(-1),), self.weight.to(x.dtype), self.eps)


def make_norm(config: ModelConfig) -> nn.Module:
    return RMSNorm(config.d_model) if config.arch == "llama" else nn.LayerNorm(config.d_model, eps=NORM_EPS)


def rotary_tables(config: ModelConfig, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's rotation angles: two (context, head_dim) fp32 tables.

    Channel pair (i, i + head_dim/2) of a query or key turns by position * theta^(-2i/head_dim),
    the half-split pairing that Hugging Face's Llama uses (``apply_rotary``), so its weights
    export unchanged; the GGUF export permutes q and k rows into llama.cpp's pairing.
    """
    half = config.head_dim // 2
    inv_freq = config.rope_theta ** (-torch.arange(half, dtype=torch.float64, device=device) / half)
    angles = torch.outer(torch.arange(config.context, dtype=torch.float64, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=1)  # (context, head_dim): each angle for both halves
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + D/2) of x (..., T, D) by the angles whose cos/sin are given (T, D).

    The tables take x's dtype: under bf16 autocast q and k are bf16, and fp32 tables
    would promote every product to fp32 and back (copies that cost more than the rotation).
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        bias = config.arch == "gpt2"
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model, bias=bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.d_model, config.d_model, bias=bias)
        self.resid_dropout = Dropout(config.dropout)
        # QK-norm: each head's queries and keys RMS-normed before the rotation, so attention
        # logits cannot grow without bound as training sharpens them.
        self.q_norm = RMSNorm(config.head_dim) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim) if config.qk_norm else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if self.training and self.dropout > 0 and x.device.type == "cpu":
            y = causal_attention_with_dropout(q, k, v, self.dropout, mask)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if mask is None else mask.to(q.dtype), is_causal=mask is None,
                dropout_p=self.dropout if self.training else 0.0,
            )  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GPT-2's: GELU between a widening and a narrowing product."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, config.d_ff)
        self.c_proj = nn.Linear(config.d_ff, config.d_model)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class GatedMLP(nn.Module):
    """SwiGLU: silu(gate) * up, then the narrowing product; gate and up come from one matmul."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, 2 * config.d_ff, bias=False)  # [gate | up]
        self.c_proj = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        return self.dropout(self.c_proj(F.silu(gate) * up))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = GatedMLP(config) if config.arch == "llama" else MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, rotary)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        # Where a token stands: learned rows added to the embedding (gpt2), or rotations of
        # queries and keys (llama), whose tables are derived from the config and not saved.
        self.wpe = nn.Embedding(config.context, config.d_model) if config.arch == "gpt2" else None
        if config.arch == "llama":
            cos, sin = rotary_tables(config)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)
        self.drop = Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        # Weight tying: the output projection reuses the input embedding. Fewer
        # parameters, and rare tokens learn from both directions.
        self.lm_head.weight = self.wte.weight
        self.init_weights()

    def init_weights(self) -> None:
        """Initialise every tensor as GPT-2 does.

        Linear and embedding weights ~ N(0, 0.02); biases 0; norm weights (LayerNorm,
        RMSNorm, QK-norm) 1, LayerNorm bias 0. The projections that write into the residual
        stream (``c_proj``) are scaled by 1/sqrt(2 * n_layer) so the stream's variance does
        not grow with depth.
        """
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif ".ln_" in name or name.startswith("ln_") or name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, mean=0.0, std=0.02)

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    def num_params(self) -> int:
        """Parameter count; the tied head is counted once."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, last_only: bool = False,
                segments: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, vocab) for every position, and the mean loss if targets are given.

        CPU training in fp32 with targets returns no logits (None), only the loss: it
        comes from ``FusedHeadLoss``, which never computes them whole.

        ``last_only`` returns the logits of the last position alone (B, 1, vocab): all
        that sampling the next token needs. Token-by-token generation uses ``Decoder``.
        ``segments`` (B, T) marks packed examples (conversations): each then starts at
        position 0 and attends only to itself, as it would alone (targets of -1 are ignored).
        """
        B, T = idx.shape
        if T > self.config.context:
            raise ValueError(f"cannot attend to {T} tokens; the context is {self.config.context}")
        mask = None
        if segments is None:
            pos = torch.arange(T, device=idx.device)
        else:
            pos, mask = segment_positions_and_mask(segments)
        x = self.wte(idx)  # (B, T, C)
        rotary = None
        if self.wpe is not None:
            x = x + self.wpe(pos)
        else:  # (T, D), or (B, 1, T, D) when packed examples restart their positions
            rotary = (self.rotary_cos[pos], self.rotary_sin[pos])
            if segments is not None:
                rotary = (rotary[0].unsqueeze(1), rotary[1].unsqueeze(1))
        x = self.drop(x)
        for block in self.h:
            x = block(x, mask, rotary)
        x = self.ln_f(x)
        if targets is not None and not last_only and fused_loss_applies(x, self.training):
            # No logits: FusedHeadLoss never holds them whole, and a training step only
            # needs the loss (see its docstring).
            rows = max(1, layers.LOSS_CHUNK_LOGITS // self.config.vocab_size)
            return None, FusedHeadLoss.apply(x.view(B * T, -1), self.lm_head.weight, targets.reshape(-1), rows)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(x)  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def block_matrices(self) -> list[tuple[nn.Parameter, int]]:
        """The 2-D weights inside the blocks, each with the number of matrices it stacks
        along its rows: 3 for the fused q|k|v product, 2 for SwiGLU's gate|up, else 1."""
        found = []
        for block in self.h:
            found.append((block.attn.c_attn.weight, 3))
            found.append((block.attn.c_proj.weight, 1))
            found.append((block.mlp.c_fc.weight, 2 if isinstance(block.mlp, GatedMLP) else 1))
            found.append((block.mlp.c_proj.weight, 1))
        return found

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Weight decay on matrices and embeddings only; never on biases or norms."""
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    @torch.no_grad()
    def resize_vocab(self, new_size: int, new_rows: torch.Tensor | None = None) -> None:
        """Grow (or keep) the vocabulary; every existing row stays bit-for-bit the same.

        ``new_rows`` (new_size - old_size, d_model) initialises the added rows; by
        default they start at the mean of the existing embeddings, a neutral guess.
        """
        old = self.wte.weight
        old_size = old.shape[0]
        if new_size < old_size:
            raise ValueError(f"cannot shrink the vocabulary from {old_size} to {new_size}")
        if new_size == old_size:
            return
        if new_rows is None:
            new_rows = old.mean(dim=0, keepdim=True).expand(new_size - old_size, -1)
        if new_rows.shape != (new_size - old_size, old.shape[1]):
            raise ValueError(f"new_rows has shape {tuple(new_rows.shape)}, expected "
                             f"{(new_size - old_size, old.shape[1])}")
        emb = nn.Embedding(new_size, old.shape[1], device=old.device, dtype=old.dtype)
        emb.weight.copy_(torch.cat([old, new_rows.to(old)], dim=0))
        self.wte = emb
        self.lm_head = nn.Linear(old.shape[1], new_size, bias=False, device=old.device, dtype=old.dtype)
        self.lm_head.weight = self.wte.weight  # keep the tie
        self.config.vocab_size = new_size
