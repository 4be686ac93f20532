"""A trained model as one GGUF file, for llama.cpp and Ollama (the ``gpt2`` or ``llama`` architecture).

A ``gpt2`` block is llama.cpp's GPT-2 graph: learned positions, pre-norm blocks with
biases, a fused q|k|v projection and a head tied to the token embedding (it reuses
``token_embd.weight`` when there is no ``output.weight``). A ``llama`` block is its
Llama graph, with q, k and v, and the SwiGLU gate and up, as separate matrices. What
differs from our computation:

* llama.cpp's GPT-2 GELU is the tanh approximation; ours is exact. Logits move by
  about 3e-3 and greedy decoding agreed token for token where we measured it.
* llama.cpp rotates adjacent channel pairs (2i, 2i + 1) where we rotate i with
  i + D/2 (as Hugging Face's Llama does), so the rows of each head's q and k
  projections are reordered to match (``_interleave_heads``): the same numbers, laid out
  for its pairing.
* Tokenizers. A BPE model exports exactly: our byte-level tokens, merges and GPT-2
  pre-tokenizer are what llama.cpp's "gpt2" tokenizer implements. A SentencePiece
  model exports as llama.cpp's "llama" tokenizer with our pieces, scores and byte
  pieces, but llama.cpp segments BPE-style (merging the best-scoring pair) where
  SentencePiece's unigram model finds the best whole segmentation, so some text
  splits into other tokens than ours (``SENTENCEPIECE_NOTE``). No llama.cpp
  tokenizer reproduces unigram with byte fallback.

Tensors keep our (out, in) layout; ``gguf`` turns numpy shapes into ggml's order.

Weight types (``DTYPES``), chosen per tensor as llama.cpp's own converter does: the
file's type applies to the weight matrices; 1-D tensors (norms, biases) and the
position embedding stay f32, since llama.cpp reads those as f32. ``q8_0`` stores
each row in blocks of 32 values (one f16 scale and 32 int8), so a matrix whose rows
are not a multiple of 32 long is written as f16 instead, and the export says so.
llama.cpp builds with AMX kernels (recent Intel Xeons) crashed on small Q8_0 files
of ours that its plain CPU kernels ran correctly; ``llama-cli --no-repack`` avoids them.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.data.chat_format import ChatTokenIds, jinja_chat_template
from engine.data.tokenizer import EOT_TOKEN, BaseTokenizer, BPETokenizer
from engine.model.config import NORM_EPS
from engine.model.gpt import GPT

DTYPES = ("f32", "f16", "q8_0")  # f16 first: llama.cpp's converter writes it by default
Q8_0_BLOCK = 32  # values per Q8_0 block; a Q8_0 row is a whole number of blocks
ALWAYS_F32 = ("position_embd.weight",)  # matrices llama.cpp keeps in f32 whatever the file's type
EXPORT_MARK = "custom_llm.export_version"  # marks a file this program wrote (it may replace it)
SENTENCEPIECE_NOTE = ("llama.cpp may split some text into different tokens than this SentencePiece model does "
                      "(it has no unigram tokenizer with byte fallback); answers can differ from ours")

# Our state-dict names -> GGUF's (per block, after "h.N.").
_BLOCK_NAMES = {
    "ln_1.weight": "attn_norm.weight", "ln_1.bias": "attn_norm.bias",
    "attn.c_attn.weight": "attn_qkv.weight", "attn.c_attn.bias": "attn_qkv.bias",  # fused [Q|K|V] as ours
    "attn.c_proj.weight": "attn_output.weight", "attn.c_proj.bias": "attn_output.bias",
    "ln_2.weight": "ffn_norm.weight", "ln_2.bias": "ffn_norm.bias",
    "mlp.c_fc.weight": "ffn_up.weight", "mlp.c_fc.bias": "ffn_up.bias",
    "mlp.c_proj.weight": "ffn_down.weight", "mlp.c_proj.bias": "ffn_down.bias",
}
_TOP_NAMES = {"wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight",
              "ln_f.weight": "output_norm.weight", "ln_f.bias": "output_norm.bias"}


def gguf_name(name: str) -> str | None:
    """Our parameter name -> its GGUF name in the gpt2 architecture; None for the tied head.

    >>> gguf_name("h.3.attn.c_attn.weight")
    'blk.3.attn_qkv.weight'
    """
    if name == "lm_head.weight":
        return None
    if name.startswith("h."):
        _, layer, rest = name.split(".", 2)
        return f"blk.{layer}.{_BLOCK_NAMES[rest]}"
    return _TOP_NAMES[name]


def _interleave_heads(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder each head's rows of a q or k projection from pairs (i, i + D/2) to (2i, 2i + 1).

    >>> _interleave_heads(np.arange(4).reshape(4, 1), 1).ravel().tolist()
    [0, 2, 1, 3]
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def named_arrays(model: GPT) -> dict[str, np.ndarray]:
    """Every tensor to write as float32, by GGUF name, in the model's architecture's layout."""
    state = {name: t.detach().float().cpu().numpy() for name, t in model.state_dict().items()}
    c = model.config
    if c.arch == "gpt2":
        return {gguf_name(n): a for n, a in state.items() if gguf_name(n) is not None}
    out = {"token_embd.weight": state["wte.weight"], "output_norm.weight": state["ln_f.weight"]}
    for i in range(c.n_layer):
        at = lambda name: state[f"h.{i}.{name}"]  # noqa: E731
        q, k, v = np.split(at("attn.c_attn.weight"), 3)
        gate, up = np.split(at("mlp.c_fc.weight"), 2)
        out.update({
            f"blk.{i}.attn_norm.weight": at("ln_1.weight"),
            f"blk.{i}.attn_q.weight": _interleave_heads(q, c.n_head),
            f"blk.{i}.attn_k.weight": _interleave_heads(k, c.n_head),
            f"blk.{i}.attn_v.weight": v,
            f"blk.{i}.attn_output.weight": at("attn.c_proj.weight"),
            f"blk.{i}.ffn_norm.weight": at("ln_2.weight"),
            f"blk.{i}.ffn_gate.weight": gate,
            f"blk.{i}.ffn_up.weight": up,
            f"blk.{i}.ffn_down.weight": at("mlp.c_proj.weight"),
        })
    return out


@dataclass(frozen=True)
class GgufTensor:
    """One tensor as written: ``data`` is float32, float16, or Q8_0 blocks as bytes (uint8)."""

    data: np.ndarray
    dtype: str  # "f32", "f16" or "q8_0"


def tensor_dtype(gguf_tensor_name: str, shape: tuple[int, ...], dtype: str) -> str:
    """The type one tensor is written in when the file's type is ``dtype``.

    >>> tensor_dtype("blk.0.ffn_up.weight", (128, 32), "q8_0"), tensor_dtype("blk.0.ffn_up.weight", (96, 24), "q8_0")
    ('q8_0', 'f16')
    """
    if len(shape) < 2 or gguf_tensor_name in ALWAYS_F32:
        return "f32"
    if dtype == "q8_0" and shape[-1] % Q8_0_BLOCK:
        return "f16"  # llama.cpp's converter falls back the same way
    return dtype


def _encode(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "q8_0":
        from gguf import GGMLQuantizationType, quants

        return quants.quantize(array, GGMLQuantizationType.Q8_0)
    return array.astype(np.float16 if dtype == "f16" else np.float32)


def gguf_tensors(model: GPT, dtype: str = "f16") -> dict[str, GgufTensor]:
    """Every tensor to write, by GGUF name, each in its type (``tensor_dtype``)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown GGUF type {dtype!r}; choose one of {', '.join(DTYPES)}")
    if model.config.qk_norm:
        raise ValueError("a model with QK-norm has no llama.cpp architecture to export to")
    out = {}
    for target, array in named_arrays(model).items():
        kind = tensor_dtype(target, array.shape, dtype)
        out[target] = GgufTensor(_encode(array, kind), kind)
    return out


def fallback_note(tensors: dict[str, GgufTensor], dtype: str) -> str | None:
    """What to tell the user when some matrices could not take the file's type (None when all did)."""
    if dtype != "q8_0":
        return None
    fallen = [n for n, t in tensors.items() if t.dtype == "f16"]
    if not fallen:
        return None
    kinds = sorted({re.sub(r"^blk\.\d+\.", "", n) for n in fallen})
    return (f"q8_0 needs rows that are a multiple of {Q8_0_BLOCK} values long; {len(fallen)} matrices "
            f"({', '.join(kinds)}) are f16 instead")


def _bpe_vocab(tok: BPETokenizer) -> tuple[list[str], list[int], list[str]]:
    """Tokens (byte-level spelling), their types and the merges ("a b"), in id order."""
    from gguf import TokenType

    spec = json.loads(tok.to_bytes())
    special = {t["id"] for t in spec["added_tokens"] if t.get("special")}
    tokens = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    types = [TokenType.CONTROL if i in special else TokenType.NORMAL for i in range(tok.vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return tokens, types, merges


def _sentencepiece_vocab(tok: BaseTokenizer) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and types, in id order (the proto's types are GGUF's numbers too)."""
    from gguf import TokenType
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(tok.to_bytes())
    kinds = pb.ModelProto.SentencePiece.Type
    type_of = {kinds.NORMAL: TokenType.NORMAL, kinds.UNKNOWN: TokenType.UNKNOWN, kinds.CONTROL: TokenType.CONTROL,
               kinds.USER_DEFINED: TokenType.USER_DEFINED, kinds.UNUSED: TokenType.UNUSED, kinds.BYTE: TokenType.BYTE}
    return ([p.piece for p in proto.pieces], [p.score for p in proto.pieces],
            [type_of[p.type] for p in proto.pieces])


def write_gguf(model: GPT, tok: BaseTokenizer, chat: ChatTokenIds | None, path: str | Path, name: str,
               dtype: str = "f16") -> list[str]:
    """Write ``model`` and its tokenizer to ``path`` (the caller makes the write atomic); ``chat``,
    the chat tokens of a chat-tuned model (else None), adds the end of turn and the chat template.

    Returns notes for the user (matrices that could not take ``dtype``).
    """
    from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType

    tensors = gguf_tensors(model, dtype)  # checks dtype before anything is written
    file_type = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
                 "q8_0": LlamaFileType.MOSTLY_Q8_0}[dtype]  # the type of most matrices, as llama.cpp names it
    c = model.config
    w = GGUFWriter(str(path), c.arch)  # "gpt2" or "llama": llama.cpp's names for these graphs
    w.add_name(name)
    w.add_uint32(EXPORT_MARK, 1)
    w.add_file_type(file_type)
    w.add_context_length(c.context)
    w.add_embedding_length(c.d_model)
    w.add_block_count(c.n_layer)
    w.add_feed_forward_length(c.d_ff)
    w.add_head_count(c.n_head)
    if c.arch == "llama":
        w.add_head_count_kv(c.n_head)
        w.add_layer_norm_rms_eps(NORM_EPS)
        w.add_rope_freq_base(c.rope_theta)
        w.add_rope_dimension_count(c.head_dim)
        w.add_vocab_size(c.vocab_size)
    else:
        w.add_layer_norm_eps(NORM_EPS)
    if isinstance(tok, BPETokenizer):
        tokens, types, merges = _bpe_vocab(tok)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")  # GPT-2's split regex, which our ByteLevel pre-tokenizer uses
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
    else:
        tokens, scores, types = _sentencepiece_vocab(tok)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_add_space_prefix(False)  # we train with add_dummy_prefix=False
        w.add_unk_token_id(tokens.index("<unk>") if "<unk>" in tokens else 2)
    # Always set: llama.cpp's defaults (11 for gpt2) point at ordinary tokens of ours.
    w.add_bos_token_id(tok.eot_id)
    w.add_eos_token_id(tok.eot_id)
    w.add_pad_token_id(tok.pad_id)
    w.add_add_bos_token(False)  # our prompts start as they are; a chat prompt brings its own <|endoftext|>
    w.add_add_eos_token(False)
    if chat is not None:
        w.add_eot_token_id(chat.end)  # a reply ends at <|end|>
        w.add_chat_template(jinja_chat_template(EOT_TOKEN))
    for tensor_name, tensor in tensors.items():
        # Q8_0 blocks are bytes: the writer needs their type to work out the tensor's shape.
        w.add_tensor(tensor_name, tensor.data, raw_dtype=GGMLQuantizationType.Q8_0 if tensor.dtype == "q8_0" else None)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    note = fallback_note(tensors, dtype)
    return [note] if note else []
