"""custom-llm's console: menus that train a model and talk to it.

    python interface.py [--model-dir DIR] [--tokenizer bpe|sentencepiece] [size options]
    python interface.py [flags] SUBCOMMAND ...   (the command line: engine/app/cli.py)
    python interface.py train [PATH] [options]   (also in every process torchrun starts)

The menu only asks, calls the session (``engine/app/session.py``, which the command
line uses too) and prints what ``engine/app/screens.py`` makes of the result. Input
and output are injected (``main(argv, input_fn, output_fn)``), so tests drive it
without patching builtins.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Iterator

from engine.app import cli, screens
from engine.app.chat_repl import run_chat
from engine.app.console import (
    BUILTIN_TEXT_LENGTH,
    DEFAULT_CHAT_LENGTH,
    DEFAULT_EPOCHS,
    DEFAULT_NEW_TOKENS,
    MAX_NEW_TOKENS,
    USER_ERRORS,
    Cancelled,
    Console,
    EndOfInput,
    Terminated,
    TrainingLength,
    edit_lines_on_a_terminal,
)
from engine.app.display import ConsoleOutput
from engine.app.flags import add_all_flags
from engine.app.session import Session
from engine.data.conversations import open_conversations
from engine.data.sources import BUILTIN_NAME, Source, open_source, source_from_text
from engine.export.model_export import DestinationInUse, default_destination
from engine.generation.sampling import GenerationConfig
from engine.runtime.distributed import launched_by_torchrun
from engine.serving.server import ServeSettings

# Each menu: its title and (label, Menu method to call); None leaves the menu.
MenuSpec = tuple[str, list[tuple[str, str | None]]]
MAIN_MENU: MenuSpec = ("Main Menu", [
    ("Training", "training_menu"), ("Response", "response_menu"), ("System Information", "system_information"),
    ("Export", "export"), ("Exit", None)])
TRAINING_MENU: MenuSpec = ("Training Menu", [
    ("Train from File", "train_from_file"), ("Train from Input", "train_from_input"),
    ("Continue Training", "continue_training"), ("Training Status", "training_status"),
    ("Train on Conversations", "train_on_conversations"), ("Back to Main Menu", None)])
RESPONSE_MENU: MenuSpec = ("Response Menu", [
    ("Q&A", "question_answer"), ("Chat", "chat"), ("Text Generation", "text_generation"),
    ("Model Information", "model_information"), ("Serve (OpenAI API)", "serve"), ("Back to Main Menu", None)])


class Menu:
    """The menus over one session: each handler asks, calls the session and prints."""

    def __init__(self, session: Session, console: Console) -> None:
        self.session = session
        self.console = console
        self.out = console.out

    def run(self) -> int:
        self.out("custom-llm: train your own language model, then talk to it.")
        runtime = self.session.runtime  # ValueError for an impossible --device/--precision: main says so
        self.out(f"Device: {runtime.device} ({runtime.reason}). Model folder: {self.session.model_dir}")
        try:
            self.choose_tokenizer()
            self.menu_loop(MAIN_MENU)
        except (EndOfInput, Cancelled, Terminated):
            self.out("")
        self.out("Goodbye.")
        return 0

    def menu_loop(self, menu: MenuSpec) -> None:
        """Run a menu's handlers until its 'back' entry; errors print one line."""
        title, options = menu
        while True:
            handler = options[self.console.choose(title, [label for label, _ in options]) - 1][1]
            if handler is None:
                return
            try:
                getattr(self, handler)()
            except Cancelled:
                self.out("(cancelled)")
            except USER_ERRORS as exc:
                self.out(f"Error: {exc}")

    def choose_tokenizer(self) -> None:
        """The folder's tokenizer, the --tokenizer flag's, or the user's answer for a new model."""
        choice = self.session.choose_tokenizer(self.session.tokenizer_kind)
        if choice.existing:
            self.out(f"Note: {choice.note}." if choice.note
                     else f"Model folder {self.session.model_dir} holds a {choice.kind} model.")
        while choice.kind is None:
            answer = self.console.ask("Choose tokenizer (bpe/sentencepiece) [default: bpe]: ")
            try:
                choice = self.session.choose_tokenizer(answer or "bpe")
            except ValueError as exc:
                self.out(f"{exc}.")

    # -- training ---------------------------------------------------------------------------
    def training_menu(self) -> None:
        self.menu_loop(TRAINING_MENU)

    def ask_length(self, default: TrainingLength | None = None) -> TrainingLength:
        """The length question; --epochs given to the menu is its default, else ``default``, else DEFAULT_EPOCHS."""
        return self.console.ask_length(self.session.args.epochs or default or DEFAULT_EPOCHS)

    def train_from_file(self) -> None:
        source = open_source(self.console.ask("File or folder path (press Enter for the built-in corpus): "))
        self.out(screens.source_summary(source))
        self.session.train_on(source, self.ask_length(BUILTIN_TEXT_LENGTH if source.name == BUILTIN_NAME else None))

    def train_from_input(self) -> None:
        source = source_from_text(self.console.read_typed_text())
        self.session.train_on(source, self.ask_length())

    def continue_training(self) -> None:
        if not self.session.has_model():
            self.out("There is no model to continue yet; use Train from File or Train from Input first.")
            return
        trainer = self.session.make_trainer()
        run = trainer.interrupted_run()
        if run is not None:
            where = f"epoch {run.epoch + 1}/{run.epochs}, step {run.run_step}/{run.total_steps}"
            if self.console.ask_yes_no(f"Resume the interrupted run on {run.name} ({where})?"):
                self.session.resume(trainer)
                return
        source = self.ask_new_data()
        expand = self.console.ask_yes_no("Expand vocabulary?")
        max_new = (self.console.ask_number("Most new tokens to add", DEFAULT_NEW_TOKENS, 1, MAX_NEW_TOKENS,
                                           "the number of new tokens") if expand else 0)
        report = self.session.continue_on(trainer, source, expand, max_new, self.ask_length())
        if report is not None:
            self.out(screens.continual_screen(report))

    def ask_new_data(self) -> Source:
        spec = self.console.ask("New data: file or folder path (or press Enter to type text): ")
        source = open_source(spec) if spec.strip() else source_from_text(self.console.read_typed_text())
        self.console.notes(source.notes)
        return source

    def train_on_conversations(self) -> None:
        if not self.session.has_model():
            self.out("There is no model yet: train it on text first (Train from File), then on conversations.")
            return
        spec = self.console.ask("Conversation file or folder: .jsonl, .json or .parquet (press Enter for the built-in "
                                 "conversations): ")
        source = open_conversations(spec)
        self.out(screens.conversations_summary(source))
        self.session.finetune_on(source, self.console.ask_length(DEFAULT_CHAT_LENGTH))

    def training_status(self) -> None:
        report = self.session.status_report()
        self.out("No model yet: train one first." if report is None else screens.status_screen(report))

    # -- response ----------------------------------------------------------------------------
    def response_menu(self) -> None:
        if not self.session.has_model():
            self.out(f"No trained model in {self.session.model_dir}. Train one first: Main Menu -> 1 (Training).")
            return
        try:
            self.session.load_generator()
        except (ValueError, FileNotFoundError) as exc:
            self.out(f"Error: cannot load the model: {exc}")
            return
        self.menu_loop(RESPONSE_MENU)

    def answer_each(self, intro: str, label: str, generate: Callable[[str, GenerationConfig], Iterator[str]],
                    prefix: Callable[[str], str]) -> None:
        """Ask at ``label`` and stream each answer after ``prefix(text)``, until an empty line."""
        self.out(intro)
        while True:
            text = self.console.ask(label)
            if not text.strip():
                return
            self.console.show_stream(prefix(text), generate(text, self.session.gen_cfg))
            self.console.notes(self.session.generator.notices)

    def question_answer(self) -> None:
        self.answer_each("Q&A: ask one question at a time. Press Enter on an empty line to go back.", "Question: ",
                         self.session.load_generator().answer, prefix=lambda question: "Answer: ")

    def text_generation(self) -> None:
        self.answer_each("Text generation: the model continues your prompt. Empty line to go back.", "Prompt: ",
                         self.session.load_generator().complete, prefix=lambda prompt: prompt)

    def chat(self) -> None:
        run_chat(self.session, self.console)

    def model_information(self) -> None:
        self.out(screens.model_screen(self.session.model_info()))

    def serve(self) -> None:
        """The OpenAI-compatible server on this machine, until Ctrl+C brings the menu back."""
        port = self.console.ask_number("Port", 8000, 1, 65535, "the port")
        self.out("Serving on 127.0.0.1 only (python interface.py serve --host ... to expose it); "
                 "Ctrl+C stops the server and returns here.")
        if self.session.serve(ServeSettings(port=port), output_fn=self.out):
            self.out("The server did not start; the line above says why.")

    # -- system and export ----------------------------------------------------------------
    def system_information(self) -> None:
        self.out(screens.system_screen(self.session.system_report()))

    def export(self) -> None:
        """Main Menu 4: the model for transformers (a folder) or llama.cpp/Ollama (a file)."""
        if not self.session.has_model():
            self.out("No trained model to export yet: train one first (Main Menu -> 1).")
            return
        fmt = self.console.ask_word("Format: hf (transformers) or gguf (llama.cpp, Ollama) [default: hf]: ",
                                    ("hf", "gguf"))
        default = default_destination(self.session.model_dir, fmt)
        what = "Folder" if fmt == "hf" else "File"
        dest = self.console.ask(f"{what} to write [default: {default}]: ").strip() or str(default)
        dtype = None  # the format's default: f32 for transformers
        if fmt == "gguf":
            dtype = self.console.ask_word("Weights: f16 (half the size), q8_0 (a quarter, nearly as good) or f32 "
                                          "(exact) [default: f16]: ", ("f16", "q8_0", "f32"))
        try:
            report = self.session.export(fmt, dest, dtype)
        except DestinationInUse as exc:
            self.out(f"{exc}.")
            if not self.console.ask_yes_no("Replace it?", default=False):
                return
            report = self.session.export(fmt, dest, dtype, force=True)
        self.console.notes(report.notes)
        self.out(screens.export_summary(report))


class MenuParser(cli.Parser):
    """The menu's flags, which may also stand before a subcommand (``--model-dir X train``)."""

    def __init__(self) -> None:
        commands = "\n".join(f"  {name:<10}{command.help}" for name, command in cli.COMMANDS.items())
        super().__init__(prog="interface.py", formatter_class=argparse.RawDescriptionHelpFormatter,
                         usage="%(prog)s [flags] [SUBCOMMAND [its arguments]]",
                         description="Train your own GPT-style model and talk to it: without a subcommand, the menu.",
                         epilog=f"subcommands (python interface.py SUBCOMMAND --help):\n{commands}")
        add_all_flags(self)
        # The first word that is no flag's value, and everything after it: the subcommand's.
        self.add_argument("command", nargs="?", help=argparse.SUPPRESS)
        self.add_argument("command_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def build_parser() -> MenuParser:
    return MenuParser()


def subcommand_argv(argv: list[str], args: argparse.Namespace) -> list[str]:
    """``--model-dir X train data.txt`` -> ``train --model-dir X data.txt``: the flags move after the name.

    ``args`` is what the menu's parser made of ``argv``; its ``command`` is a subcommand.
    """
    at = len(argv) - len(args.command_args) - 1
    assert argv[at] == args.command, (argv, args.command)
    return [args.command, *argv[:at], *argv[at + 1:]]


def main(argv: list[str] | None = None, input_fn: Callable[[str], str] = input,
         output_fn: Callable[[str], None] | None = None) -> int:
    """The menu; or, when ``argv`` names a subcommand (first, or after the flags), the command line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    edit_lines_on_a_terminal(input_fn)  # every prompt of the menu and of every subcommand
    if cli.is_subcommand(argv):
        return cli.main(argv, input_fn)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is not None:
        if args.command not in cli.COMMANDS:
            parser.error(f"unknown subcommand {args.command!r}; choose one of {', '.join(cli.COMMANDS)}")
        return cli.main(subcommand_argv(argv, args), input_fn)
    if launched_by_torchrun():  # eight menus reading one terminal would help nobody
        print("Error: under torchrun, run `interface.py train ...`; the menu is for one process", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    out = output_fn or ConsoleOutput()
    try:
        session = Session(args, out)
        return Menu(session, Console(input_fn, out)).run()
    except ValueError as exc:  # bad command-line values (e.g. an impossible precision)
        out(f"Error: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
