"""The console's prompts, and what a user types, parsed: shared by the menu and the command line.

``Console`` wraps an injected ``input_fn`` and ``output_fn`` (the tests drive it with a
script and a list): a prompt, a numbered menu, a number, yes or no, a training
length, text typed until a line of ``END``, and a stream of generated text that
Ctrl+C ends without leaving the action. How input ends an action is an exception:
``EndOfInput`` (Ctrl+D) leaves the program, ``Cancelled`` (Ctrl+C at a prompt)
abandons the action, ``Terminated`` (SIGTERM during training) leaves after the save.

Anything a user can cause (a bad path, a full disk, a diverging loss) is one of
``USER_ERRORS``: shown as one line, after which the menu carries on and the command
line exits with status 1; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from engine.training.config import MAX_BUDGET_MINUTES

USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, OSError, MemoryError)
DEFAULT_EPOCHS = 3
# The most epochs a user may type; the engine's own ceiling (training.config.MAX_EPOCHS)
# is higher, for the epochs a time budget plans.
MAX_TYPED_EPOCHS = 10_000
# Continue Training's vocabulary growth: the new tokens it adds at most, unless told.
DEFAULT_NEW_TOKENS = 1000
MAX_NEW_TOKENS = 100_000
END_OF_TEXT_INPUT = "END"


class EndOfInput(Exception):
    """The user closed standard input (Ctrl+D): leave the program cleanly."""


class Cancelled(Exception):
    """Ctrl+C at a prompt: abandon the current action."""


class Terminated(Exception):
    """SIGTERM stopped training: the checkpoint is saved, now leave the program."""


def parse_whole_number(text: str, low: int, high: int, what: str) -> int:
    """' 12 ' -> 12, or ValueError naming ``what`` and the range.

    Only ASCII digits count: ``int()`` would also take '١' (Arabic-Indic one) or '１'.
    """
    text = text.strip()
    if not (text.isascii() and text.lstrip("-").isdigit()) or not low <= int(text) <= high:
        raise ValueError(f"{what} must be a whole number from {low} to {high} (got {text!r})")
    return int(text)


@dataclass(frozen=True)
class TrainingLength:
    """How long to train: a number of epochs, or a time budget in minutes (then minutes > 0)."""

    epochs: int
    minutes: float = 0.0

    def describe(self) -> str:
        """'3 epochs' or '10 minutes', as a prompt shows its default."""
        return f"{self.minutes:g} minutes" if self.minutes else f"{self.epochs} epochs"


# The first session, Enter at every question: the built-in text for BUILTIN_TEXT_LENGTH, then
# the built-in conversations for DEFAULT_CHAT_LENGTH. Both are time budgets, so the session
# takes the same ten minutes on any machine (tokenizers included) and a faster machine gets a
# bigger model and more passes, not a shorter wait. The split and the text were chosen by
# scripts/first_session.py (README "A first session").
BUILTIN_TEXT_LENGTH = TrainingLength(DEFAULT_EPOCHS, minutes=4.0)
# A user's own text defaults to DEFAULT_EPOCHS passes; a user's own conversations to these
# minutes, in which a small set gets many passes and the run keeps the best of them.
DEFAULT_CHAT_EPOCHS = 30  # the number of passes shown where a length in epochs is asked for
DEFAULT_CHAT_LENGTH = TrainingLength(DEFAULT_CHAT_EPOCHS, minutes=5.0)


def parse_training_length(text: str, default: int | TrainingLength) -> TrainingLength:
    """'3' -> 3 epochs; '10m', '10 min', '2.5 minutes' -> a 10 (2.5) minute budget; '' -> the default.

    ``default`` is a number of epochs or a whole ``TrainingLength`` (which may be minutes).
    """
    if not isinstance(default, TrainingLength):
        default = TrainingLength(default)
    default_epochs = default.epochs
    text = text.strip().lower()
    if not text:
        return default
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
    return TrainingLength(parse_whole_number(text, 1, MAX_TYPED_EPOCHS, "the number of epochs"))


def enable_line_editing() -> None:
    """Arrow keys, history and Ctrl+R in every prompt: the terminal's own readline.

    Importing the module is all ``input()`` needs. Windows has no readline; there the
    console's own line editing stays.
    """
    try:
        import readline  # noqa: F401
    except ImportError:
        pass


def edit_lines_on_a_terminal(input_fn: Callable[[str], str]) -> None:
    """Turn line editing on when the prompts read a terminal through ``input()``.

    The one place that decides it, for the menu and every subcommand alike; piped
    input and injected ``input_fn`` (tests) stay as they are.
    """
    if input_fn is input and sys.stdin is not None and sys.stdin.isatty():
        enable_line_editing()


class Console:
    """Prompts over ``input_fn`` and ``output_fn``; Ctrl+D and Ctrl+C become exceptions."""

    def __init__(self, input_fn: Callable[[str], str] = input, output_fn: Callable[[str], None] = print) -> None:
        self._input = input_fn
        self.out = output_fn

    def ask(self, prompt: str) -> str:
        try:
            return self._input(prompt)
        except EOFError:
            raise EndOfInput from None
        except KeyboardInterrupt:
            self.out("")
            raise Cancelled from None

    def notes(self, notes: Iterable[str]) -> None:
        for note in notes:
            self.out(f"Note: {note}")

    def choose(self, title: str, labels: list[str]) -> int:
        """Show a numbered menu until a valid number is entered; returns it (1-based)."""
        while True:
            self.out(f"\n=== {title} ===")
            for i, label in enumerate(labels, 1):
                self.out(f"  {i}. {label}")
            answer = self.ask(f"Choose 1-{len(labels)}: ")
            try:
                return parse_whole_number(answer, 1, len(labels), "the choice")
            except ValueError as exc:
                self.out(f"Invalid choice: {exc}.")

    def ask_number(self, prompt: str, default: int, low: int, high: int, what: str) -> int:
        while True:
            answer = self.ask(f"{prompt} [default: {default}]: ").strip()
            if not answer:
                return default
            try:
                return parse_whole_number(answer, low, high, what)
            except ValueError as exc:
                self.out(f"Invalid number: {exc}.")

    def ask_length(self, default: int | TrainingLength) -> TrainingLength:
        """Epochs, or minutes for a time budget (a new model's size is then chosen for that time).

        ``default`` is a number of epochs or a ``TrainingLength`` (which may be minutes).
        """
        if not isinstance(default, TrainingLength):
            default = TrainingLength(default)
        while True:
            answer = self.ask(f"Training length: epochs, or minutes such as 10m for a time budget "
                              f"[default: {default.describe()}]: ")
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

    def ask_word(self, prompt: str, words: tuple[str, ...]) -> str:
        """One of ``words`` (lower case); Enter picks the first."""
        while True:
            answer = self.ask(prompt).strip().lower() or words[0]
            if answer in words:
                return answer
            self.out(f"Please answer {' or '.join(words)}.")

    def read_typed_text(self) -> str:
        """Lines until one that holds only END (or the end of input after some text)."""
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

    def show_stream(self, prefix: str, pieces: Iterator[str]) -> None:
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
