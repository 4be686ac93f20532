"""FusedHeadLoss (CPU fp32 training) against the plain head + F.cross_entropy path.

The two must give the same loss and the same gradient for every parameter: the
fused path is only a different order of the same arithmetic.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from engine.model import gpt as gpt_module
from engine.model import layers as layers_module
from engine.model.layers import FusedHeadLoss
from engine.runtime import hardware
from model import GPT, ModelConfig
from trainer import accumulate_gradients


@contextlib.contextmanager
def _plain_head():
    """GPT.forward's plain path even in training: the logits whole, then F.cross_entropy."""
    original = gpt_module.fused_loss_applies
    gpt_module.fused_loss_applies = lambda *_: False
    try:
        yield
    finally:
        gpt_module.fused_loss_applies = original


def _plain_loss(model: GPT, x, y, segments=None) -> torch.Tensor:
    with _plain_head():
        logits, loss = model(x, y, segments=segments)
    assert logits is not None
    return loss


def _loss_and_grads(model: GPT, loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same(model: GPT, fused_fn, plain_fn) -> None:
    """Same loss and the same gradient of every parameter, to float32 rounding."""
    fused_loss, fused = _loss_and_grads(model, fused_fn)
    plain_loss, plain = _loss_and_grads(model, plain_fn)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-6)
    for name in plain:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def _assert_paths_agree(model: GPT, x, y, segments=None) -> None:
    _assert_same(model, lambda: model(x, y, segments=segments)[1], lambda: _plain_loss(model, x, y, segments))


def _model(vocab: int, context: int = 24) -> GPT:
    # dropout 0: both passes then see the same network; (training mode is what picks the path)
    torch.manual_seed(7)
    return GPT(ModelConfig(vocab_size=vocab, context=context, d_model=32, n_layer=2, n_head=2, dropout=0.0)).train()


@pytest.mark.parametrize("rows", [1, 5, 7, 64, 1000])
@pytest.mark.parametrize("B,T,vocab", [(2, 24, 97), (3, 11, 50), (1, 1, 13)])
def test_fused_loss_matches_plain_path(monkeypatch, rows, B, T, vocab):
    """Chunks of every size, rows not a multiple of the chunk, one row in all."""
    monkeypatch.setattr(layers_module, "LOSS_CHUNK_LOGITS", rows * vocab)
    seen = []
    apply = FusedHeadLoss.apply
    monkeypatch.setattr(FusedHeadLoss, "apply", lambda *args: seen.append(args[3]) or apply(*args))
    m = _model(vocab)
    x = torch.randint(0, vocab, (B, T))
    y = torch.randint(0, vocab, (B, T))
    _assert_paths_agree(m, x, y)
    assert seen == [rows]  # the fused path ran, in chunks of that many rows


def test_the_forward_pass_returns_no_logits_only_when_fused():
    m = _model(97)
    x = torch.randint(0, 97, (2, 24))
    logits, loss = m(x, x)
    assert logits is None and loss is not None
    with torch.no_grad():
        assert m(x, x)[0] is not None
    assert m.eval()(x, x)[0] is not None
    assert m.train()(x)[0] is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(x, x)[0] is not None


def test_fused_loss_ignores_minus_one_even_in_whole_chunks(monkeypatch):
    monkeypatch.setattr(layers_module, "LOSS_CHUNK_LOGITS", 8 * 97)
    m = _model(97)
    x = torch.randint(0, 97, (2, 24))
    y = torch.randint(0, 97, (2, 24))
    y[0, :16] = -1  # two whole chunks with nothing to learn
    y[1, ::3] = -1
    _assert_paths_agree(m, x, y)


def test_fused_loss_with_packed_conversations():
    m = _model(97)
    x = torch.randint(0, 97, (2, 24))
    y = torch.randint(0, 97, (2, 24))
    segments = torch.tensor([[0] * 10 + [1] * 9 + [2] * 5, [0] * 24])
    y[0, :4] = -1  # prompts are not learned
    y[0, 10:13] = -1
    y[1, :20] = -1
    _assert_paths_agree(m, x, y, segments)


def test_fused_loss_with_nothing_learned_is_nan_with_zero_gradients():
    """As F.cross_entropy: NaN mean, zero gradients (accumulate_gradients skips such slices)."""
    m = _model(97)
    x = torch.randint(0, 97, (2, 24))
    y = torch.full((2, 24), -1)
    loss = m(x, y)[1]
    loss.backward()
    plain = F.cross_entropy(torch.randn(4, 97), torch.full((4,), -1), ignore_index=-1)
    assert torch.isnan(loss) and torch.isnan(plain)
    assert m.wte.weight.grad.abs().sum() == 0


def test_scaled_loss_scales_the_gradients():
    """accumulate_gradients backpropagates loss * share: the saved gradients are scaled."""
    m = _model(97)
    x = torch.randint(0, 97, (2, 24))
    _assert_same(m, lambda: m(x, x)[1] * 0.25, lambda: _plain_loss(m, x, x) * 0.25)


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_fused_loss_function_alone_matches_cross_entropy(scale):
    """Gradients reach a head weight that is also used elsewhere (as the tied embedding is);
    logits in the hundreds (scale 30) leave most probabilities at 0."""
    torch.manual_seed(3)
    h = (torch.randn(37, 16) * scale).requires_grad_()
    w = torch.randn(29, 16, requires_grad=True)
    t = torch.randint(0, 29, (37,))
    t[::4] = -1
    (FusedHeadLoss.apply(h, w, t, 8) + w.sum()).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    (F.cross_entropy(h @ w.t(), t, ignore_index=-1) + w.sum()).backward()
    torch.testing.assert_close(gh, h.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-7)


def test_fused_loss_matches_with_dropout_and_the_same_random_numbers():
    """Dropout draws the same masks in both passes when seeded alike: the head draws none."""
    torch.manual_seed(7)
    m = GPT(ModelConfig(vocab_size=97, context=24, d_model=32, n_layer=2, n_head=2, dropout=0.1)).train()
    x = torch.randint(0, 97, (2, 24))

    def seeded(fn):
        torch.manual_seed(11)
        return fn()

    _assert_same(m, lambda: seeded(lambda: m(x, x)[1]), lambda: seeded(lambda: _plain_loss(m, x, x)))


def test_micro_batches_with_a_slice_that_learns_nothing_match_the_plain_path():
    """accumulate_gradients skips a slice with no learned targets and weights the others
    by their share: with the fused head it adds up to what the plain head gives."""
    m = _model(97)
    runtime = hardware.detect_runtime("cpu", "fp32")
    x = torch.randint(0, 97, (4, 24))
    y = torch.randint(0, 97, (4, 24))
    y[:2] = -1  # the first slice of two learns nothing
    y[3, :10] = -1

    def plain():
        with _plain_head():
            return accumulate_gradients(m, x, y, runtime, micro_batches=2)

    def loss_and_grads(fn):
        m.zero_grad(set_to_none=True)
        loss = fn()
        return loss, {n: p.grad.clone() for n, p in m.named_parameters()}

    fused_loss, fused = loss_and_grads(lambda: accumulate_gradients(m, x, y, runtime, micro_batches=2))
    plain_loss, plain = loss_and_grads(plain)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-6)
    for name in plain:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_negative_target_other_than_minus_one_is_refused():
    """-100 (another library's ignore index) would otherwise be learned as token 0."""
    h, weight = torch.randn(4, 8, requires_grad=True), torch.randn(16, 8, requires_grad=True)
    with pytest.raises(ValueError, match="token ids or -1"):
        FusedHeadLoss.apply(h, weight, torch.tensor([1, -100, 2, -1]), 2)
