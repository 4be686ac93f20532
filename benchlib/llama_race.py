"""The race against llama.cpp: the menu's generation against llama-cpp-python on our own GGUF export.

One model folder is exported to GGUF (``export_model``, as a llama.cpp user would:
f16 is the export's default, f32 is what the issue's first comparison used). Then,
in this one process and alternating round by round, the same number of tokens is made
after the same prompt with the same sampling and the same number of threads:

- ours: ``ResponseGenerator.complete``, the menu's completion path (prompt, KV cache,
  sampling, text streaming), tokens/s = completion tokens / wall time of the reply;
- llama.cpp: ``Llama.generate`` (its leanest Python entry point: its own C sampler chain)
  with each token turned into text by ``Llama.detokenize``, stopped after as many
  tokens or at its end-of-text.

Sampling is ``RaceSampling`` on both sides: temperature 0.8, top-k 50, top-p 0.95,
no repetition penalty, and llama.cpp's min-p filter (0.05 by default) off. Each round
runs ours first, then each llama.cpp file; the ratio of a round divides numbers taken
seconds apart, and the medians of ``rounds`` rounds are reported.

llama.cpp's AMX kernels (Xeons since Sapphire Rapids) repack quantized matrices and
have crashed the whole process on our small Q8_0 files, so every file is first loaded
and run for a few tokens in a child process (``smoke_test``): a file that crashes
there is reported and left out instead of ending the race, and Q8_0 files are loaded
without the extra buffer types (``plain_cpu_buffers``).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from benchlib.machine import OtherLoad
from engine.export.model_export import export_model
from engine.generation.generator import ResponseGenerator
from engine.generation.sampling import GenerationConfig
from engine.runtime import hardware

RACE_PROMPT = "ROMEO:"
RACE_DTYPES = ("f16", "f32")
SMOKE_TOKENS = 8


@dataclass(frozen=True)
class RaceSampling:
    """The sampling both sides use (``--race-sampling default`` switches on our repetition penalty
    on both: llama.cpp's ``repeat_penalty`` over its last 64 tokens, as ours looks back 64)."""

    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.95
    repetition_penalty: float = 1.0

    def ours(self, max_new_tokens: int, seed: int) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                                top_p=self.top_p, repetition_penalty=self.repetition_penalty, seed=seed)

    def theirs(self) -> dict:
        """``Llama.generate``'s keywords for the same sampling (min-p off: ours has none)."""
        return {"temp": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "min_p": 0.0,
                "repeat_penalty": self.repetition_penalty}

    def describe(self) -> str:
        return (f"temperature {self.temperature:g}, top-k {self.top_k}, top-p {self.top_p:g}, "
                f"repetition penalty {self.repetition_penalty:g} on both sides")


def llama_cpp_missing() -> str | None:
    """Why the race cannot run here (None: it can)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (bash scripts/install_llama_cpp.sh)"
    if importlib.util.find_spec("gguf") is None:
        return "the gguf package is not installed (pip install -r requirements-export.txt)"
    return None


@contextlib.contextmanager
def plain_cpu_buffers(llama_cpp, plain: bool) -> Iterator[None]:
    """While loading: no extra buffer types (llama.cpp's AMX repacking), when ``plain``."""
    module = llama_cpp.llama_cpp
    defaults = module.llama_model_default_params

    def without_extra():
        params = defaults()
        if hasattr(params, "use_extra_bufts"):
            params.use_extra_bufts = False
        return params

    if plain:
        module.llama_model_default_params = without_extra
    try:
        yield
    finally:
        module.llama_model_default_params = defaults


def load_llama(path: Path, context: int, threads: int, dtype: str):
    import llama_cpp

    with plain_cpu_buffers(llama_cpp, dtype == "q8_0"):
        return llama_cpp.Llama(str(path), n_ctx=context, n_threads=threads, n_threads_batch=threads, seed=0,
                               verbose=False)


_SMOKE = """
import sys
from benchlib.llama_race import load_llama
from pathlib import Path
llm = load_llama(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
ids = [int(i) for i in sys.argv[5].split(",")]
for n, _ in enumerate(llm.generate(ids, top_k=50, top_p=0.95, min_p=0.0, temp=0.8), 1):
    if n == int(sys.argv[6]):
        break
"""


def smoke_test(path: Path, context: int, threads: int, dtype: str, ids: list[int]) -> str | None:
    """Load the file and make a few tokens in a child process; why it failed, or None."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _SMOKE, str(path), str(context), str(threads), dtype,
                           ",".join(map(str, ids)), str(SMOKE_TOKENS)],
                          cwd=root, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode == 0:
        return None
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
    return f"llama.cpp failed on the {dtype} file in a child process ({how}): {tail}"


def time_ours(gen: ResponseGenerator, prompt: str, cfg: GenerationConfig) -> tuple[float, int]:
    """One reply through the menu's completion path: (tokens/s, tokens)."""
    began = time.perf_counter()
    for _ in gen.complete(prompt, cfg):
        pass
    tokens = gen.last_stats.completion_tokens
    return tokens / (time.perf_counter() - began), tokens


def time_theirs(llm, ids: list[int], new_tokens: int, sampling: RaceSampling) -> tuple[float, int]:
    """One generation through ``Llama.generate``, each token detokenized: (tokens/s, tokens)."""
    eos, tokens = llm.token_eos(), 0
    began = time.perf_counter()
    for token in llm.generate(ids, reset=True, **sampling.theirs()):
        if token == eos:
            break
        llm.detokenize([token])
        tokens += 1
        if tokens == new_tokens:
            break
    return tokens / (time.perf_counter() - began), tokens


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def race_llama_cpp(model_dir: Path, dtypes: tuple[str, ...] = RACE_DTYPES, threads: int | None = None,
                   rounds: int = 5, new_tokens: int = 200, prompt: str = RACE_PROMPT,
                   sampling: RaceSampling = RaceSampling()) -> dict:
    """Ours against llama.cpp on ``model_dir``'s GGUF exports, alternating, ``rounds`` rounds
    after a warm-up round; per file, the medians and the ratio ours/theirs of each round."""
    missing = llama_cpp_missing()
    if missing:
        return {"skipped": missing}
    with torch_threads(threads) as threads, tempfile.TemporaryDirectory(prefix="custom-llm-race-") as tmp:
        return _race(Path(model_dir), Path(tmp), dtypes, threads, rounds, new_tokens, prompt, sampling)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """PyTorch on ``threads`` threads for the block (None: as set); yields the number in force."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        yield threads or previous
    finally:
        torch.set_num_threads(previous)


def _race(model_dir: Path, tmp: Path, dtypes: tuple[str, ...], threads: int, rounds: int, new_tokens: int,
          prompt: str, sampling: RaceSampling) -> dict:
    gen = ResponseGenerator(str(model_dir), hardware.detect_runtime("cpu"))
    ids = gen.prompts.complete(prompt, sampling.ours(new_tokens, 0)).ids
    context = gen.context
    out: dict = {"model": model_dir.name, "arch": gen.model.config.arch, "params": gen.model.num_params(),
                 "threads": threads, "rounds": rounds, "new_tokens": new_tokens, "prompt_tokens": len(ids),
                 "sampling": sampling.describe(), "ours_weights": _weights_name(gen), "files": {},
                 "load_average_before": _load_average()}
    llms = {}
    for dtype in dtypes:
        path = tmp / f"model-{dtype}.gguf"
        export_model(model_dir, "gguf", path, dtype)
        failure = smoke_test(path, context, threads, dtype, ids)
        out["files"][dtype] = {"bytes": path.stat().st_size, "skipped": failure, "theirs": [], "ours_in_round": []}
        if failure is None:
            llms[dtype] = load_llama(path, context, threads, dtype)
    ours: list[float] = []
    with OtherLoad() as load:
        for r in range(rounds + 1):  # round 0 warms both up
            rate, made = time_ours(gen, prompt, sampling.ours(new_tokens, r))
            if r:
                ours.append(rate)
                out.setdefault("ours_tokens", made)
            for dtype, llm in llms.items():
                theirs, made = time_theirs(llm, ids, new_tokens, sampling)
                if r:
                    out["files"][dtype]["theirs"].append(theirs)
                    out["files"][dtype]["ours_in_round"].append(rate)
                    out["files"][dtype]["tokens"] = made
    out["ours"] = _spread(ours)
    for dtype, row in out["files"].items():
        ours_in_round = row.pop("ours_in_round")
        if row["skipped"] is None:
            row["ratio"] = _spread([a / b for a, b in zip(ours_in_round, row["theirs"])])
            row["theirs"] = _spread(row["theirs"])
    out["other_load"] = load.share
    out["load_average_after"] = _load_average()
    return out


def _weights_name(gen: ResponseGenerator) -> str:
    dtype = gen.runtime.decode_weights or gen.runtime.decode_dtype or torch.float32
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))
