"""The flags the menu and the command line share, in groups a subcommand picks from.

The menu takes every group (``add_all_flags``); each subcommand takes the groups it
uses (``cli.COMMANDS``). A number a user types goes through the one whole-number
parser (``console.parse_whole_number``), here wrapped as an argparse type.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from engine.app.console import (
    BUILTIN_TEXT_LENGTH,
    DEFAULT_CHAT_LENGTH,
    DEFAULT_EPOCHS,
    MAX_TYPED_EPOCHS,
    parse_training_length,
    parse_whole_number,
)
from engine.model.config import ARCHS
from engine.runtime import hardware
from engine.training.config import LEARNING_RATES, NEW_MODEL_RECIPE, OPTIMIZERS

# The project folder's custom_llm/ (engine/app/flags.py is two folders down from it).
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[2] / "custom_llm"


def whole_number(low: int, high: int, what: str) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` to ``high`` (``what`` names it in the error)."""
    def parse(text: str) -> int:
        try:
            return parse_whole_number(text, low, high, what)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def budget_minutes(text: str) -> float:
    """An argparse type: a time budget in minutes."""
    try:
        return parse_training_length(f"{text}m", DEFAULT_EPOCHS).minutes
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
    g.add_argument("--arch", choices=ARCHS, help="block design: gpt2 (learned positions, LayerNorm, GELU) or llama "
                   f"(rotary positions, RMSNorm, SwiGLU, no biases) (default {NEW_MODEL_RECIPE.arch})")
    g.add_argument("--qk-norm", action=argparse.BooleanOptionalAction,
                   help=f"llama: RMS-norm queries and keys (default {'on' if NEW_MODEL_RECIPE.qk_norm else 'off'})")
    g.add_argument("--target-vocab-size", "--vocab-size", dest="target_vocab_size", type=int,
                   help="the vocabulary size to aim for; lowered for little text, and with --minutes the plan "
                        "picks a size up to it unless it is given (default 8000)")


def add_training_flags(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=whole_number(1, MAX_TYPED_EPOCHS, "the number of epochs"),
                   help=f"passes over the data (the menu's default answer; without it or --minutes: {DEFAULT_EPOCHS} "
                        f"epochs of a file, {BUILTIN_TEXT_LENGTH.describe()} of the built-in corpus, "
                        f"{DEFAULT_CHAT_LENGTH.describe()} for finetune)")
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float, help="peak learning rate (a new model: " + ", ".join(
                   f"{rate:g} with {name}" for name, rate in LEARNING_RATES.items()) + "; with --minutes scaled to "
                   "the planned width; a model keeps its own)")
    t.add_argument("--optimizer", choices=OPTIMIZERS, help="muon: Muon for the matrices in the blocks and AdamW "
                   "for the rest; adamw: AdamW for all (a new model's choice, default "
                   f"{NEW_MODEL_RECIPE.optimizer}; a model keeps its own)")
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


def all_defaults() -> argparse.Namespace:
    """Every flag at its default: the base a subcommand's own arguments are laid over."""
    defaults = argparse.ArgumentParser(add_help=False)
    add_all_flags(defaults)
    return defaults.parse_args([])
