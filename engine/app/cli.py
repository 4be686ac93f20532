"""The command line: the menu's actions as subcommands, for scripts, clusters and CI.

    python interface.py train [PATH | -] [--epochs N] [--max-minutes X]
    python interface.py continue (PATH | -) [--no-expand-vocab] [--new-tokens N] | continue --resume
    python interface.py chat | ask QUESTION | generate [PROMPT]
    python interface.py status [--json] [--plot [FILE.png]] | info [--json]
    python interface.py export DEST [--format hf|gguf] [--dtype f32|f16] [--force]

``interface.main`` hands every argv that starts with a subcommand name to ``main``
here, together with its ``App`` class: the subcommands run the menu's own actions
(the chat loop, the training driver with its Ctrl+C handling, the status screens),
so nothing is written twice. This module does not import ``interface`` (that would
be a cycle); it also owns the flags both doors share (``add_*_flags``).

Results go to stdout, everything else (errors, notes, progress) to stderr.
Exit status: 0 done, 1 an error (one line on stderr, no traceback), 2 a usage error,
130 stopped by Ctrl+C, 143 by SIGTERM (training saves a checkpoint either way).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from engine.app.console import USER_ERRORS
from engine.app.display import ConsoleOutput
from engine.app.distributed_training import add_distributed_arguments, run_distributed_training
from engine.app.loss_plot import draw_loss_plot
from engine.data.conversations import open_conversations
from engine.data.sources import Source, open_source, source_from_text
from engine.export.model_export import DTYPES, FORMATS, DestinationInUse, export_model, guess_format
from engine.folder.model_folder import LOSS_PLOT_FILE, ModelFolder
from engine.runtime import hardware
from engine.runtime.distributed import launched_by_torchrun
from engine.serving import server
from engine.serving.server import add_serve_arguments
from engine.training.trainer import MAX_BUDGET_MINUTES

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "custom_llm"
DEFAULT_EPOCHS = 3
MAX_EPOCHS = 10_000
# Conversation sets are small: 30 passes ended 95% of held-out replies with <|end|>, 12 only
# 84% (scripts/chat_experiment.py, README "Chat models").
DEFAULT_CHAT_EPOCHS = 30
# What a user can cause: one line, and exit status 1.
# 130 and 143 are 128 + SIGINT and 128 + SIGTERM, as a shell reports a process those signals ended.
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


class MenuApp(Protocol):
    """What the subcommands use of the menu's ``interface.App``, which ``interface.main`` hands in."""

    args: argparse.Namespace
    model_dir: Path
    tokenizer_kind: str | None
    resume_hint: str
    generator: Any  # a ResponseGenerator once load_generator() has run
    gen_cfg: Any  # GenerationConfig from the flags
    runtime: Any  # hardware.Runtime from --device and --precision

    def run_action(self, action: Callable[[], int]) -> int: ...
    def describe_source(self, source: Source) -> Source: ...
    def make_trainer(self) -> Any: ...
    def drive(self, trainer: Any, start: Callable) -> Any: ...
    def train_on(self, source: Source, epochs: int) -> Any: ...
    def continue_on(self, trainer: Any, source: Source, expand: bool, max_new: int, epochs: int) -> Any: ...
    def describe_conversations(self, source: Any) -> Any: ...
    def finetune_on(self, source: Any, epochs: int) -> Any: ...
    def load_generator(self) -> bool: ...
    def chat(self) -> None: ...
    def training_status(self) -> None: ...
    def system_information(self) -> None: ...
    def export_summary(self, report: Any) -> str: ...


class UsageError(Exception):
    """Arguments that parse but do not go together (exit status 2)."""


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (exit status 2), not the whole usage text."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


@dataclass(frozen=True)
class TrainingLength:
    """How long to train: a number of epochs, or a time budget in minutes (then minutes > 0)."""

    epochs: int
    minutes: float = 0.0


def parse_training_length(text: str, default_epochs: int) -> TrainingLength:
    """'3' -> 3 epochs; '10m', '10 min', '2.5 minutes' -> a 10 (2.5) minute budget; '' -> the default."""
    text = text.strip().lower()
    if not text:
        return TrainingLength(default_epochs)
    number = text.removesuffix("minutes").removesuffix("min").removesuffix("m").strip()
    if number != text:
        try:
            minutes = float(number)
        except ValueError:
            minutes = math.nan
        if not 0 < minutes <= MAX_BUDGET_MINUTES:
            raise ValueError(f"a time budget is a number of minutes above 0 and up to {MAX_BUDGET_MINUTES}, "
                             f"such as 10m (got {text!r})")
        return TrainingLength(default_epochs, minutes)
    return TrainingLength(_epochs(text))


def _epochs(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_EPOCHS:
        raise ValueError(f"the number of epochs must be a whole number from 1 to {MAX_EPOCHS} (got {text!r})")
    return int(text)


def budget_minutes(text: str) -> float:
    """An argparse type: a time budget in minutes."""
    try:
        return parse_training_length(f"{text}m", DEFAULT_EPOCHS).minutes
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def whole_number(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` to ``high``."""
    def parse(text: str) -> int:
        if not (text.isascii() and text.lstrip("-").isdigit()) or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"expected a whole number from {low} to {high}, got {text!r}")
        return int(text)
    return parse


# -- the flags both doors share ------------------------------------------------------------

def add_general_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR), help="model folder (default: %(default)s)")
    p.add_argument("--tokenizer", choices=["bpe", "sentencepiece"],
                   help="tokenizer of a new model (the menu asks; the command line uses bpe)")
    p.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")


def add_model_size_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model size (new models only; default: chosen from the hardware)")
    g.add_argument("--preset", choices=hardware.PRESET_NAMES, help="a size preset")
    g.add_argument("--d-model", type=int)
    g.add_argument("--n-layer", type=int)
    g.add_argument("--n-head", type=int)
    g.add_argument("--context", type=int, help="context length in tokens (default 256)")
    g.add_argument("--dropout", type=float)
    g.add_argument("--target-vocab-size", "--vocab-size", dest="target_vocab_size", type=int,
                   help="the vocabulary size to aim for; lowered for little text (default 8000)")


def add_training_flags(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=whole_number(1, MAX_EPOCHS),
                   help=f"passes over the data (the menu's default answer; default {DEFAULT_EPOCHS}, "
                        f"{DEFAULT_CHAT_EPOCHS} for finetune)")
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    t.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 100)")
    t.add_argument("--minutes", type=budget_minutes, default=0.0, metavar="N",
                   help="time budget instead of epochs: a new model gets the size that learns most in N minutes "
                        "on this machine, and training stops when they are up (tokenizing included)")
    t.add_argument("--max-minutes", type=float, help="stop an epoch-based run after this many minutes, saved")
    t.add_argument("--train-seed", type=int, help="seed for initialisation and data order")
    t.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the model for training (meant for GPUs; off by default)")


def add_runtime_flags(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("device")
    r.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: best available)")
    r.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="autocast dtype; fp32 also keeps generation's weights in fp32 (default: auto)")


def add_generation_flags(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("generation")
    s.add_argument("--max-new-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default %(default)s)")
    s.add_argument("--top-k", type=int, default=50)
    s.add_argument("--top-p", type=float, default=0.95)
    s.add_argument("--repetition-penalty", type=float, default=1.1)
    s.add_argument("--seed", type=int, help="seed for sampling (repeatable answers)")


ALL_FLAGS = (add_general_flags, add_model_size_flags, add_training_flags, add_runtime_flags, add_generation_flags)


def add_all_flags(p: argparse.ArgumentParser) -> None:
    """Every flag, as the menu takes them."""
    for add in ALL_FLAGS:
        add(p)


# -- the subcommands --------------------------------------------------------------------------
# Each: (help line, flag groups, its own arguments, what runs it).

def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", nargs="?", default="", metavar="PATH",
                   help="a text file or a folder of .txt/.md files; - reads standard input; "
                        "nothing: the built-in corpus")
    add_distributed_arguments(p)


def _continue_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", nargs="?", metavar="PATH", help="the new data: a file or folder, or - for standard input")
    p.add_argument("--expand-vocab", action=argparse.BooleanOptionalAction, default=True,
                   help="add tokens frequent in the new data (default: on)")
    p.add_argument("--new-tokens", type=whole_number(1, 100_000), default=1000, metavar="N",
                   help="the most tokens to add (default %(default)s)")
    p.add_argument("--resume", action="store_true", help="finish the interrupted run instead (no PATH)")


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
    p.add_argument("--dtype", choices=DTYPES, default="f32", help="weight precision (default %(default)s)")
    p.add_argument("--force", action="store_true", help="replace DEST even if it is not an earlier export")


def training_source(path: str) -> Source:
    """'-' is standard input, anything else a path ('' the built-in corpus)."""
    if path == "-":
        return source_from_text(sys.stdin.read())
    return open_source(path)


def _choose_tokenizer(app: MenuApp) -> None:
    choice = ModelFolder(app.model_dir).choose_tokenizer(app.args.tokenizer or "bpe")
    if choice.note:
        _note(choice.note)
    app.tokenizer_kind = choice.kind


def _require_model(app: MenuApp) -> None:
    if not ModelFolder(app.model_dir).has_model():
        raise FileNotFoundError(f"no trained model in {app.model_dir}; train one first: python interface.py train")


def _training_status(result) -> int:
    """Exit status of a training call: Ctrl+C (twice: None) is 130; a time budget is success."""
    if result is None or result.stopped_early == "interrupted":
        return EXIT_INTERRUPTED
    return EXIT_OK


def run_train(args: argparse.Namespace, app: MenuApp) -> int:
    if launched_by_torchrun() or args.resume or args.log_every:  # a torchrun job, a resume, job-log lines
        return run_distributed_training(args)
    _choose_tokenizer(app)
    source = app.describe_source(training_source(args.path))
    return _training_status(app.train_on(source, TrainingLength(args.epochs, args.minutes)))


def _finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", nargs="?", default="", metavar="PATH",
                   help="a JSONL file or a folder of them; nothing: the built-in conversations")
    p.add_argument("--chat-epochs", dest="epochs", type=whole_number(1, MAX_EPOCHS), metavar="N",
                   help=f"the same as --epochs: passes over the conversations (default {DEFAULT_CHAT_EPOCHS})")


def run_finetune(args: argparse.Namespace, app: MenuApp) -> int:
    """The menu's Train on Conversations: the model learns the chat format."""
    _require_model(app)
    source = app.describe_conversations(open_conversations(args.path))
    return _training_status(app.finetune_on(source, args.epochs))


def run_continue(args: argparse.Namespace, app: MenuApp) -> int:
    if args.resume == bool(args.path):
        raise UsageError("give the new data (PATH, or - for standard input) or --resume, not both")
    _require_model(app)
    _choose_tokenizer(app)
    trainer = app.make_trainer()
    if args.resume:
        if trainer.interrupted_run() is None:
            raise ValueError(f"there is no interrupted run to resume in {app.model_dir}")
        return _training_status(app.drive(trainer, lambda on_event, stop: trainer.resume(on_event, stop)))
    source = app.describe_source(training_source(args.path))
    run = trainer.interrupted_run()
    if run is not None:
        _note(f"the interrupted run on {run.name} is left unfinished; continue --resume would have finished it")
    expand = args.expand_vocab
    return _training_status(app.continue_on(trainer, source, expand, args.new_tokens if expand else 0,
                                            TrainingLength(args.epochs, args.minutes)))


def run_serve_command(args: argparse.Namespace, app: MenuApp) -> int:
    """The OpenAI-compatible server until Ctrl+C; the generation flags are each request's defaults."""
    _require_model(app)
    return server.run_serve(app.model_dir, args, app.gen_cfg, app.runtime,
                            output_fn=lambda line: print(line, flush=True), verbose=args.verbose)


def run_chat(args: argparse.Namespace, app: MenuApp) -> int:
    _require_model(app)
    app.load_generator()
    app.chat()
    return EXIT_OK


def _stream(app: MenuApp, pieces, end: str) -> None:
    """Write generated text to stdout as it comes; notes go to stderr."""
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write(end)
    sys.stdout.flush()
    for notice in app.generator.notices:
        _note(notice)


def run_ask(args: argparse.Namespace, app: MenuApp) -> int:
    _require_model(app)
    app.load_generator()
    _stream(app, app.generator.answer(args.question, app.gen_cfg), "\n")
    return EXIT_OK


def run_generate(args: argparse.Namespace, app: MenuApp) -> int:
    prompt = args.prompt
    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise UsageError("give a PROMPT, or pipe one in on standard input")
        prompt = sys.stdin.read()
    _require_model(app)
    app.load_generator()
    # Exactly the generated text; a final newline only on a terminal, where the shell
    # prompt would otherwise follow it on the same line.
    _stream(app, app.generator.complete(prompt, app.gen_cfg), "\n" if sys.stdout.isatty() else "")
    return EXIT_OK


def run_status(args: argparse.Namespace, app: MenuApp) -> int:
    _require_model(app)
    folder = ModelFolder(app.model_dir)
    plot = None
    if args.plot is not None:
        plot = Path(args.plot).expanduser() if args.plot else folder.file(LOSS_PLOT_FILE)
        draw_loss_plot(folder.read_history(), plot, title=f"Loss: {folder.path.resolve().name}")
    if args.json:
        status = asdict(folder.status())
        losses = status.pop("losses")
        existing = plot or (folder.file(LOSS_PLOT_FILE) if folder.file(LOSS_PLOT_FILE).exists() else None)
        _print_json({"model_dir": str(app.model_dir), **status, "last_train_loss": losses[-1] if losses else None,
                     "loss_plot": str(existing) if existing else None})
        return EXIT_OK
    app.training_status()
    if plot is not None and plot != folder.file(LOSS_PLOT_FILE):  # the screen names the default file itself
        print(f"Loss curves drawn in {plot}")
    return EXIT_OK


def run_info(args: argparse.Namespace, app: MenuApp) -> int:
    if not args.json:
        app.system_information()
        return EXIT_OK
    summary = ModelFolder(app.model_dir).summary()
    _print_json({"model_dir": str(app.model_dir), "device": str(app.runtime.device),
                 "precision": app.runtime.precision, "device_reason": app.runtime.reason,
                 "hardware": dict(hardware.system_summary(app.runtime)),
                 "model": asdict(summary) if summary else None})
    return EXIT_OK


def run_export(args: argparse.Namespace, app: MenuApp) -> int:
    fmt = args.format or guess_format(args.destination)
    try:
        report = export_model(app.model_dir, fmt, args.destination, args.dtype, args.force)
    except DestinationInUse as exc:
        raise DestinationInUse(f"{exc}; choose another destination, or add --force to replace it") from None
    for note in report.notes:
        _note(note)
    print(app.export_summary(report))
    return EXIT_OK


def _print_json(obj: dict) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def _note(text: str) -> None:
    print(f"Note: {text}", file=sys.stderr, flush=True)


# name: (help, flag groups, its own arguments, runner)
COMMANDS: dict[str, tuple[str, tuple, Callable, Callable[[argparse.Namespace, MenuApp], int]]] = {
    "train": ("train a model (a new one, or the folder's model further)",
              (add_general_flags, add_model_size_flags, add_training_flags, add_runtime_flags), _train_args,
              run_train),
    "continue": ("teach the model new data (vocabulary growth, rehearsal), or resume an interrupted run",
                 (add_general_flags, add_training_flags, add_runtime_flags), _continue_args, run_continue),
    "finetune": ("fine-tune the model on conversations so it chats (the menu's Train on Conversations)",
                 (add_general_flags, add_training_flags, add_runtime_flags), _finetune_args, run_finetune),
    "chat": ("talk with the model (the menu's Chat)", (add_general_flags, add_runtime_flags, add_generation_flags),
             lambda p: None, run_chat),
    "ask": ("answer one question", (add_general_flags, add_runtime_flags, add_generation_flags), _ask_args, run_ask),
    "generate": ("continue a prompt; the text alone goes to stdout",
                 (add_general_flags, add_runtime_flags, add_generation_flags), _generate_args, run_generate),
    "status": ("training progress, validation results, data sets; --plot draws the loss curves",
               (add_general_flags,), _status_args, run_status),
    "info": ("hardware, device and the model's size", (add_general_flags, add_runtime_flags), _info_args, run_info),
    "export": ("write the model for transformers (hf) or llama.cpp/Ollama (gguf)", (add_general_flags,),
               _export_args, run_export),
    "serve": ("serve the model over the OpenAI API (on 127.0.0.1 unless --host says otherwise)",
              (add_general_flags, add_runtime_flags, add_generation_flags), add_serve_arguments, run_serve_command),
}


def is_subcommand(argv: list[str]) -> bool:
    return bool(argv) and argv[0] in COMMANDS


def build_parser() -> Parser:
    p = Parser(prog="interface.py", description="Train your own GPT-style model and talk to it. "
               "Without a subcommand, the menu opens (python interface.py --help lists its flags).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_line, groups, own_args, runner) in COMMANDS.items():
        s = sub.add_parser(name, help=help_line, description=help_line[0].upper() + help_line[1:] + ".")
        own_args(s)
        for add in groups:
            add(s)
        s.set_defaults(run=runner, parser=s)
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    """The subcommand's arguments on top of every flag's default (``App`` reads them all)."""
    defaults = argparse.ArgumentParser(add_help=False)
    add_all_flags(defaults)
    args = build_parser().parse_args(argv, namespace=defaults.parse_args([]))
    if args.epochs is None:  # each command has its own default
        args.epochs = DEFAULT_CHAT_EPOCHS if args.command == "finetune" else DEFAULT_EPOCHS
    return args


def main(argv: list[str], app_class: Callable[..., MenuApp]) -> int:
    """Run one subcommand with ``app_class`` (``interface.App``); returns the exit status."""
    try:
        args = parse(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        app = app_class(args, input, ConsoleOutput())
        app.runtime  # noqa: B018 -- checks --device and --precision now
    except ValueError as exc:  # an impossible flag value (a precision the device lacks, a bad temperature)
        print(f"{args.parser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    app.resume_hint = "Resume with: python interface.py continue --resume"
    try:
        return app.run_action(lambda: args.run(args, app))
    except UsageError as exc:
        print(f"{args.parser.prog}: error: {exc} (see {args.parser.prog} --help)", file=sys.stderr)
        return EXIT_USAGE
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: still one line; -v shows where
        if args.verbose:
            traceback.print_exc()
        print(f"error: unexpected {type(exc).__name__}: {exc} (run with -v for details)", file=sys.stderr)
        return EXIT_ERROR

