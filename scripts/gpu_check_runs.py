"""``interface.py train`` alone and under torchrun, for ``gpu_check.py``.

DistributedDataParallel's cost and scaling, ``--compile`` under DDP, a multi-rank run
stopped and resumed (on as many ranks, then on one), and the time budget. Each check
returns a dict with a ``line`` for the summary.
"""
from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from engine.runtime import hardware
from engine.training import budget
from model import ModelConfig

ROOT = Path(__file__).resolve().parent.parent
STEP_LINE = re.compile(r"^step (\d+) \| loss ([\d.]+) \| lr \S+ \| ([\d,]+) tok/s", re.MULTILINE)


def train_command(processes: int, data: Path | None, folder: Path, flags: list[str], minutes: float,
                  timeout: float) -> dict:
    """``interface.py train`` alone (``processes`` 0) or under torchrun; tokens/s of its steps.

    ``data`` None resumes the folder's interrupted run (``--resume``).
    """
    command = [str(ROOT / "interface.py"), "train", *([str(data)] if data else ["--resume"]), "--model-dir",
               str(folder), "--log-every", "1", "--max-minutes", str(minutes), *flags]
    if processes:
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *command]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    steps = [(int(step), float(loss), float(rate.replace(",", ""))) for step, loss, rate in
             STEP_LINE.findall(proc.stdout)]
    timed = [rate for _, _, rate in steps[3:]] or [rate for _, _, rate in steps]  # after the first steps' warm-up
    out = {"processes": processes, "returncode": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
           "steps": len(steps), "first_step": steps[0][0] if steps else None, "last_step": steps[-1][0] if steps else None,
           "tokens_per_s": statistics.median(timed) if timed else None, "resumed": "Resuming the interrupted run" in proc.stdout,
           "loss_first": steps[0][1] if steps else None, "loss_last": steps[-1][1] if steps else None,
           "compile_failed": "torch.compile failed" in proc.stdout,
           "summary": [line for line in proc.stdout.splitlines() if line.startswith(("Training", "Validation"))][-3:]}
    if proc.returncode != 0:
        out["stderr"] = proc.stderr[-2000:]
    return out


def text_file(path: Path, tokens: int) -> Path:
    line = "Line {}: the quick brown fox jumps over the lazy dog, and the dog sleeps on. "
    path.write_text("".join(line.format(i) for i in range(tokens // 12 + 1)))
    return path


def cli_flags(cfg: ModelConfig, smoke: bool) -> list[str]:
    flags = ["--d-model", str(cfg.d_model), "--n-layer", str(cfg.n_layer), "--n-head", str(cfg.n_head),
             "--context", str(cfg.context), "--target-vocab-size", str(cfg.vocab_size)]
    return flags + (["--device", "cpu"] if smoke else [])


def gpu_count(runtime: hardware.Runtime) -> int:
    return torch.cuda.device_count() if runtime.device.type == "cuda" else 0


def check_ddp(runtime: hardware.Runtime, cfg: ModelConfig, per_gpu_batch: int, smoke: bool, minutes: float) -> dict:
    """Plain training, the same under DDP on one device, and on every GPU with the batch per GPU kept."""
    gpus = gpu_count(runtime)
    most = 2 if smoke and gpus < 2 else gpus  # the smoke run checks two gloo processes on the CPU
    flags = cli_flags(cfg, smoke)
    # Enough text for a few dozen steps on every GPU at once: tokenized once, by the first
    # run, whose folder the others train further (the same model, cache and tokenizer).
    tokens_needed = max(1, most) * per_gpu_batch * cfg.context * (40 if not smoke else 12)
    report: dict = {"per_gpu_batch": per_gpu_batch, "gpus": gpus}
    with tempfile.TemporaryDirectory() as tmp:
        data, folder = text_file(Path(tmp) / "text.txt", tokens_needed), Path(tmp) / "model"
        timeout = 60 * minutes + 600
        batch = ["--epochs", "1", "--batch-size", str(per_gpu_batch)]
        report["plain"] = train_command(0, data, folder, [*flags, *batch], minutes, timeout)
        report["ddp_1"] = train_command(1, data, folder, [*flags, *batch], minutes, timeout)
        plain, one = report["plain"]["tokens_per_s"], report["ddp_1"]["tokens_per_s"]
        if plain and one:
            report["ddp_1_vs_plain"] = one / plain
        if most > 1:
            report[f"ddp_{most}"] = train_command(most, data, folder, [*flags, "--epochs", "1", "--batch-size",
                                                                       str(most * per_gpu_batch)], minutes, timeout)
            many = report[f"ddp_{most}"]["tokens_per_s"]
            if many and one:
                report["scaling_efficiency"] = many / (most * one)
    line = f"DDP on 1 = {report.get('ddp_1_vs_plain', float('nan')):.2f}x plain"
    if "scaling_efficiency" in report:
        line += f", {most} ranks {report['scaling_efficiency']:.2f} efficient"
    report["line"] = line
    return report


def check_compile_ddp(runtime: hardware.Runtime, cfg: ModelConfig, per_gpu_batch: int, smoke: bool,
                      minutes: float) -> dict:
    """``--compile`` under torchrun: DDP around a compiled model, on one GPU and on all of them."""
    gpus = gpu_count(runtime)
    most = 2 if smoke and gpus < 2 else gpus
    report: dict = {"gpus": gpus}
    with tempfile.TemporaryDirectory() as tmp:
        data = text_file(Path(tmp) / "text.txt", max(1, most) * per_gpu_batch * cfg.context * 30)
        for n in sorted({1, most} - {0}):
            report[f"ranks_{n}"] = train_command(n, data, Path(tmp) / f"model{n}", [
                *cli_flags(cfg, smoke), "--epochs", "1", "--batch-size", str(n * per_gpu_batch), "--compile"],
                minutes, 60 * minutes + 600)
    rows = [(k, v) for k, v in report.items() if k.startswith("ranks_")]
    report["line"] = ", ".join(
        f"{k.split('_')[1]} rank(s) " + ("FAILED" if v["returncode"] else "eager fallback" if v["compile_failed"]
                                        else f"{v['tokens_per_s'] or 0:,.0f} tok/s over {v['steps']} steps")
        for k, v in rows)
    return report


def check_multi_rank(runtime: hardware.Runtime, smoke: bool) -> dict:
    """A run on every GPU stopped by its time limit, resumed on as many, then on one process."""
    gpus = gpu_count(runtime)
    ranks = 2 if smoke and gpus < 2 else gpus
    if ranks < 2:
        return {"skipped": "one GPU", "line": "skipped (one GPU)"}
    cfg = ModelConfig(vocab_size=320 if smoke else 2000, context=32 if smoke else 256, d_model=32 if smoke else 256,
                      n_layer=1 if smoke else 4, n_head=2 if smoke else 4)
    minutes = 0.1 if smoke else 0.25
    per_rank = 4 if smoke else 16
    report: dict = {"ranks": ranks}
    # Epochs enough that the time limit, not the data, ends each row.
    run = ["--epochs", "50", "--batch-size", str(ranks * per_rank), "--checkpoint-every", "10"]
    device = ["--device", "cpu"] if smoke else []
    with tempfile.TemporaryDirectory() as tmp:
        data, folder = text_file(Path(tmp) / "text.txt", 20_000 if smoke else 500_000), Path(tmp) / "model"
        report["start"] = train_command(ranks, data, folder, [*cli_flags(cfg, smoke), *run], minutes, 600)
        # --resume: the folder's run goes on with its own model, data and batch
        report["resume_same"] = train_command(ranks, None, folder, device, minutes, 600)
        report["resume_one"] = train_command(0, None, folder, device, minutes, 600)
    rows = [report[k] for k in ("start", "resume_same", "resume_one")]
    # Each resumed row goes on from the step the row before stopped at.
    continued = [r["resumed"] and r["first_step"] == before["last_step"] + 1 for before, r in zip(rows, rows[1:])
                 if before["last_step"] is not None and r["first_step"] is not None]
    ok = all(r["returncode"] == 0 for r in rows) and continued == [True, True]
    steps = " -> ".join(str(r["last_step"]) for r in rows)
    report["line"] = (f"{ranks} ranks stopped and resumed on {ranks}, then on 1 (steps {steps})" if ok else
                      f"{ranks} ranks FAILED (exit codes {[r['returncode'] for r in rows]}, continued {continued})")
    return report


def check_budget(runtime: hardware.Runtime, smoke: bool) -> dict:
    """The time-budget probe and plans on this device, then a short real budget run."""
    reference = ModelConfig(vocab_size=8000)  # the probe's reference shape, 256 x 4 at context 256
    batch = hardware.default_batch_size(runtime, reference)
    rate = budget.probe_flop_rate(runtime, reference, batch)
    plans = {minutes: budget.plan_budget(minutes, rate, 300_000, 8000, batch) for minutes in (3, 10, 30)}
    out = {"probe_tflops": rate / 1e12, "batch": batch,
           "plans": {m: {"shape": vars(p.shape), "lr": p.learning_rate, "dropout": p.dropout,
                         "tokens": p.planned_tokens} for m, p in plans.items()}}
    minutes = 0.1 if smoke else 1.0
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "text.txt"
        data.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(20_000)))
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(ROOT / "interface.py"), "train", str(data), "--minutes",
                               str(minutes), "--model-dir", str(Path(tmp) / "m")],
                              capture_output=True, text=True, timeout=600, cwd=ROOT)
        out["run"] = {"minutes": minutes, "wall_s": round(time.perf_counter() - t0, 1),
                      "returncode": proc.returncode,
                      "lines": [line for line in proc.stdout.splitlines()
                                if "time budget" in line or line.startswith(("Validation", "Training"))][-4:]}
        if proc.returncode != 0:
            out["run"]["stderr"] = proc.stderr[-2000:]
    out["line"] = f"probe {rate / 1e12:.1f} TFLOP/s, a {60 * minutes:.0f} s budget took {out['run']['wall_s']:.0f} s"
    return out
