"""Pieces of the network that are faster written out than taken from ``torch.nn``.

Dropout and attention-with-dropout for CPU training, the positions and mask of
packed examples, and the fused head + cross-entropy for CPU training in fp32. Each
docstring says what it replaces and what that was measured to buy.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def cpu_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout (zero with probability p, scale the rest by 1/(1-p)).

    ``F.dropout`` on the CPU costs more than the arithmetic around it, and most of that
    is drawing random numbers (one-threaded, ~3 ns each). Here each 31-bit random
    integer from the global generator gives two 15-bit uniform draws, half the numbers:
    the compact model's training step ran 1.046x faster (median of 24 alternating
    pairs). So p is rounded to a multiple of 1/32768 (0.1 becomes 0.100006) and the
    scale is 1/(1 - that p): the expectation stays exact. The scale is fp32 even for a
    bf16 ``x`` (CPU autocast): a bf16 1/0.9 (1.109) shrank activations by 0.3%.
    """
    n = x.numel()
    threshold = min(round(p * 32768), 32767)  # p < 1 must keep something
    bits = torch.empty((n + 1) // 2, dtype=torch.int32, device=x.device).random_()  # [0, 2**31)
    keep = torch.empty(2, (n + 1) // 2, dtype=torch.bool, device=x.device)
    torch.ge(bits.bitwise_and(0x7FFF), threshold, out=keep[0])  # bits 0-14
    torch.ge(bits.bitwise_right_shift_(16), threshold, out=keep[1])  # bits 16-30
    scale = torch.where(keep.view(-1)[:n].view(x.shape), 32768 / (32768 - threshold), 0.0)
    return x * scale


class Dropout(nn.Dropout):
    """``nn.Dropout`` that uses ``cpu_dropout`` when training on the CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.p > 0 and x.device.type == "cpu":
            return cpu_dropout(x, self.p)
        return super().forward(x)


def causal_attention_with_dropout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float,
                                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention written out, with dropout on the weights: (B, H, T, D) -> (B, H, T, D).

    For CPU training only. There ``scaled_dot_product_attention`` has no fused kernel
    that applies dropout, so it falls back to this same computation, plus masking
    passes of its own and the slower dropout mask; spelled out, it is ~10% faster.
    ``mask`` (additive, 0 or -inf) replaces the plain causal one when given.
    """
    T = q.size(-2)
    if mask is None:
        # -inf above the diagonal: adding it is cheaper than masked_fill forward and backward.
        mask = torch.full((T, T), float("-inf"), device=q.device).triu(diagonal=1)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1))) + mask  # (B, H, T, T)
    return cpu_dropout(torch.softmax(att, dim=-1), p) @ v


def segment_positions_and_mask(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions that restart at each segment, and attention that stays inside it.

    ``segments`` (B, T) labels the example each token belongs to, in contiguous runs
    (packed conversations). Returns positions (B, T) and an additive mask (B, 1, T, T):
    0 where a token may attend (an earlier or the same token of its own segment),
    -inf elsewhere. So a packed example sees what it would see alone in a window.
    """
    B, T = segments.shape
    steps = torch.arange(T, device=segments.device).expand(B, T)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(starts, steps, torch.zeros_like(steps)).cummax(dim=1).values
    allowed = (segments[:, :, None] == segments[:, None, :]) & torch.ones(T, T, dtype=torch.bool,
                                                                        device=segments.device).tril()
    mask = torch.zeros(B, 1, T, T, device=segments.device).masked_fill(~allowed[:, None], float("-inf"))
    return steps - first, mask


# Logits per chunk of the fused loss below (fp32: 32 MB), so rows = this // vocab:
# 1048 rows of the compact preset's 8000-token vocabulary. Measured there (2-core
# AVX2 EPYC, fwd + bwd of the head alone, median of 10 quiet rounds): 184 ms plain,
# 178 ms in chunks of 256 rows, 168 ms in chunks of 1024. Staying within the cache
# buys nothing here; fewer passes do, so a chunk is as large as memory comfortably
# allows. The whole training step: 1.02x faster (median of 24 alternating pairs),
# peak memory 998 -> 807 MB.
LOSS_CHUNK_LOGITS = 1 << 23


class FusedHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of ``h @ weight.T`` against ``targets`` (-1 ignored), computed
    with its gradients in the forward pass and without holding the (rows, vocab) logits
    whole: for CPU training in fp32.

    The plain head writes the logits, log-softmaxes them into a second tensor, and its
    backward pass writes a gradient of the same size and exponentiates the
    log-probabilities again (64 MB tensors on the compact preset, two exps per logit).
    Here each chunk of ``rows`` rows is multiplied out, softmaxed once (one exp per
    logit), and turned at once into the gradient share * (softmax - one-hot), which
    goes straight into the products for the hidden rows' gradient and, summed over the
    chunks, the weight's. The backward pass only scales those two by the incoming
    gradient. The three matrix products are the plain path's; the passes between them
    are what goes.

    As ``F.cross_entropy(..., ignore_index=-1)``: the mean is over the learned targets,
    and with none it is NaN (the gradients are then zero).
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
        if bool((targets < -1).any()):  # F.cross_entropy would refuse it; here it would count as id 0
            raise ValueError("targets must be token ids or -1 (ignored)")
        learned = targets != -1  # (N,)
        count = learned.sum()
        # Each row's share of the mean: 1/learned, or 0 for an ignored row. The gradient
        # of the logits is share * (softmax - one-hot); the share is applied to the thin
        # sides of the products (the hidden rows, N x d_model), not to the logits.
        share = (learned.to(h.dtype) / count.clamp(min=1)).unsqueeze(1)  # (N, 1)
        safe = targets.clamp(min=0).unsqueeze(1)  # ignored rows point at id 0; their share is 0
        want_h, want_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None
        nll_sum = h.new_zeros(())
        for start in range(0, h.shape[0], rows):
            hc, t = h[start:start + rows], safe[start:start + rows]
            logits = hc @ weight.t()  # (rows, vocab)
            # softmax takes one exp per logit, row by row (log_softmax and then exp took
            # two). The log-sum-exp comes from the largest probability, exp(0) / sum,
            # which never underflows: lse = max logit - log(max probability).
            probs = torch.softmax(logits, dim=1)
            lse = logits.amax(1, keepdim=True) - probs.amax(1, keepdim=True).log()
            nll_sum += torch.where(learned[start:start + rows, None], lse - logits.gather(1, t), 0.0).sum()
            probs.scatter_add_(1, t, t.new_full(t.shape, -1, dtype=h.dtype))  # softmax - one-hot
            if want_h:
                torch.mm(probs, weight, out=grad_h[start:start + rows])
            if want_w:
                grad_w.addmm_(probs.t(), hc * share[start:start + rows])
        if want_h:
            grad_h.mul_(share)
        ctx.grads = grad_h, grad_w
        return nll_sum / count  # NaN for no learned targets, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        return (None if grad_h is None else grad_h * grad_out,
                None if grad_w is None else grad_w * grad_out, None, None)


def fused_loss_applies(x: torch.Tensor, training: bool) -> bool:
    """Whether ``GPT.forward`` takes ``FusedHeadLoss``: CPU training in fp32 with
    gradients. Elsewhere (eval, GPUs, autocast, and under torch.compile, so that what it
    compiles stays as it was) the logits are computed whole as before."""
    return (training and x.device.type == "cpu" and x.dtype == torch.float32 and torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())
