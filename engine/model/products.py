"""Generation's matrix products: one linear layer in the layout that is fastest for a few rows.

``Product`` keeps the weight in the compute dtype (transposed where that is faster);
``HalfProduct`` keeps it in fp16 on the CPU and multiplies in fp32 (FBGEMM's kernel).
``half_products_work`` tells whether this machine has that kernel.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F


class Product:
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


class HalfProduct:
    """One linear layer whose weight is held in fp16 and multiplied in fp32 (CPU only).

    FBGEMM widens the fp16 weights inside its kernel; rows, bias and sums stay fp32,
    so only the weights are rounded (relative error ~5e-4; logits move by ~1e-3). At
    batch 1 a product costs what reading its weight costs: with half the bytes the
    compact model's decode steps ran 2.4x faster (median of 10 alternating rounds).

    Two entry points reach the same kernel. ``torch.fbgemm_linear_fp16_weight_fp32_activation``
    (or, in releases before it, ``torch.fbgemm_linear_fp16_weight``) takes plain
    tensors and costs ~2 us a call, but runs on one thread;
    ``torch.ops.quantized.linear_dynamic_fp16`` passes a TorchScript object and costs
    ~12 us, but splits the product over every thread. Small matrices take the first
    (over 17 products a token, the second made generation 1.3x slower), big ones (the
    LM head) the second where there are threads to use. The first is marked
    deprecated, so the second stands in where a PyTorch release has dropped it;
    ``half_products_work`` tells whether either works. The first also writes into a
    given tensor (the KV cache rows: no copy) and skips the bias pass when there is no
    bias (llama's layers).

    Many rows are arithmetic, not reading: a product of ``THREADED_ROWS`` rows or more
    (a server's batch, a prompt's chunk) takes the threaded call whenever PyTorch has
    threads to give it. So a small matrix is packed for both calls, which holds its
    fp16 weights twice. Measured on the 2-core Xeon, the compact gpt2's 17 products: at
    16 rows 1,024 us with the plain call against 785 us threaded on two threads; at 8
    rows 522 us either way (so not from 8). The menu's prompts, fed 64 ids a step on two
    threads, go 1.3x faster (192 ids: 14.4 ms against 19.4 on the first session's
    llama). Both calls give the same values, bit for bit.
    """

    THREADED_FROM = 1 << 20  # weights (4 MB in fp32) from which threads beat the cheaper call
    THREADED_ROWS = 16  # rows from which threads beat the cheaper call, when there are threads

    def __init__(self, layer: nn.Linear) -> None:
        # A copy: packing clamps out-of-range values in place, and must never touch the model.
        weight = layer.weight.detach().float().clone()
        bias = None if layer.bias is None else layer.bias.detach().float().clone()
        self.biased = bias is not None
        self.plain_tensors = False
        if weight.numel() < self.THREADED_FROM or torch.get_num_threads() == 1:
            with warnings.catch_warnings():
                # PyTorch warns once per process that these functions are deprecated; the
                # fallback below is what replaces them, so the warning tells the user nothing.
                warnings.simplefilter("ignore", UserWarning)
                try:
                    self.packed = torch.fbgemm_pack_gemm_matrix_fp16(weight)
                    self.linear = getattr(torch, "fbgemm_linear_fp16_weight_fp32_activation", None)
                    if self.linear is None:  # the older function wants a bias vector, zeros for none
                        self.linear = torch.fbgemm_linear_fp16_weight
                        bias = torch.zeros(weight.shape[0]) if bias is None else bias
                    self.bias, self.plain_tensors = bias, True
                    self(weight.new_zeros(1, weight.shape[1]))  # the first call is where the warning fires
                except (AttributeError, RuntimeError):
                    self.plain_tensors = False
        # The threaded call's packing: the only one where the plain call is missing or the
        # matrix is big, and the one for many rows beside it otherwise.
        self.threaded = torch.ops.quantized.linear_prepack_fp16(weight, None if bias is None else bias.clone())
        if not self.plain_tensors:
            self.packed, self.bias = self.threaded, None

    @staticmethod
    def fits(layer: nn.Linear) -> bool:
        """fp16 tops out at 65504: a weight beyond it stays fp32."""
        return bool(layer.weight.detach().abs().max() < 65504)

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.plain_tensors and (x.shape[0] < self.THREADED_ROWS or torch.get_num_threads() == 1):
            if out is None:
                return self.linear(x, self.packed, self.bias)
            return self.linear(x, self.packed, self.bias, output=out)
        y = torch.ops.quantized.linear_dynamic_fp16(x, self.threaded)
        return y if out is None else out.copy_(y)

    @property
    def adds_in_place(self) -> bool:
        """Whether ``add_to`` works: the plain-tensor call, and no bias of the layer's own."""
        return self.plain_tensors and not self.biased

    def add_to(self, residual: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out (1, N) = residual (N,) + self(x) for one row x (1, K), in one pass.

        The plain-tensor call adds its bias vector after the sum over the inputs; a layer
        without a bias (llama's) hands it the residual row instead: the addition
        ``residual + self(x)`` would make, bit for bit, without a pass of its own.
        """
        return self.linear(x, self.packed, residual, output=out)


def half_products_work() -> bool:
    """Whether ``HalfProduct`` runs here and gets a small product right (FBGEMM is
    x86 with AVX2; Arm builds and older CPUs lack it)."""
    layer = nn.Linear(16, 8)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(-1, 1, 8 * 16).reshape(8, 16))
        layer.bias.copy_(torch.linspace(0, 1, 8))
        x = torch.linspace(1, -1, 16).reshape(1, 16)
        try:
            got = HalfProduct(layer)(x)
        except Exception:  # a missing operator, no FBGEMM engine, an unsupported CPU
            return False
        return got.shape == (1, 8) and torch.allclose(got, layer(x), atol=1e-2)
