"""Running the benchmark: which sections, in which order, with which sizes, into one report.

``Plan`` is what the command line asked for, with the defaults that depend on
``--quick`` filled in. ``Sections`` runs each section that is not skipped, in a fixed
order (training first, so that its peak memory is the training's own), into one
report dict: the printout and ``--json`` both read it.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from benchlib.batched_race import race_batched
from benchlib.data_path import bench_data
from benchlib.generation import NoEndTokenizer, bench_generation
from benchlib.llama_race import RACE_PROMPT, RaceSampling, race_llama_cpp
from benchlib.machine import bench_matmul, cpu_instruction_sets, measure_when_quiet, wait_until_idle
from benchlib.quality import bench_quality
from benchlib.reference import race
from benchlib.server_load import bench_server, server_model
from benchlib.token_cost import token_cost
from benchlib.training import bench_training
from engine.data.sources import open_source
from engine.data.tokenizer import train_tokenizer
from engine.generation.generator import ResponseGenerator
from engine.runtime import hardware
from model import ModelConfig


@dataclass(frozen=True)
class Plan:
    """The benchmark's settings, from the command line (``bench.build_parser``)."""

    cfg: ModelConfig
    batch: int
    steps: int  # timed training steps
    warmup: int  # untimed training steps first
    rounds: int  # ours-then-theirs rounds of the race
    gen_repeats: int
    skip: frozenset[str]
    quick: bool
    bf16: bool  # also time bf16 autocast training where the CPU has native bf16
    quality: bool
    quality_minutes: float
    corpus: Path
    reference: Path
    wait_idle: float  # seconds to wait for a quiet CPU before a section
    server_clients: int
    server_requests: int  # per client
    server_max_tokens: int
    server_model: Path | None
    llama_cpp: bool = False  # race against llama.cpp
    llama_cpp_model: Path | None = None
    llama_cpp_types: tuple[str, ...] = ("f16", "f32")
    llama_cpp_threads: int | None = None  # None: the menu's threads
    llama_cpp_sampling: RaceSampling = RaceSampling()
    new_tokens: int = 200  # generated per timed run
    prompt_len: int = 10

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        _, d_model, n_layer, n_head = hardware.preset_by_name(args.preset)
        cfg = ModelConfig(vocab_size=args.vocab, context=args.context, d_model=args.d_model or d_model,
                          n_layer=args.n_layer or n_layer, n_head=args.n_head or n_head, dropout=args.dropout,
                          arch=args.arch)
        return cls(cfg=cfg, batch=args.batch, steps=args.steps or (5 if args.quick else 10), warmup=args.warmup,
                   rounds=args.rounds or (1 if args.quick else 5), gen_repeats=2 if args.quick else 3,
                   skip=frozenset(s.strip() for s in args.skip.split(",") if s.strip()), quick=args.quick,
                   bf16=not args.no_bf16, quality=args.quality, quality_minutes=args.quality_minutes,
                   corpus=Path(args.corpus), reference=Path(args.reference), wait_idle=args.wait_idle,
                   server_clients=args.server_clients, server_requests=args.server_requests,
                   server_max_tokens=args.server_max_tokens,
                   server_model=Path(args.server_model) if args.server_model else None,
                   llama_cpp=args.llama_cpp,
                   llama_cpp_model=Path(args.llama_cpp_model) if args.llama_cpp_model else None,
                   llama_cpp_types=tuple(t.strip() for t in args.llama_cpp_types.split(",") if t.strip()),
                   llama_cpp_threads=args.llama_cpp_threads,
                   llama_cpp_sampling=RaceSampling(repetition_penalty=1.1 if args.llama_cpp_sampling == "default"
                                                   else 1.0))


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return cpu


def environment(plan: Plan) -> dict:
    cfg = plan.cfg
    return {
        "cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "native_bf16": hardware.cpu_has_native_bf16(), "python": platform.python_version(),
        "torch": torch.__version__, "quick": plan.quick,
        "config": {"arch": cfg.arch, "d_model": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
                   "context": cfg.context, "vocab": cfg.vocab_size, "batch": plan.batch,
                   "dropout": cfg.dropout},
    }


def race_ratios(race_result: dict) -> dict:
    """The race's ours/theirs ratios under the names ``--json`` readers look for (empty without a race)."""
    if not race_result.get("rounds"):
        return {}
    return {"train_tokens_per_s": race_result["train_ratio"], "gen_tokens_per_s": race_result["gen_ratio"],
            "gen_tokens_per_s_fp32_weights": race_result["gen_ratio_fp32"],
            "gen_tokens_per_s_default_sampling": race_result["gen_ratio_default"]}


class Sections:
    """Runs the sections of one plan in order; each method adds its part of the report."""

    def __init__(self, plan: Plan, workdir: Path) -> None:
        self.plan = plan
        self.workdir = workdir  # scratch files: scaled corpora, token caches, trained models
        self.report: dict = {"environment": environment(plan)}
        self.tokenizer = None  # a BPE tokenizer of the corpus, for generation and the race
        self.gen_cfg = plan.cfg  # the model size with the tokenizer's vocabulary
        self._served: Path | None = None  # the model folder of the server and llama.cpp sections

    def run(self) -> dict:
        skip = self.plan.skip
        self.report["training"] = []
        if "train" not in skip:  # first, so that its peak memory is the training's own
            self.training()
        self.idle()
        self.matmul()
        self.prepare_tokenizer()
        if "gen" not in skip:
            self.generation()
        if "data" not in skip:
            self.data()
        if "reference" not in skip:
            self.reference_race()
        if "server" not in skip:
            self.server()
        if self.plan.llama_cpp:
            self.llama_cpp_race()
        if self.plan.quality:
            self.quality()
        return self.report

    def idle(self) -> None:
        wait_until_idle(self.plan.wait_idle)

    def training(self) -> None:
        p = self.plan
        self.report["cpu_isa"] = cpu_instruction_sets()
        precisions = ["fp32"]
        if hardware.cpu_has_native_bf16() and p.bf16 and not p.quick:
            precisions.append("bf16")
        for precision in precisions:
            self.report["training"].append(measure_when_quiet(
                lambda precision=precision: bench_training(p.cfg, p.batch, precision, p.steps, p.warmup),
                p.wait_idle))

    def matmul(self) -> None:
        """The matrix-product rates, and each training row's MFU against the rate of its precision."""
        matmul = self.report["matmul"] = bench_matmul(self.plan.cfg, self.plan.batch, self.plan.quick)
        for t in self.report["training"]:
            square = matmul["square_fp32" if t["precision"] == "fp32" else "square_bf16"]
            t["mfu_square"] = t["achieved_gflops"] / square["gflops_median"]
            if t["precision"] == "fp32":
                t["mfu_model"] = t["achieved_gflops"] / matmul["model_gemms_fp32"]["gflops_median"]

    def prepare_tokenizer(self) -> None:
        """A BPE tokenizer of the corpus for generation and the race (trained unless gen and data are both skipped)."""
        p = self.plan
        if p.corpus.exists() and not {"gen", "data"} <= p.skip:
            self.tokenizer = train_tokenizer("bpe", open_source(str(p.corpus)).sample_for_tokenizer(),
                                             p.cfg.vocab_size)
        if self.tokenizer is not None and self.tokenizer.vocab_size != p.cfg.vocab_size:
            self.gen_cfg = ModelConfig(**{**p.cfg.to_dict(), "vocab_size": self.tokenizer.vocab_size})

    def _generation_tokenizer(self):
        return self.tokenizer if self.tokenizer is not None else NoEndTokenizer(None)

    def generation(self) -> None:
        p, tokenizer = self.plan, self._generation_tokenizer()
        self.report["generation"] = measure_when_quiet(
            lambda: bench_generation(self.gen_cfg, tokenizer, p.new_tokens, p.prompt_len, p.gen_repeats),
            p.wait_idle)

    def data(self) -> None:
        p = self.plan
        if not p.corpus.exists():
            self.report["data_note"] = f"skipped: {p.corpus} not found"
            return
        self.idle()
        self.report["data"] = bench_data(p.corpus, [1] if p.quick else [1, 10], p.cfg.vocab_size, self.workdir)

    def reference_race(self) -> None:
        p = self.plan
        result = self.report["race"] = race(p.reference, p.cfg, self.gen_cfg, self._generation_tokenizer(), p.batch,
                                            p.steps, p.warmup, p.new_tokens, p.prompt_len, p.gen_repeats, p.rounds,
                                            p.wait_idle)
        self.report["reference"] = result.pop("reference", result)  # a skipped race is its own reference

    def served_model(self) -> Path | None:
        """The model folder the server and llama.cpp sections run: ``--server-model``, else the
        benchmark's model size trained briefly on the corpus (once); None without either."""
        p = self.plan
        if self._served is None:
            if p.server_model is not None:
                self._served = p.server_model
            elif p.corpus.exists():
                self._served = server_model(p.corpus, p.cfg, p.batch, self.workdir)
        return self._served

    def server(self) -> None:
        p = self.plan
        model_dir = self.served_model()
        if model_dir is None:
            self.report["server_note"] = f"skipped: {p.corpus} not found (or give --server-model DIR)"
            return
        self.report["server"] = measure_when_quiet(lambda: bench_server(
            model_dir, p.server_clients, p.server_requests, p.server_max_tokens, self.workdir), p.wait_idle)

    def llama_cpp_race(self) -> None:
        """Ours against llama.cpp on the same model, alternating; then what one of our tokens costs,
        and both engines decoding 1 to 16 sequences at once."""
        p = self.plan
        model_dir = p.llama_cpp_model or self.served_model()
        if model_dir is None:
            self.report["llama_cpp_note"] = f"{p.corpus} not found (or give --llama-cpp-model DIR)"
            return
        self.idle()
        race = self.report["llama_cpp"] = race_llama_cpp(model_dir, p.llama_cpp_types, p.llama_cpp_threads,
                                                         p.rounds, p.new_tokens, sampling=p.llama_cpp_sampling)
        if race.get("skipped"):
            return
        previous = torch.get_num_threads()
        torch.set_num_threads(race["threads"])
        try:
            gen = ResponseGenerator(str(model_dir), hardware.detect_runtime("cpu"))
            race["token_cost"] = token_cost(gen, RACE_PROMPT, p.llama_cpp_sampling.ours(p.new_tokens, 0))
        finally:
            torch.set_num_threads(previous)
        self.idle()
        race["batched"] = race_batched(model_dir, race["threads"], rounds=p.rounds)

    def quality(self) -> None:
        p = self.plan
        if not p.corpus.exists():
            self.report["quality_note"] = f"skipped: {p.corpus} not found"
            return
        self.idle()
        self.report["quality"] = bench_quality(p.corpus, p.quality_minutes, self.workdir)


def run_benchmark(plan: Plan) -> dict:
    """Every section the plan asks for, in a scratch folder removed afterwards; the report."""
    with tempfile.TemporaryDirectory(prefix="custom-llm-bench-") as tmp:
        report = Sections(plan, Path(tmp)).run()
    report["ratios"] = race_ratios(report.get("race", {}))
    return report
