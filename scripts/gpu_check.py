#!/usr/bin/env python3
"""Every GPU check in one run, for a session that has a GPU for a few minutes.

    python scripts/gpu_check.py --out results/         # on the GPU machine
    python scripts/gpu_check.py --smoke --out /tmp/x   # tiny sizes on the CPU: does it run?

Each check is independent (one failing does not stop the rest) and its result goes
into ``<out>/gpu_check.json`` as soon as it finishes, so a run cut short by a time
limit still leaves what it measured:

1. flash attention: which ``scaled_dot_product_attention`` kernels run for our
   attention shapes in bf16 (the profiler's kernel names);
2. the large preset (d_model 1024, 12 layers, context 1024) trained with the
   trainer's own step under bf16 autocast, eager and then ``torch.compile``d:
   tokens/s and MFU against the card's dense bf16 peak;
3. fp16 autocast with a GradScaler: a few steps, finite losses, the scale;
4. the automatic batch size: what ``hardware.default_batch_size`` picks and the
   peak memory of a step at that size;
5. the out-of-memory back-off under real memory pressure: a batch far too large
   for the card must train (at a smaller micro-batch) instead of failing;
6. generation: batch-1 sampling tokens/s with the KV cache, and time to first token;
7. distributed training through ``interface.py train``: one process without torchrun,
   the same under torchrun on one GPU (DistributedDataParallel's cost), and, where the
   machine has more GPUs, all of them with the same batch per GPU: tokens/s and the
   scaling efficiency (N-GPU tokens/s over N times one GPU's). ``--smoke`` runs two
   gloo processes on the CPU instead;
8. the time budget on this device: the probe's FLOP/s, the shapes it plans for 3, 10
   and 30 minutes on a 1 MB text, and a real ``interface.py train --minutes`` run whose
   wall time must stay within its budget (plus start-up).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import flops_per_token  # noqa: E402
from engine.data.sources import source_from_text  # noqa: E402
from engine.runtime import hardware  # noqa: E402
from engine.training import budget
from engine.training.events import MemoryBackoff  # noqa: E402
from model import GPT, ModelConfig  # noqa: E402
from response_generator import GenerationConfig, ResponseGenerator  # noqa: E402
from trainer import TrainConfig, Trainer, make_optimizer, train_step  # noqa: E402

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by a substring of the device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def check_flash(runtime: hardware.Runtime, cfg: ModelConfig) -> dict:
    from torch.profiler import ProfilerActivity, profile

    model = GPT(cfg).to(runtime.device).train()
    x = torch.randint(0, cfg.vocab_size, (2, cfg.context), device=runtime.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        with runtime.autocast():
            _, loss = model(x, x)
        loss.backward()
        sync()
    names = sorted({e.key for e in prof.key_averages() if "attention" in e.key.lower() or "flash" in e.key.lower()})
    return {"attention_kernels": names, "flash_used": any("flash" in n.lower() for n in names)}


def time_training(runtime: hardware.Runtime, cfg: ModelConfig, batch: int, steps: int, compile_: bool) -> dict:
    torch.manual_seed(0)
    model = GPT(cfg).to(runtime.device).train()
    optimizer = make_optimizer(model, TrainConfig(), runtime)
    scaler = torch.amp.GradScaler("cuda") if runtime.use_grad_scaler else None
    forward = torch.compile(model) if compile_ else model
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.context), device=runtime.device)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    t_first = time.perf_counter()
    for i in range(steps + 3):
        sync()
        t0 = time.perf_counter()
        losses.append(train_step(forward, optimizer, x, x, 3e-4, runtime, 1.0, scaler))
        sync()
        if i == 0:
            first_step_s = time.perf_counter() - t_first
        if i >= 3:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    tokens_per_s = batch * cfg.context / step
    out = {"compile": compile_, "precision": runtime.precision, "batch": batch, "steps": steps,
           "tokens_per_s": tokens_per_s, "step_ms": 1e3 * step, "first_step_s": first_step_s,
           "loss_first": losses[0], "loss_last": losses[-1],
           "achieved_tflops": flops_per_token(model) * tokens_per_s / 1e12}
    if torch.cuda.is_available():
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        peak = peak_tflops(torch.cuda.get_device_name())
        if peak:
            out["mfu"] = out["achieved_tflops"] / peak
    if scaler is not None:
        out["grad_scale"] = scaler.get_scale()
    return out


def check_backoff(runtime: hardware.Runtime, cfg: ModelConfig, batch: int, text: str) -> dict:
    events = []
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(tmp + "/m", "bpe", runtime=runtime,
                          model_overrides={k: getattr(cfg, k) for k in ("d_model", "n_layer", "n_head",
                                                                          "context")},
                          train_overrides={"batch_size": batch, "target_vocab_size": 2000, "checkpoint_every": 1000})
        result = trainer.train(source_from_text(text), 1,
                               lambda event: events.append(event) if isinstance(event, MemoryBackoff) else None)
    return {"batch": batch, "backoffs": [vars(e) for e in events], "steps": result.steps, "val_loss": result.final_eval.val_loss if result.final_eval else None}


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
    return {"tokens": n, "tokens_per_s": statistics.median(rates), "first_token_ms": 1e3 * statistics.median(first)}


ROOT = Path(__file__).resolve().parent.parent
STEP_LINE = re.compile(r"^step (\d+) \| loss ([\d.]+) \| lr \S+ \| ([\d,]+) tok/s", re.MULTILINE)


def train_command(processes: int, data: Path, folder: Path, flags: list[str], minutes: float,
                  timeout: float) -> dict:
    """``interface.py train`` alone (``processes`` 0) or under torchrun; tokens/s of its steps."""
    command = [str(ROOT / "interface.py"), "train", str(data), "--model-dir", str(folder), "--epochs", "1",
               "--log-every", "1", "--max-minutes", str(minutes), *flags]
    if processes:
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *command]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    steps = [(int(step), float(loss), float(rate.replace(",", ""))) for step, loss, rate in
             STEP_LINE.findall(proc.stdout)]
    timed = [rate for _, _, rate in steps[3:]] or [rate for _, _, rate in steps]  # after the first steps' warm-up
    out = {"processes": processes, "returncode": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
           "steps": len(steps), "tokens_per_s": statistics.median(timed) if timed else None,
           "loss_first": steps[0][1] if steps else None, "loss_last": steps[-1][1] if steps else None,
           "summary": [line for line in proc.stdout.splitlines() if line.startswith(("Training", "Validation"))][-3:]}
    if proc.returncode != 0:
        out["stderr"] = proc.stderr[-2000:]
    return out


def check_budget(runtime: hardware.Runtime, smoke: bool) -> dict:
    """The time-budget probe and plans on this device, then a short real budget run."""
    batch = hardware.default_batch_size(runtime, 256, 256)
    rate = budget.probe_flop_rate(runtime, 8000, batch)
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
    return out


def check_ddp(runtime: hardware.Runtime, cfg: ModelConfig, per_gpu_batch: int, smoke: bool, minutes: float) -> dict:
    """Plain training, the same under DDP on one device, and on every GPU with the batch per GPU kept."""
    gpus = torch.cuda.device_count() if runtime.device.type == "cuda" else 0
    most = 2 if smoke and gpus < 2 else gpus  # the smoke run checks two gloo processes on the CPU
    flags = ["--d-model", str(cfg.d_model), "--n-layer", str(cfg.n_layer), "--n-head", str(cfg.n_head),
             "--context", str(cfg.context), "--target-vocab-size", str(cfg.vocab_size)]
    if smoke:
        flags += ["--device", "cpu"]
    # Enough text for a few dozen steps on every GPU at once: tokenized once, by the first
    # run, whose folder the others train further (the same model, cache and tokenizer).
    tokens_needed = max(1, most) * per_gpu_batch * cfg.context * (40 if not smoke else 12)
    line = "Line {}: the quick brown fox jumps over the lazy dog, and the dog sleeps on. "
    report: dict = {"per_gpu_batch": per_gpu_batch, "gpus": gpus}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "text.txt"
        data.write_text("".join(line.format(i) for i in range(tokens_needed // 12 + 1)))
        folder = Path(tmp) / "model"
        timeout = 60 * minutes + 600
        report["plain"] = train_command(0, data, folder, [*flags, "--batch-size", str(per_gpu_batch)],
                                        minutes, timeout)
        report["ddp_1"] = train_command(1, data, folder, [*flags, "--batch-size", str(per_gpu_batch)],
                                        minutes, timeout)
        plain, one = report["plain"]["tokens_per_s"], report["ddp_1"]["tokens_per_s"]
        if plain and one:
            report["ddp_1_vs_plain"] = one / plain
        if most > 1:
            report[f"ddp_{most}"] = train_command(most, data, folder, [*flags, "--batch-size",
                                                                       str(most * per_gpu_batch)], minutes, timeout)
            many = report[f"ddp_{most}"]["tokens_per_s"]
            if many and one:
                report["scaling_efficiency"] = many / (most * one)
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, any device: check that the script runs")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per row")
    p.add_argument("--skip", default="", help="comma-separated checks to skip: flash,train,compile,fp16,"
                                               "autobatch,backoff,generate,ddp,budget")
    p.add_argument("--ddp-minutes", type=float, default=0.75, help="training time of each distributed row")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    runtime = hardware.detect_runtime()
    if args.smoke:
        cfg = ModelConfig(vocab_size=512, context=64, d_model=64, n_layer=2, n_head=4)
        batch, steps, big_batch, lines = 4, 2, 8, 2_000
    else:
        _, d_model, n_layer, n_head = hardware.preset_by_name("large")
        cfg = ModelConfig(vocab_size=8000, context=1024, d_model=d_model, n_layer=n_layer, n_head=n_head)
        batch = hardware.default_batch_size(runtime, cfg.d_model, cfg.context)
        # ~1.2M tokens: enough 1024-token windows for one batch of 1024 sequences,
        # which needs several times an H100's memory at this size.
        steps, big_batch, lines = args.steps, 1024, 100_000
    report: dict = {"device": str(runtime.device), "precision": runtime.precision, "torch": torch.__version__,
                    "config": cfg.to_dict(), "batch": batch}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        report.update(gpu=props.name, memory_gib=props.total_memory / 2**30,
                      bf16=torch.cuda.is_bf16_supported(), peak_bf16_tflops=peak_tflops(props.name))

    def record(name: str, fn) -> None:
        if name in skip:
            return
        t0 = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as error:  # one failing check must not hide the others
            report[name] = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()[-2000:]}
        report[name + "_seconds"] = round(time.perf_counter() - t0, 1)
        print(f"== {name}: {json.dumps(report[name], default=str)[:600]}", flush=True)
        (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    record("flash", lambda: check_flash(runtime, cfg))
    record("train", lambda: time_training(runtime, cfg, batch, steps, compile_=False))
    record("compile", lambda: time_training(runtime, cfg, batch, steps, compile_=True))
    if runtime.device.type == "cuda":
        fp16 = hardware.detect_runtime(str(runtime.device), "fp16")
        record("fp16", lambda: time_training(fp16, cfg, max(1, batch // 2), 5, compile_=False))
        record("autobatch", lambda: {"picked": batch, **time_training(runtime, cfg, batch, 3, compile_=False)})
    text = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog. " for i in range(lines))
    record("backoff", lambda: check_backoff(runtime, cfg, big_batch, text))
    record("generate", lambda: time_generation(runtime, cfg))
    ddp_batch = 4 if args.smoke else 16  # per GPU: the large preset at context 1024 fits it on any 24 GiB card
    record("ddp", lambda: check_ddp(runtime, cfg, ddp_batch, args.smoke, 0.1 if args.smoke else args.ddp_minutes))
    record("budget", lambda: check_budget(runtime, args.smoke))
    print(f"written: {out_dir / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
