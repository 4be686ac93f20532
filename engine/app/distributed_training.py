"""The command line's ``train``: in one process, or in each process torchrun starts.

    python interface.py train [PATH] --epochs N [model and training flags]
    torchrun --nproc-per-node=8 interface.py train [PATH] --epochs N [flags]

Without torchrun this trains in one process, like the menu's Train from File. Under
torchrun every process runs it: rank 0 opens the model folder (and holds its lock),
trains the tokenizer and tokenizes the data, reports progress and writes every save;
the other ranks receive the run from rank 0 and train their share of every batch
(``Trainer.follow``), writing nothing. Running the same command again resumes an
interrupted run; ``--resume`` resumes without naming the data.

``run_distributed_training(args)`` is the one entry point: ``cli.py`` adds these arguments
(``add_distributed_arguments``) to its ``train`` parser and hands the run over under
torchrun, or for ``--resume``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from engine.app.console import USER_ERRORS
from engine.app.display import ConsoleOutput, TrainingProgress, epoch_label
from engine.app.screens import notes, training_outcome
from engine.data.sources import open_source
from engine.runtime import hardware
from engine.runtime.distributed import (
    DEFAULT_TIMEOUT_S,
    Distributed,
    DistributedError,
    LaunchEnv,
    first_line,
    init_distributed,
    is_collective_failure,
    launched_by_torchrun,
    lost_contact,
)
from engine.training.events import EpochStarted, StepDone, TrainingEvent, TrainResult
from engine.training.runs import StopFlag, StopReason
from engine.training.trainer import Trainer

EXIT_CODES = {StopReason.FINISHED: 0, StopReason.TIME_LIMIT: 0, StopReason.INTERRUPTED: 130, StopReason.TERMINATED: 143}


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``train`` beyond PATH and the menu's model and training flags."""
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted run saved in the model folder (give no PATH)")
    parser.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="under torchrun: seconds to wait for the other processes, when joining and at "
                             "every step, before stopping with an error (default: %(default)g)")
    parser.add_argument("--log-every", type=int, default=0,
                        help="print one line every N steps instead of a progress bar (0: the bar)")


def make_trainer(args: argparse.Namespace, runtime: hardware.Runtime, distributed: Distributed | None = None,
                 tokenizer_kind: str | None = None) -> Trainer:
    """The Trainer the flags describe: the one mapping of flags to settings, for the menu and every subcommand."""
    return Trainer(
        str(args.model_dir), tokenizer_kind or args.tokenizer or "bpe",
        model_overrides={"d_model": args.d_model, "n_layer": args.n_layer, "n_head": args.n_head,
                         "context": args.context, "dropout": args.dropout, "arch": args.arch,
                         "qk_norm": args.qk_norm},
        train_overrides={"learning_rate": args.lr, "batch_size": args.batch_size, "optimizer": args.optimizer,
                         "target_vocab_size": args.target_vocab_size, "checkpoint_every": args.checkpoint_every,
                         "max_minutes": args.max_minutes, "seed": args.train_seed, "compile": args.compile},
        runtime=runtime, preset=args.preset, distributed=distributed)


def run_distributed_training(args: argparse.Namespace) -> int:
    """Train as ``args`` say, alone or as one rank of a torchrun job; returns the exit code.

    0: the run finished (or reached --max-minutes); 130/143: Ctrl+C/SIGTERM stopped it
    after saving; 1: an error (one line); 2: a launch that cannot work.
    """
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.resume and args.path:
        return _fail("give either PATH or --resume, not both", 2)
    if args.path == "-" and launched_by_torchrun():
        return _fail("under torchrun, give a file or folder: every process cannot read one standard input", 2)
    if args.log_every < 0:
        return _fail("--log-every must not be negative", 2)
    if not launched_by_torchrun():
        return _guarded(lambda: _lead(args, None), "")
    try:
        env = LaunchEnv.from_environ()
        distributed = init_distributed(env, args.device, args.precision, args.dist_timeout)
    except (ValueError, DistributedError) as exc:
        return _fail(f"{_rank_label()}{exc}", 2 if isinstance(exc, ValueError) else 1)
    try:
        if distributed.is_main:
            def tell_the_others(message: str) -> None:  # if no run was announced, the others wait for one
                if not distributed.announced:
                    distributed.announce_failure(message)
            try:
                return _guarded(lambda: _lead(args, distributed), "rank 0: ", tell_the_others)
            except BaseException as exc:
                tell_the_others(first_line(exc))
                raise
        # Rank 0 has said why a run could not start; the first process of another node says it too.
        quiet = env.local_rank != 0
        return _guarded(lambda: _exit_code(Trainer.follow(distributed)), f"rank {env.rank}: ",
                        quiet_when_rank0_failed=quiet)
    finally:
        distributed.close()


def _lead(args: argparse.Namespace, distributed: Distributed | None) -> int:
    """Alone, or rank 0: open the folder, prepare and train the run, report it."""
    say = ConsoleOutput()
    progress = StepLog(say, args.log_every)
    try:
        runtime = distributed.runtime if distributed else hardware.detect_runtime(args.device, args.precision)
        say(f"Device: {runtime.device} ({runtime.reason}). Model folder: {args.model_dir}")
        trainer = make_trainer(args, runtime, distributed)
        if args.resume:
            result = trainer.resume(progress, StopFlag())
        else:
            source = open_source(args.path)
            say(f"Data: {source.name}")
            for note in source.notes:
                say(f"Note: {note}")
            result = trainer.train(source, args.epochs, progress, StopFlag(), args.minutes)
    finally:
        progress.close()
    for line in notes(trainer.notes):
        say(line)
    again = " (with as many processes, for an exact resume)" if distributed else ""
    say(training_outcome(result, args.model_dir, f"Run the same command to go on{again}."))
    return _exit_code(result)


def _exit_code(result: TrainResult) -> int:
    return EXIT_CODES.get(result.stopped_early, 1)


def _guarded(work: Callable[[], int], label: str, told: Callable[[str], None] | None = None,
             quiet_when_rank0_failed: bool = False) -> int:
    """Run ``work``; what a user or a dead process causes becomes one line and an exit code.

    ``told`` hears the line once it is printed (rank 0 passes it on to the other ranks).
    """
    try:
        return work()
    except KeyboardInterrupt:
        return _fail(f"{label}stopped at once; the last checkpoint on disk is intact", 130, told)
    except DistributedError as exc:
        return 1 if quiet_when_rank0_failed else _fail(f"{label}{exc}", 1, told)
    except Exception as exc:
        if label and is_collective_failure(exc):
            return _fail(f"{label}{lost_contact(exc)}", 1, told)
        if isinstance(exc, USER_ERRORS):
            return _fail(f"{label}Error: {exc}", 1, told)
        raise


def _fail(message: str, code: int, told: Callable[[str], None] | None = None) -> int:
    print(message, file=sys.stderr, flush=True)
    if told is not None:
        told(message)
    return code


def _rank_label() -> str:
    try:
        return f"rank {LaunchEnv.from_environ().rank}: "
    except ValueError:
        return ""


class StepLog:
    """Training events for the console: the progress bar, or with ``every`` > 0 one plain
    line every ``every`` steps (for job logs; the loss with six decimals)."""

    def __init__(self, out: Callable[[str], None], every: int = 0) -> None:
        self.bar = TrainingProgress(out)
        self.out = out
        self.every = every

    def __call__(self, event: TrainingEvent) -> None:
        if self.every and isinstance(event, StepDone):
            if event.step % self.every == 0 or event.batch == event.n_batches:
                self.out(f"step {event.step} | loss {event.loss:.6f} | lr {event.lr:.3e} | "
                         f"{event.tokens_per_s:,.0f} tok/s | batch {event.batch}/{event.n_batches}")
        elif self.every and isinstance(event, EpochStarted):
            self.out(f"{epoch_label(event)}: {event.n_batches} batches")
        else:
            self.bar(event)

    def close(self) -> None:
        self.bar.close()
