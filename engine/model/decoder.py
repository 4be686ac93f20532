"""Generation's view of the network: the same computation as ``GPT.forward``, one step at a time.

``Decoder.step`` feeds new ids through plain tensor operations into a preallocated
``KVCache``; ``_HalfProduct`` holds weight matrices in fp16 where the CPU has
FBGEMM's kernel for it.
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.model.config import ModelConfig
from engine.model.gpt import GPT


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

    ``dtype`` is the dtype of the matrix products and the KV cache (default: the
    model's); on a GPU, the autocast dtype training used. With bf16 or fp16 the rest
    stays as autocast kept it in training: the residual stream, the embeddings and
    the layer norms in fp32 (``stream_dtype``). So the sum over the layers never
    leaves fp32: in fp16 a stream that passes 65504 would become inf, and in bf16
    each addition would round to 8 bits. ``matrix_dtype=torch.float16`` on the CPU
    keeps the weight matrices in fp16 and computes in fp32 (``_HalfProduct``;
    ``hardware.Runtime.decode_weights`` says whether this machine has the kernel).
    """

    def __init__(self, model: GPT, dtype: torch.dtype | None = None,
                 matrix_dtype: torch.dtype | None = None) -> None:
        self.config = model.config
        self.device = model.device
        self.dtype = dtype or model.wte.weight.dtype
        self.stream_dtype = torch.float32 if self.dtype in (torch.float16, torch.bfloat16) else self.dtype
        half = matrix_dtype == torch.float16 and self.device.type == "cpu" and self.dtype == torch.float32

        def vec(t: torch.Tensor) -> torch.Tensor:  # an fp32 model's own tensor: no copy
            return t.detach().to(self.stream_dtype)

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
        low = self.dtype  # the products' dtype; x, the residual stream, stays in stream_dtype
        for layer, (w1, b1, qkv, proj, w2, b2, fc, fc_proj) in enumerate(self.layers):
            qkv(F.layer_norm(x, (C,), w1, b1, self.eps).to(low), out=cache.rows[layer, start:end])
            # q of the new positions, k and v of all so far: (1, H, T or end, D).
            q, k, v = cache.q[layer][:, :, start:end], cache.k[layer][:, :, :end], cache.v[layer][:, :, :end]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
            # (1, H, 1, D) is already laid out as (1, C); only a chunk needs the transpose.
            y = y.view(1, C) if T == 1 else y.transpose(1, 2).reshape(T, C)
            x = x + proj(y)  # a low-precision product added to the fp32 stream: the sum is fp32
            x = x + fc_proj(self.gelu(fc(F.layer_norm(x, (C,), w2, b2, self.eps).to(low))))
        cache.pos = end
        if T > 1:
            x = x[-1:]
        return self.head(F.layer_norm(x, (C,), *self.ln_f, self.eps).to(low))[0].float()
