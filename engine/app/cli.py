"""The command line: the menu's actions as subcommands, for scripts, clusters and CI.

    python interface.py train [PATH | -] [--epochs N | --minutes N] [--max-minutes X]
    python interface.py continue (PATH | -) [--no-expand-vocab] [--new-tokens N] | continue --resume
    python interface.py finetune [PATH] [--epochs N | --minutes N]
    python interface.py chat | ask QUESTION | generate [PROMPT]
    python interface.py status [--json] [--plot [FILE.png]] | info [--json]
    python interface.py export DEST [--format hf|gguf] [--dtype f32|f16|q8_0] [--force]
    python interface.py serve [--host H] [--port N] [--api-key KEY]

``interface.main`` hands every argv that names a subcommand to ``main`` here. Each
subcommand makes a ``session.Session`` and runs the same actions the menu runs (the
chat loop, the training driver with its Ctrl+C handling, the status screens), so
nothing is written twice.

Results go to stdout, everything else (errors, notes, progress) to stderr.
Exit status: 0 done, 1 an error (one line on stderr, no traceback), 2 a usage error,
130 stopped by Ctrl+C, 143 by SIGTERM (training saves a checkpoint either way), 141
when whatever read stdout closed it early (``interface.py status | head``), quietly.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from engine.app import screens
from engine.app.chat_repl import run_chat
from engine.app.console import (
    BUILTIN_TEXT_LENGTH,
    DEFAULT_CHAT_EPOCHS,  # noqa: F401 -- cli.DEFAULT_CHAT_EPOCHS, as before
    DEFAULT_CHAT_LENGTH,
    DEFAULT_EPOCHS,
    DEFAULT_NEW_TOKENS,
    MAX_NEW_TOKENS,
    MAX_TYPED_EPOCHS,
    USER_ERRORS,
    Cancelled,
    Console,
    EndOfInput,
    Terminated,
    TrainingLength,
    parse_training_length,  # noqa: F401 -- cli.parse_training_length, as before
)
from engine.app.display import ConsoleOutput
from engine.app.distributed_training import add_distributed_arguments, run_distributed_training
from engine.app.flags import (
    add_general_flags,
    add_generation_flags,
    add_model_size_flags,
    add_runtime_flags,
    add_training_flags,
    all_defaults,
    whole_number,
)
from engine.app.loss_plot import draw_loss_plot
from engine.app.session import Session
from engine.data.conversations import open_conversations
from engine.data.sources import Source, open_source, source_from_text
from engine.export.model_export import DTYPES, FORMATS, DestinationInUse, guess_format
from engine.folder.model_folder import LOSS_PLOT_FILE
from engine.runtime.distributed import launched_by_torchrun
from engine.serving.server import add_serve_arguments
from engine.training.events import TrainResult
from engine.training.runs import StopReason

# 130, 141 and 143 are 128 + SIGINT, SIGPIPE and SIGTERM, as a shell reports a process those signals ended.
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143
EXIT_BROKEN_PIPE = 141
RESUME_HINT = "Resume with: python interface.py continue --resume"


class UsageError(Exception):
    """Arguments that parse but do not go together (exit status 2)."""


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (exit status 2), not the whole usage text."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- each subcommand's own arguments --------------------------------------------------------

def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", nargs="?", default="", metavar="PATH",
                   help="a text file or a folder of .txt/.md files; - reads standard input; "
                        "nothing: the built-in corpus")
    add_distributed_arguments(p)


def _continue_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", nargs="?", metavar="PATH", help="the new data: a file or folder, or - for standard input")
    p.add_argument("--expand-vocab", action=argparse.BooleanOptionalAction, default=True,
                   help="add tokens frequent in the new data (default: on)")
    p.add_argument("--new-tokens", type=whole_number(1, MAX_NEW_TOKENS, "the number of new tokens"),
                   default=DEFAULT_NEW_TOKENS,
                   metavar="N", help="the most tokens to add (default %(default)s)")
    p.add_argument("--resume", action="store_true", help="finish the interrupted run instead (no PATH)")


def _finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", nargs="?", default="", metavar="PATH",
                   help="a conversation file (.jsonl, .json, .parquet; OpenAI, ShareGPT or Alpaca form) or a folder of "
                        "them; nothing: the built-in conversations")
    p.add_argument("--chat-epochs", dest="epochs", type=whole_number(1, MAX_TYPED_EPOCHS, "the number of epochs"),
                   metavar="N", help=f"the same as --epochs: passes over the conversations "
                                     f"(without it or --minutes: {DEFAULT_CHAT_LENGTH.describe()})")


def _ask_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("question", metavar="QUESTION")


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", metavar="PROMPT",
                   help="the text to continue; without it, standard input ('' samples freely)")


def _status_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--plot", nargs="?", const="", metavar="FILE.png",
                   help=f"draw the loss curves (needs matplotlib; default file: {LOSS_PLOT_FILE} in the model folder)")


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("destination", metavar="DEST", help="a folder for hf, a .gguf file for gguf")
    p.add_argument("--format", choices=FORMATS,
                   help="hf: a transformers folder; gguf: one file for llama.cpp/Ollama (default: from DEST)")
    p.add_argument("--dtype", "--type", dest="dtype", choices=DTYPES, default=None,
                   help="weight type: f32, f16 or q8_0 (q8_0: gguf only; default: f16 for gguf, f32 for hf)")
    p.add_argument("--force", action="store_true", help="replace DEST even if it is not an earlier export")


# -- what runs them ----------------------------------------------------------------------------

def training_source(path: str) -> Source:
    """'-' is standard input, anything else a path ('' the built-in corpus)."""
    if path == "-":
        return source_from_text(sys.stdin.read())
    return open_source(path)


def _choose_tokenizer(session: Session) -> None:
    """The flag's tokenizer, or bpe, for a new model; the folder's for an existing one (with a note)."""
    choice = session.choose_tokenizer(session.args.tokenizer or "bpe")
    if choice.note:
        _note(choice.note)


def _require_model(session: Session) -> None:
    if not session.has_model():
        raise FileNotFoundError(f"no trained model in {session.model_dir}; train one first: python interface.py train")


def _training_status(result: TrainResult | None) -> int:
    """Exit status of a training call: Ctrl+C (twice: None) is 130; a time budget is success."""
    if result is None or result.stopped_early is StopReason.INTERRUPTED:
        return EXIT_INTERRUPTED
    return EXIT_OK


def run_train(args: argparse.Namespace, session: Session, console: Console) -> int:
    if launched_by_torchrun() or args.resume or args.log_every:  # a torchrun job, a resume, job-log lines
        return run_distributed_training(args)
    _choose_tokenizer(session)
    source = training_source(args.path)
    console.out(screens.source_summary(source))
    return _training_status(session.train_on(source, TrainingLength(args.epochs, args.minutes)))


def run_finetune(args: argparse.Namespace, session: Session, console: Console) -> int:
    """The menu's Train on Conversations: the model learns the chat format."""
    _require_model(session)
    source = open_conversations(args.path)
    console.out(screens.conversations_summary(source))
    return _training_status(session.finetune_on(source, TrainingLength(args.epochs, args.minutes)))


def run_continue(args: argparse.Namespace, session: Session, console: Console) -> int:
    if args.resume == bool(args.path):
        raise UsageError("give the new data (PATH, or - for standard input) or --resume, not both")
    _require_model(session)
    _choose_tokenizer(session)
    trainer = session.make_trainer()
    if args.resume:
        if trainer.interrupted_run() is None:
            raise ValueError(f"there is no interrupted run to resume in {session.model_dir}")
        return _training_status(session.resume(trainer))
    source = training_source(args.path)
    console.out(screens.source_summary(source))
    run = trainer.interrupted_run()
    if run is not None:
        _note(f"the interrupted run on {run.name} is left unfinished; continue --resume would have finished it")
    expand = args.expand_vocab
    report = session.continue_on(trainer, source, expand, args.new_tokens if expand else 0,
                                 TrainingLength(args.epochs, args.minutes))
    if report is None:
        return EXIT_INTERRUPTED
    console.out(screens.continual_screen(report))
    return _training_status(report.result)


def run_serve_command(args: argparse.Namespace, session: Session, console: Console) -> int:
    """The OpenAI-compatible server until Ctrl+C; the generation flags are each request's defaults."""
    _require_model(session)
    return session.serve(args, output_fn=lambda line: print(line, flush=True), verbose=args.verbose)


def run_chat_command(args: argparse.Namespace, session: Session, console: Console) -> int:
    _require_model(session)
    run_chat(session, console)
    return EXIT_OK


def _stream(session: Session, pieces, end: str) -> None:
    """Write generated text to stdout as it comes; notes go to stderr."""
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write(end)
    sys.stdout.flush()
    for notice in session.generator.notices:
        _note(notice)


def run_ask(args: argparse.Namespace, session: Session, console: Console) -> int:
    generator = session.load_generator()
    _stream(session, generator.answer(args.question, session.gen_cfg), "\n")
    return EXIT_OK


def run_generate(args: argparse.Namespace, session: Session, console: Console) -> int:
    prompt = args.prompt
    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise UsageError("give a PROMPT, or pipe one in on standard input")
        prompt = sys.stdin.read()
    generator = session.load_generator()
    # Exactly the generated text; a final newline only on a terminal, where the shell
    # prompt would otherwise follow it on the same line.
    _stream(session, generator.complete(prompt, session.gen_cfg), "\n" if sys.stdout.isatty() else "")
    return EXIT_OK


def run_status(args: argparse.Namespace, session: Session, console: Console) -> int:
    _require_model(session)
    folder = session.folder
    plot = None
    if args.plot is not None:
        plot = Path(args.plot).expanduser() if args.plot else folder.file(LOSS_PLOT_FILE)
        draw_loss_plot(folder.read_history(), plot, title=f"Loss: {folder.path.resolve().name}")
    report = session.status_report()
    if args.json:
        status = asdict(report.status)
        losses = status.pop("losses")
        existing = plot or report.loss_plot
        _print_json({"model_dir": str(session.model_dir), **status, "last_train_loss": losses[-1] if losses else None,
                     "loss_plot": str(existing) if existing else None})
        return EXIT_OK
    print(screens.status_screen(report))
    if plot is not None and plot != folder.file(LOSS_PLOT_FILE):  # the screen names the default file itself
        print(f"Loss curves drawn in {plot}")
    return EXIT_OK


def run_info(args: argparse.Namespace, session: Session, console: Console) -> int:
    report = session.system_report()
    if not args.json:
        print(screens.system_screen(report))
        return EXIT_OK
    if report.config_error:
        raise ValueError(report.config_error)
    runtime = session.runtime
    _print_json({"model_dir": str(session.model_dir), "device": str(runtime.device),
                 "precision": runtime.precision, "device_reason": runtime.reason,
                 "hardware": dict(report.hardware), "model": asdict(report.model) if report.model else None})
    return EXIT_OK


def run_export(args: argparse.Namespace, session: Session, console: Console) -> int:
    fmt = args.format or guess_format(args.destination)
    try:
        report = session.export(fmt, args.destination, args.dtype, args.force)
    except DestinationInUse as exc:
        raise DestinationInUse(f"{exc}; choose another destination, or add --force to replace it") from None
    for note in report.notes:
        _note(note)
    print(screens.export_summary(report))
    return EXIT_OK


def _stdout_closed() -> int:
    """The reader of stdout went away (``| head``): stop quietly, as a program that SIGPIPE ends does.

    What is still buffered for stdout can never be written; stdout now points at the null
    device, so the interpreter's flush at exit does not fail a second time.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE


def _print_json(obj: dict) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def _note(text: str) -> None:
    print(f"Note: {text}", file=sys.stderr, flush=True)


# -- the table of subcommands, and the parser it builds ---------------------------------------

Runner = Callable[[argparse.Namespace, Session, Console], int]


@dataclass(frozen=True)
class Command:
    """One subcommand: its help line, the shared flag groups it takes, its own arguments, its runner."""

    help: str
    flag_groups: tuple[Callable[[argparse.ArgumentParser], None], ...]
    own_args: Callable[[argparse.ArgumentParser], None]
    run: Runner


_MODEL_USE = (add_general_flags, add_runtime_flags, add_generation_flags)
_TRAINING = (add_general_flags, add_training_flags, add_runtime_flags)
COMMANDS: dict[str, Command] = {
    "train": Command("train a model (a new one, or the folder's model further)",
                     (add_general_flags, add_model_size_flags, add_training_flags, add_runtime_flags),
                     _train_args, run_train),
    "continue": Command("teach the model new data (vocabulary growth, rehearsal), or resume an interrupted run",
                        _TRAINING, _continue_args, run_continue),
    "finetune": Command("fine-tune the model on conversations so it chats (the menu's Train on Conversations)",
                        _TRAINING, _finetune_args, run_finetune),
    "chat": Command("talk with the model (the menu's Chat)", _MODEL_USE, lambda p: None, run_chat_command),
    "ask": Command("answer one question", _MODEL_USE, _ask_args, run_ask),
    "generate": Command("continue a prompt; the text alone goes to stdout", _MODEL_USE, _generate_args,
                        run_generate),
    "status": Command("training progress, validation results, data sets; --plot draws the loss curves",
                      (add_general_flags,), _status_args, run_status),
    "info": Command("hardware, device and the model's size", (add_general_flags, add_runtime_flags), _info_args,
                    run_info),
    "export": Command("write the model for transformers (hf) or llama.cpp/Ollama (gguf)", (add_general_flags,),
                      _export_args, run_export),
    "serve": Command("serve the model over the OpenAI API (on 127.0.0.1 unless --host says otherwise)",
                     _MODEL_USE, add_serve_arguments, run_serve_command),
}


def is_subcommand(argv: list[str]) -> bool:
    return bool(argv) and argv[0] in COMMANDS


def build_parser() -> Parser:
    p = Parser(prog="interface.py", description="Train your own GPT-style model and talk to it. "
               "Without a subcommand, the menu opens (python interface.py --help lists its flags).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        s = sub.add_parser(name, help=command.help, description=command.help[0].upper() + command.help[1:] + ".")
        command.own_args(s)
        for add in command.flag_groups:
            add(s)
        s.set_defaults(run=command.run, parser=s)
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    """The subcommand's arguments on top of every flag's default (``Session`` reads them all)."""
    args = build_parser().parse_args(argv, namespace=all_defaults())
    if args.epochs is None and not args.minutes:  # the first session's defaults are minutes
        if args.command == "finetune":
            args.epochs, args.minutes = DEFAULT_CHAT_LENGTH.epochs, DEFAULT_CHAT_LENGTH.minutes
        elif args.command == "train" and not args.path:  # the built-in text
            args.epochs, args.minutes = BUILTIN_TEXT_LENGTH.epochs, BUILTIN_TEXT_LENGTH.minutes
    if args.epochs is None:  # each command has its own default
        args.epochs = DEFAULT_CHAT_LENGTH.epochs if args.command == "finetune" else DEFAULT_EPOCHS
    return args


def main(argv: list[str], input_fn: Callable[[str], str] = input) -> int:
    """Run one subcommand (``argv[0]``); returns the exit status."""
    try:
        args = parse(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if launched_by_torchrun() and args.command != "train":
        # Only `train` shares its work across the processes; any other subcommand would run
        # once per process, all on one folder.
        print(f"{args.parser.prog}: error: under torchrun, only `interface.py train` runs; run {args.command} "
              "as one process", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    out = ConsoleOutput()
    try:
        session = Session(args, out, resume_hint=RESUME_HINT)
        session.runtime  # noqa: B018 -- checks --device and --precision now
    except ValueError as exc:  # an impossible flag value (a precision the device lacks, a bad temperature)
        print(f"{args.parser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return _run(args, session, Console(input_fn, out))


def _run(args: argparse.Namespace, session: Session, console: Console) -> int:
    """The subcommand's runner; how it ended, as an exit status."""
    try:
        status = args.run(args, session, console)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return status
    except BrokenPipeError:
        return _stdout_closed()
    except EndOfInput:
        return EXIT_OK
    except Cancelled:  # Ctrl+C at a prompt (the console has ended its line)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        return EXIT_TERMINATED
    except UsageError as exc:
        print(f"{args.parser.prog}: error: {exc} (see {args.parser.prog} --help)", file=sys.stderr)
        return EXIT_USAGE
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # a bug: still one line; -v shows where
        if args.verbose:
            traceback.print_exc()
        print(f"error: unexpected {type(exc).__name__}: {exc} (run with -v for details)", file=sys.stderr)
        return EXIT_ERROR
