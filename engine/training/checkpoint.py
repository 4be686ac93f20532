"""What a training state is, and where it goes: the model folder, or the other ranks.

``TrainingState`` is everything a resume needs besides the data: the model, the
optimizer and its gradient scaler, where the run stands (``Progress``) and the
history. ``Checkpointer`` saves it to the model folder as one journaled unit (with
every process's random state) and loads it back; ``RunPackage`` carries the same state
from rank 0 to the other ranks of a distributed run, which never open the folder.
Growing the vocabulary grows the state too: embedding rows and optimizer moments.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from engine.data.tokenizer import BaseTokenizer, tokenizer_from_bytes
from engine.folder.model_folder import CHECKPOINT_FILE, WEIGHTS_FILE, ModelFolder, load_state
from engine.folder.records import DatasetRecord, FolderMeta, History, VocabExpansion
from engine.model.config import ModelConfig
from engine.model.gpt import GPT
from engine.runtime import hardware
from engine.runtime.distributed import Distributed, SharedFile, rank_seed, state_on_cpu
from engine.training.config import TrainConfig
from engine.training.runs import Progress
from engine.training.step import make_optimizer


@dataclass
class TrainingState:
    """The model and everything that trains it, as one checkpoint holds them."""

    model: GPT
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    progress: Progress = field(default_factory=Progress)
    history: History = field(default_factory=History)

    @classmethod
    def fresh(cls, model: GPT, config: TrainConfig, runtime: hardware.Runtime, progress: Progress | None = None,
              history: History | None = None) -> TrainingState:
        """``model`` with a new optimizer (and, for fp16, a gradient scaler)."""
        scaler = torch.amp.GradScaler("cuda") if runtime.use_grad_scaler else None
        return cls(model, make_optimizer(model, config, runtime), scaler, progress or Progress(), history or History())

    @classmethod
    def new(cls, model_config: ModelConfig, config: TrainConfig, runtime: hardware.Runtime) -> TrainingState:
        """A new model, its weights drawn from ``config.seed``, and a new optimizer."""
        torch.manual_seed(config.seed)
        return cls.fresh(GPT(model_config).to(runtime.device), config, runtime)

    @torch.no_grad()
    def rows_of_parts(self, parts: list[list[int]]) -> torch.Tensor:
        """Embedding rows for new tokens made of old ones: each the mean of its parts' rows
        (of every row, for a token with no parts)."""
        emb = self.model.wte.weight
        return torch.stack([emb[ids].mean(dim=0) if ids else emb.mean(dim=0) for ids in parts])

    @torch.no_grad()
    def rows_for_chat_tokens(self, vocab_size: int, eot_id: int, end_id: int) -> torch.Tensor:
        """Rows for the chat tokens appended up to ``vocab_size``: <|end|> (``end_id``) as a copy
        of end-of-text, the end the model already knows; the role tokens as the mean
        embedding (no word in particular)."""
        emb = self.model.wte.weight
        mean, eot = emb.mean(dim=0), emb[eot_id]
        return torch.stack([eot.clone() if i == end_id else mean.clone() for i in range(emb.shape[0], vocab_size)])

    def grow_vocabulary(self, vocab_size: int, new_rows: torch.Tensor, config: TrainConfig,
                        runtime: hardware.Runtime) -> None:
        """Grow the embedding to ``vocab_size`` rows (``new_rows`` appended), with zero
        optimizer moments for them, and note the growth in the history.

        Every old row and every old moment stays exactly as it was; the optimizer is made
        anew around the grown parameter, with the old state loaded into it. An unfinished
        run ends here: its token cache holds ids of the old vocabulary.
        """
        old_param, old_rows = self.model.wte.weight, self.model.wte.weight.shape[0]
        self.model.resize_vocab(vocab_size, new_rows)
        added = vocab_size - old_rows
        state = self.optimizer.state_dict()
        flat = [p for g in self.optimizer.param_groups for p in g["params"]]
        slot = state["state"].get(next(i for i, p in enumerate(flat) if p is old_param))
        if slot:
            for key in ("exp_avg", "exp_avg_sq"):
                t = slot[key]
                slot[key] = torch.cat([t, t.new_zeros(added, *t.shape[1:])])
        scaler_state = self.scaler.state_dict() if self.scaler is not None else None
        self.optimizer = make_optimizer(self.model, config, runtime)
        self.optimizer.load_state_dict(state)
        if scaler_state:
            self.scaler.load_state_dict(scaler_state)
        if self.progress.run:
            self.progress.run.finished = True
        self.history.expansions.append(VocabExpansion(self.progress.step, added, vocab_size))


def rng_state(runtime: hardware.Runtime) -> dict:
    """This process's random state: the CPU generator's, and that of the one GPU it trains on.

    Only the device the run uses, alone or as a rank of a distributed run:
    ``get_rng_state_all`` would record every GPU visible (and initialise CUDA in a run
    on the CPU), which a machine with fewer GPUs could not take back.
    """
    state = {"torch": torch.get_rng_state()}
    if runtime.device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(runtime.device)
    return state


def restore_rng(state: dict, runtime: hardware.Runtime) -> str:
    """Put back a state ``rng_state`` returned; what of it did not fit this run, in one line ('' if all did).

    Checkpoints saved before by one process hold every visible GPU's state (``"cuda"``,
    a list); the run's own GPU takes the one of its index. A GPU state on a run on the
    CPU, or no state for this run's GPU, is left aside: only dropout draws differ from
    those of an uninterrupted run. CUDA is never touched in a run on the CPU.
    """
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    own, every_gpu = state.get("cuda_device"), state.get("cuda") or []
    if runtime.device.type != "cuda":
        if own is None and not every_gpu:
            return ""
        return ("this checkpoint holds GPU random state and training goes on on the CPU: it is left aside, so "
                "dropout draws differ from those of an uninterrupted run")
    index = runtime.device.index if runtime.device.index is not None else torch.cuda.current_device()
    note = ""
    if own is None and index < len(every_gpu):
        own = every_gpu[index]
        if len(every_gpu) > 1:
            note = (f"this checkpoint holds the random state of {len(every_gpu)} GPUs and this run trains on one: "
                    f"that of GPU {index} is restored")
    if own is None:
        saved = f"{len(every_gpu)} GPU(s)" if every_gpu else "the CPU"
        return (f"this checkpoint holds no random state for {runtime.device} (it was saved on {saved}): dropout "
                "draws differ from those of an uninterrupted run")
    torch.cuda.set_rng_state(own, runtime.device)
    return note


def weights_on_cpu(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model's state dict on the CPU, with tied tensors still one tensor.

    ``wte.weight`` and ``lm_head.weight`` are the same memory. ``.cpu()`` per key keeps
    that on the CPU (it returns the tensor itself) but copies a GPU tensor once per key,
    which would store the embedding twice. So each tensor moves once, and a key that
    names one already moved gets the same copy: the file is the one a CPU run writes.
    """
    moved: dict[tuple, torch.Tensor] = {}
    weights = {}
    for key, tensor in state_dict.items():
        tensor = tensor.detach()
        same = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                tensor.stride(), tensor.dtype)
        if same not in moved:
            moved[same] = tensor.cpu()
        weights[key] = moved[same]
    return weights


@dataclass
class Loaded:
    """What ``Checkpointer.load`` read: the state, the folder's record and tokenizer, and notes."""

    state: TrainingState
    meta: FolderMeta
    tokenizer: BaseTokenizer
    notes: list[str]  # what the user should know (a damaged or missing checkpoint, random state left aside)


class Checkpointer:
    """Saves a ``TrainingState`` to the model folder and loads it back; sends it to the other ranks.

    Without a folder (a rank > 0 of a distributed run) a save only hands this process's
    random state to rank 0, which writes it with its own. Files that must join the next
    save (a new model's tokenizer) wait in ``pending_files``.
    """

    def __init__(self, folder: ModelFolder | None, runtime: hardware.Runtime, dist: Distributed | None = None):
        self.folder, self.runtime, self.dist = folder, runtime, dist
        self.pending_files: dict[str, bytes] = {}
        self.rng_ranks: list[dict] | None = None  # every rank's RNG state, from a distributed checkpoint

    @property
    def writes_folder(self) -> bool:
        """Whether this process writes the model folder (rank 0 of a distributed run, or alone)."""
        return self.dist is None or self.dist.is_main

    def save(self, state: TrainingState, config: TrainConfig, meta: FolderMeta | None,
             datasets: list[DatasetRecord], extra_files: dict[str, bytes] | None = None) -> None:
        """Save weights, full training state, history, data sets and config as one unit.

        After a crash the folder holds either this save or the previous one, never a
        mix (``extra_files`` join the same unit, e.g. a grown tokenizer).

        In a distributed run every rank calls it at the same step: rank 0 gathers each
        rank's RNG state (its dropout draws), so that a resume on as many ranks is exact,
        and writes; the others only hand over their state.
        """
        rng = rng_state(self.runtime)
        rng_ranks = self.dist.gather_to_main(rng) if self.dist is not None else None
        if not self.writes_folder:
            return
        # The plain model's state dict, never DDP's: its keys have no "module." prefix.
        weights = weights_on_cpu(state.model.state_dict())
        ckpt = {
            "model": weights,
            "optimizer": state.optimizer.state_dict(),
            "scaler": state.scaler.state_dict() if state.scaler is not None else None,
            "state": state.progress.to_dict(),
            "rng": rng,
        }
        if rng_ranks is not None:
            ckpt["rng_ranks"] = rng_ranks
        meta.model = state.model.config
        meta.training = config.to_dict()
        meta.progress = state.progress.saved()
        self.folder.commit_save(weights, ckpt, meta, state.history, datasets,
                                {**self.pending_files, **(extra_files or {})})
        self.pending_files = {}

    def load(self, config: TrainConfig, dropout: float | None = None) -> Loaded:
        """The folder's model, optimizer and progress; ``dropout`` overrides the saved one.

        A damaged or missing checkpoint is not fatal: training goes on from the weights
        in model.pth with a fresh optimizer, and a note says so.
        """
        meta = self.folder.read_meta()
        tokenizer = self.folder.load_tokenizer()
        model_config = replace(meta.model) if dropout is None else replace(meta.model, dropout=dropout)
        if tokenizer.vocab_size != model_config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model "
                             f"expects {model_config.vocab_size}; the folder is inconsistent")
        model = GPT(model_config)
        ckpt, notes = self._read_checkpoint()
        ckpt_path = self.folder.file(CHECKPOINT_FILE)
        if ckpt is not None:
            load_state(model, ckpt["model"], ckpt_path)
        else:  # weights without training state: continue with a fresh optimizer
            load_state(model, self.folder.load_verified(WEIGHTS_FILE), self.folder.file(WEIGHTS_FILE))
        state = TrainingState.fresh(model.to(self.runtime.device), config, self.runtime,
                                    history=self.folder.read_history())
        if ckpt is None:
            return Loaded(state, meta, tokenizer, notes)
        state.optimizer.load_state_dict(ckpt["optimizer"])
        if state.scaler is not None and ckpt.get("scaler"):
            state.scaler.load_state_dict(ckpt["scaler"])
        state.progress = Progress.from_dict(ckpt["state"])
        note = restore_rng(ckpt.get("rng", {}), self.runtime)
        if note:
            notes.append(note)
        self.rng_ranks = ckpt.get("rng_ranks")
        state.history.drop_after(state.progress.step)  # logged after this checkpoint, lost with the process
        return Loaded(state, meta, tokenizer, notes)

    def send(self, state: TrainingState, config: TrainConfig, tokenizer: BaseTokenizer, resumed: bool, data: Path,
             rehearsal_pool: np.ndarray | None) -> None:
        """Rank 0: send the other ranks everything the run needs (``RunPackage``), then share the data file.

        A resumed run gives each rank its own saved random state when as many ranks saved it.
        """
        world_size = self.dist.world_size
        rng_ranks = self.rng_ranks if resumed and len(self.rng_ranks or []) == world_size else None
        package = RunPackage.of(state, config, tokenizer, resumed, rng_ranks, SharedFile.of(data), rehearsal_pool)
        self.dist.announce(package)
        self.dist.fetch_file(package.data)

    def _read_checkpoint(self) -> tuple[dict | None, list[str]]:
        """checkpoint.pth, verified; None (and why) when it is missing or damaged."""
        path = self.folder.file(CHECKPOINT_FILE)
        if not path.exists():
            return None, ["no checkpoint.pth found: training continues from model.pth with a fresh optimizer"]
        try:
            ckpt = self.folder.load_verified(CHECKPOINT_FILE)
            if not isinstance(ckpt, dict) or not {"model", "optimizer", "state"} <= set(ckpt):
                raise ValueError(f"{path} is not a training checkpoint")
        except ValueError as exc:
            return None, [f"{exc}; continuing from model.pth with a fresh optimizer"]
        return ckpt, []


@dataclass
class RunPackage:
    """What rank 0 sends the other ranks of a distributed run before it starts.

    All they need, so that they never open the model folder: the settings, the
    tokenizer, where the run stands, the optimizer's state, the data and the rehearsal
    sample. The weights travel separately: DistributedDataParallel copies rank 0's to
    every rank when it wraps the model. ``Distributed.announce`` pickles the package as
    it sends it, so the configs and the progress go as they are (dataclasses pickle),
    and a rank > 0 gets its own copies of them.
    """

    model_config: ModelConfig
    train_config: TrainConfig
    tokenizer_kind: str
    tokenizer: bytes
    progress: Progress  # the run included
    resumed: bool
    optimizer: dict  # its state_dict, on the CPU
    scaler: dict | None
    rng_ranks: list[dict] | None  # each rank's RNG state at the checkpoint (same world size only)
    data: SharedFile  # the token cache of the run
    rehearsal_pool: np.ndarray | None

    @classmethod
    def of(cls, state: TrainingState, config: TrainConfig, tokenizer: BaseTokenizer, resumed: bool,
           rng_ranks: list[dict] | None, data: SharedFile, rehearsal_pool: np.ndarray | None) -> RunPackage:
        return cls(model_config=state.model.config, train_config=config,
                   tokenizer_kind=tokenizer.kind, tokenizer=tokenizer.to_bytes(), progress=state.progress,
                   resumed=resumed, optimizer=state_on_cpu(state.optimizer.state_dict()),
                   scaler=state.scaler.state_dict() if state.scaler is not None else None, rng_ranks=rng_ranks,
                   data=data, rehearsal_pool=rehearsal_pool)

    def unpack(self, dist: Distributed) -> tuple[TrainingState, TrainConfig, BaseTokenizer]:
        """A rank > 0's state from the package: the same model, optimizer and run, no folder.

        Sets this rank's random state: the one saved for it, or one seeded from the step.
        """
        runtime = dist.runtime
        tokenizer = tokenizer_from_bytes(self.tokenizer_kind, self.tokenizer, "rank 0's tokenizer")
        config = self.train_config
        # Any weights do: DistributedDataParallel copies rank 0's into this model when it wraps it.
        model = GPT(self.model_config).to(runtime.device)
        state = TrainingState.fresh(model, config, runtime, self.progress)
        state.optimizer.load_state_dict(self.optimizer)
        if state.scaler is not None and self.scaler:
            state.scaler.load_state_dict(self.scaler)
        if self.rng_ranks is not None:
            restore_rng(self.rng_ranks[dist.rank], runtime)
        else:
            torch.manual_seed(rank_seed(config.seed, dist.rank, state.progress.step))
        return state, config, tokenizer
