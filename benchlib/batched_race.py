"""Many sequences at once, ours against llama.cpp: how each engine's pass grows with the batch.

The server's goals are ratios to one stream (3x at 8 streams, 4x at 16). This section
asks what the reference engine reaches on the same model and machine, so that a ratio
can be read against it. It times the engines alone, without HTTP, text or sampling
beyond the greedy pick: ``n`` sequences start from the same prompt, and then each of
``steps`` steps feeds every sequence its next token.

- ours: ``Decoder.step_many``, the server's batched pass, with ``logits.argmax``;
- llama.cpp: one ``llama_decode`` a step of a batch holding one token of each sequence
  (a context of ``n`` sequences), through llama-cpp-python's low-level API, with numpy's
  argmax over each sequence's logits.

Both get the same threads. Each level alternates ours and theirs, ``rounds`` times, and
the medians are reported. Ours must give every sequence the same tokens (they are the
same greedy sequence, and the batched pass is batch-invariant); that is checked here.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from benchlib.llama_race import llama_cpp_missing, torch_threads
from engine.export.model_export import export_model
from engine.generation.generator import ResponseGenerator
from engine.generation.sampling import GenerationConfig
from engine.model.decoder import Feed
from engine.runtime import hardware

LEVELS = (1, 4, 8, 16)
PROMPT = "ROMEO:"


def time_ours(decoder, prompt_ids: list[int], n: int, steps: int) -> tuple[float, list[list[int]]]:
    """Tokens/s of ``steps`` greedy steps of ``n`` sequences together, and each sequence's tokens."""
    caches = [decoder.new_cache() for _ in range(n)]
    logits = decoder.step_many([Feed(list(prompt_ids), cache) for cache in caches])
    made: list[list[int]] = [[] for _ in range(n)]
    began = time.perf_counter()
    for _ in range(steps):
        picks = logits.argmax(-1).tolist()
        for row, pick in zip(made, picks):
            row.append(pick)
        logits = decoder.step_many([Feed([pick], cache) for pick, cache in zip(picks, caches)])
    return n * steps / (time.perf_counter() - began), made


class LlamaBatch:
    """A llama.cpp model and, per level, a context of ``n`` sequences with a batch to feed them."""

    def __init__(self, path: Path, context: int, threads: int) -> None:
        import llama_cpp._logger
        import llama_cpp.llama_cpp as api  # the C API's bindings

        llama_cpp._logger.set_verbose(False)  # errors only: the high-level Llama(verbose=False) does the same
        self.api, self.context, self.threads = api, context, threads
        api.llama_backend_init()
        self.model = api.llama_model_load_from_file(str(path).encode(), api.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.vocab_size = api.llama_vocab_n_tokens(api.llama_model_get_vocab(self.model))

    def close(self) -> None:
        self.api.llama_model_free(self.model)

    def rate(self, prompt_ids: list[int], n: int, steps: int) -> float:
        """Tokens/s of ``steps`` greedy steps of ``n`` sequences in one context."""
        import numpy as np

        api = self.api
        params = api.llama_context_default_params()
        params.n_ctx, params.n_seq_max = self.context * n, n
        params.n_batch = params.n_ubatch = max(n * len(prompt_ids), n)
        params.n_threads = params.n_threads_batch = self.threads
        ctx = api.llama_init_from_model(self.model, params)
        batch = api.llama_batch_init(params.n_batch, 0, n)
        try:
            # Every sequence's prompt in one batch; the logits of each one's last position.
            items = [(token, pos, seq, pos == len(prompt_ids) - 1)
                     for seq in range(n) for pos, token in enumerate(prompt_ids)]
            self._decode(ctx, batch, items)
            rows, pos = [i for i, item in enumerate(items) if item[3]], len(prompt_ids)
            began = time.perf_counter()
            for _ in range(steps):
                picks = [int(np.ctypeslib.as_array(api.llama_get_logits_ith(ctx, row), shape=(self.vocab_size,))
                             .argmax()) for row in rows]
                self._decode(ctx, batch, [(pick, pos, seq, True) for seq, pick in enumerate(picks)])
                rows, pos = list(range(n)), pos + 1
            return n * steps / (time.perf_counter() - began)
        finally:
            api.llama_batch_free(batch)
            api.llama_free(ctx)

    def _decode(self, ctx, batch, items: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants logits) items."""
        batch.n_tokens = len(items)
        for i, (token, pos, seq, logits) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
            batch.seq_id[i][0] = seq
        status = self.api.llama_decode(ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")


def race_batched(model_dir: Path, threads: int | None = None, levels: tuple[int, ...] = LEVELS,
                 steps: int = 64, rounds: int = 3, dtype: str = "f16") -> dict:
    """Per level of ``levels`` sequences, both engines' tokens/s (medians of ``rounds``
    alternating rounds) and each one's ratio to its own single sequence."""
    missing = llama_cpp_missing()
    if missing:
        return {"skipped": missing}
    ours: dict[int, list[float]] = {n: [] for n in levels}
    theirs: dict[int, list[float]] = {n: [] for n in levels}
    same = True
    with torch_threads(threads) as threads, tempfile.TemporaryDirectory(prefix="custom-llm-batched-") as tmp:
        gen = ResponseGenerator(str(model_dir), hardware.detect_runtime("cpu"))
        decoder = gen.decoder()
        prompt_ids = gen.prompts.complete(PROMPT, GenerationConfig()).ids
        steps = min(steps, gen.context - len(prompt_ids))
        path = Path(tmp) / f"model-{dtype}.gguf"
        export_model(model_dir, "gguf", path, dtype)
        theirs_engine = LlamaBatch(path, gen.context, threads)
        try:
            for r in range(rounds + 1):  # round 0 warms both up
                for n in levels:
                    rate, made = time_ours(decoder, prompt_ids, n, steps)
                    same = same and all(row == made[0] for row in made)
                    their_rate = theirs_engine.rate(prompt_ids, n, steps)
                    if r:
                        ours[n].append(rate)
                        theirs[n].append(their_rate)
        finally:
            theirs_engine.close()
    rows = []
    for n in levels:
        a, b = statistics.median(ours[n]), statistics.median(theirs[n])
        rows.append({"sequences": n, "ours": a, "theirs": b, "ours_all": ours[n], "theirs_all": theirs[n]})
    one = rows[0]
    for row in rows:
        row["ours_vs_one"] = row["ours"] / one["ours"] if one["sequences"] == 1 else None
        row["theirs_vs_one"] = row["theirs"] / one["theirs"] if one["sequences"] == 1 else None
        row["ours_vs_theirs"] = row["ours"] / row["theirs"]
    return {"model": Path(model_dir).name, "arch": gen.model.config.arch, "params": gen.model.num_params(),
            "threads": threads, "steps": steps, "rounds": rounds, "dtype": dtype, "prompt_tokens": len(prompt_ids),
            "every_sequence_same": same, "levels": rows}
