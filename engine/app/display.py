"""Plain-text output for the terminal: tables, sizes, a loss chart, the training progress bar."""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

from engine.training.events import (
    CompileChecked,
    CompileFailed,
    EpochStarted,
    Evaluated,
    MemoryBackoff,
    Notice,
    RunResumed,
    RunStarted,
    StepDone,
    TokenizerTraining,
    Tokenizing,
    TrainingEvent,
    VocabGrowing,
)


def human_count(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.2f}"


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def rows_table(rows: list[tuple[str, str]]) -> str:
    """Two aligned columns: label, value."""
    if not rows:
        return ""
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"  {label:<{width}}  {value}" for label, value in rows)


def loss_chart(values: list[float], width: int = 60, height: int = 10) -> str:
    """A text chart of a loss curve; each column is the mean of a slice of steps.

    >>> print(loss_chart([4.0, 3.0, 2.0, 1.0], width=4, height=2))
        4.000 |#
        1.000 |####
              +----
    """
    values = [v for v in values if v == v]  # drop NaN
    if not values:
        return "  (no steps yet)"
    width = max(1, min(width, len(values)))
    columns = []
    for i in range(width):
        part = values[i * len(values) // width:(i + 1) * len(values) // width] or [values[-1]]
        columns.append(sum(part) / len(part))
    hi, lo = max(columns), min(columns)
    span = (hi - lo) or 1.0
    lines = []
    for row in range(height):
        # The top row marks columns at the maximum, the bottom row every column.
        level = hi - span * row / max(1, height - 1)
        bar = "".join("#" if c >= level - 1e-12 else " " for c in columns)
        label = f"{level:7.3f}" if row in (0, height - 1) else " " * 7
        lines.append(f"  {label} |{bar}".rstrip())
    lines.append("  " + " " * 7 + " +" + "-" * width)
    return "\n".join(lines)


class TrainingProgress:
    """Receives the trainer's events: a tqdm bar per epoch on a terminal, plain lines elsewhere.

    Plain mode is for logs (output to a file, a pipe, a cluster's job log): whole lines,
    never a carriage return, on the stream the bar would use. One line about every tenth
    of an epoch or ``PLAIN_EVERY_S`` seconds, whichever comes first, and one for the
    last batch of each epoch. ``plain=None`` picks plain mode when that stream is not a
    terminal.
    """

    PLAIN_EVERY_S = 30.0

    def __init__(self, out: Callable[[str], None], plain: bool | None = None, stream: TextIO | None = None) -> None:
        self.out = out
        self.bar = None
        self.stream = stream or sys.stderr
        self.plain = not _is_terminal(self.stream) if plain is None else plain
        self.epoch: EpochStarted | None = None  # the epoch under way (plain mode)
        self._last_line = (0, 0.0)  # batch and time of the last plain line

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.epoch = None

    def note(self, text: str) -> None:
        """A line in the middle of an epoch, printed above the bar rather than through it."""
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            self.out(text)

    def plain_step(self, event: StepDone) -> None:
        """A progress line when a tenth of the epoch or ``PLAIN_EVERY_S`` has passed, and at its end."""
        epoch, now = self.epoch, time.monotonic()
        last_batch, last_time = self._last_line
        tenth_more = event.batch - last_batch >= max(1, event.n_batches // 10)
        if not (event.batch >= event.n_batches or tenth_more or now - last_time >= self.PLAIN_EVERY_S):
            return
        self._last_line = (event.batch, now)
        print(f"{epoch_label(epoch)}: batch {event.batch}/{event.n_batches} "
              f"({event.batch / max(1, event.n_batches):.0%}) | loss {event.loss:.4f} | lr {event.lr:.2e} | "
              f"step {event.step} | {event.tokens_per_s:,.0f} tok/s", file=self.stream, flush=True)

    def __call__(self, event: TrainingEvent) -> None:
        from tqdm import tqdm

        if isinstance(event, Notice):
            self.note(f"Note: {event.text}")
        elif isinstance(event, TokenizerTraining):
            self.out(f"Training a {event.kind} tokenizer (up to {event.vocab_size:,} tokens)...")
        elif isinstance(event, VocabGrowing):
            self.out(f"Growing the {event.kind} vocabulary (up to {event.max_new:,} new tokens)...")
        elif isinstance(event, Tokenizing):
            self.out(f"Tokenizing {event.source}...")
        elif isinstance(event, RunResumed):
            self.out(f"Resuming the interrupted run on {event.name} at epoch {event.epoch + 1}/"
                     f"{event.epochs}, step {event.run_step}/{event.total_steps}.")
        elif isinstance(event, RunStarted):
            micro = f" in {event.micro_batches} micro-batches" if event.micro_batches > 1 else ""
            where = event.device
            if event.world_size > 1:
                where = f"{event.world_size} processes ({event.device} on rank 0)"
                micro = f" ({event.batch_size // event.world_size} per process{micro.replace(' in', ',')})"
            length = (f"for {event.minutes_left:.1f} more minute(s)" if event.minutes_left
                      else f"{event.epochs} epoch(s)")
            self.out(f"Training {human_count(event.params)} parameters on {where} "
                     f"({event.precision}): {event.train_tokens:,} training tokens, "
                     f"{length}, batch {event.batch_size} x {event.window} tokens{micro}. "
                     "Ctrl+C saves and stops.")
        elif isinstance(event, EpochStarted):
            self.close()
            if self.plain:
                self.epoch, self._last_line = event, (event.batch, time.monotonic())
            else:
                self.bar = tqdm(total=event.n_batches, initial=event.batch, file=self.stream,
                                desc=epoch_label(event), mininterval=0.5,
                                dynamic_ncols=True, leave=True)
        elif isinstance(event, StepDone) and self.epoch is not None:
            self.plain_step(event)
        elif isinstance(event, StepDone) and self.bar is not None:
            self.bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}", step=event.step,
                                 tok_s=f"{event.tokens_per_s:.0f}", refresh=False)
            self.bar.update(1)
        elif isinstance(event, CompileChecked):
            self.out(event.note)
        elif isinstance(event, CompileFailed):
            self.note(f"torch.compile failed ({event.reason}); training continues without it.")
        elif isinstance(event, MemoryBackoff):
            self.note(f"Out of memory: continuing with micro-batches of {event.micro_batch_size} sequences, "
                      f"{event.micro_batches} per step (the batch of {event.batch_size} is unchanged).")
        elif isinstance(event, Evaluated):
            self.close()
            r = event.result
            when = f"at step {r.step}" if r.partial_epoch else f"after epoch {r.epoch}"
            self.out(f"Validation {when}: loss {r.val_loss:.4f} | perplexity {r.perplexity:.2f} | "
                     f"{r.bpb:.4f} bits/byte")


def epoch_label(event: EpochStarted) -> str:
    return f"Epoch {event.epoch + 1}/{event.epochs}" if event.epochs else f"Epoch {event.epoch + 1}"


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-like stream without isatty
        return False


class ConsoleOutput:
    """print() plus a way to stream partial lines (used for generated text)."""

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)

    @staticmethod
    def write_partial(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
