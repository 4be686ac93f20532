"""The llama block: rotary positions, RMSNorm, SwiGLU, no biases; and what it shares with gpt2."""
import pytest
import torch

from engine.model.config import ModelConfig, swiglu_width
from engine.model.gpt import GPT, apply_rotary, rotary_tables

LLAMA = dict(vocab_size=300, context=32, d_model=64, n_layer=2, n_head=4, dropout=0.0, arch="llama")


@pytest.fixture(params=[False, True], ids=["plain", "qk_norm"])
def llama(request):
    torch.manual_seed(0)
    return GPT(ModelConfig(**LLAMA, qk_norm=request.param)).eval()


def test_the_block_has_no_biases_no_position_table_and_gpt2s_parameter_budget():
    model = GPT(ModelConfig(**{**LLAMA, "d_model": 192, "n_head": 3}))
    names = dict(model.named_parameters())
    assert model.wpe is None and not any(n.endswith("bias") for n in names)
    assert names["h.0.mlp.c_fc.weight"].shape == (2 * swiglu_width(192), 192)  # [gate | up]
    gpt2 = GPT(ModelConfig(**{**LLAMA, "d_model": 192, "n_head": 3, "arch": "gpt2"}))
    block = sum(p.numel() for p in model.h[0].parameters())
    assert abs(block - sum(p.numel() for p in gpt2.h[0].parameters())) / block < 0.01
    assert not any("rotary" in k for k in model.state_dict())  # derived from the config, never saved


def test_a_later_token_never_changes_an_earlier_logit(llama):
    x = torch.randint(0, 300, (1, 32))
    y = x.clone()
    y[0, 20:] = (y[0, 20:] + 7) % 300
    assert torch.allclose(llama(x)[0][0, :20], llama(y)[0][0, :20], atol=1e-6)


def test_packed_examples_see_exactly_what_they_see_alone(llama):
    x = torch.randint(0, 300, (1, 32))
    segments = torch.tensor([[1] * 12 + [2] * 20])
    packed, _ = llama(x, segments=segments)
    alone, _ = llama(x[:, 12:])
    assert torch.allclose(packed[0, 12:], alone[0], atol=1e-5)


def test_rotary_scores_depend_only_on_the_distance_between_positions():
    cfg = ModelConfig(**LLAMA)
    cos, sin = rotary_tables(cfg)
    q, k = torch.randn(cfg.head_dim), torch.randn(cfg.head_dim)

    def score(i, j):
        return float(apply_rotary(q, cos[i], sin[i]) @ apply_rotary(k, cos[j], sin[j]))

    assert score(5, 2) == pytest.approx(score(20, 17), rel=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)
    assert torch.allclose(apply_rotary(q, cos[0], sin[0]), q)  # position 0 is no rotation


def test_old_configs_read_as_gpt2_and_wrong_settings_are_refused():
    old = {"vocab_size": 300, "context": 32, "d_model": 64, "n_layer": 2, "n_head": 4, "d_ff": 256, "dropout": 0.1}
    assert ModelConfig.from_dict(old).arch == "gpt2"
    with pytest.raises(ValueError, match="qk_norm needs arch llama"):
        ModelConfig(vocab_size=300, qk_norm=True)
    with pytest.raises(ValueError, match="even head size"):
        ModelConfig(vocab_size=300, d_model=30, n_head=2, arch="llama")


def test_a_llama_model_trains(llama):
    llama.train()
    opt = torch.optim.AdamW(llama.parameters(), lr=3e-3)
    x = torch.randint(0, 300, (4, 32))
    first = None
    for _ in range(30):
        _, loss = llama(x, x)
        first = first if first is not None else float(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert float(loss) < 0.5 * first
