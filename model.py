"""The GPT-style decoder: configuration, layers, KV cache and vocabulary resizing.

Module names follow GPT-2 (``wte``, ``wpe``, ``h``, ``ln_f``, ``lm_head``, ``c_attn``,
``c_proj``, ``c_fc``) so the weights map one-to-one onto the familiar layout.
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# Guard rails for configs read from disk: a hostile or corrupt config.json must not
# make us allocate absurd amounts of memory before anything else is checked.
MAX_PARAMS = 20_000_000_000
MAX_VOCAB = 1_000_000
MAX_CONTEXT = 65_536
MAX_LAYERS = 1_000
MAX_WIDTH = 65_536


@dataclass
class ModelConfig:
    vocab_size: int
    context: int = 256
    d_model: int = 256
    n_layer: int = 4
    n_head: int = 4
    d_ff: int = 0  # 0 means 4 * d_model, the GPT-2 ratio
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.d_ff == 0 and isinstance(self.d_model, int):
            self.d_ff = 4 * self.d_model
        problems = []
        for name in ("vocab_size", "context", "d_model", "n_layer", "n_head", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} must be a positive integer (got {value!r})")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1) (got {self.dropout!r})")
        if not problems:
            if self.d_model % self.n_head:
                problems.append(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
            if self.vocab_size > MAX_VOCAB:
                problems.append(f"vocab_size {self.vocab_size} exceeds {MAX_VOCAB}")
            if self.n_layer > MAX_LAYERS:
                problems.append(f"n_layer {self.n_layer} exceeds {MAX_LAYERS}")
            if max(self.d_model, self.d_ff) > MAX_WIDTH or self.n_head > self.d_model:
                problems.append(f"d_model/d_ff/n_head ({self.d_model}/{self.d_ff}/{self.n_head}) are out of range")
            if self.context > MAX_CONTEXT:
                problems.append(f"context {self.context} exceeds {MAX_CONTEXT}")
            if self.n_params_estimate() > MAX_PARAMS:
                problems.append(f"the model would have ~{self.n_params_estimate():,} parameters; too large")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    def n_params_estimate(self) -> int:
        per_layer = 4 * self.d_model * self.d_model + 2 * self.d_model * self.d_ff
        return self.n_layer * per_layer + (self.vocab_size + self.context) * self.d_model

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ValueError("model config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(sorted(unknown))}")
        return cls(**d)


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
            rows = max(1, LOSS_CHUNK_LOGITS // self.config.vocab_size)
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


# ---------------------------------------------------------------------------------------
# Generation: the same network, one step at a time


class KVCache:
    """Preallocated attention state for one sequence: (n_layer, context, 3 * d_model).

    Row t of a layer holds that position's q|k|v exactly as the layer's fused
    projection produced them, so the product writes straight into the cache. ``pos``
    counts the positions filled. Learned positions cannot roll over: when the window
    is full the caller crops the context, ``reset()``s and feeds the kept part again.
    """

    def __init__(self, config: ModelConfig, device, dtype: torch.dtype = torch.float32) -> None:
        C, H, S = config.d_model, config.n_head, config.context
        self.rows = torch.zeros(config.n_layer, S, 3 * C, device=device, dtype=dtype)
        self.context = S
        self.pos = 0
        # Per layer, q, k and v as (1, H, S, D) views of the rows, made once: a step
        # then only slices them (each tensor operation has a fixed cost at batch 1).
        self.q, self.k, self.v = ([self.rows[i, :, j * C:(j + 1) * C].view(1, S, H, -1).transpose(1, 2)
                                   for i in range(config.n_layer)] for j in range(3))

    def reset(self) -> None:
        self.pos = 0


class _Product:
    """One linear layer, stored in the layout that is fastest for a few rows."""

    def __init__(self, layer: nn.Linear, dtype: torch.dtype) -> None:
        w = layer.weight.detach().to(dtype)
        self.bias = None if layer.bias is None else layer.bias.detach().to(dtype)
        # Measured on the CPU (MKL): one row times W^T copied contiguous is 1.3-3x faster
        # than F.linear when the output is at least as wide as the input; for the
        # narrowing product (d_ff -> d_model) F.linear is ~1.6x faster.
        self.transposed = w.device.type == "cpu" and w.shape[1] <= w.shape[0]
        self.weight = w.t().contiguous() if self.transposed else w

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if not self.transposed:
            y = F.linear(x, self.weight, self.bias)
            return y if out is None else out.copy_(y)
        if self.bias is None:
            return torch.mm(x, self.weight, out=out)
        return torch.addmm(self.bias, x, self.weight, out=out)


class _HalfProduct:
    """One linear layer whose weight is held in fp16 and multiplied in fp32 (CPU only).

    FBGEMM widens the fp16 weights inside its kernel; rows, bias and sums stay fp32,
    so only the weights are rounded (relative error ~5e-4; logits move by ~1e-3). At
    batch 1 a product costs what reading its weight costs: with half the bytes the
    compact model's decode steps ran 2.4x faster (median of 10 alternating rounds).

    Two doors lead to the same kernel. ``torch.fbgemm_linear_fp16_weight`` takes
    plain tensors and costs ~2 us a call, but runs on one thread;
    ``torch.ops.quantized.linear_dynamic_fp16`` passes a TorchScript object and costs
    ~12 us, but splits the product over every thread. Small matrices take the first
    (over 17 products a token, the second made generation 1.3x slower), big ones (the
    LM head) the second where there are threads to use. The first is marked
    deprecated, so the second stands in where a PyTorch release has dropped it;
    ``half_products_work`` tells whether either works.
    """

    THREADED_FROM = 1 << 20  # weights (4 MB in fp32) from which threads beat the cheaper call

    def __init__(self, layer: nn.Linear) -> None:
        # A copy: packing clamps out-of-range values in place, and must never touch the model.
        weight = layer.weight.detach().float().clone()
        bias = torch.zeros(weight.shape[0]) if layer.bias is None else layer.bias.detach().float().clone()
        self.plain_tensors = False
        if weight.numel() < self.THREADED_FROM or torch.get_num_threads() == 1:
            with warnings.catch_warnings():
                # PyTorch warns once per process that these functions are deprecated; the
                # fallback below is what replaces them, so the warning tells the user nothing.
                warnings.simplefilter("ignore", UserWarning)
                try:
                    self.packed, self.bias = torch.fbgemm_pack_gemm_matrix_fp16(weight), bias
                    self.plain_tensors = True
                    self(weight.new_zeros(1, weight.shape[1]))  # the first call is where the warning fires
                except (AttributeError, RuntimeError):
                    self.plain_tensors = False
        if not self.plain_tensors:
            self.packed, self.bias = torch.ops.quantized.linear_prepack_fp16(weight, bias), None

    @staticmethod
    def fits(layer: nn.Linear) -> bool:
        """fp16 tops out at 65504: a weight beyond it stays fp32."""
        return bool(layer.weight.detach().abs().max() < 65504)

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.plain_tensors:
            y = torch.fbgemm_linear_fp16_weight(x, self.packed, self.bias)
        else:
            y = torch.ops.quantized.linear_dynamic_fp16(x, self.packed)
        return y if out is None else out.copy_(y)


def half_products_work() -> bool:
    """Whether ``_HalfProduct`` runs here and gets a small product right (FBGEMM is
    x86 with AVX2; Arm builds and older CPUs lack it)."""
    layer = nn.Linear(16, 8)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(-1, 1, 8 * 16).reshape(8, 16))
        layer.bias.copy_(torch.linspace(0, 1, 8))
        x = torch.linspace(1, -1, 16).reshape(1, 16)
        try:
            got = _HalfProduct(layer)(x)
        except Exception:  # a missing operator, no FBGEMM engine, an unsupported CPU
            return False
        return got.shape == (1, 8) and torch.allclose(got, layer(x), atol=1e-2)


class Decoder:
    """Incremental inference for one sequence: feed new ids, get the next-token logits.

    It computes what ``GPT.forward`` computes, written as plain tensor operations.
    At batch size 1 a step is a few matrix-vector products whose cost is reading
    the weights; module calls, reshapes and copying keys and values into a cache
    were about a third of the step, and are gone here: the fused q|k|v product
    writes into the cache rows itself, and attention reads keys and values as
    strided views of those rows.

    Some weights are copied into a faster layout, or into a lower precision than the
    model's (bf16 or fp16 halve the bytes each step reads), so a Decoder sees the
    weights as they were when it was built: after training, build a new one.

    ``dtype`` is the compute dtype (default: the model's). ``matrix_dtype=torch.float16``
    on the CPU keeps the weight matrices in fp16 and computes in fp32 (``_HalfProduct``;
    ``hardware.Runtime.decode_weights`` says whether this machine has the kernel).
    """

    def __init__(self, model: GPT, dtype: torch.dtype | None = None,
                 matrix_dtype: torch.dtype | None = None) -> None:
        self.config = model.config
        self.device = model.device
        self.dtype = dtype or model.wte.weight.dtype
        half = matrix_dtype == torch.float16 and self.device.type == "cpu" and self.dtype == torch.float32

        def vec(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(self.dtype)

        def product(layer: nn.Linear) -> _Product | _HalfProduct:
            return _HalfProduct(layer) if half and _HalfProduct.fits(layer) else _Product(layer, self.dtype)

        self.wte, self.wpe = vec(model.wte.weight), vec(model.wpe.weight)
        self.layers = [
            (vec(b.ln_1.weight), vec(b.ln_1.bias), product(b.attn.c_attn), product(b.attn.c_proj),
             vec(b.ln_2.weight), vec(b.ln_2.bias), product(b.mlp.c_fc), product(b.mlp.c_proj))
            for b in model.h
        ]
        self.ln_f = (vec(model.ln_f.weight), vec(model.ln_f.bias))
        self.head = product(model.lm_head)
        self.eps = model.ln_f.eps
        # With fp16 weights the step is approximate already (logits move by ~1e-3), and
        # the tanh form of GELU, which differs from the exact one by at most ~5e-4, costs
        # half as much at batch 1 (5 against 11 us for a 1024-wide row, four times a token).
        self.gelu = functools.partial(F.gelu, approximate="tanh") if half else F.gelu

    def new_cache(self) -> KVCache:
        return KVCache(self.config, self.device, self.dtype)

    @torch.inference_mode()
    def step(self, ids: list[int], cache: KVCache) -> torch.Tensor:
        """Run ``ids`` (the tokens the cache has not seen) and return fp32 logits (vocab,)
        for the token after the last of them."""
        C = self.config.d_model
        start, T = cache.pos, len(ids)
        end = start + T
        if T == 0:
            raise ValueError("nothing to decode: ids is empty")
        if end > cache.context:
            raise ValueError(f"cannot attend to {end} tokens; the context is {cache.context}")
        if T == 1:  # indexing with a Python int is a view: no index tensor to build
            x = (self.wte[ids[0]] + self.wpe[start]).view(1, C)
        else:
            x = self.wte[torch.tensor(ids, device=self.device)] + self.wpe[start:end]
        # One new query sees every key; a chunk after cached keys needs an explicit mask.
        mask, causal = None, T > 1 and start == 0
        if T > 1 and start > 0:
            mask = torch.ones(T, end, dtype=torch.bool, device=self.device).tril(diagonal=start)
        for layer, (w1, b1, qkv, proj, w2, b2, fc, fc_proj) in enumerate(self.layers):
            qkv(F.layer_norm(x, (C,), w1, b1, self.eps), out=cache.rows[layer, start:end])
            # q of the new positions, k and v of all so far: (1, H, T or end, D).
            q, k, v = cache.q[layer][:, :, start:end], cache.k[layer][:, :, :end], cache.v[layer][:, :, :end]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
            # (1, H, 1, D) is already laid out as (1, C); only a chunk needs the transpose.
            y = y.view(1, C) if T == 1 else y.transpose(1, 2).reshape(T, C)
            x = x + proj(y)
            x = x + fc_proj(self.gelu(fc(F.layer_norm(x, (C,), w2, b2, self.eps))))
        cache.pos = end
        if T > 1:
            x = x[-1:]
        return self.head(F.layer_norm(x, (C,), *self.ln_f, self.eps))[0].float()
