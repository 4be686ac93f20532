"""The model: a GPT-style decoder, and its step-by-step form for generation.

The network lives in ``engine/model/``; this module is where the rest of the program
and its users find it:

- ``ModelConfig`` (``engine/model/config.py``): vocabulary, context, width, depth,
  heads and dropout, checked when made and when read back from ``config.json``.
- ``GPT`` (``engine/model/gpt.py``): ``forward(idx, targets=None)`` returns
  ``(logits, loss)``, nanoGPT's shape with GPT-2's module names, so its weights map
  one-to-one onto the Hugging Face layout.
- ``Decoder`` and ``KVCache`` (``engine/model/decoder.py``): the same computation for
  generation, one step at a time over a preallocated cache.
- ``engine/model/layers.py``: the pieces written out for speed on the CPU (dropout,
  attention with dropout, the fused head + loss), each against its plain reference.
"""
from engine.model.config import ModelConfig
from engine.model.decoder import Decoder, KVCache
from engine.model.gpt import GPT
from engine.model.products import half_products_work

__all__ = ["GPT", "Decoder", "KVCache", "ModelConfig", "half_products_work"]
