"""Generation's view of the network: the same computation as ``GPT.forward``, one step at a time.

``Decoder.step`` feeds new ids of one sequence through plain tensor operations into a
preallocated ``KVCache``; ``Decoder.step_many`` does the same for several sequences in
one pass, each with its own cache, position and length (a server's batch). The weight
matrices live in ``engine.model.products``.

Batch invariance: in ``step_many`` a sequence's logits do not depend on which other
sequences share the step, nor on how many, on the CPU with fp16 weights (FBGEMM, the
default where the kernel exists). Each part of the step is row-wise there:

- FBGEMM's fp16-weight product computes every output row on its own, in one order
  over the inputs whatever the number of rows (measured for 1 to 257 rows, one and two
  threads, both of ``HalfProduct``'s entry points: bit-identical).
- LayerNorm and RMSNorm (``llama_layout.RowRMSNorm``) normalise each row by itself.
- Rotation, attention and writing the cache run per sequence, with the very calls
  that sequence makes alone (on several threads, SDPA gives each head to one thread).
- A server's steps of many rows may run on more threads than the sequence alone did
  (``engine.serving.step_threads``); none of the above depends on it, and products of
  ``HalfProduct.THREADED_ROWS`` rows or more then take FBGEMM's threaded call, which
  gives the same bits (``test_a_sequence_gets_the_same_logits_alone_and_in_any_batch``
  runs its batches on two threads too).
- Element-wise passes (GELU, the gate's sigmoid, additions) compute each value alone;
  GELU and the sigmoid take a vector and a scalar route that may round differently,
  and a value's route is the same in any batch when d_ff is a multiple of 32 per
  thread's share (d_ff is 4 x d_model, or a multiple of 64 for llama; so: d_model a
  multiple of 16, one or two generation threads, as the server has on machines up to
  three cores). Measured: bit-identical for 1 to 300 rows, one and two threads.
- The single-row paths (``_gpt2_row``, ``_llama_row``) make the same operations on the same rows,
  and so does ``_generating`` (every sequence feeding one token), which rotates all the
  rows' q and k in one multiplication: element by element, as each would be alone.

Not guaranteed: fp32 weights (MKL takes a matrix-vector kernel for one row and picks
its blocking and threading by the number of rows: a row moves by ~1e-6 between 1 and 2
rows, and, with several threads, at other sizes), and GPUs (cuBLAS picks kernels and
split-K by shape). There the logits of a sequence in a batch differ from its logits
alone in the last bits, and a token differs only if a draw falls that close to a
boundary between two candidates.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.model import llama_layout
from engine.model.config import ModelConfig
from engine.model.gpt import GPT, rotary_tables
from engine.model.products import HalfProduct, Product

__all__ = ["Decoder", "Feed", "KVCache", "PositionViews"]


class PositionViews(NamedTuple):
    """One layer's views of a cache for a one-token step at position p: the row the fused
    q|k|v product writes, q of p, k and v of 0..p (each (1, H, ., D)), and for llama in
    fp32 the q|k part of the row as complex pairs (1, 2H, D/2), rotated in place."""

    row: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    pairs: torch.Tensor | None


class KVCache:
    """Preallocated attention state for one sequence: (n_layer, context, 3 * d_model).

    Row t of a layer holds that position's q|k|v exactly as the layer's fused
    projection produced them (for llama, with q and k then normed and rotated in
    place), so the product writes straight into the cache. ``pos`` counts the positions
    filled. Positions cannot roll over (learned rows for gpt2; a llama could, but both
    share one rule): when the window is full the caller crops the context,
    ``reset()``s and feeds the kept part again.
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
        # llama in fp32: per layer, the q|k part of the rows as (S, 2H, D/2) complex pairs
        # (the Decoder keeps each rotated pair side by side), so a rotation is one
        # complex multiplication in place. Other dtypes have no complex view (bf16).
        self.pairs = None
        if config.arch == "llama" and dtype == torch.float32:
            self.pairs = [torch.view_as_complex(self.rows[i, :, :2 * C].view(S, 2 * H, config.head_dim // 2, 2))
                          for i in range(config.n_layer)]
        self._at: list[list[PositionViews] | None] = [None] * S

    def reset(self) -> None:
        self.pos = 0

    def at(self, pos: int) -> list[PositionViews]:
        """Per layer, the views a one-token step at ``pos`` uses, made on first use and kept.

        Slicing five views a layer cost ~50 us of a ~950 us token (CPU time, the compact
        gpt2 in the menu's loop); kept, a cache that serves the next reply too (the
        generator's and the server's caches are reused) slices nothing. At most
        ``context`` lists of n_layer views (~1 MB at context 256 and 4 layers).
        """
        views = self._at[pos]
        if views is None:
            end = pos + 1
            views = self._at[pos] = [
                PositionViews(self.rows[i, pos:end], self.q[i][:, :, pos:end], self.k[i][:, :, :end],
                              self.v[i][:, :, :end], None if self.pairs is None else self.pairs[i][pos:end])
                for i in range(len(self.q))]
        return views


@dataclass(frozen=True)
class Feed:
    """What one sequence brings to a step: the ids its cache has not seen, and the cache."""

    ids: list[int]
    cache: KVCache


class _Span(NamedTuple):
    """One feed's place in a step: its first row among the step's rows, the cache
    positions start..end it fills, the attention mask of a chunk after cached keys (or
    None) and, for llama, the rotations of those positions (T, 1, D/2)."""

    first: int
    start: int
    end: int
    mask: torch.Tensor | None
    turns: torch.Tensor | None


class _Block(NamedTuple):
    """One block's tensors in generation's layout.

    gpt2: LayerNorm weights and biases. llama: no norm tensors (their weights are folded
    into qkv and fc, see ``llama_layout``) and no biases.
    """

    ln_1_weight: torch.Tensor | None
    ln_1_bias: torch.Tensor | None
    qkv: Product | HalfProduct
    proj: Product | HalfProduct
    ln_2_weight: torch.Tensor | None
    ln_2_bias: torch.Tensor | None
    fc: Product | HalfProduct
    fc_proj: Product | HalfProduct


Norm = Callable[[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], torch.Tensor]


def _layer_norm(eps: float) -> Norm:
    return lambda x, weight, bias: torch.layer_norm(x, x.shape[-1:], weight, bias, eps)


class Decoder:
    """Incremental inference: feed new ids, get the next-token logits.

    It computes what ``GPT.forward`` computes, written as plain tensor operations.
    At batch size 1 a step is a few matrix-vector products whose cost is reading
    the weights; module calls, reshapes and copying keys and values into a cache
    were about a third of the step, and are gone here: the fused q|k|v product
    writes into the cache rows itself, and attention reads keys and values as
    strided views of those rows. The llama block's weights are laid out for the
    same purpose (``llama_layout``).

    Some weights are copied into a faster layout, or into a lower precision than the
    model's (bf16 or fp16 halve the bytes each step reads), so a Decoder sees the
    weights as they were when it was built: after training, build a new one.

    ``dtype`` is the dtype of the matrix products and the KV cache (default: the
    model's); on a GPU, the autocast dtype training used. With bf16 or fp16 the rest
    stays as autocast kept it in training: the residual stream, the embeddings and
    the norms in fp32 (``stream_dtype``). So the sum over the layers never leaves
    fp32: in fp16 a stream that passes 65504 would become inf, and in bf16 each
    addition would round to 8 bits. The same holds for both blocks; a llama's rotation
    is computed in fp32 too and stored in the cache's dtype, as autocast's fp32 rotary
    tables made it in training. ``matrix_dtype=torch.float16`` on the CPU keeps the
    weight matrices in fp16 and computes in fp32 (``HalfProduct``;
    ``hardware.Runtime.decode_weights`` says whether this machine has the kernel).
    """

    def __init__(self, model: GPT, dtype: torch.dtype | None = None,
                 matrix_dtype: torch.dtype | None = None) -> None:
        config = self.config = model.config
        self.device = model.device
        self.dtype = dtype or model.wte.weight.dtype
        self.stream_dtype = torch.float32 if self.dtype in (torch.float16, torch.bfloat16) else self.dtype
        self.cast = self.dtype != self.stream_dtype  # whether rows are cast down before each product
        half = matrix_dtype == torch.float16 and self.device.type == "cpu" and self.dtype == torch.float32

        def vec(t: torch.Tensor) -> torch.Tensor:  # an fp32 model's own tensor: no copy
            return t.detach().to(self.stream_dtype)

        def product(layer: nn.Linear) -> Product | HalfProduct:
            return HalfProduct(layer) if half and HalfProduct.fits(layer) else Product(layer, self.dtype)

        self.wte = vec(model.wte.weight)
        self.wpe = None if model.wpe is None else vec(model.wpe.weight)
        self.rotary = config.arch == "llama"
        self.qk_norm: list[torch.Tensor] | None = None
        if self.rotary:  # norm weights folded into the products that read them (llama_layout)
            eps, C, D = model.ln_f.eps, config.d_model, config.head_dim
            self.norm: Norm = llama_layout.RowRMSNorm(C, eps, self.device)  # takes (x, weight, bias) too
            factor = self.norm.factor
            self.layers = [_Block(None, None, product(qkv), product(b.attn.c_proj), None, None, product(fc),
                                  product(b.mlp.c_proj))
                           for b in model.h for qkv, fc in [llama_layout.llama_products(b, config, factor)]]
            self.ln_f: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
            self.head = product(llama_layout.fold_norm(model.lm_head.weight, model.ln_f.weight, factor))
            cos, sin = rotary_tables(config, self.device)
            self.turns = torch.complex(cos[:, :D // 2], sin[:, :D // 2]).unsqueeze(1)  # (context, 1, D/2)
            if config.qk_norm:
                self.head_norm = llama_layout.RowRMSNorm(D, eps, self.device)
                self.qk_norm = [vec(llama_layout.qk_norm_weights(b, config, self.head_norm.factor)) for b in model.h]
        else:
            self.norm = _layer_norm(model.ln_f.eps)
            self.layers = [_Block(vec(b.ln_1.weight), vec(b.ln_1.bias), product(b.attn.c_attn), product(b.attn.c_proj),
                                  vec(b.ln_2.weight), vec(b.ln_2.bias), product(b.mlp.c_fc), product(b.mlp.c_proj))
                           for b in model.h]
            self.ln_f = (vec(model.ln_f.weight), vec(model.ln_f.bias))
            self.head = product(model.lm_head)
        self.eps = model.ln_f.eps
        # With fp16 weights the step is approximate already (logits move by ~1e-3), and
        # the tanh form of GELU, which differs from the exact one by at most ~5e-4, costs
        # half as much at batch 1 (5 against 11 us for a 1024-wide row, four times a token).
        self.gelu = functools.partial(F.gelu, approximate="tanh") if half else F.gelu
        self.row = self._row_path()

    def new_cache(self) -> KVCache:
        return KVCache(self.config, self.device, self.dtype)

    def step(self, ids: list[int], cache: KVCache) -> torch.Tensor:
        """Run ``ids`` (the tokens the cache has not seen) and return fp32 logits (vocab,)
        for the token after the last of them."""
        if self.row is not None and len(ids) == 1 and cache.pos < cache.context:
            with torch.inference_mode():  # the menu's token: straight to the row path
                return self.row(ids[0], cache)[0]
        return self.step_many([Feed(ids, cache)])[0]

    def _row_path(self) -> Callable[[int, KVCache], torch.Tensor] | None:
        """The step for one sequence feeding one token, on the CPU with an fp32 stream
        (None elsewhere: ``step_many``'s general path serves that case too)."""
        if self.device.type != "cpu" or self.cast:
            return None
        if not self.rotary:
            return self._gpt2_row
        # llama's residual products add in place: fp16 weights through FBGEMM's plain-tensor call.
        adds_in_place = all(isinstance(p, HalfProduct) and p.adds_in_place
                            for blk in self.layers for p in (blk.proj, blk.fc_proj))
        return self._llama_row if adds_in_place else None

    def _gpt2_row(self, token: int, cache: KVCache) -> torch.Tensor:
        """``step_many`` for one sequence and one token of a gpt2 on the CPU: logits (1, vocab).

        The same operations on the same row as ``step_many``, bit for bit, with fewer of
        them around: the stream is one row added to in place, the cache's views come
        from ``KVCache.at``, and nothing is gathered for a batch. In the menu's loop the
        compact model made 1.05x the tokens/s through here (CPU time, 7 alternating rounds).
        """
        C, start = self.config.d_model, cache.pos
        width, eps, gelu, sdpa = (C,), self.eps, self.gelu, F.scaled_dot_product_attention
        x = torch.add(self.wte[token], self.wpe[start]).view(1, C)  # (1, C), a new row: added to in place
        for (ln_1_weight, ln_1_bias, qkv, proj, ln_2_weight, ln_2_bias, fc, fc_proj), at in zip(self.layers,
                                                                                               cache.at(start)):
            qkv(torch.layer_norm(x, width, ln_1_weight, ln_1_bias, eps), out=at.row)
            x.add_(proj(sdpa(at.q, at.k, at.v).view(1, C)))  # (1, H, 1, D) is already laid out as (1, C)
            x.add_(fc_proj(gelu(fc(torch.layer_norm(x, width, ln_2_weight, ln_2_bias, eps)))))
        cache.pos = start + 1
        return self.head(torch.layer_norm(x, width, self.ln_f[0], self.ln_f[1], eps))

    def _llama_row(self, token: int, cache: KVCache) -> torch.Tensor:
        """``step_many`` for one sequence and one token of a llama on the CPU: logits (1, vocab).

        At batch 1 every tensor operation costs a few microseconds beyond its arithmetic,
        and the llama block has more of them than GPT-2's (RMSNorm, the rotation, the
        gate): through ``step_many`` it made ~11% fewer tokens/s than a GPT-2 of the
        same size. Here the residual stream is a 1-D row that the products add to
        themselves (``HalfProduct.add_to``: the bias slot, which llama leaves empty),
        in two buffers taken in turn, and c_fc writes into a buffer whose gate half is a
        view made once: two passes fewer a layer. The values are ``step_many``'s, bit
        for bit (the additions and the norms are the same operations on the same rows;
        ``test_a_sequence_gets_the_same_logits_alone_and_in_any_batch`` checks it).
        """
        C, start = self.config.d_model, cache.pos
        end = start + 1
        # The stream's two buffers, taken in turn, each as a row (1, C) and as the (C,)
        # vector the products add; the first x is the embedding row itself, read only.
        rows = [torch.empty(C, device=self.device) for _ in range(2)]
        rows = [(row.view(1, C), row) for row in rows]
        x, x_flat = self.wte[token].view(1, C), self.wte[token]
        up_gate = torch.empty(1, 2 * self.config.d_ff, device=self.device)
        gate = up_gate[:, self.config.d_ff:]
        span = _Span(0, start, end, None, self.turns[start:end])
        sdpa, glu, vector_norm, hypot = F.scaled_dot_product_attention, F.glu, torch.linalg.vector_norm, torch.hypot
        root_eps = self.norm.root_eps  # RowRMSNorm written out: x / hypot(|x|, sqrt(C * eps))
        for layer, (blk, at) in enumerate(zip(self.layers, cache.at(start))):
            blk.qkv(x / hypot(vector_norm(x, 2, -1, True), root_eps), out=at.row)
            if self.qk_norm is None and at.pairs is not None:  # as _attend does, written out
                at.pairs.mul_(span.turns)
            else:
                self._turn(layer, cache, span)
            blk.proj.add_to(x_flat, sdpa(at.q, at.k, at.v).view(1, C), rows[0][0])  # x + proj(attention)
            (x, x_flat), rows = rows[0], rows[::-1]
            blk.fc(x / hypot(vector_norm(x, 2, -1, True), root_eps), out=up_gate)
            blk.fc_proj.add_to(x_flat, glu(up_gate, -1).mul_(gate), rows[0][0])
            (x, x_flat), rows = rows[0], rows[::-1]
        cache.pos = end
        return self.head(self.norm(x))

    @torch.inference_mode()
    def step_many(self, feeds: Sequence[Feed]) -> torch.Tensor:
        """One pass for several sequences: fp32 logits (B, vocab), row b for the token after
        ``feeds[b].ids``. Each sequence brings its own cache; their new rows share the
        matrix products, and each attends to its own cache alone."""
        if self.row is not None and all(len(feed.ids) == 1 and feed.cache.pos < feed.cache.context
                                        for feed in feeds):
            if len(feeds) == 1:
                return self.row(feeds[0].ids[0], feeds[0].cache)
            if self.qk_norm is None and (not self.rotary or feeds[0].cache.pairs is not None):
                return self._generating(feeds)
        spans = self._spans(feeds)
        rows = spans[-1].first + spans[-1].end - spans[-1].start
        x = self._embed(feeds, spans, rows)  # the residual stream, in stream_dtype
        alone = len(feeds) == 1
        sizes = [span.end - span.start for span in spans]
        # A generating sequence's views of its one new position (KVCache.at), looked up once.
        ats = [feed.cache.at(span.start) if size == 1 else None for feed, span, size in zip(feeds, spans, sizes)]
        for layer, blk in enumerate(self.layers):
            h = self._low(self.norm(x, blk.ln_1_weight, blk.ln_1_bias))
            if alone:  # the product writes into the cache rows itself
                blk.qkv(h, out=feeds[0].cache.rows[layer, spans[0].start:spans[0].end])
            else:
                for feed, span, at, new in zip(feeds, spans, ats, blk.qkv(h).split(sizes)):
                    (feed.cache.rows[layer, span.start:span.end] if at is None else at[layer].row).copy_(new)
            ys = [self._attend(layer, feed.cache, span, None if at is None else at[layer])
                  for feed, span, at in zip(feeds, spans, ats)]
            x = x + blk.proj(ys[0] if alone else torch.cat(ys))  # a low-precision product added to the fp32 stream
            x = x + self._mlp(blk, self._low(self.norm(x, blk.ln_2_weight, blk.ln_2_bias)))
        for feed, span in zip(feeds, spans):
            feed.cache.pos = span.end
        if rows > len(feeds):  # a chunk of several ids: only its last row is sampled from
            x = x[-1:] if alone else x[torch.tensor([span.first + span.end - span.start - 1 for span in spans],
                                                    device=self.device)]
        logits = self.head(self._low(self.norm(x, *self.ln_f)))
        return logits if logits.dtype == torch.float32 else logits.float()

    def _generating(self, feeds: Sequence[Feed]) -> torch.Tensor:
        """``step_many`` when every sequence feeds one token (a server's steady state), on the
        row path's terms (CPU, fp32 stream and cache, no QK-norm): logits (B, vocab).

        The general path spends a few tensor operations per sequence per layer beyond its
        attention (a span, a rotation, a copy). Here the rows are rotated in the product's
        output, all at once (each pair by its own position's turn, element by element as
        in the cache), and each sequence's layer costs one copy into its cache and its
        attention: the server made 1.12x the tokens/s at 8 streams (README, Server). The
        values are the general path's (``test_a_sequence_gets_the_same_logits_alone_and_in_any_batch``).
        """
        C, H = self.config.d_model, self.config.n_head
        B = len(feeds)
        positions = [feed.cache.pos for feed in feeds]
        ats = [feed.cache.at(pos) for feed, pos in zip(feeds, positions)]  # per sequence, per layer
        x = self.wte[torch.tensor([feed.ids[0] for feed in feeds], device=self.device)]
        where = torch.tensor(positions, device=self.device)
        if self.wpe is not None:
            x = x + self.wpe[where]
        turns = self.turns[where] if self.rotary else None  # (B, 1, D/2)
        sdpa = F.scaled_dot_product_attention
        for layer, blk in enumerate(self.layers):
            h = blk.qkv(self.norm(x, blk.ln_1_weight, blk.ln_1_bias))  # (B, 3C)
            if turns is not None:  # q|k of every row as (B, 2H, D/2) pairs, rotated in place
                torch.view_as_complex(h[:, :2 * C].view(B, 2 * H, -1, 2)).mul_(turns)
            ys = []
            for at, new in zip(ats, h.unbind()):
                views = at[layer]
                views.row.copy_(new)
                ys.append(sdpa(views.q, views.k, views.v).view(1, C))
            x = x + blk.proj(torch.cat(ys))
            x = x + self._mlp(blk, self.norm(x, blk.ln_2_weight, blk.ln_2_bias))
        for feed, pos in zip(feeds, positions):
            feed.cache.pos = pos + 1
        return self.head(self.norm(x, *self.ln_f))

    def _low(self, h: torch.Tensor) -> torch.Tensor:
        """Rows in the products' dtype (a pass only where it differs from the stream's)."""
        return h.to(self.dtype) if self.cast else h

    def _spans(self, feeds: Sequence[Feed]) -> list[_Span]:
        """Where each feed's rows go, checked; what its attention needs, made once for all layers."""
        if not feeds:
            raise ValueError("nothing to decode: no sequences")
        spans, rows = [], 0
        for feed in feeds:
            start, T = feed.cache.pos, len(feed.ids)
            if T == 0:
                raise ValueError("nothing to decode: ids is empty")
            end = start + T
            if end > feed.cache.context:
                raise ValueError(f"cannot attend to {end} tokens; the context is {feed.cache.context}")
            # One new query sees every key; a chunk after cached keys needs an explicit mask.
            mask = None
            if T > 1 and start > 0:
                mask = torch.ones(T, end, dtype=torch.bool, device=self.device).tril(diagonal=start)
            spans.append(_Span(rows, start, end, mask, self.turns[start:end] if self.rotary else None))
            rows += T
        return spans

    def _embed(self, feeds: Sequence[Feed], spans: list[_Span], rows: int) -> torch.Tensor:
        """The new rows' token embeddings (rows, C), plus their positions' rows for gpt2."""
        C = self.config.d_model
        if rows == 1:  # indexing with a Python int is a view: no index tensor to build
            x = self.wte[feeds[0].ids[0]]
            return (x if self.wpe is None else x + self.wpe[spans[0].start]).view(1, C)
        x = self.wte[torch.tensor([i for feed in feeds for i in feed.ids], device=self.device)]
        if self.wpe is None:
            return x
        if len(feeds) == 1:
            return x + self.wpe[spans[0].start:spans[0].end]
        positions = [p for span in spans for p in range(span.start, span.end)]
        return x + self.wpe[torch.tensor(positions, device=self.device)]

    def _attend(self, layer: int, cache: KVCache, span: _Span, at: PositionViews | None) -> torch.Tensor:
        """Attention of the rows ``span`` (already in the cache) over the cache: (T, C).
        ``at``: the layer's views of the one position a generating sequence feeds (else None)."""
        start, end = span.start, span.end
        T, C = end - start, self.config.d_model
        if self.rotary:
            if self.qk_norm is None and cache.pairs is not None:  # fp32: one complex multiplication in place
                (cache.pairs[layer][start:end] if at is None else at.pairs).mul_(span.turns)
            else:
                self._turn(layer, cache, span)
        # q of the new positions, k and v of all so far: (1, H, T or end, D).
        if at is None:
            q, k, v = cache.q[layer][:, :, start:end], cache.k[layer][:, :, :end], cache.v[layer][:, :, :end]
        else:
            q, k, v = at.q, at.k, at.v
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=span.mask, is_causal=T > 1 and start == 0)
        # (1, H, 1, D) is already laid out as (1, C); only a chunk needs the transpose.
        return y.view(1, C) if T == 1 else y.transpose(1, 2).reshape(T, C)

    def _turn(self, layer: int, cache: KVCache, span: _Span) -> None:
        """llama: QK-norm (if the model has it) and the rotation of the span's q and k, in the
        cache (fp32 caches without QK-norm take a shortcut in ``_attend``)."""
        start, end = span.start, span.end
        T, H, D = end - start, self.config.n_head, self.config.head_dim
        qk = cache.rows[layer, start:end, :2 * H * D]  # (T, 2C): q|k, pairs side by side
        source = qk.float().view(T, 2 * H, D)
        if self.qk_norm is not None:  # each head's q and k RMS-normed over its D channels, in fp32
            source = self.head_norm(source) * self.qk_norm[layer]
        pairs = torch.view_as_complex(source.contiguous().view(T, 2 * H, D // 2, 2))
        if cache.pairs is not None:
            torch.mul(pairs, span.turns, out=cache.pairs[layer][start:end])
        else:  # bf16/fp16 caches: rotated in fp32, stored in the cache's dtype
            qk.copy_(torch.view_as_real(pairs * span.turns).view(T, 2 * H * D))

    def _mlp(self, blk: _Block, h: torch.Tensor) -> torch.Tensor:
        """gpt2: c_proj(GELU(c_fc(h))). llama: c_proj(silu(gate) * up), c_fc making [up | gate]."""
        if not self.rotary:
            return blk.fc_proj(self.gelu(blk.fc(h)))
        up_gate = blk.fc(h)
        # F.glu: up * sigmoid(gate), one pass; times gate, silu(gate) * up.
        return blk.fc_proj(F.glu(up_gate, -1).mul_(up_gate[:, self.config.d_ff:]))
