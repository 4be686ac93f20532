"""custom-llm's console: menus that train a model and talk to it.

    python interface.py [--model-dir DIR] [--tokenizer bpe|sentencepiece] [size options]
    python interface.py SUBCOMMAND ...      (the command line: see cli.py)
    python interface.py train [PATH] [options]   (also in every process torchrun starts)

The interface only parses input, calls the engine (``trainer``, ``response_generator``)
and formats results. Input and output are injected (``App(input_fn, output_fn)``), so
tests drive it without patching builtins.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable

from engine.app import cli
from engine.app.chat_repl import ChatLoop
from engine.app.cli import DEFAULT_CHAT_EPOCHS, DEFAULT_EPOCHS, MAX_EPOCHS, TrainingLength, parse_training_length
from engine.app.console import USER_ERRORS
from engine.app.display import (
    ConsoleOutput,
    TrainingProgress,
    human_bytes,
    human_count,
    loss_chart,
    rows_table,
)
from engine.app.distributed_training import make_trainer
from engine.data.conversations import ConversationSource, open_conversations
from engine.data.sources import Source, open_source, source_from_text
from engine.export.model_export import DTYPES, DestinationInUse, ExportReport, default_destination, export_model
from engine.folder.model_folder import HISTORY_FILE, LOSS_PLOT_FILE, ModelFolder
from engine.runtime import hardware
from engine.runtime.distributed import launched_by_torchrun
from engine.serving import server
from engine.training import continual
from engine.training.events import ContinualReport, TrainResult
from engine.training.runs import StopFlag
from response_generator import ChatSession, GenerationConfig, ResponseGenerator
from trainer import Trainer

END_OF_TEXT_INPUT = "END"

# Each menu: its title and (label, App method to call); None leaves the menu.
MAIN_MENU = ("Main Menu", [("Training", "training_menu"), ("Response", "response_menu"),
                           ("System Information", "system_information"), ("Export", "export"), ("Exit", None)])
TRAINING_MENU = ("Training Menu", [("Train from File", "train_from_file"),
                                   ("Train from Input", "train_from_input"),
                                   ("Continue Training", "continue_training"),
                                   ("Training Status", "training_status"),
                                   ("Train on Conversations", "train_on_conversations"),
                                   ("Back to Main Menu", None)])
RESPONSE_MENU = ("Response Menu", [("Q&A", "question_answer"), ("Chat", "chat"),
                                   ("Text Generation", "text_generation"),
                                   ("Model Information", "model_information"),
                                   ("Serve (OpenAI API)", "serve"), ("Back to Main Menu", None)])
# USER_ERRORS (engine.reports): what a user can cause, shown as one line; the menu carries on.


class EndOfInput(Exception):
    """The user closed standard input (Ctrl+D): leave the program cleanly."""


class Cancelled(Exception):
    """Ctrl+C at a prompt: abandon the current action."""


class Terminated(Exception):
    """SIGTERM stopped training: the checkpoint is saved, now leave the program."""


def parse_whole_number(text: str, low: int, high: int, what: str) -> int:
    """'12' -> 12. Only ASCII digits count (int() would also take '١')."""
    text = text.strip()
    if not (text.isascii() and text.lstrip("-").isdigit()):
        raise ValueError(f"{what} must be a whole number from {low} to {high} (got {text!r})")
    value = int(text)
    if not low <= value <= high:
        raise ValueError(f"{what} must be from {low} to {high} (got {value})")
    return value


class App:
    def __init__(self, args: argparse.Namespace, input_fn: Callable[[str], str] = input,
                 output_fn: Callable[[str], None] = print) -> None:
        self.args = args
        self._input = input_fn
        self.out = output_fn
        self.model_dir = Path(args.model_dir).expanduser()
        self.tokenizer_kind = args.tokenizer
        self._runtime: hardware.Runtime | None = None
        self.generator: ResponseGenerator | None = None
        self.gen_cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                        top_k=args.top_k, top_p=args.top_p,
                                        repetition_penalty=args.repetition_penalty, seed=args.seed)
        self.resume_hint = "Choose Continue Training to resume."  # the command line names its own way

    # -- input helpers ---------------------------------------------------------------------
    def ask(self, prompt: str) -> str:
        try:
            return self._input(prompt)
        except EOFError:
            raise EndOfInput from None
        except KeyboardInterrupt:
            self.out("")
            raise Cancelled from None

    def choose(self, menu: tuple[str, list[tuple[str, str | None]]]) -> int:
        """Show a menu until a valid number is entered; returns it (1-based)."""
        title, options = menu
        while True:
            self.out(f"\n=== {title} ===")
            for i, (label, _) in enumerate(options, 1):
                self.out(f"  {i}. {label}")
            answer = self.ask(f"Choose 1-{len(options)}: ")
            try:
                return parse_whole_number(answer, 1, len(options), "the choice")
            except ValueError as exc:
                self.out(f"Invalid choice: {exc}.")

    def menu_loop(self, menu: tuple[str, list[tuple[str, str | None]]]) -> None:
        """Run a menu's handlers until its 'back' entry; errors print one line."""
        while True:
            handler = menu[1][self.choose(menu) - 1][1]
            if handler is None:
                return
            try:
                getattr(self, handler)()
            except Cancelled:
                self.out("(cancelled)")
            except USER_ERRORS as exc:
                self.out(f"Error: {exc}")

    def ask_number(self, prompt: str, default: int, low: int, high: int, what: str) -> int:
        while True:
            answer = self.ask(f"{prompt} [default: {default}]: ").strip()
            if not answer:
                return default
            try:
                return parse_whole_number(answer, low, high, what)
            except ValueError as exc:
                self.out(f"Invalid number: {exc}.")

    def ask_length(self) -> TrainingLength:
        """Epochs, or minutes for a time budget (the model size is then chosen for that time)."""
        default = self.args.epochs or DEFAULT_EPOCHS
        while True:
            answer = self.ask(f"Training length: epochs, or minutes such as 10m for a time budget "
                              f"[default: {default} epochs]: ")
            try:
                return parse_training_length(answer, default)
            except ValueError as exc:
                self.out(f"Invalid length: {exc}.")

    def ask_yes_no(self, prompt: str, default: bool = True) -> bool:
        hint = "Y/n" if default else "y/N"
        while True:
            answer = self.ask(f"{prompt} [{hint}]: ").strip().lower()
            if not answer:
                return default
            if answer in ("y", "yes"):
                return True
            if answer in ("n", "no"):
                return False
            self.out("Please answer y or n.")

    @property
    def runtime(self) -> hardware.Runtime:
        if self._runtime is None:
            self._runtime = hardware.detect_runtime(self.args.device, self.args.precision)
        return self._runtime

    # -- start-up --------------------------------------------------------------------------
    def choose_tokenizer(self) -> None:
        choice = ModelFolder(self.model_dir).choose_tokenizer(self.tokenizer_kind)
        if choice.existing:
            self.out(f"Note: {choice.note}." if choice.note
                     else f"Model folder {self.model_dir} holds a {choice.kind} model.")
        while choice.kind is None:
            answer = self.ask("Choose tokenizer (bpe/sentencepiece) [default: bpe]: ")
            try:
                choice = ModelFolder(self.model_dir).choose_tokenizer(answer or "bpe")
            except ValueError as exc:
                self.out(f"{exc}.")
        self.tokenizer_kind = choice.kind

    def run(self) -> int:
        self.out("custom-llm: train your own language model, then talk to it.")
        self.out(f"Device: {self.runtime.device} ({self.runtime.reason}). Model folder: {self.model_dir}")
        try:
            self.choose_tokenizer()
            self.menu_loop(MAIN_MENU)
        except (EndOfInput, Cancelled, Terminated):
            self.out("")
        self.out("Goodbye.")
        return 0

    def run_action(self, action: Callable[[], int]) -> int:
        """Run one action as a command-line subcommand: its exit status, or how input ended it."""
        try:
            return action()
        except EndOfInput:
            return 0
        except Cancelled:
            return cli.EXIT_INTERRUPTED
        except Terminated:
            return cli.EXIT_TERMINATED

    # -- training ---------------------------------------------------------------------------
    def make_trainer(self) -> Trainer:
        return make_trainer(self.args, self.runtime, tokenizer_kind=self.tokenizer_kind)

    def training_menu(self) -> None:
        self.menu_loop(TRAINING_MENU)

    def read_typed_text(self) -> str:
        self.out(f"Type or paste your text. Finish with a line that holds only {END_OF_TEXT_INPUT}.")
        lines = []
        while True:
            try:
                line = self.ask("")
            except EndOfInput:
                if not lines:
                    raise
                break
            if line.strip() == END_OF_TEXT_INPUT:
                break
            lines.append(line)
        return "\n".join(lines) + "\n"

    def train_from_file(self) -> None:
        spec = self.ask("File or folder path (press Enter for the built-in corpus): ")
        self.run_training(self.describe_source(open_source(spec)))

    def describe_source(self, source: Source) -> Source:
        """Say what the data is, and any note about reading it; returns the source."""
        self.out(f"Data: {source.name} ({human_bytes(source.n_bytes)})")
        for note in source.notes:
            self.out(f"Note: {note}")
        return source

    def train_from_input(self) -> None:
        source = source_from_text(self.read_typed_text())
        self.run_training(source)

    def continue_training(self) -> None:
        if not ModelFolder(self.model_dir).has_model():
            self.out("There is no model to continue yet; use Train from File or Train from Input first.")
            return
        trainer = self.make_trainer()
        run = trainer.interrupted_run()
        if run is not None:
            where = f"epoch {run.epoch + 1}/{run.epochs}, step {run.run_step}/{run.total_steps}"
            if self.ask_yes_no(f"Resume the interrupted run on {run.name} ({where})?"):
                self.drive(trainer, lambda on_event, stop: trainer.resume(on_event, stop))
                return
        spec = self.ask("New data: file or folder path (or press Enter to type text): ")
        source = open_source(spec) if spec.strip() else source_from_text(self.read_typed_text())
        for note in source.notes:
            self.out(f"Note: {note}")
        expand = self.ask_yes_no("Expand vocabulary?")
        max_new = (self.ask_number("Most new tokens to add", 1000, 1, 100_000, "the number of new tokens")
                   if expand else 0)
        self.continue_on(trainer, source, expand, max_new, self.ask_length())

    def continue_on(self, trainer: Trainer, source: Source, expand: bool, max_new: int,
                    length: TrainingLength) -> TrainResult | None:
        """Teach the model ``source`` (growth, rehearsal), then show the before/after table."""
        reports: list[ContinualReport] = []

        def start(on_event, stop) -> TrainResult:
            reports.append(continual.train_on_new_data(trainer, source, length.epochs, expand, max_new, on_event,
                                                       stop, length.minutes))
            return reports[-1].result

        result = self.drive(trainer, start)
        if result is not None:
            self.show_continual_report(reports[-1])
        return result

    def show_continual_report(self, report: ContinualReport) -> None:
        growth = report.growth
        if growth is not None:
            if growth.added == 0:
                self.out("Vocabulary: no new token was frequent enough to add.")
            else:
                examples = ", ".join(repr(t) for t in growth.examples[:8])
                self.out(f"Vocabulary: {growth.old_vocab:,} -> {growth.new_vocab:,} tokens "
                         f"({growth.added} added, e.g. {examples})")
                self.out(f"Tokens per byte of the new data: {growth.tokens_per_byte_before:.3f} -> "
                         f"{growth.tokens_per_byte_after:.3f}; earlier validation text tokenized "
                         f"differently: {growth.drift:.1%}")
        rows = [("Dataset", "loss before -> after | bits/byte before -> after")]
        for row in report.table:
            before, after = row.before, row.after
            if before:
                text = f"{before.val_loss:.4f} -> {after.val_loss:.4f} | {before.bpb:.4f} -> {after.bpb:.4f}"
            else:
                text = f"(new) -> {after.val_loss:.4f} | (new) -> {after.bpb:.4f}"
            rows.append((row.name, text))
        self.out("\nHeld-out results per dataset:")
        self.out(rows_table(rows))

    def run_training(self, source: Source) -> None:
        self.train_on(source, self.ask_length())

    def train_on(self, source: Source, length: TrainingLength) -> TrainResult | None:
        trainer = self.make_trainer()
        return self.drive(trainer, lambda on_event, stop: trainer.train(source, length.epochs, on_event, stop,
                                                                        length.minutes))

    def drive(self, trainer: Trainer, start: Callable[[TrainingProgress, StopFlag], TrainResult]) -> TrainResult | None:
        """Run a training call with a progress bar; Ctrl+C saves and returns to the menu.

        Returns the call's result, or None when a second Ctrl+C stopped it at once."""
        for note in trainer.notes:
            self.out(f"Note: {note}")
        trainer.notes.clear()
        progress = TrainingProgress(self.out)
        self.generator = None  # the weights are about to change
        try:
            result = start(progress, StopFlag())
        except KeyboardInterrupt:
            progress.close()
            self.out("Stopped at once; the last checkpoint on disk is intact.")
            return None
        finally:
            progress.close()
        for note in trainer.notes:
            self.out(f"Note: {note}")
        trainer.notes.clear()
        if result.stopped_early == "terminated":
            self.out(f"Terminated at step {result.global_step}; checkpoint saved.")
            raise Terminated
        if result.stopped_early:
            self.out(f"Training stopped ({result.stopped_early}) at step {result.global_step}; "
                     f"checkpoint saved. {self.resume_hint}")
        else:
            self.out(f"Training complete: {result.steps} steps this run, {result.global_step} in total. "
                     f"Model saved in {self.model_dir}")
        return result

    def train_on_conversations(self) -> None:
        if not ModelFolder(self.model_dir).has_model():
            self.out("There is no model yet: train it on text first (Train from File), then on conversations.")
            return
        spec = self.ask("Conversation file or folder, JSONL (press Enter for the built-in conversations): ")
        source = self.describe_conversations(open_conversations(spec))
        epochs = self.ask_number("Number of epochs", DEFAULT_CHAT_EPOCHS, 1, MAX_EPOCHS, "the number of epochs")
        self.finetune_on(source, epochs)

    def describe_conversations(self, source: ConversationSource) -> ConversationSource:
        self.out(f"Data: {source.name} ({len(source.conversations):,} conversations, {human_bytes(source.n_bytes)})")
        for note in source.notes:
            self.out(f"Note: {note}")
        return source

    def finetune_on(self, source: ConversationSource, epochs: int) -> TrainResult | None:
        trainer = self.make_trainer()
        return self.drive(trainer, lambda on_event, stop: trainer.train_conversations(source, epochs, on_event, stop))

    def training_status(self) -> None:
        status = ModelFolder(self.model_dir).status()
        if status is None:
            self.out("No model yet: train one first.")
            return
        last = status.last_eval
        rows = [("Model folder", str(self.model_dir)),
                ("Tokenizer", status.tokenizer),
                ("Stage", status.stage + ("" if status.chat_tuned else
                                          " (Train on Conversations makes it a chat model)")),
                ("Steps", f"{status.steps:,}"),
                ("Tokens seen", f"{status.tokens_seen:,}"),
                ("Epochs completed", str(status.epochs))]
        if last:
            rows.append(("Last validation", f"loss {last.val_loss:.4f} | perplexity {last.perplexity:.2f} "
                                            f"| {last.bpb:.4f} bits/byte (step {last.step})"))
            rows.append(("Best validation loss", f"{status.best_val_loss:.4f}"))
        else:
            rows.append(("Validation", "none yet (runs at the end of each epoch)"))
        for run in status.runs[-5:]:
            what = "Fine-tuned on" if run.kind == "chat" else "Trained on"
            length = f"a {run.minutes:g}-minute budget" if run.minutes else f"{run.epochs} epochs"
            rows.append((what, f"{run.name} ({run.tokens:,} tokens, {length})"))
        for record in status.datasets:
            latest = record.latest
            if latest is None:
                result = "not evaluated yet"
            elif record.kind == "chat":
                result = f"held-out assistant loss {latest.val_loss:.4f}, {latest.bpb:.4f} bits/byte"
            else:
                result = f"{latest.bpb:.4f} bits/byte"
            rows.append(("Dataset", f"{record.name}: {result}"))
        rows.append(("Loss curves (PNG)", self.loss_plot_note()))
        self.out("\n=== Training Status ===")
        self.out(rows_table(rows))
        self.out("\nTraining loss by step:")
        self.out(loss_chart(status.losses))

    def loss_plot_note(self) -> str:
        """Where the drawn loss curves are, and whether training has moved on since."""
        folder = ModelFolder(self.model_dir)
        plot, history = folder.file(LOSS_PLOT_FILE), folder.file(HISTORY_FILE)
        redraw = f"python interface.py status --plot --model-dir {self.model_dir}"
        if not plot.exists():
            return f"none yet; draw them with: {redraw}"
        if history.exists() and history.stat().st_mtime > plot.stat().st_mtime:
            return f"{plot} (drawn before the latest training; redraw: {redraw})"
        return str(plot)

    # -- response ----------------------------------------------------------------------------
    def load_generator(self) -> bool:
        if self.generator is not None:
            return True
        if not ModelFolder(self.model_dir).has_model():
            self.out(f"No trained model in {self.model_dir}. Train one first: Main Menu -> 1 (Training).")
            return False
        self.generator = ResponseGenerator(str(self.model_dir), self.runtime)
        return True

    def response_menu(self) -> None:
        try:
            if not self.load_generator():
                return
        except (ValueError, FileNotFoundError) as exc:
            self.out(f"Error: cannot load the model: {exc}")
            return
        self.menu_loop(RESPONSE_MENU)

    def show_stream(self, prefix: str, pieces) -> None:
        """Print pieces as they arrive; Ctrl+C ends this answer only."""
        write = getattr(self.out, "write_partial", None)
        collected = []
        try:
            for piece in pieces:
                if write:
                    write(piece if collected else prefix + piece)
                collected.append(piece)
        except KeyboardInterrupt:
            collected.append(" [stopped]")
        finally:
            if hasattr(pieces, "close"):
                pieces.close()
        if write:
            write("\n")
        else:
            self.out(prefix + "".join(collected))
        for notice in self.generator.notices:
            self.out(f"Note: {notice}")

    def question_answer(self) -> None:
        self.out("Q&A: ask one question at a time. Press Enter on an empty line to go back.")
        while True:
            question = self.ask("Question: ")
            if not question.strip():
                return
            self.show_stream("Answer: ", self.generator.answer(question, self.gen_cfg))

    def text_generation(self) -> None:
        self.out("Text generation: the model continues your prompt. Empty line to go back.")
        while True:
            prompt = self.ask("Prompt: ")
            if not prompt.strip():
                return
            self.show_stream(prompt, self.generator.complete(prompt, self.gen_cfg))

    def chat(self) -> None:
        session = ChatSession(self.generator, self.gen_cfg)
        learned = self.generator.chat_ids is not None
        self.out("Chat: the model remembers the conversation. /help for commands, /bye to leave.")
        if not learned:
            self.out("Note: this model was not fine-tuned on conversations, so it tends to continue text rather "
                     "than take turns; Training Menu 5 (Train on Conversations) makes it a chat model.")
        model_line = (f"Model: {self.model_dir} ({self.generator.model.num_params():,} parameters, "
                      + ("learned chat format)" if learned else "plain User:/AI: prompt, not chat-tuned)"))
        try:
            ChatLoop(session, self.ask, self.out, self.show_stream, model_line).run()
        finally:
            self.gen_cfg = session.cfg  # settings changed in the chat stay for the next one

    def serve(self) -> None:
        """The OpenAI-compatible server on this machine, until Ctrl+C brings the menu back."""
        port = self.ask_number("Port", 8000, 1, 65535, "the port")
        self.out("Serving on 127.0.0.1 only (python interface.py serve --host ... to expose it); "
                 "Ctrl+C stops the server and returns here.")
        code = server.run_serve(self.model_dir, server.ServeSettings(port=port), self.gen_cfg, self.runtime,
                                output_fn=self.out)
        if code:
            self.out("The server did not start; the line above says why.")

    def model_information(self) -> None:
        info = self.generator.info()
        self.out("\n=== Model Information ===")
        self.out(rows_table([
            ("Parameters", f"{info.parameters:,} ({human_count(info.parameters)})"),
            ("Vocabulary size", f"{info.config.vocab_size:,} ({info.tokenizer})"),
            ("Architecture", f"{info.config.n_layer} layers, {info.config.n_head} heads, "
                             f"d_model {info.config.d_model}"),
            ("Context", f"{info.config.context} tokens"),
            ("Memory (fp32 weights)", f"{info.memory_mb:.1f} MB"),
            ("Training steps", f"{info.training_steps:,}"),
            ("Device", info.device),
        ]))

    # -- system -------------------------------------------------------------------------------
    def system_information(self) -> None:
        self.out("\n=== System Information ===")
        self.out("Hardware:")
        self.out(rows_table(hardware.system_summary(self.runtime)))
        folder = ModelFolder(self.model_dir)
        self.out(f"\nModel folder: {self.model_dir}")
        try:
            m = folder.summary()
        except ValueError as exc:
            self.out(f"  cannot read config.json: {exc}")
            return
        if m is None:
            self.out("  (no trained model yet)")
            return
        self.out(rows_table([
            ("Parameters", f"{m.parameters:,} ({human_count(m.parameters)})"),
            ("Vocabulary", f"{m.vocab_size:,} ({m.tokenizer})"),
            ("Layers / heads", f"{m.n_layer} / {m.n_head} (d_model {m.d_model})"),
            ("Context", f"{m.context} tokens"),
            ("Size in memory", human_bytes(m.parameters * 4) + " (fp32)"),
            ("Training steps", f"{m.training_steps:,}"),
        ]))
        self.out("Files:")
        files = sorted(p for p in self.model_dir.rglob("*") if p.is_file())
        self.out(rows_table([(str(p.relative_to(self.model_dir)), human_bytes(p.stat().st_size)) for p in files]))


    # -- export -------------------------------------------------------------------------------
    def export(self) -> None:
        """Main Menu 5: the model for transformers (a folder) or llama.cpp/Ollama (a file)."""
        if not ModelFolder(self.model_dir).has_model():
            self.out("No trained model to export yet: train one first (Main Menu -> 1).")
            return
        while True:
            fmt = self.ask("Format: hf (transformers) or gguf (llama.cpp, Ollama) [default: hf]: ").strip().lower()
            fmt = fmt or "hf"
            if fmt in ("hf", "gguf"):
                break
            self.out("Please answer hf or gguf.")
        default = default_destination(self.model_dir, fmt)
        what = "Folder" if fmt == "hf" else "File"
        dest = self.ask(f"{what} to write [default: {default}]: ").strip() or str(default)
        dtype = "f32"
        if fmt == "gguf":
            dtype = self.ask("Weights: f32 (exact) or f16 (half the size) [default: f32]: ").strip().lower() or "f32"
            if dtype not in DTYPES:
                raise ValueError(f"unknown weight type {dtype!r}; choose f32 or f16")
        try:
            report = export_model(self.model_dir, fmt, dest, dtype)
        except DestinationInUse as exc:
            self.out(f"{exc}.")
            if not self.ask_yes_no("Replace it?", default=False):
                return
            report = export_model(self.model_dir, fmt, dest, dtype, force=True)
        for note in report.notes:
            self.out(f"Note: {note}")
        self.out(self.export_summary(report))

    @staticmethod
    def export_summary(report: ExportReport) -> str:
        """What was written, and the one step to use it."""
        chat = " with the chat template" if report.chat_template else ""
        if report.format == "hf":
            return (f"Exported{chat} to {report.path} ({len(report.files)} files, {human_bytes(report.n_bytes)}). "
                    f"Load it with transformers: AutoModelForCausalLM.from_pretrained({report.path!r})")
        return (f"Exported{chat} to {report.path} ({human_bytes(report.n_bytes)}). "
                f"Run it with llama.cpp: llama-cli -m {report.path}")


def build_parser() -> argparse.ArgumentParser:
    commands = "\n".join(f"  {name:<10}{entry[0]}" for name, entry in cli.COMMANDS.items())
    p = MenuParser(prog="interface.py", formatter_class=argparse.RawDescriptionHelpFormatter,
                   description="Train your own GPT-style model and talk to it: without a subcommand, the menu.",
                   epilog=f"subcommands (python interface.py SUBCOMMAND --help):\n{commands}")
    cli.add_all_flags(p)
    return p


def enable_line_editing() -> None:
    """Arrow keys, history and Ctrl+R in every prompt: the terminal's own readline.

    Importing the module is all ``input()`` needs. Windows has no readline; there the
    console's own line editing stays.
    """
    try:
        import readline  # noqa: F401
    except ImportError:
        pass


class MenuParser(cli.Parser):
    """The menu's flags; a subcommand placed after them gets a hint (subcommands come first)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        misplaced = [word for word in message.replace(":", " ").split() if word in cli.COMMANDS]
        if "unrecognized arguments" in message and misplaced:
            message = f"put the subcommand first: python interface.py {misplaced[0]} [flags]"
        super().error(message)


def main(argv: list[str] | None = None, input_fn: Callable[[str], str] = input,
         output_fn: Callable[[str], None] | None = None) -> int:
    """The menu; or, when ``argv`` starts with a subcommand name, the command line (cli.py)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if cli.is_subcommand(argv):
        return cli.main(argv, App)
    if launched_by_torchrun():  # eight menus reading one terminal would help nobody
        print("Error: under torchrun, run `interface.py train ...`; the menu is for one process", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    out = output_fn or ConsoleOutput()
    if input_fn is input and sys.stdin.isatty():
        enable_line_editing()
    try:
        app = App(args, input_fn, out)
        return app.run()
    except ValueError as exc:  # bad command-line values (e.g. an impossible precision)
        out(f"Error: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
