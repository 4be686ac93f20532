#!/usr/bin/env python3
"""Every GPU check in one script, for a session that has a GPU for a few minutes.

    python scripts/gpu_check.py --out results/                      # on the GPU machine
    python scripts/gpu_check.py --out results/ --only fp16_resume,chat
    python scripts/gpu_check.py --smoke --out /tmp/x                # tiny sizes on the CPU: does it run?

Each check is independent (one failing does not stop the rest; one that needs a
trained model folder trains its own, once per run) and its result goes into
``<out>/gpu_check.json`` as soon as it finishes, so a run cut short by a time limit
still leaves what it measured. The last line printed is a one-line summary to paste
into a note. Each check is sized for one call of at most 600 s on an H100; a whole run
is not, so split it with ``--only``/``--skip``, e.g. ``--only flash,train,fp16,
autobatch,backoff,generate``, then ``--only fp16_resume,chat,generate_paths,decode,
cpu_load``, then ``--only compile,compile_ddp``, then ``--only ddp,multi_rank,budget``.
A check that trains directly backs off to smaller micro-batches when out of memory, as
the Trainer does; the others train through the Trainer.

The throughput checks are here; ``gpu_check_trainer.py`` holds the Trainer's paths and
``gpu_check_runs.py`` the runs of ``interface.py train``.

Throughput, on the large preset (d_model 1024, 12 layers, context 1024):

- ``flash``: which ``scaled_dot_product_attention`` kernels run for our shapes;
- ``train``/``compile``: the trainer's own step under the autocast dtype, eager and
  ``torch.compile``d: tokens/s and MFU against the card's dense bf16 peak;
- ``fp16``: fp16 autocast with a GradScaler: finite losses, the scale;
- ``autobatch``: what ``hardware.default_batch_size`` picks and the peak memory of a
  step at that size (against the card's);
- ``backoff``: a batch far too large for the card must train (at a smaller micro-batch);
- ``generate``: batch-1 sampling tokens/s with the KV cache, and time to first token.

Paths that had never run on a GPU, through the ``Trainer`` on a small model:

- ``fp16_resume``: fp16 training stopped halfway, the GradScaler's state in the
  checkpoint, and a resume that must repeat the uninterrupted run's losses;
- ``chat``: fine-tuning on conversations (packed examples: attention with a mask, and
  dropout), with the attention kernels that ran;
- ``generate_paths``: generation from the saved folder, with and without the KV cache
  (greedy: the same tokens?), and a chat reply;
- ``decode``: the generation ``Decoder`` in fp32, bf16 and fp16 against the fp32
  forward pass, on logits;
- ``cpu_load``: the checkpoint of a run stopped on the GPU resumed on the CPU, and its
  model generating there.

Distributed and timed runs of ``interface.py train``:

- ``ddp``: one process, the same under torchrun on one GPU (DDP's cost) and on every
  GPU with the batch per GPU kept: tokens/s and the scaling efficiency;
- ``compile_ddp``: ``--compile`` under torchrun (DDP around a compiled model), on one
  GPU and on all of them;
- ``multi_rank`` (more than one GPU; the smoke run uses two CPU processes): a run on
  every GPU stopped by its time limit, resumed on as many, then on one process;
- ``budget``: the time budget's probe and plans here, and a real ``--minutes`` run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

SCRIPTS = Path(__file__).resolve().parent
sys.path[:0] = [str(SCRIPTS.parent), str(SCRIPTS)]  # the project, and the two modules beside this one

from gpu_check_runs import check_budget, check_compile_ddp, check_ddp, check_multi_rank  # noqa: E402
from gpu_check_trainer import (  # noqa: E402
    Workspace,
    attention_kernels,
    check_chat,
    check_cpu_load,
    check_decode,
    check_fp16_resume,
    check_generate_paths,
    sync,
)

from bench import flops_per_token  # noqa: E402
from engine.data.sources import source_from_text  # noqa: E402
from engine.runtime import hardware  # noqa: E402
from engine.training.events import MemoryBackoff  # noqa: E402
from engine.training.step import backing_off  # noqa: E402
from model import GPT, ModelConfig  # noqa: E402
from response_generator import GenerationConfig, ResponseGenerator  # noqa: E402
from trainer import TrainConfig, Trainer, make_optimizer, train_step  # noqa: E402

CHECKS = ("flash", "train", "compile", "fp16", "autobatch", "backoff", "generate", "fp16_resume", "chat",
          "generate_paths", "decode", "cpu_load", "ddp", "compile_ddp", "multi_rank", "budget")
# torch.compile on a CPU takes a minute or more before its first step: a smoke run
# leaves these out unless --only names them.
SLOW_ON_CPU = {"compile", "compile_ddp"}

# Dense bf16 tensor-core peaks (no 2:4 sparsity), TFLOP/s, by a substring of the device
# name, the most specific first. NVIDIA's datasheets give bf16 with sparsity; dense is
# half: H100 SXM 1,979 (989), H100 PCIe 1,513 (756), H100 NVL 1,671 (835); H200 SXM as
# H100 SXM (989), H200 NVL as H100 NVL (835); GH200's GPU as H100 SXM (989). A100 624
# (312), L40S 733 (362), A10 250 (125); RTX 4090 165 with fp32 accumulation (Ada
# whitepaper). AWS's A10G is a different part from the A10: unknown here (None). The
# device names: "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA H100 NVL",
# "NVIDIA H200", "NVIDIA H200 NVL".
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0),
                    ("H200", 989.0), ("A100", 312.0), ("L40S", 362.0), ("A10G", None), ("A10", 125.0),
                    ("4090", 165.0))


def peak_tflops(name: str) -> float | None:
    """The dense bf16 peak of the GPU called ``name``, where we know it (None: unknown)."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def check_flash(runtime: hardware.Runtime, cfg: ModelConfig) -> dict:
    model = GPT(cfg).to(runtime.device).train()
    x = torch.randint(0, cfg.vocab_size, (2, cfg.context), device=runtime.device)
    names = attention_kernels(runtime, model, x)
    flash = any("flash" in n.lower() for n in names)
    return {"attention_kernels": names, "flash_used": flash, "line": "flash" if flash else "no flash kernel"}


def steps_backing_off(forward, optimizer, x: torch.Tensor, runtime: hardware.Runtime,
                      scaler: torch.amp.GradScaler | None, steps: int) -> tuple[list[float], list[float], int]:
    """``steps`` training steps on the batch ``x``: losses, step times and micro-batches.

    Out of memory, a step is retried in twice as many micro-batches, as the Trainer
    does (``backing_off``), so a check measures the largest slice that fits instead of
    failing. Only the try that fitted is timed.
    """
    def timed_step(micro_batches: int) -> tuple[float, float]:
        sync()
        t0 = time.perf_counter()
        loss = train_step(forward, optimizer, x, x, 3e-4, runtime, 1.0, scaler, micro_batches)
        sync()
        return loss, time.perf_counter() - t0

    micro, losses, times = 1, [], []
    for _ in range(steps):
        (loss, seconds), micro = backing_off(timed_step, micro, x.shape[0], optimizer, runtime,
                                             f"out of memory on {runtime.device} even with one sequence per "
                                             "micro-batch")
        losses.append(loss)
        times.append(seconds)
    return losses, times, micro


def time_training(runtime: hardware.Runtime, cfg: ModelConfig, batch: int, steps: int, compile_: bool) -> dict:
    torch.manual_seed(0)
    model = GPT(cfg).to(runtime.device).train()
    optimizer = make_optimizer(model, TrainConfig(), runtime)
    scaler = torch.amp.GradScaler("cuda") if runtime.use_grad_scaler else None
    forward = torch.compile(model) if compile_ else model
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.context), device=runtime.device)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    losses, times, micro = steps_backing_off(forward, optimizer, x, runtime, scaler, steps + 3)
    step = statistics.median(times[3:])  # after the first steps' warm-up (and compilation)
    tokens_per_s = batch * cfg.context / step
    out = {"compile": compile_, "precision": runtime.precision, "batch": batch, "micro_batches": micro,
           "steps": steps, "tokens_per_s": tokens_per_s, "step_ms": 1e3 * step, "first_step_s": times[0],
           "loss_first": losses[0], "loss_last": losses[-1],
           "achieved_tflops": flops_per_token(model) * tokens_per_s / 1e12}
    line = f"{tokens_per_s:,.0f} tok/s"
    if torch.cuda.is_available():
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        peak = peak_tflops(torch.cuda.get_device_name(runtime.device))
        if peak:
            out["mfu"] = out["achieved_tflops"] / peak
            line += f" MFU {out['mfu']:.2f}"
    if scaler is not None:
        out["grad_scale"] = scaler.get_scale()
        line += f" scale {scaler.get_scale():g}"
    finite = all(math.isfinite(v) for v in losses)
    out["line"] = line + ("" if micro == 1 else f" ({micro} micro-batches)") + ("" if finite else " NON-FINITE LOSS")
    return out


def check_autobatch(runtime: hardware.Runtime, cfg: ModelConfig, batch: int) -> dict:
    out = {"picked": batch, **time_training(runtime, cfg, batch, 3, compile_=False)}
    if torch.cuda.is_available():
        card = hardware.accelerator_memory_gib(runtime)
        out["card_memory_gib"] = card
        out["peak_share"] = out["peak_memory_gib"] / card
        out["line"] = f"batch {batch}: peak {out['peak_memory_gib']:.1f} of {card:.1f} GiB"
    return out


def check_backoff(runtime: hardware.Runtime, cfg: ModelConfig, batch: int, text: str) -> dict:
    events = []
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(tmp + "/m", "bpe", runtime=runtime,
                          model_overrides={k: getattr(cfg, k) for k in ("d_model", "n_layer", "n_head", "context")},
                          train_overrides={"batch_size": batch, "target_vocab_size": 2000, "checkpoint_every": 1000})
        result = trainer.train(source_from_text(text), 1,
                               lambda event: events.append(event) if isinstance(event, MemoryBackoff) else None)
    last = events[-1] if events else None
    return {"batch": batch, "backoffs": [vars(e) for e in events], "steps": result.steps,
            "val_loss": result.final_eval.val_loss if result.final_eval else None,
            "line": f"batch {batch} trained {result.steps} steps"
                    + (f" in micro-batches of {last.micro_batch_size}" if last else " without backing off")}


def time_generation(runtime: hardware.Runtime, cfg: ModelConfig) -> dict:
    torch.manual_seed(0)
    gen = ResponseGenerator.from_model(GPT(cfg), type("Tok", (), {"eot_id": -1})(), runtime)
    n = min(200, cfg.context - 10)
    settings = GenerationConfig(max_new_tokens=n, temperature=0.8, top_k=50, top_p=1.0,
                                repetition_penalty=1.0, seed=0)
    rates, first = [], []
    for r in range(4):
        sync()
        t0 = time.perf_counter()
        count = 0
        for _ in gen.generate_ids(list(range(1, 11)), settings):
            if count == 0:
                t_first = time.perf_counter() - t0
            count += 1
        sync()
        if r:  # the first run warms up
            rates.append(count / (time.perf_counter() - t0))
            first.append(t_first)
    rate, first_ms = statistics.median(rates), 1e3 * statistics.median(first)
    return {"tokens": n, "tokens_per_s": rate, "first_token_ms": first_ms,
            "line": f"{rate:.0f} tok/s, first token {first_ms:.1f} ms"}


# -- the run --------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, any device: check that the script runs")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per row")
    p.add_argument("--only", default="", help=f"comma-separated checks to run (default: all): {','.join(CHECKS)}")
    p.add_argument("--skip", default="", help="comma-separated checks to leave out")
    p.add_argument("--ddp-minutes", type=float, default=0.75, help="training time of each distributed row")
    args = p.parse_args(argv)
    only, skip = (set(filter(None, s.split(","))) for s in (args.only, args.skip))
    unknown = (only | skip) - set(CHECKS)
    if unknown:
        p.error(f"unknown check(s) {', '.join(sorted(unknown))}; the checks: {', '.join(CHECKS)}")
    args.selected = [c for c in CHECKS if (c in only if only else not (args.smoke and c in SLOW_ON_CPU))
                     and c not in skip]
    return args


def summary_line(report: dict, selected: list[str]) -> str:
    """One line a person can paste into a note: the card, then each check's result."""
    parts = [report.get("gpu", report["device"]), f"torch {report['torch']}", report["precision"]]
    for name in selected:
        result = report.get(name)
        if isinstance(result, dict):
            parts.append(f"{name}: " + (f"ERROR {result['error'][:80]}" if "error" in result else result.get("line", "ok")))
    return "SUMMARY " + " | ".join(parts)


def run_checks(names: list[str], checks: dict[str, Callable[[], dict]], report: dict, out_dir: Path) -> None:
    """Run ``names`` in order into ``report``, writing it after each; one failing stops none."""
    on_cuda = torch.cuda.is_available()
    for name in names:
        t0 = time.perf_counter()
        try:
            report[name] = checks[name]()
        except Exception as error:  # one failing check must not hide the others
            report[name] = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()[-2000:]}
        report[name + "_seconds"] = round(time.perf_counter() - t0, 1)
        print(f"== {name} ({report[name + '_seconds']} s): {json.dumps(report[name], default=str)[:600]}", flush=True)
        (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        if on_cuda:
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    runtime = hardware.detect_runtime()
    on_cuda = runtime.device.type == "cuda"
    if args.smoke:
        cfg = ModelConfig(vocab_size=512, context=64, d_model=64, n_layer=2, n_head=4)
        batch, steps, big_batch, lines = 4, 2, 8, 500
    else:
        _, d_model, n_layer, n_head = hardware.preset_by_name("large")
        cfg = ModelConfig(vocab_size=8000, context=1024, d_model=d_model, n_layer=n_layer, n_head=n_head)
        batch = hardware.default_batch_size(runtime, cfg)
        # ~1.2M tokens: enough 1024-token windows for one batch of 1024 sequences,
        # which needs several times an H100's memory at this size.
        steps, big_batch, lines = args.steps, 1024, 100_000
    report: dict = {"device": str(runtime.device), "precision": runtime.precision, "reason": runtime.reason,
                    "torch": torch.__version__, "config": cfg.to_dict(), "batch": batch, "checks": args.selected}
    if on_cuda:
        props = torch.cuda.get_device_properties(runtime.device)
        report.update(gpu=props.name, memory_gib=props.total_memory / 2**30, gpus=torch.cuda.device_count(),
                      capability=list(hardware.cuda_capability(runtime.device)), peak_bf16_tflops=peak_tflops(props.name))
    work = Workspace(Path(tempfile.mkdtemp(prefix="gpu_check-")), runtime, args.smoke)
    text = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog. " for i in range(lines))
    ddp_batch = 4 if args.smoke else 16  # per GPU: the large preset at context 1024 fits it on any 24 GiB card
    ddp_minutes = 0.1 if args.smoke else args.ddp_minutes
    checks: dict[str, Callable[[], dict]] = {
        "flash": lambda: check_flash(runtime, cfg),
        "train": lambda: time_training(runtime, cfg, batch, steps, compile_=False),
        "compile": lambda: time_training(runtime, cfg, batch, steps, compile_=True),
        "fp16": lambda: time_training(hardware.detect_runtime(str(runtime.device), "fp16"), cfg, max(1, batch // 2),
                                      5, compile_=False),
        "autobatch": lambda: check_autobatch(runtime, cfg, batch),
        "backoff": lambda: check_backoff(runtime, cfg, big_batch, text),
        "generate": lambda: time_generation(runtime, cfg),
        "fp16_resume": lambda: check_fp16_resume(work),
        "chat": lambda: check_chat(work),
        "generate_paths": lambda: check_generate_paths(work),
        "decode": lambda: check_decode(work),
        "cpu_load": lambda: check_cpu_load(work),
        "ddp": lambda: check_ddp(runtime, cfg, ddp_batch, args.smoke, ddp_minutes),
        # compiling takes a minute or more of the first step: a longer row
        "compile_ddp": lambda: check_compile_ddp(runtime, cfg, ddp_batch, args.smoke, 2 * ddp_minutes),
        "multi_rank": lambda: check_multi_rank(runtime, args.smoke),
        "budget": lambda: check_budget(runtime, args.smoke),
    }
    # fp16 autocast does not run on the CPU, and the card's memory is what autobatch measures.
    names = [n for n in args.selected if on_cuda or n not in ("fp16", "autobatch")]
    try:
        run_checks(names, checks, report, out_dir)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(work.root)
    report["summary"] = summary_line(report, names)
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"written: {out_dir / 'gpu_check.json'}")
    print(report["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
