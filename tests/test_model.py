"""The transformer itself: causality, the KV cache, vocabulary resizing, config checks."""
import pytest
import torch

from engine.model.decoder import Feed
from model import GPT, Decoder, ModelConfig

# The two blocks (and llama with QK-norm) the Decoder must compute as GPT.forward does.
BLOCKS = {"gpt2": {}, "llama": {"arch": "llama"}, "llama-qk_norm": {"arch": "llama", "qk_norm": True}}


def model_of(block: str, **shape) -> GPT:
    """A tiny eval-mode model of ``block``, its norm weights and biases drawn at random
    (they start at 1 and 0, where folding them somewhere wrong would change nothing)."""
    values = dict(vocab_size=97, context=24, d_model=32, n_layer=2, n_head=2, dropout=0.0)
    torch.manual_seed(1234)
    model = GPT(ModelConfig(**{**values, **shape, **BLOCKS[block]})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name or "norm" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.uniform_(-0.2, 0.2)
    return model


@pytest.fixture(params=list(BLOCKS))
def any_model(request) -> GPT:
    return model_of(request.param)


def test_later_tokens_never_change_earlier_logits(tiny_model, tiny_config):
    x = torch.randint(0, tiny_config.vocab_size, (2, 16))
    y = x.clone()
    y[:, 10:] = torch.randint(0, tiny_config.vocab_size, (2, 6))
    a, _ = tiny_model(x)
    b, _ = tiny_model(y)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_decoder_matches_the_full_forward(any_model):
    x = torch.randint(0, any_model.config.vocab_size, (1, 20))
    ids = x[0].tolist()
    full, _ = any_model(x)
    decoder = Decoder(any_model)
    cache = decoder.new_cache()
    # A prefill, a multi-token chunk after a prefix (needs the offset causal mask), then single steps.
    got = {6: decoder.step(ids[:7], cache), 11: decoder.step(ids[7:12], cache)}
    for i in range(12, 20):
        got[i] = decoder.step([ids[i]], cache)
    assert cache.pos == 20
    for i, logits in got.items():
        assert logits.shape == (any_model.config.vocab_size,)
        torch.testing.assert_close(logits, full[0, i], atol=1e-5, rtol=1e-5)


def test_decoder_refuses_to_overflow_and_restarts_after_reset(any_model):
    decoder = Decoder(any_model)
    cache = decoder.new_cache()
    ids = list(range(any_model.config.context))
    decoder.step(ids, cache)
    with pytest.raises(ValueError, match="context is 24"):
        decoder.step([1], cache)
    cache.reset()
    full, _ = any_model(torch.tensor([ids[:5]]))
    torch.testing.assert_close(decoder.step(ids[:5], cache), full[0, -1], atol=1e-5, rtol=1e-5)


def test_many_sequences_in_one_step_match_the_full_forward(any_model):
    """step_many: prompts of different lengths and positions, chunks after a prefix and
    single tokens, in one pass; each sequence's logits are the full forward's."""
    vocab = any_model.config.vocab_size
    seqs = [torch.randint(0, vocab, (n,)).tolist() for n in (20, 9, 3, 14)]
    fulls = [any_model(torch.tensor([s]))[0][0] for s in seqs]
    decoder = Decoder(any_model)
    caches = [decoder.new_cache() for _ in seqs]
    fed = [0] * len(seqs)
    for chunk in (5, 1, 4, 1, 1, 3, 1, 1, 1, 1, 1, 1, 1):  # each sequence takes what is left of the chunk
        live = [b for b, s in enumerate(seqs) if fed[b] < len(s)]
        if not live:
            break
        feeds = [Feed(seqs[b][fed[b]:fed[b] + chunk], caches[b]) for b in live]
        logits = decoder.step_many(feeds)
        assert logits.shape == (len(live), vocab)
        for row, b in enumerate(live):
            fed[b] += len(feeds[row].ids)
            torch.testing.assert_close(logits[row], fulls[b][fed[b] - 1], atol=1e-5, rtol=1e-5)
    assert fed == [len(s) for s in seqs] and [c.pos for c in caches] == fed


def test_decoder_in_bf16_stays_close_to_fp32(any_model):
    x = torch.randint(0, any_model.config.vocab_size, (1, 12))
    full, _ = any_model(x)
    decoder = Decoder(any_model, torch.bfloat16)
    logits = decoder.step(x[0].tolist(), decoder.new_cache())
    assert logits.dtype == torch.float32
    assert decoder.head.weight.dtype == torch.bfloat16
    torch.testing.assert_close(logits, full[0, -1], atol=0.05, rtol=0.05)


def test_loss_is_cross_entropy_and_tied_head(tiny_model, tiny_config):
    x = torch.randint(0, tiny_config.vocab_size, (2, 8))
    logits, loss = tiny_model(x, x)
    expected = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), x.view(-1))
    torch.testing.assert_close(loss, expected)
    assert tiny_model.lm_head.weight is tiny_model.wte.weight


def test_resize_keeps_old_rows_and_old_logits(tiny_model, tiny_config):
    x = torch.randint(0, tiny_config.vocab_size, (1, 12))
    before, _ = tiny_model(x)
    old_rows = tiny_model.wte.weight.detach().clone()
    old_size = tiny_config.vocab_size
    tiny_model.resize_vocab(old_size + 13)
    after, _ = tiny_model(x)
    assert tiny_model.wte.weight.shape[0] == old_size + 13 == tiny_model.config.vocab_size
    assert torch.equal(tiny_model.wte.weight[: old_rows.shape[0]], old_rows)
    assert tiny_model.lm_head.weight is tiny_model.wte.weight
    # Every old token's logit is unchanged (up to matmul blocking); only columns are added.
    torch.testing.assert_close(after[..., : old_rows.shape[0]], before, atol=1e-6, rtol=0)


def test_resize_rejects_shrinking(tiny_model, tiny_config):
    with pytest.raises(ValueError, match="cannot shrink"):
        tiny_model.resize_vocab(tiny_config.vocab_size - 1)


@pytest.mark.parametrize("bad, message", [
    (dict(d_model=30, n_head=4), "not divisible"),
    (dict(n_layer=0), "n_layer must be a positive integer"),
    (dict(dropout=1.5), "dropout"),
    (dict(vocab_size=10**9), "exceeds"),
    (dict(d_model=65536, n_layer=1000, n_head=1), "too large"),
    (dict(d_model="256"), "d_model must be a positive integer"),
])
def test_config_validation_names_the_problem(bad, message):
    values = dict(vocab_size=100, d_model=32, n_layer=1, n_head=2)
    values.update(bad)
    with pytest.raises(ValueError, match=message):
        ModelConfig(**values)


def test_config_round_trip_and_unknown_keys():
    cfg = ModelConfig(vocab_size=100, d_model=32, n_layer=1, n_head=2)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.d_ff == 128
    with pytest.raises(ValueError, match="unknown model config keys: evil"):
        ModelConfig.from_dict({**cfg.to_dict(), "evil": "os.system"})


def test_param_groups_do_not_decay_biases_or_norms(tiny_model):
    decay, no_decay = tiny_model.param_groups(0.01)
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    total = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert total == tiny_model.num_params()


def test_dropout_only_in_training():
    cfg = ModelConfig(vocab_size=50, context=16, d_model=32, n_layer=1, n_head=2, dropout=0.5)
    model = GPT(cfg)
    x = torch.randint(0, 50, (1, 16))
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])
    model.train()
    assert not torch.equal(model(x)[0], model(x)[0])
