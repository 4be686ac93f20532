"""Export a model folder to another program's format: the one call the menu and ``interface.py export`` make.

    export_model("custom_llm", "hf", "out/")            # a folder transformers loads
    export_model("custom_llm", "gguf", "model.gguf")     # one file for llama.cpp and Ollama

The model is loaded and checked like the Response menu loads it. Nothing is written
in place: the folder or file is made beside the destination and moved there only when
complete (``storage.replace_folder``, ``storage.atomic_path``). A destination that
holds something else is refused unless ``force``: a previous export of either format
may be replaced, anything else only on request.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from engine.data.chat_format import chat_ids_in_force
from engine.data.tokenizer import BPETokenizer
from engine.export import gguf_file, hf_folder
from engine.export.gguf_file import EXPORT_MARK, SENTENCEPIECE_NOTE, write_gguf
from engine.export.hf_folder import hf_files
from engine.folder.model_folder import ModelFolder
from engine.runtime import storage

FORMATS = ("hf", "gguf")
# The weight types each format can hold, and what an export writes when none is asked for:
# f32 for transformers (as before), f16 for GGUF (what llama.cpp's converter writes).
FORMAT_DTYPES = {"hf": tuple(hf_folder.DTYPES), "gguf": gguf_file.DTYPES}
DEFAULT_DTYPES = {"hf": "f32", "gguf": "f16"}
DTYPES = ("f32", "f16", "q8_0")  # every type some format takes (a command line's choices)
HF_MARK_FILE = "custom_llm_export.json"  # in an exported folder: this program wrote it


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote: the format, where, its files and size, and notes for the user."""

    format: str  # "hf" or "gguf"
    path: str
    files: list[str]
    n_bytes: int
    chat_template: bool  # the model has a chat format and the export carries its template
    notes: list[str] = field(default_factory=list)


class DestinationInUse(ValueError):
    """The destination holds something that is not a previous export (``force`` replaces it)."""


def guess_format(destination: str) -> str:
    """'model.gguf' -> 'gguf'; anything else is a folder for transformers ('hf')."""
    return "gguf" if str(destination).lower().endswith(".gguf") else "hf"


def default_destination(model_dir: str | Path, fmt: str) -> Path:
    """Beside the model folder: ``custom_llm-hf/`` or ``custom_llm.gguf``."""
    model_dir = Path(model_dir).expanduser().resolve()
    return model_dir.with_name(model_dir.name + ("-hf" if fmt == "hf" else ".gguf"))


def check_destination(fmt: str, destination: str | Path, force: bool = False,
                      model_dir: str | Path | None = None) -> Path:
    """The destination as a path, or a ValueError that says why it cannot be used.

    Never, even with ``force``: the model folder itself, a folder that holds it, or
    another model folder (replacing one would delete a model).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose hf or gguf")
    dest = Path(destination).expanduser()
    if not str(destination).strip():
        raise ValueError("the destination is empty; give a folder (hf) or a .gguf file")
    if model_dir is not None:
        model = Path(model_dir).expanduser().resolve()
        if dest.resolve() == model or dest.resolve() in model.parents:
            raise ValueError(f"{dest} holds the model being exported; choose a destination outside {model}")
    if dest.is_dir() and ModelFolder(dest).has_model():
        raise ValueError(f"{dest} is a model folder; choose another destination")
    if fmt == "hf":
        if dest.exists() and not dest.is_dir():
            raise ValueError(f"{dest} is a file; an hf export is a folder, so give a folder path")
        if dest.is_dir() and any(dest.iterdir()) and not (dest / HF_MARK_FILE).exists() and not force:
            raise DestinationInUse(f"{dest} is not empty and holds no earlier export")
    else:
        if dest.is_dir():
            raise ValueError(f"{dest} is a folder; a gguf export is one file, e.g. {dest / 'model.gguf'}")
        if dest.exists() and not force and not _is_our_gguf(dest):
            raise DestinationInUse(f"{dest} exists and is not a GGUF file exported by custom-llm")
    parent = _existing_parent(dest)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write to {parent}: permission denied; choose another destination")
    return dest


def _existing_parent(path: Path) -> Path:
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{parent} is a file, so {path} cannot be created")
    return parent


def _is_our_gguf(path: Path) -> bool:
    try:
        from gguf import GGUFReader

        return EXPORT_MARK in GGUFReader(str(path)).fields
    except Exception:  # not a GGUF file at all (the reader raises several types)
        return False


def dtype_in_force(fmt: str, dtype: str | None) -> str:
    """The weight type an export of ``fmt`` writes: ``dtype``, or the format's default when None."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose hf or gguf")
    if dtype is None:
        return DEFAULT_DTYPES[fmt]
    allowed = FORMAT_DTYPES[fmt]
    if dtype not in allowed:
        extra = " (q8_0 is a GGUF type)" if dtype in DTYPES else ""
        raise ValueError(f"unknown weight type {dtype!r} for {fmt}{extra}; choose {', '.join(allowed[:-1])} or {allowed[-1]}")
    return dtype


def export_model(model_dir: str | Path, fmt: str, destination: str | Path, dtype: str | None = None,
                 force: bool = False) -> ExportReport:
    """Export the model in ``model_dir``; returns what was written.

    ``dtype`` None: the format's default (``DEFAULT_DTYPES``).
    """
    dtype = dtype_in_force(fmt, dtype)
    folder = ModelFolder(model_dir)
    if not folder.has_model():
        raise FileNotFoundError(f"no trained model in {folder.path} to export; train one first")
    dest = check_destination(fmt, destination, force, model_dir)
    _require_extra("safetensors" if fmt == "hf" else "gguf")
    model, tok, meta = folder.load_model("cpu")
    chat_ids = chat_ids_in_force(meta.chat_tuned, tok)  # the rule Chat follows: chat-tuned, with the tokens
    chat = chat_ids is not None
    steps = meta.progress.step
    notes = []
    try:
        if fmt == "hf":
            files = hf_files(model, tok, chat_ids, steps, dtype)
            files[HF_MARK_FILE] = storage.json_bytes({"exported_by": "custom-llm", "format": "hf",
                                                      "training_steps": steps})
            storage.replace_folder(dest, files)
            return ExportReport("hf", str(dest), sorted(files), sum(len(b) for b in files.values()), chat)
        with storage.atomic_path(dest) as tmp:
            notes += write_gguf(model, tok, chat_ids, tmp, name=folder.path.resolve().name, dtype=dtype)
    except OSError as exc:  # the previous export, if any, is untouched
        raise ValueError(f"could not write {dest}: {exc.strerror or exc}") from exc
    if not isinstance(tok, BPETokenizer):
        notes.append(SENTENCEPIECE_NOTE)
    return ExportReport("gguf", str(dest), [dest.name], dest.stat().st_size, chat, notes)


def _require_extra(module: str) -> None:
    """Export needs packages the rest of the program does not: say how to get them."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ValueError(f"exporting needs the {module} package: pip install -r requirements-export.txt")
