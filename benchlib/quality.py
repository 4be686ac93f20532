"""Quality per minute: the default CPU setup trained for a fixed time on the corpus.

What a user gets from ``Trainer`` in a time budget: the validation bits per byte,
the steps and tokens it saw, and what generation's fp16 weights cost on that model.
"""
from __future__ import annotations

import time
from pathlib import Path

from benchlib.generation import bench_half_weights
from benchlib.machine import OtherLoad
from engine.data.sources import open_source
from engine.runtime import hardware
from engine.training.events import RunStarted, StepDone


def bench_quality(corpus: Path, minutes: float, workdir: Path) -> dict:
    from trainer import Trainer

    try:
        from engine.app.cli import DEFAULT_EPOCHS
    except ImportError:  # the command line is not needed to train; fall back to its documented default
        DEFAULT_EPOCHS = 3
    trainer = Trainer(str(workdir / "quality_model"), "bpe", train_overrides={"max_minutes": minutes})
    losses: list[float] = []
    started: list[RunStarted] = []

    def on_event(event) -> None:
        if isinstance(event, StepDone):
            losses.append(event.loss)
        elif isinstance(event, RunStarted):
            started.append(event)

    with OtherLoad() as load:
        t0 = time.perf_counter()
        result = trainer.train(open_source(str(corpus)), DEFAULT_EPOCHS, on_event=on_event)
        wall = time.perf_counter() - t0
    final = result.final_eval
    cfg, run = trainer.model.config, trainer.progress.run
    text = corpus.read_text(encoding="utf-8", errors="replace")
    held_out = trainer.tokenizer.encode(text[-len(text) // 20:])[-2048:]  # from the validation tail
    return {
        "half_weights": bench_half_weights(trainer.model, held_out) if hardware.cpu_half_weights_available() else None,
        "minutes": minutes, "epochs_requested": DEFAULT_EPOCHS, "stopped": result.stopped_early or "finished",
        "val_bpb": final.bpb if final else None, "val_loss": final.val_loss if final else None,
        "steps": result.steps, "tokens_seen": trainer.progress.tokens_seen,
        "train_tokens": started[0].train_tokens if started else None,
        "wall_s": wall, "final_train_loss": losses[-1] if losses else None,
        "config": {"d_model": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
                   "context": cfg.context, "vocab": cfg.vocab_size, "dropout": cfg.dropout,
                   "batch": run.batch_size, "lr": trainer.config.learning_rate,
                   "warmup_steps": min(trainer.config.warmup_steps, max(1, run.total_steps // 10)),
                   "min_lr_ratio": trainer.config.min_lr_ratio,
                   "precision": trainer.runtime.precision},
        "other_load": load.share,
    }
