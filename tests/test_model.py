"""The transformer itself: causality, the KV cache, vocabulary resizing, config checks."""
import pytest
import torch

from model import GPT, KVCache, ModelConfig


def test_later_tokens_never_change_earlier_logits(tiny_model, tiny_config):
    x = torch.randint(0, tiny_config.vocab_size, (2, 16))
    y = x.clone()
    y[:, 10:] = torch.randint(0, tiny_config.vocab_size, (2, 6))
    a, _ = tiny_model(x)
    b, _ = tiny_model(y)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_cached_forward_matches_full_forward(tiny_model, tiny_config):
    x = torch.randint(0, tiny_config.vocab_size, (1, 20))
    full, _ = tiny_model(x)
    cache = KVCache(tiny_config, 1, "cpu")
    parts = [tiny_model(x[:, :7], kv_cache=cache)[0],  # prefill
             tiny_model(x[:, 7:12], kv_cache=cache)[0],  # a multi-token chunk after a prefix
             *[tiny_model(x[:, i:i + 1], kv_cache=cache)[0] for i in range(12, 20)]]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.pos == 20


def test_cache_refuses_to_overflow(tiny_model, tiny_config):
    cache = KVCache(tiny_config, 1, "cpu")
    tiny_model(torch.zeros(1, tiny_config.max_seq_len, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="context is 24"):
        tiny_model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)


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
    cfg = ModelConfig(vocab_size=50, max_seq_len=16, d_model=32, n_layer=1, n_head=2, dropout=0.5)
    model = GPT(cfg)
    x = torch.randint(0, 50, (1, 16))
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])
    model.train()
    assert not torch.equal(model(x)[0], model(x)[0])
