"""Crash-safe file writes for the model folder.

Every file the application writes goes through here: the bytes land in a temporary
file in the same folder, are flushed and fsynced, and only then replace the real
name with ``os.replace``. A reader therefore sees either the old file or the new
one, never half of each, even if the process is killed or the machine loses power.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

TEMP_PREFIX = ".tmp-"


def _fsync_dir(folder: Path) -> None:
    # The rename itself lives in the directory entry; fsync the folder so it survives
    # a power cut. Some platforms (Windows) cannot open a directory: skip there.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> None:
    """Call ``write(f)`` on a temp file beside ``path`` and move it into place."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the block has written it, fsync it and
    move it over ``path``. Also for writers that insist on opening the file themselves
    (``gguf.GGUFWriter``).

    Whatever goes wrong in the block (disk full, Ctrl+C), the temporary file is removed
    and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX + path.name + ".", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def replace_folder(folder: str | os.PathLike, files: dict[str, bytes]) -> None:
    """Make ``folder`` hold exactly ``files`` (name -> bytes), all new or all old.

    The files are written and fsynced in a temporary sibling folder, which then takes
    the folder's name. An existing folder is first renamed aside and removed only
    after the new one is in place: a crash leaves the old folder or the new one
    (under its own name or, in the instant between the two renames, beside it as
    ``.tmp-NAME.*``), never a folder that mixes the two.
    """
    import shutil

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX + folder.name + ".", dir=folder.parent))
    old = None
    try:
        for name, data in files.items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        _fsync_dir(staging)
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX + folder.name + ".old.", dir=folder.parent))
            old.rmdir()  # a free name: renaming onto an existing folder is not portable
            os.replace(folder, old)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None and not folder.exists():
            os.replace(old, folder)  # put the previous folder back
        raise
    _fsync_dir(folder.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def json_bytes(obj: Any) -> bytes:
    """``obj`` as indented UTF-8 JSON, the way every JSON file of ours is written."""
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_bytes(path, json_bytes(obj))


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, turning a syntax error into a message that names the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); restore it or remove the folder") from exc


def load_torch(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """Load tensors without executing code: ``weights_only`` refuses arbitrary pickles.

    PyTorch's own messages for a refused or broken file run to several lines and
    suggest loading it the unsafe way. A user must never be steered there, so each
    failure becomes one line of our own that says what to do instead.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises several types for a bad or hostile file
        if _is_weights_only_refusal(exc):
            raise ValueError(f"{path} holds something other than tensors (it may be malicious) and was "
                             "not loaded; delete it and restore the folder from a source you trust") from exc
        raise ValueError(f"cannot load {path}: {_short_reason(exc)}; restore it from a backup or retrain") from exc


def _is_weights_only_refusal(exc: Exception) -> bool:
    """True when the safe unpickler met an object it will not build (code, classes, ...)."""
    text = str(exc).lower()
    return isinstance(exc, pickle.UnpicklingError) and ("weights only" in text or "weights_only" in text)


def _short_reason(exc: Exception) -> str:
    """The first clause of an exception's message, without PyTorch's advice that follows it.

    >>> _short_reason(RuntimeError("PytorchStreamReader failed reading zip archive: failed finding "
    ...                            "central directory. This is an internal miniz error. If you ..."))
    'damaged or not a weight file (PytorchStreamReader failed reading zip archive: failed finding central directory)'
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # PyTorch colours some words
    first = text.splitlines()[0].split(". ")[0].rstrip(".") if text else ""
    if not first or "weights_only" in first.lower():
        first = "the file ends early" if isinstance(exc, EOFError) else type(exc).__name__
    return f"damaged or not a weight file ({first[:120]})"


def remove_stale_temp_files(folder: str | os.PathLike) -> int:
    """Delete temp files left behind by a killed writer; returns how many."""
    removed = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for p in folder.glob(TEMP_PREFIX + "*"):
        try:
            p.unlink()
            removed += 1
        except OSError:
            pass
    return removed


# ---------------------------------------------------------------------------------
# Several files that must change together

STAGING_DIR = ".staging"
JOURNAL_FILE = "commit.json"


def torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _to_bytes(content: Any) -> bytes:
    if isinstance(content, bytes):
        return content
    if isinstance(content, str):
        return content.encode("utf-8")
    return torch_bytes(content)


KILL_ENV = "CUSTOM_LLM_TEST_KILL_AT"  # "point" or "point#n": die the n-th time (from 1)
_points_seen: dict[str, int] = {}


def _crash_point(name: str) -> None:
    """For crash tests only: SIGKILL this process at a named point of a save."""
    wanted = os.environ.get(KILL_ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition("#")
    if point != name:
        return
    _points_seen[name] = _points_seen.get(name, 0) + 1
    if _points_seen[name] == int(nth or 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def commit_files(folder: str | os.PathLike, files: dict[str, Any]) -> None:
    """Replace several files so that a reader sees all of the new ones or none.

    Values are bytes, text, or an object for ``torch.save``. The new files are written
    and fsynced in a staging folder; then a journal naming them is written atomically
    (the commit point); then they are moved into place and the journal removed. A
    crash before the journal leaves the old files; a crash after it is rolled forward
    by ``recover`` the next time the folder is opened.
    """
    folder = Path(folder)
    try:
        _stage_and_commit(folder, files)
    except OSError as exc:
        if (folder / JOURNAL_FILE).exists():
            raise  # committed: the staged files must stay for ``recover`` to finish the move
        _clear_staging(folder / STAGING_DIR)
        reason = exc.strerror or str(exc)
        raise OSError(exc.errno, f"could not save to {folder}: {reason}; the previous save is intact") from exc


def _stage_and_commit(folder: Path, files: dict[str, Any]) -> None:
    staging = folder / STAGING_DIR
    _clear_staging(staging)
    staging.mkdir(parents=True)
    for name, content in files.items():
        target = staging / name
        target.parent.mkdir(parents=True, exist_ok=True)
        data = _to_bytes(content)
        with open(target, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _crash_point(f"staged:{name}")
    _fsync_dir(staging)
    _crash_point("before-journal")
    write_json(folder / JOURNAL_FILE, {"files": list(files)})
    _crash_point("after-journal")
    recover(folder)


def recover(folder: str | os.PathLike) -> bool:
    """Finish a committed group of writes, or drop an uncommitted one. True if rolled forward."""
    folder = Path(folder)
    journal = folder / JOURNAL_FILE
    staging = folder / STAGING_DIR
    rolled = False
    if journal.exists():
        try:
            names = read_json(journal)["files"]
        except (ValueError, KeyError, TypeError):
            names = []  # a journal is written atomically, so this means tampering: ignore it
        for name in names:
            src = staging / name
            if src.exists():
                dest = folder / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dest)
        _fsync_dir(folder)
        journal.unlink()
        _fsync_dir(folder)
        rolled = True
    _clear_staging(staging)
    return rolled


def _clear_staging(staging: Path) -> None:
    if staging.exists():
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
