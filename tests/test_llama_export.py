"""A llama-block model exported: LlamaForCausalLM in transformers, the GGUF llama graph in llama.cpp."""
import numpy as np
import pytest
import torch

from engine.data.chat_format import render
from engine.data.sources import source_from_text
from engine.export.gguf_file import _interleave_heads, gguf_tensors, named_arrays
from engine.export.model_export import export_model
from engine.folder.model_folder import ModelFolder
from engine.runtime import storage
from trainer import Trainer

from conftest import SAMPLE_TEXT, TINY_MODEL, TINY_TRAIN
from test_export import (
    CONVERSATION,
    MULTILINGUAL,
    PROMPTS,
    assert_llama_cpp_continues_like,
    greedy_ids,
    without_amx_repacking,
)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tiny llama-block model, trained a little and marked as chat-tuned (for the template)."""
    folder = tmp_path_factory.mktemp("llama") / "model"
    Trainer(str(folder), "bpe", model_overrides={**TINY_MODEL, "arch": "llama"},
            train_overrides=TINY_TRAIN).train(source_from_text(SAMPLE_TEXT), 2)
    meta = storage.read_json(folder / "config.json")
    storage.write_json(folder / "config.json", dict(meta, chat_tuned=True))
    return folder


def test_hf_export_is_our_model_as_llama_in_transformers(llama_folder, tmp_path):
    transformers = pytest.importorskip("transformers")
    report = export_model(llama_folder, "hf", tmp_path / "hf")
    assert report.chat_template
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert type(hf_model).__name__ == "LlamaForCausalLM"
    assert hf_model.lm_head.weight is hf_model.model.embed_tokens.weight  # tied, stored once
    assert not any(name.endswith("bias") for name, _ in hf_model.named_parameters())
    model, tok, _ = ModelFolder(llama_folder).load_model()
    model.eval()
    ids = tok.encode(MULTILINGUAL)[:model.config.context]
    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids])).logits
        mine, _ = model(torch.tensor([ids]))
    assert (theirs - mine).abs().max().item() < 1e-4
    for prompt in PROMPTS:
        prompt_ids = tok.encode(prompt)
        n = model.config.context - len(prompt_ids)
        expected, margins = greedy_ids(model, prompt_ids, n)
        out = hf_model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=n,
                                pad_token_id=tok.pad_id, eos_token_id=None)[0, len(prompt_ids):].tolist()
        sure = next((i for i, m in enumerate(margins) if m < 1e-4), n)
        assert out[:sure] == expected[:sure]
    expected, _ = render(tok, tok.chat_token_ids(), CONVERSATION, open_reply=True)
    got = hf_tok.apply_chat_template([m.to_dict() for m in CONVERSATION], add_generation_prompt=True, tokenize=True)
    assert (got["input_ids"] if hasattr(got, "keys") else got) == expected


def test_gguf_llama_graph_has_split_and_reordered_projections(llama_folder, tmp_path):
    from gguf import GGUFReader

    export_model(llama_folder, "gguf", tmp_path / "model.gguf", "f32")
    reader = GGUFReader(str(tmp_path / "model.gguf"))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "llama"
    tensors = {t.name: np.asarray(t.data).reshape(tuple(reversed(t.shape.tolist()))) for t in reader.tensors}
    model, _, _ = ModelFolder(llama_folder).load_model()
    c, state = model.config, model.state_dict()
    assert "output.weight" not in tensors and not any("bias" in name for name in tensors)
    q = state["h.0.attn.c_attn.weight"][:c.d_model].numpy()
    assert np.array_equal(tensors["blk.0.attn_q.weight"], _interleave_heads(q, c.n_head))
    assert np.array_equal(tensors["blk.0.ffn_gate.weight"], state["h.0.mlp.c_fc.weight"][:c.d_ff].numpy())
    # The reordering pairs channel i of each head with channel i + D/2, as our rotation does.
    d = c.head_dim
    rows = _interleave_heads(np.arange(c.d_model)[:, None], c.n_head)[:d, 0]
    assert rows.tolist() == [j for i in range(d // 2) for j in (i, i + d // 2)]


def ours_from_gguf(model, dtype: str) -> None:
    """Give ``model`` the weights a GGUF file of ``dtype`` holds, put back into our layout."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize

    c = model.config
    kinds = {"f32": T.F32, "f16": T.F16, "q8_0": T.Q8_0}
    shapes = {name: a.shape for name, a in named_arrays(model).items()}
    read = {name: np.asarray(dequantize(t.data, kinds[t.dtype]), dtype=np.float32).reshape(shapes[name])
            for name, t in gguf_tensors(model, dtype).items()}

    def plain(w):  # undo _interleave_heads
        return w.reshape(c.n_head, w.shape[0] // c.n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    state = {"wte.weight": read["token_embd.weight"], "lm_head.weight": read["token_embd.weight"],
             "ln_f.weight": read["output_norm.weight"]}
    for i in range(c.n_layer):
        b = f"blk.{i}."
        state.update({
            f"h.{i}.ln_1.weight": read[b + "attn_norm.weight"], f"h.{i}.ln_2.weight": read[b + "ffn_norm.weight"],
            f"h.{i}.attn.c_attn.weight": np.concatenate([plain(read[b + "attn_q.weight"]),
                                                         plain(read[b + "attn_k.weight"]), read[b + "attn_v.weight"]]),
            f"h.{i}.attn.c_proj.weight": read[b + "attn_output.weight"],
            f"h.{i}.mlp.c_fc.weight": np.concatenate([read[b + "ffn_gate.weight"], read[b + "ffn_up.weight"]]),
            f"h.{i}.mlp.c_proj.weight": read[b + "ffn_down.weight"],
        })
    model.load_state_dict({name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in state.items()})


@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_llama_cpp_continues_like_ours(llama_folder, tmp_path, monkeypatch, dtype):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is an optional extra "
                                    "(requirements-llama.txt, scripts/install_llama_cpp.sh)")
    without_amx_repacking(llama_cpp, monkeypatch)
    export_model(llama_folder, "gguf", tmp_path / "model.gguf", dtype)
    model, tok, _ = ModelFolder(llama_folder).load_model()
    model.eval()
    ours_from_gguf(model, dtype)
    context = model.config.context
    llm = llama_cpp.Llama(str(tmp_path / "model.gguf"), n_ctx=context, n_threads=1, verbose=False)
    assert_llama_cpp_continues_like(model, tok, llm)
