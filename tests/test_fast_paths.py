"""The speed-ups tied to their plain reference: each fast path must compute the same thing."""
import pytest
import torch
import torch.nn.functional as F
from test_model import BLOCKS, model_of

from engine.data.tokenizer import chunk_text, train_tokenizer
from engine.model.decoder import Feed
from engine.model.layers import causal_attention_with_dropout, cpu_dropout
from engine.model.llama_layout import RowRMSNorm
from engine.model.products import HalfProduct, Product, half_products_work
from engine.runtime import hardware
from model import GPT, Decoder
from response_generator import CHAT_STOPS, TextStreamer

from conftest import SAMPLE_TEXT


def test_written_out_attention_equals_sdpa_without_dropout():
    q, k, v = (torch.randn(2, 3, 17, 8) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(causal_attention_with_dropout(q, k, v, 0.0), expected, atol=1e-5, rtol=1e-5)


def test_cpu_dropout_zeroes_p_and_scales_the_rest():
    x = torch.ones(200_000)
    y = cpu_dropout(x, 0.25)
    zero_share = (y == 0).float().mean().item()
    assert abs(zero_share - 0.25) < 0.01
    assert torch.all((y == 0) | torch.isclose(y, torch.tensor(1 / 0.75)))
    assert abs(y.mean().item() - 1.0) < 0.02  # expectation preserved


def test_cpu_dropout_draws_are_independent_across_the_shared_integers():
    # Element i and element i + ceil(n/2) take their draws from the same 31-bit integer.
    torch.manual_seed(0)
    n = 1_000_001  # odd: the last integer's second half is unused
    dropped = cpu_dropout(torch.ones(n), 0.5) == 0
    half = (n + 1) // 2
    assert abs(dropped.float().mean().item() - 0.5) < 3e-3
    both = (dropped[: n - half] & dropped[half:]).float().mean().item()
    assert abs(both - 0.25) < 3e-3  # independent: p * p


def test_cpu_dropout_is_unbiased_for_bf16_activations():
    # Under CPU bf16 autocast the activations are bf16; the mask and scale must not be:
    # bf16 draws and a bf16 1/0.9 shrank the mean by 0.4%, 11 standard errors here.
    torch.manual_seed(0)
    y = cpu_dropout(torch.ones(1_000_000, dtype=torch.bfloat16), 0.1)
    assert abs((y == 0).float().mean().item() - 0.1) < 1.5e-3
    assert abs(y.double().mean().item() - 1.0) < 1.5e-3


def test_dropout_is_identity_in_eval_and_follows_the_global_seed(tiny_config):
    tiny_config.dropout = 0.2
    model = GPT(tiny_config)
    x = torch.randint(0, tiny_config.vocab_size, (2, 10))
    model.eval()
    torch.testing.assert_close(model(x)[0], model(x)[0])
    model.train()
    torch.manual_seed(3)
    a = model(x, x)[1]
    torch.manual_seed(3)
    b = model(x, x)[1]
    assert torch.equal(a, b)
    a.backward()  # the written-out attention path trains
    assert model.h[0].attn.c_attn.weight.grad is not None


def test_last_only_matches_the_full_forward(tiny_model, tiny_config):
    x = torch.randint(0, tiny_config.vocab_size, (2, 12))
    full, _ = tiny_model(x)
    last, _ = tiny_model(x, last_only=True)
    assert last.shape == (2, 1, tiny_config.vocab_size)
    torch.testing.assert_close(last, full[:, -1:])


def test_decoder_layouts_compute_f_linear():
    # Both stored layouts: widening (kept transposed) and narrowing (kept as is).
    for d_in, d_out, bias in ((16, 64, True), (64, 16, True), (16, 40, False)):
        layer = torch.nn.Linear(d_in, d_out, bias=bias)
        product = Product(layer, torch.float32)
        assert product.transposed == (d_in <= d_out)
        x = torch.randn(3, d_in)
        with torch.no_grad():
            expected = F.linear(x, layer.weight, layer.bias)
            torch.testing.assert_close(product(x), expected)
            out = torch.empty(3, d_out)
            assert product(x, out=out) is out
            torch.testing.assert_close(out, expected)


needs_half_kernel = pytest.mark.skipif(not hardware.cpu_half_weights_available(),
                                       reason="this PyTorch/CPU has no fp16-weight kernel (FBGEMM)")


def test_the_half_kernel_is_found_where_fbgemm_runs():
    # The skips above must not hide a broken probe on the machines that have the kernel.
    import platform
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        avx2 = " avx2" in f.read()
    if not (x86 and avx2 and "fbgemm" in torch.backends.quantized.supported_engines):
        pytest.skip("no FBGEMM here")
    assert hardware.cpu_half_weights_available()


@needs_half_kernel
@pytest.mark.parametrize("block", BLOCKS)
def test_half_weight_decoder_stays_close_to_the_fp32_forward(block):
    model = model_of(block)
    x = torch.randint(0, model.config.vocab_size, (1, 16))
    full, _ = model(x)
    decoder = Decoder(model, matrix_dtype=torch.float16)
    assert isinstance(decoder.head, HalfProduct)
    assert all(isinstance(p, HalfProduct) for layer in decoder.layers for p in layer[2:4] + layer[6:])
    cache = decoder.new_cache()
    got = [decoder.step(x[0, :9].tolist(), cache)] + [decoder.step([t], cache) for t in x[0, 9:].tolist()]
    for i, logits in zip(range(8, 16), got):
        assert logits.dtype == torch.float32
        # Only the weights are rounded to fp16 (relative 2**-11) and GELU takes its tanh
        # form (within ~5e-4): far inside this bound, while a wrong layout, a dropped
        # bias or a norm weight folded into the wrong product would be off by the logits' own size.
        torch.testing.assert_close(logits, full[0, i], atol=2e-3, rtol=2e-3)
        assert not torch.equal(logits, full[0, i])  # fp16 really used: not the fp32 path


@needs_half_kernel
@pytest.mark.parametrize("block", BLOCKS)
def test_weights_beyond_fp16_range_stay_fp32(block):
    model = model_of(block)
    with torch.no_grad():
        model.h[0].mlp.c_fc.weight[0, 0] = 1e6
    decoder = Decoder(model, matrix_dtype=torch.float16)
    fc = decoder.layers[0][6]
    assert isinstance(fc, Product) and fc.weight.dtype == torch.float32
    assert isinstance(decoder.layers[0][2], HalfProduct)


@needs_half_kernel
def test_half_product_falls_back_to_the_quantized_operator(monkeypatch):
    layer = torch.nn.Linear(24, 40)
    x = torch.randn(3, 24)
    fast = HalfProduct(layer)
    assert fast.plain_tensors
    monkeypatch.delattr(torch, "fbgemm_pack_gemm_matrix_fp16")  # as a release without it would be
    fallback = HalfProduct(layer)
    assert not fallback.plain_tensors
    with torch.no_grad():
        torch.testing.assert_close(fallback(x), fast(x), atol=1e-6, rtol=1e-6)  # the same kernel behind both
        torch.testing.assert_close(fallback(x), layer(x), atol=2e-3, rtol=2e-3)
    out = torch.empty(3, 40)
    assert fallback(x, out=out) is out


@needs_half_kernel
def test_big_half_products_use_the_threaded_operator(monkeypatch):
    layer = torch.nn.Linear(24, 40)
    x = torch.randn(3, 24)
    monkeypatch.setattr(HalfProduct, "THREADED_FROM", 24 * 40)  # as if this were an LM head
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    big = HalfProduct(layer)
    assert not big.plain_tensors
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # one thread: the cheaper call
    assert HalfProduct(layer).plain_tensors
    with torch.no_grad():
        torch.testing.assert_close(big(x), layer(x), atol=2e-3, rtol=2e-3)


@needs_half_kernel
@pytest.mark.parametrize("bias", [True, False])
def test_many_rows_on_two_threads_take_the_threaded_call_with_the_same_bits(monkeypatch, bias):
    # A server's batch of 16 rows or more on two threads goes through the threaded call;
    # each row must come out as the plain call makes it alone, or a request's tokens
    # would depend on its company.
    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 200, bias=bias)
    product = HalfProduct(layer)
    assert product.plain_tensors
    x = torch.randn(40, 96)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            alone = torch.cat([product(row.view(1, -1)) for row in x])
        calls = []
        real = torch.ops.quantized.linear_dynamic_fp16
        monkeypatch.setattr(torch.ops.quantized, "linear_dynamic_fp16", lambda *a: calls.append(1) or real(*a))
        torch.set_num_threads(2)
        with torch.no_grad():
            for rows in (1, 3, 15, 16, 17, 33, 40):
                assert torch.equal(product(x[:rows]), alone[:rows]), rows
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 4  # the batches of 16 rows and more, and only those


@needs_half_kernel
def test_packing_never_changes_the_models_weights():
    layer = torch.nn.Linear(8, 4)
    with torch.no_grad():
        layer.weight[0, 0] = 7e4  # beyond fp16: the packer clamps its input in place
    before = layer.weight.detach().clone()
    HalfProduct(layer)
    assert torch.equal(layer.weight, before)


def test_no_half_kernel_means_no_half_weights(monkeypatch):
    monkeypatch.delattr(torch, "fbgemm_pack_gemm_matrix_fp16")
    monkeypatch.setattr(torch.ops.quantized, "linear_prepack_fp16", None, raising=False)
    assert half_products_work() is False


@pytest.mark.parametrize("native_bf16", [False, True])
def test_cpu_runtime_trains_in_bf16_only_where_native_and_generates_in_fp32(monkeypatch, native_bf16):
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: native_bf16)
    exact = hardware.detect_runtime("cpu", "fp32")  # exact on request
    assert exact.autocast_dtype is exact.decode_weights is None and exact.decode_dtype == torch.float32
    monkeypatch.setattr(hardware, "cpu_half_weights_available", lambda: False)
    plain = hardware.detect_runtime("cpu")
    assert plain.decode_weights is None and plain.decode_dtype == torch.float32  # no kernel: fp32 weights
    assert plain.autocast_dtype == (torch.bfloat16 if native_bf16 else None)
    monkeypatch.setattr(hardware, "cpu_half_weights_available", lambda: True)
    auto = hardware.detect_runtime("cpu")
    assert auto.decode_weights == torch.float16 and auto.decode_dtype == torch.float32
    assert auto.autocast_dtype == (torch.bfloat16 if native_bf16 else None)
    assert "fp16" in auto.reason and ("bf16 autocast" in auto.reason) == native_bf16
    if native_bf16:
        assert hardware.detect_runtime("cpu", "bf16").decode_weights == torch.float16
    else:
        with pytest.raises(ValueError, match="no native bf16"):
            hardware.detect_runtime("cpu", "bf16")


def test_generator_accepts_a_model_built_under_inference_mode(tiny_config):
    from response_generator import GenerationConfig, ResponseGenerator
    with torch.inference_mode():
        model = GPT(tiny_config)
    gen = ResponseGenerator.from_model(model, type("Tok", (), {"eot_id": -1})(),
                                       hardware.detect_runtime("cpu", "fp32"))
    settings = GenerationConfig(max_new_tokens=5, temperature=0, seed=0)
    assert len(list(gen.generate_ids([1, 2, 3], settings))) == 5
    assert gen._decoder() is gen._decoder()


@pytest.mark.parametrize("block", BLOCKS)
def test_generator_rebuilds_its_decoder_after_the_weights_change(block):
    from response_generator import ResponseGenerator
    model = model_of(block)
    gen = ResponseGenerator.from_model(model, None, hardware.detect_runtime("cpu", "fp32"))
    first = gen._decoder()
    assert gen._decoder() is first  # unchanged weights: reused
    x = torch.randint(0, model.config.vocab_size, (1, 6))
    with torch.no_grad():
        model.h[0].mlp.c_fc.weight.mul_(2.0)  # an in-place update, as an optimizer step makes
        model.ln_f.weight.mul_(0.5)  # and one to a weight that llama's Decoder folds into the head
    second = gen._decoder()
    assert second is not first
    full, _ = model(x)
    torch.testing.assert_close(second.step(x[0].tolist(), second.new_cache()), full[0, -1], atol=1e-5, rtol=1e-5)


def test_rms_norm_rows_are_f_rms_norm_up_to_the_factor_and_each_row_by_itself():
    norm = RowRMSNorm(64, 1e-5, torch.device("cpu"))
    x = torch.randn(300, 64) * torch.rand(300, 1) * 3
    x[0] = 1e-4  # a row so small that eps matters
    torch.testing.assert_close(norm(x) * norm.factor, F.rms_norm(x, (64,), None, 1e-5), atol=1e-6, rtol=1e-5)
    whole = norm(x)
    assert all(torch.equal(norm(x[:m]), whole[:m]) for m in (1, 2, 7, 16, 31, 32, 33, 100, 299))


@needs_half_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("block", BLOCKS)
def test_a_sequence_gets_the_same_logits_alone_and_in_any_batch(block, monkeypatch, threads):
    """With fp16 weights every part of a step is row-wise (decoder.py's docstring): a
    sequence's logits are bit-identical whether it steps alone or beside others, in
    prefill chunks or single tokens, whatever the others are doing. Steps where every
    sequence feeds one token take their own path (``Decoder._generating``): it must run.
    The batches also run on two threads, as a server's big steps may (its products of
    16 rows and more then take FBGEMM's threaded call), the sequences alone on one."""
    model = model_of(block, d_model=64, n_head=4, context=40)
    decoder = Decoder(model, matrix_dtype=torch.float16)
    generating = []
    monkeypatch.setattr(decoder, "_generating", lambda feeds: generating.append(len(feeds))
                        or Decoder._generating(decoder, feeds))
    seqs = [torch.randint(0, 97, (n,)).tolist() for n in (30, 7, 1, 18, 25, 22, 16, 28)]
    alone = []
    for s in seqs:
        cache = decoder.new_cache()
        alone.append([decoder.step(s[i:i + 6], cache) for i in range(0, min(len(s), 12), 6)]
                     + [decoder.step([t], cache) for t in s[12:]])
    caches = [decoder.new_cache() for _ in seqs]
    fed, steps = [0] * len(seqs), [0] * len(seqs)
    rows = []
    real = torch.ops.quantized.linear_dynamic_fp16
    monkeypatch.setattr(torch.ops.quantized, "linear_dynamic_fp16", lambda x, w: rows.append(len(x)) or real(x, w))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        batched(decoder, seqs, caches, alone, fed, steps, block)
    finally:
        torch.set_num_threads(before)
    assert fed == [len(s) for s in seqs]
    assert bool(rows) == (threads > 1) and all(n >= HalfProduct.THREADED_ROWS for n in rows)
    if decoder.qk_norm is None:  # QK-norm's per-head norm keeps to the general path
        assert max(generating) >= 3, generating  # several sequences generating at once went this way


def batched(decoder, seqs, caches, alone, fed, steps, block) -> None:
    """Step the sequences together in a changing company, checking each row against ``alone``."""
    for round_ in range(40):
        # a changing company: a sequence joins late, another skips rounds
        live = [b for b in range(len(seqs)) if fed[b] < len(seqs[b]) and round_ >= b and (b != 3 or round_ % 3)]
        if not live and all(f == len(s) for f, s in zip(fed, seqs)):
            break
        if not live:
            continue
        feeds = [Feed(seqs[b][fed[b]:fed[b] + (6 if fed[b] < 12 else 1)], caches[b]) for b in live]
        logits = decoder.step_many(feeds)
        for row, b in enumerate(live):
            fed[b] += len(feeds[row].ids)
            assert torch.equal(logits[row], alone[b][steps[b]]), (block, b, steps[b])
            steps[b] += 1


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_windowed_streamer_equals_decoding_everything(kind):
    tok = train_tokenizer(kind, list(chunk_text(SAMPLE_TEXT, 400)), 320)
    text = "  The miller's  café — naïve 日本語 😀 \n\nUser: hi\nAI: fine  " * 3
    ids = tok.encode(text)
    streamer = TextStreamer(tok)
    pieces = [streamer.push(i) for i in ids] + [streamer.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert streamer.start > 0  # the window did move on
    chat = TextStreamer(tok, CHAT_STOPS)
    shown = "".join(chat.push(i) for i in ids) + chat.flush()
    assert chat.stopped and shown == text[:text.index("\nUser:")]


def test_cpu_allocator_setting_is_harmless():
    assert hardware.configure_cpu_allocator() in (True, False)
    assert torch.ones(1 << 22).sum().item() == float(1 << 22)  # a 16 MB tensor still allocates


@pytest.mark.parametrize("block", BLOCKS)
def test_a_caches_position_views_are_made_once_and_see_its_rows(block):
    """KVCache.at: per layer, the row a step at a position writes and the q, k, v it reads,
    made on first use and then the very same views."""
    model = model_of(block, d_model=32, n_head=2, context=12)
    cache = Decoder(model, matrix_dtype=torch.float16).new_cache()
    views = cache.at(4)
    assert cache.at(4) is views and len(views) == model.config.n_layer
    C, H = model.config.d_model, model.config.n_head
    for layer, at in enumerate(views):
        at.row.copy_(torch.arange(3 * C, dtype=at.row.dtype).view(1, 3 * C))
        assert torch.equal(at.q.reshape(-1), cache.rows[layer, 4, :C])
        assert at.k.shape == at.v.shape == (1, H, 5, C // H)  # positions 0..4
        assert torch.equal(at.k[0, :, 4].reshape(-1), cache.rows[layer, 4, C:2 * C])
        assert torch.equal(at.v[0, :, 4].reshape(-1), cache.rows[layer, 4, 2 * C:])
        assert (at.pairs is not None) == (block != "gpt2")  # llama in fp32: its complex pairs


def test_an_emulated_avx2_cpu_has_no_native_bf16(monkeypatch):
    """ATEN_CPU_CAPABILITY=avx2 keeps PyTorch's kernels to AVX2: bf16 is then slow whatever
    /proc/cpuinfo says, so the runtime trains in fp32, as on a real AVX2-only CPU."""
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert hardware.cpu_has_native_bf16() is False
    assert hardware.detect_runtime("cpu").autocast_dtype is None
    with pytest.raises(ValueError, match="no native bf16"):
        hardware.detect_runtime("cpu", "bf16")
