"""custom-llm's console: menus that train a model and talk to it.

    python interface.py [--model-dir DIR] [--tokenizer bpe|sentencepiece] [size options]
    python interface.py train [PATH] [options]       (also under torchrun: distributed_training.py)

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

import continual
from chat_repl import ChatLoop
from distributed_training import add_train_arguments, run_distributed_training
from engine import hardware
from engine.conversations import open_conversations
from engine.display import (
    ConsoleOutput,
    TrainingProgress,
    human_bytes,
    human_count,
    loss_chart,
    rows_table,
)
from engine.distributed import launched_by_torchrun
from engine.model_folder import ModelFolder
from engine.reports import ContinualReport, TrainResult
from engine.sources import open_source, source_from_text
from model import GPT, ModelConfig
from response_generator import ChatSession, GenerationConfig, ResponseGenerator
from trainer import StopFlag, Trainer

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "custom_llm"
DEFAULT_EPOCHS = 3
MAX_EPOCHS = 10_000
END_OF_TEXT_INPUT = "END"

# Each menu: its title and (label, App method to call); None leaves the menu.
MAIN_MENU = ("Main Menu", [("Training", "training_menu"), ("Response", "response_menu"),
                           ("System Information", "system_information"), ("Exit", None)])
TRAINING_MENU = ("Training Menu", [("Train from File", "train_from_file"),
                                   ("Train from Input", "train_from_input"),
                                   ("Continue Training", "continue_training"),
                                   ("Training Status", "training_status"),
                                   ("Train on Conversations", "train_on_conversations"),
                                   ("Back to Main Menu", None)])
RESPONSE_MENU = ("Response Menu", [("Q&A", "question_answer"), ("Chat", "chat"),
                                   ("Text Generation", "text_generation"),
                                   ("Model Information", "model_information"), ("Back to Main Menu", None)])
# What a user can cause: shown as one line, and the menu carries on.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, OSError, MemoryError)
# Conversation sets are small; more passes than over text (measured: scripts/chat_experiment.py).
DEFAULT_CHAT_EPOCHS = 12


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

    # -- training ---------------------------------------------------------------------------
    def make_trainer(self) -> Trainer:
        a = self.args
        trainer = Trainer(
            str(self.model_dir), self.tokenizer_kind or "bpe",
            model_overrides={"d_model": a.d_model, "n_layer": a.n_layer, "n_head": a.n_head,
                             "context": a.context, "dropout": a.dropout},
            train_overrides={"learning_rate": a.lr, "batch_size": a.batch_size, "target_vocab_size": a.target_vocab_size,
                             "checkpoint_every": a.checkpoint_every, "max_minutes": a.max_minutes,
                             "seed": a.train_seed, "compile": a.compile},
            runtime=self.runtime, preset=a.preset)
        return trainer

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
        source = open_source(spec)
        self.out(f"Data: {source.name} ({human_bytes(source.n_bytes)})")
        for note in source.notes:
            self.out(f"Note: {note}")
        self.run_training(source)

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
        epochs = self.ask_number("Number of epochs", self.args.epochs, 1, MAX_EPOCHS, "the number of epochs")
        reports: list[ContinualReport] = []

        def start(on_event, stop) -> TrainResult:
            reports.append(continual.train_on_new_data(trainer, source, epochs, expand, max_new, on_event, stop))
            return reports[-1].result

        if self.drive(trainer, start) is not None:
            self.show_continual_report(reports[-1])

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

    def run_training(self, source, trainer: Trainer | None = None) -> None:
        epochs = self.ask_number("Number of epochs", self.args.epochs, 1, MAX_EPOCHS, "the number of epochs")
        trainer = trainer or self.make_trainer()
        self.drive(trainer, lambda on_event, stop: trainer.train(source, epochs, on_event, stop))

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
                     "checkpoint saved. Choose Continue Training to resume.")
        else:
            self.out(f"Training complete: {result.steps} steps this run, {result.global_step} in total. "
                     f"Model saved in {self.model_dir}")
        return result

    def train_on_conversations(self) -> None:
        if not ModelFolder(self.model_dir).has_model():
            self.out("There is no model yet: train it on text first (Train from File), then on conversations.")
            return
        spec = self.ask("Conversation file or folder, JSONL (press Enter for the built-in conversations): ")
        source = open_conversations(spec)
        self.out(f"Data: {source.name} ({len(source.conversations):,} conversations, {human_bytes(source.n_bytes)})")
        for note in source.notes:
            self.out(f"Note: {note}")
        epochs = self.ask_number("Number of epochs", DEFAULT_CHAT_EPOCHS, 1, MAX_EPOCHS, "the number of epochs")
        trainer = self.make_trainer()
        self.drive(trainer, lambda on_event, stop: trainer.train_conversations(source, epochs, on_event, stop))

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
            rows.append((what, f"{run.name} ({run.tokens:,} tokens, {run.epochs} epochs)"))
        for record in status.datasets:
            latest = record.latest
            if latest is None:
                result = "not evaluated yet"
            elif record.kind == "chat":
                result = f"held-out assistant loss {latest.val_loss:.4f}, {latest.bpb:.4f} bits/byte"
            else:
                result = f"{latest.bpb:.4f} bits/byte"
            rows.append(("Dataset", f"{record.name}: {result}"))
        self.out("\n=== Training Status ===")
        self.out(rows_table(rows))
        self.out("\nTraining loss by step:")
        self.out(loss_chart(status.losses))

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
        if not folder.has_model():
            self.out("  (no trained model yet)")
            return
        try:
            meta = folder.read_meta()
            config = ModelConfig.from_dict(meta["model"])
        except ValueError as exc:
            self.out(f"  cannot read config.json: {exc}")
            return
        n_params = count_parameters(config)
        steps = meta.get("progress", {}).get("step", 0)
        self.out(rows_table([
            ("Parameters", f"{n_params:,} ({human_count(n_params)})"),
            ("Vocabulary", f"{config.vocab_size:,} ({meta['tokenizer']})"),
            ("Layers / heads", f"{config.n_layer} / {config.n_head} (d_model {config.d_model})"),
            ("Context", f"{config.context} tokens"),
            ("Size in memory", human_bytes(n_params * 4) + " (fp32)"),
            ("Training steps", f"{steps:,}"),
        ]))
        self.out("Files:")
        files = sorted(p for p in self.model_dir.rglob("*") if p.is_file())
        self.out(rows_table([(str(p.relative_to(self.model_dir)), human_bytes(p.stat().st_size)) for p in files]))


def count_parameters(config: ModelConfig) -> int:
    """Exact parameter count without allocating weights (built on the meta device)."""
    import torch

    with torch.device("meta"):
        return GPT(config).num_params()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="interface.py", description="Train your own GPT-style model and talk to it.")
    p.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR), help="model folder (default: %(default)s)")
    p.add_argument("--tokenizer", choices=["bpe", "sentencepiece"], help="skip the tokenizer question")
    g = p.add_argument_group("model size (new models only; default: chosen from the hardware)")
    g.add_argument("--preset", choices=hardware.PRESET_NAMES, help="a size preset")
    g.add_argument("--d-model", type=int)
    g.add_argument("--n-layer", type=int)
    g.add_argument("--n-head", type=int)
    g.add_argument("--context", type=int, help="context length in tokens (default 256)")
    g.add_argument("--dropout", type=float)
    g.add_argument("--target-vocab-size", "--vocab-size", dest="target_vocab_size", type=int,
                   help="the vocabulary size to aim for; lowered for little text (default 8000)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="default answer to the epochs question")
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    t.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 100)")
    t.add_argument("--max-minutes", type=float, help="stop a training run after this many minutes")
    t.add_argument("--train-seed", type=int, help="seed for initialisation and data order")
    t.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the model for training (meant for GPUs; off by default)")
    t.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: best available)")
    t.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="autocast dtype; fp32 also keeps generation's weights in fp32 (default: auto)")
    s = p.add_argument_group("generation")
    s.add_argument("--max-new-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=50)
    s.add_argument("--top-p", type=float, default=0.95)
    s.add_argument("--repetition-penalty", type=float, default=1.1)
    s.add_argument("--seed", type=int, help="seed for sampling (repeatable answers)")
    p.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
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


def main(argv: list[str] | None = None, input_fn: Callable[[str], str] = input,
         output_fn: Callable[[str], None] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # training without the menu, also in every process torchrun starts
        parser = build_parser()
        parser.prog = "interface.py train"
        add_train_arguments(parser)
        return run_distributed_training(parser.parse_args(argv[1:]))
    if launched_by_torchrun():  # eight menus reading one terminal would help nobody
        print("Error: under torchrun, run `interface.py train ...`; the menu is for one process", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    hardware.configure_cpu()
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
