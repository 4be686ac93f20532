"""The GPT-style network: attention, MLP, the pre-norm block and ``GPT`` itself.

Module names follow GPT-2 (``wte``, ``wpe``, ``h``, ``ln_f``, ``lm_head``, ``c_attn``,
``c_proj``, ``c_fc``) so the weights map one-to-one onto the familiar layout.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.model import layers
from engine.model.config import ModelConfig
from engine.model.layers import (
    Dropout,
    FusedHeadLoss,
    causal_attention_with_dropout,
    fused_loss_applies,
    segment_positions_and_mask,
)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.d_model, config.d_model)
        self.resid_dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
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
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, config.d_ff)
        self.c_proj = nn.Linear(config.d_ff, config.d_model)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.context, config.d_model)
        self.drop = Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        # Weight tying: the output projection reuses the input embedding. Fewer
        # parameters, and rare tokens learn from both directions.
        self.lm_head.weight = self.wte.weight
        self.init_weights()

    def init_weights(self) -> None:
        """Initialise every tensor as GPT-2 does.

        Linear and embedding weights ~ N(0, 0.02); biases 0; LayerNorm weight 1, bias 0.
        The projections that write into the residual stream (``c_proj``) are scaled
        by 1/sqrt(2 * n_layer) so the stream's variance does not grow with depth.
        """
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif ".ln_" in name or name.startswith("ln_"):
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
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.h:
            x = block(x, mask)
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
