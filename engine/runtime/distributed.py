"""Several processes training one model: the process group torchrun's environment describes.

torchrun starts one process per GPU (or a few on a CPU) and tells each who it is in
environment variables: ``RANK`` (0 .. WORLD_SIZE-1 over every node), ``WORLD_SIZE``,
``LOCAL_RANK`` (its index on its node, which picks its GPU), and ``MASTER_ADDR`` /
``MASTER_PORT`` (where the processes meet). ``init_distributed`` joins them:

* NCCL between CUDA GPUs, gloo between CPU processes; the device and precision come
  from ``hardware.detect_runtime`` like everywhere else, with LOCAL_RANK picking the GPU;
* a gloo group for the small messages that are Python objects (the run that rank 0
  prepared, the RNG states a checkpoint gathers, a file another node cannot see).

Every wait is bounded. Joining, and every collective of a training step, give up after
``timeout_s``; a process that dies makes the others' next collective fail at once
(gloo sees the closed connection) or at that timeout (NCCL's watchdog). Rank 0 alone
prepares a run (training a tokenizer, tokenizing the text), which may take long on a big
corpus, so the others wait for its answer up to ``prepare_timeout_s``; if rank 0 dies
meanwhile they hear at once. Failures become a ``DistributedError`` with one clear line.
"""
from __future__ import annotations

import datetime
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist

from engine.runtime import hardware

DEFAULT_TIMEOUT_S = 300.0  # a step's collectives, joining, a checkpoint's gather
DEFAULT_PREPARE_TIMEOUT_S = 6 * 3600.0  # rank 0 training a tokenizer on a large corpus
FILE_CHUNK_BYTES = 64 << 20  # a file another node cannot see is sent in pieces of this size
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A distributed job cannot go on (a process died, a rendezvous failed); one line says why."""


def launched_by_torchrun(environ: Mapping[str, str] = os.environ) -> bool:
    """True in a process that torchrun (or a launcher setting the same variables) started."""
    return "WORLD_SIZE" in environ or "RANK" in environ


@dataclass(frozen=True)
class LaunchEnv:
    """Who this process is in the job, as the launcher's environment variables say."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> LaunchEnv:
        missing = [name for name in LAUNCH_VARIABLES if name not in environ]
        if missing:
            raise ValueError(f"the launch environment lacks {', '.join(missing)}; start the job with torchrun "
                             "(e.g. torchrun --nproc-per-node=2 interface.py train ...)")
        try:
            values = {name: int(environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        except ValueError:
            raise ValueError("RANK, WORLD_SIZE, LOCAL_RANK and MASTER_PORT must be whole numbers") from None
        env = cls(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"], environ["MASTER_ADDR"],
                  values["MASTER_PORT"])
        if not 0 <= env.rank < env.world_size or env.local_rank < 0:
            raise ValueError(f"RANK {env.rank} does not fit WORLD_SIZE {env.world_size}")
        return env


@dataclass(frozen=True)
class SharedFile:
    """A file rank 0 reads that every rank needs (a token cache): its path and size there."""

    path: str
    size: int

    @classmethod
    def of(cls, path: Path) -> SharedFile:
        path = Path(path).resolve()
        return cls(str(path), path.stat().st_size)


@dataclass(frozen=True)
class _Failure:
    """What rank 0 sends instead of a run when it could not prepare one."""

    message: str


def _holds_copy(path: Path, size: int) -> bool:
    """Whether this process sees the file rank 0 means (the same path and size: a shared disk)."""
    try:
        return path.is_file() and path.stat().st_size == size
    except OSError:
        return False


class Distributed:
    """This process's place in a joined job, and the few collectives training needs."""

    def __init__(self, env: LaunchEnv, runtime: hardware.Runtime, timeout_s: float, prepare_timeout_s: float) -> None:
        self.env = env
        self.runtime = runtime
        self.backend = "nccl" if runtime.device.type == "cuda" else "gloo"
        self.timeout_s = timeout_s
        self.announced = False  # rank 0: the run (or its failure) has been sent
        self._scratch: Path | None = None
        timeout = datetime.timedelta(seconds=timeout_s)
        # Objects travel over gloo, which works on CPU tensors: the main group itself on a
        # CPU job, a second group beside NCCL on GPUs.
        self._objects = dist.new_group(backend="gloo", timeout=timeout) if self.backend == "nccl" else None
        self._prepare = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=prepare_timeout_s))

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    # -- the run rank 0 prepares -------------------------------------------------------------
    def announce(self, payload: Any) -> None:
        """Rank 0: send the prepared run to every other rank (they wait in ``receive``)."""
        assert self.is_main and not self.announced
        self.announced = True
        dist.broadcast_object_list([payload], src=0, group=self._prepare)

    def announce_failure(self, message: str) -> None:
        """Rank 0: tell the other ranks that there is no run, and why."""
        self.announce(_Failure(message))

    def receive(self) -> Any:
        """Ranks > 0: wait for rank 0's run; a ``DistributedError`` when it failed to prepare one."""
        box = [None]
        try:
            dist.broadcast_object_list(box, src=0, group=self._prepare)
        except RuntimeError as exc:
            raise DistributedError(f"rank 0 stopped before the run began ({first_line(exc)})") from None
        if isinstance(box[0], _Failure):
            raise DistributedError(f"rank 0 could not start the run: {box[0].message}")
        return box[0]

    def fetch_file(self, shared: SharedFile) -> Path:
        """Every rank: a local path to ``shared``, the file rank 0 read.

        Ranks that see it (one node, or a shared disk) read it in place; when any rank does
        not, rank 0 sends the bytes and those ranks keep a private copy outside the model
        folder, removed when the job ends.
        """
        path = Path(shared.path)
        holds = self.is_main or _holds_copy(path, shared.size)
        answers: list[Any] = [None] * self.world_size
        dist.all_gather_object(answers, holds, group=self._objects)
        if all(answers):
            return path
        target = None if holds else self._scratch_dir() / path.name
        with open(path if self.is_main else os.devnull, "rb") as source, \
                open(target if target else os.devnull, "wb") as sink:
            for offset in range(0, shared.size, FILE_CHUNK_BYTES):
                n = min(FILE_CHUNK_BYTES, shared.size - offset)
                chunk = torch.empty(n, dtype=torch.uint8)
                if self.is_main:
                    chunk.copy_(torch.frombuffer(bytearray(source.read(n)), dtype=torch.uint8))
                dist.broadcast(chunk, src=0, group=self._objects)
                if target:
                    sink.write(chunk.numpy().tobytes())
        return target or path

    def _scratch_dir(self) -> Path:
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix=f"custom-llm-rank{self.rank}-"))
        return self._scratch

    # -- during training ---------------------------------------------------------------------
    def shard(self, n_rows: int) -> slice:
        """This rank's rows of a global batch of ``n_rows`` (the caller checked divisibility)."""
        share = n_rows // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` in DistributedDataParallel: gradients are averaged over the ranks in the
        backward pass, and rank 0's weights are copied to every rank here."""
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.runtime.device.index] if self.backend == "nccl" else None
        return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place (on the training device)."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """The largest value of ``tensor`` over the ranks, in place."""
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def gather_to_main(self, value: Any) -> list[Any] | None:
        """Every rank's ``value``, in rank order, on rank 0 (None on the others)."""
        gathered: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, gathered, dst=0, group=self._objects)
        return gathered

    def close(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
        if dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(env: LaunchEnv, device: str | None = None, precision: str | None = None,
                     timeout_s: float = DEFAULT_TIMEOUT_S,
                     prepare_timeout_s: float = DEFAULT_PREPARE_TIMEOUT_S) -> Distributed:
    """Join the job ``env`` describes; a ``DistributedError`` if the others are not there in time."""
    if not timeout_s > 0:
        raise ValueError(f"the timeout must be positive (got {timeout_s!r})")
    runtime = hardware.detect_runtime(device, precision, local_rank=env.local_rank)
    if runtime.device.type not in ("cuda", "cpu"):
        raise ValueError(f"distributed training runs on CUDA GPUs (NCCL) or on CPUs (gloo), not on "
                         f"{runtime.device.type}; add --device cpu")
    backend = "nccl" if runtime.device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), rank=env.rank,
                                world_size=env.world_size,
                                device_id=runtime.device if backend == "nccl" else None)
        return Distributed(env, runtime, timeout_s, max(prepare_timeout_s, timeout_s))
    except (RuntimeError, TimeoutError) as exc:  # DistNetworkError, DistStoreError are RuntimeErrors
        if dist.is_initialized():
            dist.destroy_process_group()
        raise DistributedError(
            f"could not join the other {env.world_size - 1} process(es) at {env.master_addr}:{env.master_port} "
            f"within {timeout_s:g} s ({first_line(exc)}); check that every node runs the same torchrun command "
            "and can reach that address") from None


def rank_seed(seed: int, rank: int, step: int) -> int:
    """The seed of a rank's dropout draws where no checkpoint holds its RNG state: one per
    (seed, rank, step), so the ranks differ from each other and from earlier runs."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0])


def state_on_cpu(value: Any) -> Any:
    """A copy of a state dict (nested dicts and lists of tensors) with every tensor on the
    CPU, to send to other ranks: a pickled CUDA tensor would land on rank 0's GPU there."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: state_on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(state_on_cpu(v) for v in value)
    return value


def first_line(exc: BaseException) -> str:
    """An exception's first line, without the C++ source location PyTorch puts in front."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
        text = text.split(". ", 1)[0]  # gloo and NCCL go on with general advice
    return text[:300]


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says the other processes are gone or stuck (not a bug of this one)."""
    if isinstance(exc, DistributedError) or isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(word in text for word in (
        "gloo", "nccl", "connection reset", "connection closed", "broken pipe", "timed out", "watchdog"))


def lost_contact(exc: BaseException) -> str:
    """The line a rank prints when a collective failed: what happened and what the folder holds."""
    return (f"lost contact with the other processes ({first_line(exc)}): a process died, was stopped or hangs. "
            "Stopping; the model folder keeps its last complete save, and running the same command resumes from it")
