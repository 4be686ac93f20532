"""A trained model as a Hugging Face folder that ``transformers`` loads alone.

A ``gpt2`` block becomes ``GPT2LMHeadModel``, a ``llama`` block ``LlamaForCausalLM``:

    config.json              GPT2Config (exact GELU, LayerNorm eps 1e-5) or LlamaConfig
                             (SiLU gate, RMSNorm eps 1e-5, rotary base, no biases); tied head
    model.safetensors        the weights under that model's names (the tied head saved once)
    generation_config.json   end-of-text (and end-of-turn for a chat model) stop generation
    tokenizer.json           the tokenizer for the ``tokenizers`` library
    tokenizer_config.json    its special tokens and, for a chat model, the chat template
    special_tokens_map.json  the special tokens again, for older transformers versions
    README.md                a short model card

Differences from our own layout. GPT-2's ``Conv1D`` stores a projection as (in, out)
where our ``nn.Linear`` stores (out, in), so every GPT-2 projection matrix is
transposed. Llama keeps q, k and v, and the gate and up projections, as separate
matrices: ours are split along their rows. Our rotary pairing (channel i with i + D/2)
is the one ``LlamaForCausalLM`` applies, so q and k need no reordering. And
``safetensors`` refuses two names for one tensor, so only the embedding is written;
``tie_word_embeddings`` makes ``lm_head`` use it. QK-norm has no place in Llama's
layout: such a model is refused with a message.

A SentencePiece model is converted to a ``tokenizers`` Unigram model with the same
pieces and scores, byte fallback, no normalizer and no dummy prefix, so it splits
text into the same ids as ours (the tests check it).

One deliberate difference in the tokenizer: our tokenizers never turn typed text into
a special token, but the exported one does, because ``apply_chat_template`` renders
the conversation as text and tokenizes it; the special tokens in that text must come
back as their ids.
"""
from __future__ import annotations

import torch

from engine.data.chat_format import CHAT_TOKENS, ChatTokenIds, jinja_chat_template
from engine.data.tokenizer import EOT_TOKEN, PAD_TOKEN, BaseTokenizer, BPETokenizer
from engine.model.config import NORM_EPS
from engine.model.gpt import GPT
from engine.runtime import storage

SPACE_MARK = "\u2581"  # SentencePiece's stand-in for a space
NEVER_FROM_TEXT = -1e9  # the Unigram score of pieces that text must never produce
DTYPES = {"f32": torch.float32, "f16": torch.float16}
# Our nn.Linear weights that GPT-2's Conv1D stores transposed.
_PROJECTIONS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def gpt2_config(model: GPT, tok: BaseTokenizer, dtype: str = "f32") -> dict:
    """The ``GPT2Config`` of ``model``: the same network, named the Hugging Face way."""
    c = model.config
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": c.vocab_size, "n_positions": c.context, "n_ctx": c.context,
        "n_embd": c.d_model, "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": c.d_ff,
        "activation_function": "gelu",  # exact GELU, as F.gelu computes it (not "gelu_new", the tanh one)
        "layer_norm_epsilon": NORM_EPS,  # nn.LayerNorm's default, which our blocks use
        "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
        "initializer_range": 0.02, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": tok.eot_id, "eos_token_id": tok.eot_id, "pad_token_id": tok.pad_id,
        "torch_dtype": "float32" if dtype == "f32" else "float16",
    }


def llama_config(model: GPT, tok: BaseTokenizer, dtype: str = "f32") -> dict:
    """The ``LlamaConfig`` of a ``llama``-block model (one key/value head per query head)."""
    c = model.config
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": c.vocab_size, "max_position_embeddings": c.context,
        "hidden_size": c.d_model, "intermediate_size": c.d_ff, "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head, "num_key_value_heads": c.n_head, "head_dim": c.head_dim,
        "hidden_act": "silu", "rms_norm_eps": NORM_EPS, "rope_theta": c.rope_theta,
        "attention_bias": False, "mlp_bias": False, "attention_dropout": c.dropout,
        "initializer_range": 0.02, "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": tok.eot_id, "eos_token_id": tok.eot_id, "pad_token_id": tok.pad_id,
        "torch_dtype": "float32" if dtype == "f32" else "float16",
    }


def llama_state_dict(model: GPT, dtype: str = "f32") -> dict[str, torch.Tensor]:
    """Our weights under Llama's names: q|k|v and gate|up split, the tied head left out."""
    c = model.config
    out = {"model.embed_tokens.weight": model.wte.weight, "model.norm.weight": model.ln_f.weight}
    for i, block in enumerate(model.h):
        prefix = f"model.layers.{i}."
        q, k, v = block.attn.c_attn.weight.split(c.d_model)
        gate, up = block.mlp.c_fc.weight.split(c.d_ff)
        out.update({
            prefix + "input_layernorm.weight": block.ln_1.weight,
            prefix + "self_attn.q_proj.weight": q, prefix + "self_attn.k_proj.weight": k,
            prefix + "self_attn.v_proj.weight": v, prefix + "self_attn.o_proj.weight": block.attn.c_proj.weight,
            prefix + "post_attention_layernorm.weight": block.ln_2.weight,
            prefix + "mlp.gate_proj.weight": gate, prefix + "mlp.up_proj.weight": up,
            prefix + "mlp.down_proj.weight": block.mlp.c_proj.weight,
        })
    return {name: t.detach().to("cpu", DTYPES[dtype]).contiguous() for name, t in out.items()}


def gpt2_state_dict(model: GPT, dtype: str = "f32") -> dict[str, torch.Tensor]:
    """Our weights under GPT-2's names, projections transposed, the tied head left out."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # the same tensor as wte.weight (tied)
        t = tensor.detach().to("cpu", DTYPES[dtype])
        if name.endswith(_PROJECTIONS):
            t = t.t()
        out[f"transformer.{name}"] = t.contiguous()
    return out


def sentencepiece_to_tokenizers(proto_bytes: bytes):
    """Our SentencePiece model as a ``tokenizers.Tokenizer`` that gives the same ids.

    Unigram with the proto's pieces and scores and byte fallback; spaces become U+2581
    with no dummy prefix and no splitting (SentencePiece segments the whole text at
    once); control pieces are special tokens (see the module docstring); the user-defined newline piece is split
    off first, as SentencePiece does with user-defined symbols.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    proto = pb.ModelProto()
    proto.ParseFromString(proto_bytes)
    kinds = pb.ModelProto.SentencePiece.Type
    # SentencePiece never matches byte, control or unknown pieces against text ("<0x41>"
    # typed by a user is six characters); tokenizers' Unigram would, at their score 0.
    # A score far below any path of ordinary pieces keeps them out of the segmentation;
    # byte fallback finds byte pieces by name, whatever their score. (The unknown piece's
    # score follows the lowest score, but it only covers characters no piece holds, which
    # every segmentation must then cover the same way.)
    never = (kinds.BYTE, kinds.CONTROL, kinds.UNKNOWN)
    vocab = [(p.piece, NEVER_FROM_TEXT if p.type in never else p.score) for p in proto.pieces]
    unk_id = next(i for i, p in enumerate(proto.pieces) if p.type == kinds.UNKNOWN)
    tok = Tokenizer(models.Unigram(vocab, unk_id=unk_id, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE_MARK, prepend_scheme="never", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE_MARK, " "), decoders.ByteFallback(), decoders.Fuse()])
    special = [p.piece for p in proto.pieces if p.type == kinds.CONTROL]
    tok.add_special_tokens([AddedToken(piece, special=True, normalized=False) for piece in special])
    user_defined = [p.piece for p in proto.pieces if p.type == kinds.USER_DEFINED]
    tok.add_tokens([AddedToken(piece, special=False, normalized=False) for piece in user_defined])
    return tok


def tokenizer_json(tok: BaseTokenizer) -> str:
    """``tokenizer.json`` for the ``tokenizers`` library (ours as it is, for BPE)."""
    if isinstance(tok, BPETokenizer):
        return tok.to_bytes().decode("utf-8")
    return sentencepiece_to_tokenizers(tok.to_bytes()).to_str()


def special_tokens(tok: BaseTokenizer) -> dict:
    """The special tokens by role, as ``special_tokens_map.json`` and the tokenizer config name them."""
    # No unk_token: both tokenizers fall back to bytes, so no text is ever unknown.
    names = {"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "pad_token": PAD_TOKEN}
    chat = [t for t, i in zip(CHAT_TOKENS, _chat_token_ids(tok)) if i is not None]
    if chat:
        names["additional_special_tokens"] = chat
    return names


def _chat_token_ids(tok: BaseTokenizer) -> list[int | None]:
    ids = tok.chat_token_ids()
    return [None] * len(CHAT_TOKENS) if ids is None else [ids.system, ids.user, ids.assistant, ids.end]


def tokenizer_config(tok: BaseTokenizer, chat: ChatTokenIds | None, context: int) -> dict:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special_tokens(tok),
              "model_max_length": context, "add_bos_token": False, "add_eos_token": False,
              "clean_up_tokenization_spaces": False}
    if chat is not None:
        config["chat_template"] = jinja_chat_template(EOT_TOKEN)
    return config


def generation_config(tok: BaseTokenizer, chat: ChatTokenIds | None) -> dict:
    """Stop at end-of-text, and for a chat model also at the end of its turn, as our Chat does."""
    eos = [tok.eot_id] + ([chat.end] if chat is not None else [])
    return {"bos_token_id": tok.eot_id, "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": tok.pad_id}


def model_card(model: GPT, tok: BaseTokenizer, chat: ChatTokenIds | None, training_steps: int) -> str:
    c = model.config
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", f"tags: [{c.arch}, custom-llm]", "---",
        "", f"# A small {'Llama' if c.arch == 'llama' else 'GPT-2'} style model trained with custom-llm", "",
        f"{model.num_params():,} parameters: {c.n_layer} layers, {c.n_head} heads, width {c.d_model}, "
        f"context {c.context} tokens, a {tok.kind} tokenizer of {c.vocab_size:,} tokens, "
        f"{training_steps:,} training steps.", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'tok = AutoTokenizer.from_pretrained("PATH")',
        'model = AutoModelForCausalLM.from_pretrained("PATH")',
        "```", "",
        f"Prompt plus answer must fit in {c.context} tokens, the context it was trained on.",
    ]
    if chat is not None:
        lines += ["", "The chat template is the one the model was fine-tuned with: "
                  "`tok.apply_chat_template(messages, add_generation_prompt=True)`; a reply ends with `<|end|>`."]
    return "\n".join(lines) + "\n"


def hf_files(model: GPT, tok: BaseTokenizer, chat: ChatTokenIds | None, training_steps: int,
             dtype: str = "f32") -> dict[str, bytes]:
    """Every file of the export folder, by name; ``chat``: the chat tokens of a chat-tuned model (else None)."""
    from safetensors.torch import save

    c = model.config
    if c.qk_norm:
        raise ValueError("a model with QK-norm has no Hugging Face Llama layout to export to")
    llama = c.arch == "llama"
    config = llama_config(model, tok, dtype) if llama else gpt2_config(model, tok, dtype)
    weights = llama_state_dict(model, dtype) if llama else gpt2_state_dict(model, dtype)
    context = c.context
    as_json = storage.json_bytes
    return {
        "config.json": as_json(config),
        # transformers refuses safetensors files without this metadata
        "model.safetensors": save(weights, metadata={"format": "pt"}),
        "generation_config.json": as_json(generation_config(tok, chat)),
        "tokenizer.json": tokenizer_json(tok).encode("utf-8"),
        "tokenizer_config.json": as_json(tokenizer_config(tok, chat, context)),
        "special_tokens_map.json": as_json(special_tokens(tok)),
        "README.md": model_card(model, tok, chat, training_steps).encode("utf-8"),
    }
