"""Text generation: sampling, streaming, and the three ways to talk to a model.

The code lives in ``engine/generation/``; this module is where the rest of the
program and its users find it:

- ``GenerationConfig`` and ``sample_next_token`` (``engine/generation/sampling.py``):
  the settings of an answer and the one function that draws a token.
- ``TextStreamer`` (``engine/generation/streaming.py``): ids to text as they come,
  never splitting a character, holding back what could start a stop string.
- ``ResponseGenerator`` and ``ChatSession`` (``engine/generation/generator.py``):
  Q&A, chat and completion, which differ only in their prompt and stop strings.
"""
from engine.generation.generator import (
           CHAT_STOPS,
           ChatSession,
           GenerationStats,
           ModelInfo,
           ResponseGenerator,
           render_plain,
)
from engine.generation.sampling import GenerationConfig, apply_repetition_penalty, best_candidates, sample_next_token
from engine.generation.streaming import TextStreamer

__all__ = ["CHAT_STOPS", "ChatSession", "GenerationConfig", "GenerationStats", "ModelInfo", "ResponseGenerator", "TextStreamer",
           "apply_repetition_penalty", "best_candidates", "render_plain", "sample_next_token"]
