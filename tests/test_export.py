"""Export of the GPT-2 block (old folders, --arch gpt2; tests/test_llama_export.py has the llama one): the
Hugging Face folder in real transformers, the GGUF file read back and in llama.cpp,
and the rules for where an export may be written."""
import shutil

import numpy as np
import pytest
import torch

from benchlib.llama_race import plain_cpu_buffers
from engine.data.chat_format import Message, render
from engine.export.gguf_file import fallback_note, gguf_name, gguf_tensors
from engine.export.model_export import DestinationInUse, check_destination, dtype_in_force, export_model
from engine.folder.model_folder import ModelFolder
from engine.runtime import hardware, storage
from model import GPT, ModelConfig
from response_generator import GenerationConfig, ResponseGenerator

# Scripts the tiny tokenizers never saw (byte fallback), emoji with a modifier, a combining
# accent, tabs, runs of spaces and newlines.
MULTILINGUAL = ("The river ran past the old mill. Grüße aus Köln! Ça va? 東京は晴れ。Привет, мир. "
                "مرحبا 😀👍🏽 e\u0301 \tx  two  spaces\n\nnew line ")
PROMPTS = ["The river ran past the old mill", "In spring the orchard", "A careful student reads"]
CONVERSATION = [Message("system", "Be brief."), Message("user", "Where did the river run?"),
                Message("assistant", "Past the mill."), Message("user", "Tell me  more\n(please) 😀")]


@pytest.fixture(scope="module")
def chat_model(trained_once, tmp_path_factory):
    """A trained model per tokenizer kind, marked as fine-tuned on conversations."""
    made = {}

    def get(kind):
        if kind not in made:
            folder = tmp_path_factory.mktemp(f"chat-{kind}") / "model"
            shutil.copytree(trained_once(kind, 2, arch="gpt2"), folder)
            meta = storage.read_json(folder / "config.json")
            storage.write_json(folder / "config.json", dict(meta, chat_tuned=True))
            made[kind] = folder
        return made[kind]

    return get


def greedy(n: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_hf_export_is_our_model_in_transformers(chat_model, tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    folder = chat_model(kind)
    report = export_model(folder, "hf", tmp_path / "hf")
    assert report.chat_template and "model.safetensors" in report.files
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = ResponseGenerator(str(folder), hardware.detect_runtime("cpu", "fp32"))
    tok, context = ours.tokenizer, ours.context
    assert hf_model.config.activation_function == "gelu" and hf_model.config.n_ctx == context
    assert hf_model.config.tie_word_embeddings and hf_model.lm_head.weight is hf_model.transformer.wte.weight

    ids = tok.encode(MULTILINGUAL)
    assert hf_tok(MULTILINGUAL, add_special_tokens=False)["input_ids"] == ids
    assert hf_tok.decode(ids) == tok.decode(ids) == MULTILINGUAL

    window = torch.tensor([ids[:context]])
    with torch.no_grad():
        theirs = hf_model(window).logits
        mine, _ = ours.model(window)
    assert (theirs - mine).abs().max().item() < 1e-4

    for prompt in PROMPTS:
        prompt_ids = tok.encode(prompt)
        n = context - len(prompt_ids)
        expected = list(ours.generate_ids(prompt_ids, greedy(n)))
        out = hf_model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=n,
                                pad_token_id=tok.pad_id)[0, len(prompt_ids):].tolist()
        assert out[:len(expected)] == expected
        if len(expected) < n:  # ours stopped at an end token without yielding it; theirs emits it
            assert out[len(expected)] in (tok.eot_id, tok.chat_token_ids().end)

    # The template renders exactly our chat prompt, special tokens as their ids...
    chat_ids = tok.chat_token_ids()
    expected, _ = render(tok, chat_ids, CONVERSATION, open_reply=True)
    got = hf_tok.apply_chat_template([m.to_dict() for m in CONVERSATION], add_generation_prompt=True, tokenize=True)
    got = got["input_ids"] if hasattr(got, "keys") else got
    assert got == expected
    # ...while in our app, a user who types a special token's spelling gets ordinary text.
    assert chat_ids.user not in tok.encode("<|user|>")
    assert hf_tok("<|user|>", add_special_tokens=False)["input_ids"] == [chat_ids.user]


def test_a_model_without_chat_format_exports_no_template(trained_once, tmp_path):
    report = export_model(trained_once("bpe", 2, arch="gpt2"), "hf", tmp_path / "hf")
    config = storage.read_json(tmp_path / "hf" / "tokenizer_config.json")
    assert not report.chat_template and "chat_template" not in config
    assert config["eos_token"] == "<|endoftext|>" and config["add_bos_token"] is False
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "hf" / "model.safetensors")
    model, _, _ = ModelFolder(trained_once("bpe", 2, arch="gpt2")).load_model()
    assert "lm_head.weight" not in weights and "transformer.lm_head.weight" not in weights
    assert torch.equal(weights["transformer.h.0.attn.c_attn.weight"], model.h[0].attn.c_attn.weight.t())
    assert torch.equal(weights["transformer.wte.weight"], model.wte.weight)


def expected_gguf_type(name: str, array: np.ndarray, dtype: str):
    """What each tensor must be in the file, as llama.cpp's converter chooses it."""
    from gguf import GGMLQuantizationType as T

    if array.ndim == 1 or name == "position_embd.weight":
        return T.F32
    if dtype == "q8_0" and array.shape[-1] % 32:
        return T.F16
    return {"f32": T.F32, "f16": T.F16, "q8_0": T.Q8_0}[dtype]


def assert_within_q8_0_error(theirs: np.ndarray, ours: np.ndarray, name: str) -> None:
    """Q8_0 keeps, per block of 32 values, an f16 scale d = max|x| / 127 and round(x / d):
    each value is off by at most d / 2, plus 127 times the scale's own f16 rounding (2**-11 d)."""
    blocks, got = ours.reshape(-1, 32), theirs.reshape(-1, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127
    assert (np.abs(got - blocks) <= d * (0.5 + 127 * 2.0 ** -11) + 1e-12).all(), name


@pytest.mark.parametrize("kind,dtype", [("bpe", "f32"), ("sentencepiece", "f16"), ("bpe", "q8_0")])
def test_gguf_reads_back_with_every_tensor_and_key(chat_model, tmp_path, kind, dtype):
    from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType, TokenType
    from gguf.quants import dequantize

    folder = chat_model(kind)
    path = tmp_path / "model.gguf"
    report = export_model(folder, "gguf", path, dtype)
    assert bool(report.notes) == (kind == "sentencepiece")  # llama.cpp may split SentencePiece text otherwise
    model, tok, _ = ModelFolder(folder).load_model()
    reader = GGUFReader(str(path))

    tensors = {t.name: t for t in reader.tensors}
    expected = {gguf_name(k): v.numpy() for k, v in model.state_dict().items() if gguf_name(k)}
    assert set(tensors) == set(expected) and "output.weight" not in tensors
    for name, ours in expected.items():
        written = tensors[name]
        assert written.tensor_type == expected_gguf_type(name, ours, dtype), name
        assert tuple(int(n) for n in reversed(written.shape)) == ours.shape, name  # ggml lists dims innermost first
        if written.tensor_type == GGMLQuantizationType.Q8_0:
            assert_within_q8_0_error(dequantize(written.data, written.tensor_type), ours, name)
            continue
        if written.tensor_type == GGMLQuantizationType.F16:
            ours = ours.astype(np.float16)  # the rounding f16 export does, and nothing more
        assert written.data.dtype == ours.dtype and np.array_equal(written.data, ours), name
    if dtype == "q8_0":  # the tiny model's rows are 32 or 128 long: every matrix but one takes Q8_0
        assert sum(t.tensor_type == GGMLQuantizationType.Q8_0 for t in tensors.values()) == len(
            [a for a in expected.values() if a.ndim == 2]) - 1

    def value(key):
        field = reader.fields[key]
        if len(field.data) > 1:
            return [field.contents(i) for i in range(len(field.data))]
        return field.contents()

    c = model.config
    assert value("general.architecture") == "gpt2"
    assert value("general.file_type") == {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
                                          "q8_0": LlamaFileType.MOSTLY_Q8_0}[dtype]
    assert (value("gpt2.context_length"), value("gpt2.embedding_length"), value("gpt2.block_count"),
            value("gpt2.feed_forward_length"), value("gpt2.attention.head_count")) == (
        c.context, c.d_model, c.n_layer, c.d_ff, c.n_head)
    assert value("gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    assert value("tokenizer.ggml.bos_token_id") == value("tokenizer.ggml.eos_token_id") == tok.eot_id
    assert value("tokenizer.ggml.add_bos_token") is False
    assert value("tokenizer.ggml.eot_token_id") == tok.chat_token_ids().end
    assert "<|user|>" in value("tokenizer.chat_template")
    tokens, types = reader.fields["tokenizer.ggml.tokens"], value("tokenizer.ggml.token_type")
    assert len(tokens.data) == tok.vocab_size
    assert types[tok.eot_id] == types[tok.chat_token_ids().user] == TokenType.CONTROL
    if kind == "bpe":
        assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
        ids = range(tok.vocab_size)
        assert [tokens.contents(i) for i in ids] == [tok.id_to_piece(i) for i in ids]
        assert all(" " in m for m in value("tokenizer.ggml.merges"))
    else:
        assert value("tokenizer.ggml.model") == "llama" and value("tokenizer.ggml.add_space_prefix") is False
        byte_a = tok.encode("\U0001F600")[0]  # an emoji the tiny vocabulary lacks: a byte piece
        assert types[byte_a] == TokenType.BYTE and len(value("tokenizer.ggml.scores")) == tok.vocab_size


def test_q8_0_writes_f16_where_rows_are_not_whole_blocks():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=97, context=24, d_model=48, n_layer=2, n_head=2, dropout=0.0))
    tensors = gguf_tensors(model, "q8_0")
    # Rows of 48 values cannot be Q8_0; ffn_down's rows are d_ff = 192 long and can.
    assert {n: t.dtype for n, t in tensors.items() if t.data.ndim == 2} == {
        "token_embd.weight": "f16", "position_embd.weight": "f32",
        **{f"blk.{i}.{kind}.weight": "f16" for i in range(2) for kind in ("attn_qkv", "attn_output", "ffn_up")},
        **{f"blk.{i}.ffn_down.weight": "q8_0" for i in range(2)}}
    assert tensors["blk.0.ffn_down.weight"].data.dtype == np.uint8  # blocks: 32 int8 and an f16 scale each
    assert tensors["blk.0.ffn_down.weight"].data.shape == (48, 192 // 32 * 34)
    note = fallback_note(tensors, "q8_0")
    assert "7 matrices" in note and "attn_qkv.weight" in note and "ffn_down" not in note
    assert fallback_note(gguf_tensors(model, "f16"), "f16") is None


def test_each_format_has_its_weight_types_and_default():
    assert dtype_in_force("gguf", None) == "f16" and dtype_in_force("hf", None) == "f32"
    assert dtype_in_force("gguf", "q8_0") == "q8_0"
    with pytest.raises(ValueError, match="q8_0 is a GGUF type"):
        dtype_in_force("hf", "q8_0")
    with pytest.raises(ValueError, match="choose f32, f16 or q8_0"):
        dtype_in_force("gguf", "q4_0")


def round_like_the_file(model: torch.nn.Module, dtype: str) -> None:
    """Give ``model`` the weights a GGUF file of ``dtype`` holds (f16- or Q8_0-rounded), read
    back as llama.cpp reads them, so that only llama.cpp's arithmetic differs from ours."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize

    written = gguf_tensors(model, dtype)
    state = {}
    for name, ours in model.state_dict().items():
        tensor = written[gguf_name(name) or "token_embd.weight"]  # the head is tied to the embedding
        values = dequantize(tensor.data, {"f32": T.F32, "f16": T.F16, "q8_0": T.Q8_0}[tensor.dtype])
        state[name] = torch.from_numpy(np.asarray(values, dtype=np.float32)).reshape(ours.shape)
    model.load_state_dict(state)


# Greedy tokens are compared up to the first step where our top two logits are closer than
# this: a near tie, which a small difference in arithmetic may break either way. Their GELU is
# the tanh approximation (logits ~3e-3 apart), and with Q8_0 their CPU kernels also round each
# activation row to 8-bit blocks before the product (about 2e-3 more on the tiny test model).
# Our side has the file's weights (``round_like_the_file``), so the bound holds for every type.
NEAR_TIE = 0.02


def without_amx_repacking(llama_cpp, monkeypatch) -> None:
    """llama.cpp's AMX kernels (Intel Xeons since Sapphire Rapids) repack Q8_0 matrices into
    their own buffer and crash the process on some of a small model's matmuls (the plain CPU
    kernels read the same file fine; ggml-org/llama.cpp#11115, #20824). Load models without
    those extra buffer types, where the library lets us."""
    module = llama_cpp.llama_cpp
    with plain_cpu_buffers(llama_cpp, True):  # the bench's loader, held for the whole test
        plain_cpu_params = module.llama_model_default_params
    monkeypatch.setattr(module, "llama_model_default_params", plain_cpu_params)


def greedy_ids(model, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Our greedy continuation through the full forward pass, and each step's top-two margin."""
    out, margins, visible = [], [], list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([visible]))[0][0, -1]
            top2 = torch.topk(logits, 2)
            margins.append(float(top2.values[0] - top2.values[1]))
            out.append(int(top2.indices[0]))
            visible.append(out[-1])
    return out, margins


def assert_llama_cpp_continues_like(model, tok, llm) -> None:
    """llama.cpp's greedy continuation of each prompt is ours up to the first near-tie
    (``NEAR_TIE``), over at least 10 tokens in all. Prompt and answer stay inside the
    context: llama.cpp aborts the whole process past it."""
    compared = 0
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        expected, margins = greedy_ids(model, ids, model.config.context - len(ids))
        theirs = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if len(theirs) == len(expected):
                break
            theirs.append(token)
        sure = next((i for i, m in enumerate(margins) if m < NEAR_TIE), len(margins))
        assert theirs[:sure] == expected[:sure], prompt
        compared += sure
    assert compared >= 10


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_llama_cpp_continues_like_ours(trained_once, tmp_path, monkeypatch, dtype):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is an optional extra "
                                    "(requirements-llama.txt, scripts/install_llama_cpp.sh)")
    without_amx_repacking(llama_cpp, monkeypatch)
    folder = trained_once("bpe", 2, arch="gpt2")
    export_model(folder, "gguf", tmp_path / "model.gguf", dtype)
    ours = ResponseGenerator(str(folder), hardware.detect_runtime("cpu", "fp32"))
    round_like_the_file(ours.model, dtype)
    tok, context = ours.tokenizer, ours.context
    llm = llama_cpp.Llama(str(tmp_path / "model.gguf"), n_ctx=context, n_threads=1, verbose=False)
    assert llm.n_ctx() >= context
    assert llm.tokenize(MULTILINGUAL.encode(), add_bos=False, special=False) == tok.encode(MULTILINGUAL)
    assert_llama_cpp_continues_like(ours.model, tok, llm)


def test_where_an_export_may_go(trained_once, tmp_path):
    folder = trained_once("bpe", 2, arch="gpt2")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(DestinationInUse):
        export_model(folder, "hf", busy)
    assert (busy / "notes.txt").read_text() == "mine"
    for forbidden in (folder, folder.parent):  # the model itself, or a folder holding it: never, even forced
        with pytest.raises(ValueError, match="holds the model"):
            check_destination("hf", forbidden, force=True, model_dir=folder)
    with pytest.raises(ValueError, match="is a folder"):
        check_destination("gguf", busy)
    with pytest.raises(ValueError, match="unknown export format"):
        check_destination("onnx", tmp_path / "x")
    with pytest.raises(ValueError, match="cannot be created"):  # unwritable: its parent is a file
        export_model(folder, "gguf", busy / "notes.txt" / "m.gguf")

    export_model(folder, "hf", tmp_path / "hf")
    export_model(folder, "hf", tmp_path / "hf")  # an earlier export is replaced without --force
    export_model(folder, "hf", busy, force=True)
    assert not (busy / "notes.txt").exists() and (busy / "config.json").exists()
    export_model(folder, "gguf", tmp_path / "m.gguf")
    export_model(folder, "gguf", tmp_path / "m.gguf", "f16")  # our own GGUF is replaced too
    (tmp_path / "other.gguf").write_bytes(b"not ours")
    with pytest.raises(DestinationInUse):
        export_model(folder, "gguf", tmp_path / "other.gguf")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(storage.TEMP_PREFIX)]


def test_a_failed_folder_write_leaves_the_previous_one(tmp_path):
    target = tmp_path / "out"
    storage.replace_folder(target, {"a.txt": b"old"})

    class Boom(dict):
        def items(self):
            yield "a.txt", b"new"
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        storage.replace_folder(target, Boom())
    assert (target / "a.txt").read_bytes() == b"old"
    with pytest.raises(RuntimeError):
        with storage.atomic_path(tmp_path / "f.bin") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer died")
    assert not (tmp_path / "f.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
