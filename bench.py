#!/usr/bin/env python3
"""Benchmark: training and generation speed, the data path, quality per minute, the server under load.

Times our own code paths (the trainer's step, the generator's token loop, the
tokenizer wrappers), then runs Hugging Face transformers' GPT-2 at the identical
configuration (``../shared/bench/reference_hf.py``) in a subprocess, after ours and
never at the same time, and prints the ratios ours/theirs.

    python bench.py                    # everything but the quality run (a few minutes)
    python bench.py --quick            # fewer steps, 1x corpus only (about a minute)
    python bench.py --quality          # adds a 165 s training run on tinyshakespeare
    python bench.py --json out.json    # also write every number as JSON
    python bench.py --skip train,gen,data,reference   # only the server load run (16 clients x 4 requests)
    python bench.py --skip train,gen,data,reference,server --llama-cpp --llama-cpp-model DIR
                                       # only the race against llama.cpp on DIR's GGUF exports

The sections live in ``benchlib/`` (one module each); this script parses the flags,
runs them (``benchlib.sections``) and prints the report (``benchlib.report``).

The training section also shows the CPU's instruction set as PyTorch sees it, which
kernels the step ran (fused AdamW, the fused loss head, the attention path), and where
a step's time goes by kind of work (torch.profiler): the next bottleneck to look at.

``transformers`` is needed for the reference only (``pip install -r
requirements-bench.txt``); without it that section is skipped with a note.

The machine matters: two processes that both use every core slow each other down
many times over. Each section therefore waits (up to ``--wait-idle`` seconds) for
the CPU to go quiet, measures how much CPU other processes took while it ran, and
flags numbers taken on a busy machine.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchlib.data_path import bench_data
from benchlib.generation import NoEndTokenizer, bench_generation, bench_half_weights
from benchlib.llama_race import race_llama_cpp
from benchlib.machine import (
    BUSY_WARNING,
    CPU_FLAGS,
    ISA_CAPS,
    OtherLoad,
    bench_matmul,
    cpu_instruction_sets,
    measure_when_quiet,
    wait_until_idle,
)
from benchlib.quality import bench_quality
from benchlib.reference import race, run_reference
from benchlib.report import print_report
from benchlib.sections import Plan, run_benchmark
from benchlib.server_load import bench_server, server_model
from benchlib.token_cost import op_kind, token_cost
from benchlib.training import STEP_CATEGORIES, bench_training, flops_per_token, step_breakdown, step_category
from engine.runtime import hardware

# The sections live in benchlib/; their entry points stay reachable as bench.NAME for
# the tests and scripts/gpu_check.py.
__all__ = ["BUSY_WARNING", "CPU_FLAGS", "ISA_CAPS", "NoEndTokenizer", "OtherLoad", "STEP_CATEGORIES", "bench_data",
           "bench_generation", "bench_half_weights", "bench_matmul", "bench_quality", "bench_server",
           "bench_training", "build_parser", "cpu_instruction_sets", "flops_per_token", "main", "measure_when_quiet",
           "op_kind", "print_report", "race", "race_llama_cpp", "run_reference", "server_model", "step_breakdown",
           "step_category", "token_cost", "wait_until_idle"]

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared"
DEFAULT_CORPUS = SHARED / "data" / "tinyshakespeare.txt"
DEFAULT_REFERENCE = SHARED / "bench" / "reference_hf.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark custom-llm against Hugging Face GPT-2 on this machine.")
    p.add_argument("--quick", action="store_true", help="fewer steps and repeats, 1x corpus only")
    p.add_argument("--json", metavar="PATH", help="write all results as JSON to PATH")
    p.add_argument("--quality", action="store_true", help="also train the default CPU setup for a fixed time")
    p.add_argument("--quality-minutes", type=float, default=2.75, help="time budget of the quality run (2.75)")
    p.add_argument("--preset", default="compact", choices=hardware.PRESET_NAMES, help="model size (compact)")
    p.add_argument("--d-model", type=int)
    p.add_argument("--n-layer", type=int)
    p.add_argument("--n-head", type=int)
    p.add_argument("--arch", default="gpt2", choices=("gpt2", "llama"), help="block design of the model (gpt2)")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--steps", type=int, help="timed training steps (10; quick 5)")
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps first (3)")
    p.add_argument("--rounds", type=int, help="ours-then-theirs rounds of the race (5; quick 1)")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast training row")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: train,gen,data,reference,server")
    p.add_argument("--server-clients", type=int, default=16, help="clients of the server load run (16)")
    p.add_argument("--server-requests", type=int, default=4, help="requests each client sends, in turn (4)")
    p.add_argument("--server-max-tokens", type=int, default=64, help="max_tokens of each request (64)")
    p.add_argument("--server-model", metavar="DIR",
                   help="serve this model folder (default: train the model size above briefly on the corpus)")
    p.add_argument("--llama-cpp", action="store_true",
                   help="also race the menu's generation against llama.cpp on the model's GGUF exports")
    p.add_argument("--llama-cpp-model", metavar="DIR",
                   help="the model folder to race (default: --server-model, else the one the server section trains)")
    p.add_argument("--llama-cpp-types", default="f16,f32", help="GGUF weight types to race (f16,f32; q8_0 too)")
    p.add_argument("--llama-cpp-threads", type=int,
                   help="threads on both sides (default: what the menu uses, all usable cores)")
    p.add_argument("--llama-cpp-sampling", default="plain", choices=("plain", "default"),
                   help="plain: temperature 0.8, top-k 50, top-p 0.95, no repetition penalty; default: "
                        "+ our repetition penalty 1.1 (both sides alike)")
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="text for the data and quality sections")
    p.add_argument("--reference", default=str(DEFAULT_REFERENCE), help="the reference script")
    p.add_argument("--wait-idle", type=float, default=60.0,
                   help="before each section, wait up to this many seconds for the CPU to go quiet (60)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    hardware.configure_cpu()
    report = run_benchmark(Plan.from_args(args))
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=float) + "\n", encoding="utf-8")
        print(f"\nJSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
