"""The Trainer's paths that had never run on a GPU, for ``gpu_check.py``: on a small model.

fp16 with the GradScaler's state through a stop and a resume, chat fine-tuning (packed
examples: attention with a mask, and dropout), generation from a saved folder with and
without the KV cache, the ``Decoder`` in each precision against the fp32 forward pass,
and a checkpoint written on the GPU resumed on the CPU. Each check returns a dict with
a ``line`` for the summary.
"""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from engine.data.chat_format import Message
from engine.data.conversations import builtin_conversations
from engine.data.sources import source_from_text
from engine.folder.model_folder import ModelFolder
from engine.model.decoder import Decoder
from engine.runtime import hardware
from engine.training.events import StepDone
from engine.training.runs import StopFlag
from model import GPT
from response_generator import GenerationConfig, ResponseGenerator
from trainer import Trainer


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()



def attention_kernels(runtime: hardware.Runtime, model: GPT, x: torch.Tensor,
                      segments: torch.Tensor | None = None) -> list[str]:
    """The attention kernels one forward and backward pass of ``model`` runs (the profiler's names)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        with runtime.autocast():
            _, loss = model(x, x, segments=segments)
        loss.backward()
        sync()
    return sorted({e.key for e in prof.key_averages() if "attention" in e.key.lower() or "flash" in e.key.lower()})



def record_losses(into: dict[int, float], flag: StopFlag | None = None, stop_at: int | None = None,
                  events: list | None = None) -> Callable:
    """A Trainer listener: each step's loss into ``into``; sets ``flag`` after step ``stop_at``."""
    def on_event(event) -> None:
        if events is not None:
            events.append(event)
        if isinstance(event, StepDone):
            into[event.step] = event.loss
            if flag is not None and event.step == stop_at:
                flag.set("interrupted")
    return on_event


def compare_losses(got: dict[int, float], expected: dict[int, float]) -> dict:
    """How a run's losses compare with another's, step for step."""
    common = sorted(set(got) & set(expected))
    diffs = [abs(got[s] - expected[s]) for s in common]
    return {"same_steps": set(got) == set(expected), "exact": set(got) == set(expected) and max(diffs, default=0) == 0,
            "max_abs_diff": max(diffs, default=None), "finite": all(math.isfinite(v) for v in got.values())}


@dataclass
class Workspace:
    """Model folders the path checks share within one run, each trained on first use.

    Each check asks for what it needs (``text_model``, ``stopped_model``, ``chat_model``),
    so any subset of the checks runs alone.
    """

    root: Path
    runtime: hardware.Runtime
    smoke: bool
    straight: dict[int, float] = field(default_factory=dict)  # the text model's losses, step by step
    stop_step: int = 0
    made: set[str] = field(default_factory=set)

    @property
    def model_overrides(self) -> dict:
        if self.smoke:
            return {"d_model": 32, "n_layer": 1, "n_head": 2, "context": 32}
        return {"d_model": 256, "n_layer": 4, "n_head": 4, "context": 256}

    @property
    def train_overrides(self) -> dict:
        if self.smoke:
            return {"target_vocab_size": 320, "batch_size": 4, "checkpoint_every": 10, "eval_batches": 4}
        return {"target_vocab_size": 2000, "batch_size": 16, "checkpoint_every": 10, "eval_batches": 8}

    def source(self):
        lines = 80 if self.smoke else 3000
        return source_from_text("".join(f"Line {i}: the {('quick', 'slow', 'red')[i % 3]} fox jumps over "
                                        f"{i % 7} lazy dogs, and the dogs sleep on.\n" for i in range(lines)))

    def trainer(self, name: str, runtime: hardware.Runtime | None = None, **overrides) -> Trainer:
        return Trainer(str(self.root / name), "bpe", model_overrides=self.model_overrides,
                       train_overrides={**self.train_overrides, **overrides}, runtime=runtime or self.runtime)

    def text_model(self) -> Path:
        """A model trained for two epochs on the text, uninterrupted (its losses: ``straight``)."""
        if "text" not in self.made:
            self.trainer("text").train(self.source(), 2, record_losses(self.straight))
            self.stop_step = max(self.straight) // 2
            self.made.add("text")
        return self.root / "text"

    def stopped_model(self) -> Path:
        """The same run stopped halfway (``stop_step``): its checkpoint holds the interrupted run."""
        if "stopped" not in self.made:
            self.text_model()
            flag = StopFlag()
            self.trainer("stopped").train(self.source(), 2, record_losses({}, flag, self.stop_step), flag)
            self.made.add("stopped")
        return self.root / "stopped"

    def chat_model(self) -> tuple[Path, dict]:
        """The text model fine-tuned on conversations (with dropout: masked attention + dropout)."""
        if "chat" not in self.made:
            shutil.copytree(self.text_model(), self.root / "chat")
            source = builtin_conversations()
            source.conversations = source.conversations[:40 if self.smoke else 200]
            losses: dict[int, float] = {}
            result = Trainer(str(self.root / "chat"), runtime=self.runtime, model_overrides={"dropout": 0.1}
                             ).train_conversations(source, 2, record_losses(losses))
            self.chat_result = {"steps": result.steps, "loss_first": losses[min(losses)],
                                "loss_last": losses[max(losses)], "finite": all(map(math.isfinite, losses.values())),
                                "val_loss": result.final_eval.val_loss if result.final_eval else None}
            self.made.add("chat")
        return self.root / "chat", self.chat_result


def check_fp16_resume(work: Workspace) -> dict:
    """fp16 through the Trainer: stopped halfway, resumed from the checkpoint with the scaler's state."""
    on_cuda = work.runtime.device.type == "cuda"
    runtime = hardware.detect_runtime(str(work.runtime.device), "fp16" if on_cuda else "fp32")
    straight, first, resumed = {}, {}, {}
    whole = work.trainer("fp16_a", runtime)
    whole.train(work.source(), 2, record_losses(straight))
    stop_at, flag = max(straight) // 2, StopFlag()
    work.trainer("fp16_b", runtime).train(work.source(), 2, record_losses(first, flag, stop_at), flag)
    saved = torch.load(work.root / "fp16_b" / "checkpoint.pth", weights_only=True)["scaler"]
    again = work.trainer("fp16_b", runtime)
    run = again.interrupted_run()  # loads the checkpoint; the run's step, before training moves it on
    run_step = run.run_step if run else None
    restored = again.scaler.state_dict() if again.scaler is not None else None
    again.train(work.source(), 2, record_losses(resumed))
    out = {"precision": runtime.precision, "stopped_at": stop_at, "run_step": run_step,
           "saved_scaler": saved, "restored_scaler": restored, "scaler_restored": saved == restored,
           **compare_losses({**first, **resumed}, straight)}
    if whole.scaler is not None:
        out["final_scale"] = {"straight": whole.scaler.get_scale(), "resumed": again.scaler.get_scale()}
    ok = run_step == stop_at and out["scaler_restored"] and out["same_steps"] and out["finite"] and (out["max_abs_diff"] or 0) < 1e-3
    scale = f", scale {saved['scale']:g} restored" if saved else ", no scaler"
    exact = "exact" if out["exact"] else f"max diff {out['max_abs_diff']:.1e}"
    out["line"] = f"{runtime.precision} resume {exact}{scale}" + ("" if ok else " FAILED")
    return out


def check_chat(work: Workspace) -> dict:
    """Chat fine-tuning, and the attention kernels of a packed batch with dropout."""
    folder, result = work.chat_model()
    model, _, _ = ModelFolder(folder).load_model(work.runtime.device)
    model.train()  # dropout on, as in fine-tuning
    context = model.config.context
    x = torch.randint(0, model.config.vocab_size, (2, context), device=work.runtime.device)
    segments = (torch.arange(context, device=x.device) * 3 // context).expand(2, context)  # three examples a row
    kernels = attention_kernels(work.runtime, model, x, segments)
    # The masked path must give each packed example what it would get alone (no dropout here).
    model.eval()
    start, end = context // 3 + 1, 2 * context // 3  # inside the second example
    with torch.no_grad(), work.runtime.autocast():
        packed = model(x, segments=segments)[0][:, start:end].float()
        alone = model(x[:, start:end])[0].float()
    diff = (packed - alone).abs().max().item()
    ok = result["finite"] and result["loss_last"] < result["loss_first"]
    return {**result, "attention_kernels": kernels, "packed_vs_alone_max_diff": diff,
            "line": f"{result['steps']} steps, loss {result['loss_first']:.2f} -> {result['loss_last']:.2f}, "
                    f"packed vs alone {diff:.1e}" + ("" if ok else " FAILED")}


def check_generate_paths(work: Workspace) -> dict:
    """Generation from the saved (chat-tuned) folder: cached against uncached, and a chat reply."""
    folder, _ = work.chat_model()
    gen = ResponseGenerator(str(folder), work.runtime)
    cfg = GenerationConfig(max_new_tokens=40, temperature=0, repetition_penalty=1.0, seed=0)
    prompt = gen.tokenizer.encode("Line 12: the red fox")
    timed = {}
    for use_cache in (True, False):
        sync()
        t0 = time.perf_counter()
        timed[use_cache] = list(gen.generate_ids(prompt, cfg, use_cache=use_cache))
        sync()
        timed[f"seconds_{use_cache}"] = time.perf_counter() - t0
    cached, uncached = timed[True], timed[False]
    agree = next((i for i, (a, b) in enumerate(zip(cached, uncached)) if a != b), min(len(cached), len(uncached)))
    reply = "".join(gen.chat([Message("user", "Hello, how are you?")], cfg))
    return {"cached": len(cached), "uncached": len(uncached), "same_leading_tokens": agree,
            "identical": cached == uncached, "cached_s": timed["seconds_True"], "uncached_s": timed["seconds_False"],
            "chat_reply": reply, "finish_reason": gen.last_stats.finish_reason if gen.last_stats else None,
            "line": f"cached = uncached for {agree}/{len(cached)} greedy tokens, chat reply of {len(reply)} chars"}


def check_decode(work: Workspace) -> dict:
    """The Decoder's logits in fp32, bf16 and fp16 against the fp32 forward pass (exact fp32 matmuls)."""
    model, _, _ = ModelFolder(work.text_model()).load_model(work.runtime.device)
    ids = torch.randint(0, model.config.vocab_size, (model.config.context - 1,)).tolist()
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # the reference without TF32
    try:
        with torch.no_grad():
            exact = model(torch.tensor([ids], device=work.runtime.device))[0][0, 7:].float()
    finally:
        torch.set_float32_matmul_precision(previous)
    out: dict = {"max_logit": exact.abs().max().item()}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        decoder = Decoder(model, dtype)
        cache = decoder.new_cache()
        got = torch.stack([decoder.step(ids[:8], cache)] + [decoder.step([t], cache) for t in ids[8:]])
        name = str(dtype).replace("torch.", "")
        out[name] = {"max_abs_diff": (got - exact).abs().max().item(), "finite": bool(torch.isfinite(got).all()),
                     "same_argmax": (got.argmax(-1) == exact.argmax(-1)).float().mean().item()}
    out["line"] = ", ".join(f"{n} {out[n]['max_abs_diff']:.1e}" for n in ("float32", "bfloat16", "float16")) + \
        f" (logits up to {out['max_logit']:.1f})"
    return out


def check_cpu_load(work: Workspace) -> dict:
    """The checkpoint of a run stopped on the GPU, resumed on the CPU; its model generates there."""
    folder = work.root / "cpu_resume"
    shutil.copytree(work.stopped_model(), folder)
    cpu = hardware.detect_runtime("cpu", "fp32")
    trainer = Trainer(str(folder), runtime=cpu)
    run = trainer.interrupted_run()
    run_step = run.run_step if run else None  # before resuming moves it on
    resumed: dict[int, float] = {}
    trainer.resume(record_losses(resumed))
    compared = compare_losses(resumed, {s: v for s, v in work.straight.items() if s > work.stop_step})
    gen = ResponseGenerator(str(folder), cpu)
    tokens = list(gen.generate_ids(gen.tokenizer.encode("Line 3: the"), GenerationConfig(
        max_new_tokens=20, temperature=0, repetition_penalty=1.0, seed=0)))
    ok = run_step == work.stop_step and compared["same_steps"] and compared["finite"]
    return {"saved_on": str(work.runtime.device), "run_step": run_step,
            "first_resumed_step": min(resumed, default=None), **compared, "generated": len(tokens),
            "line": f"resumed at step {work.stop_step} on the CPU (max diff {compared['max_abs_diff'] or 0:.1e} "
                    f"from {work.runtime.device}), generated {len(tokens)} tokens" + ("" if ok else " FAILED")}
