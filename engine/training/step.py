"""One optimizer step: the optimizers, gradient accumulation, the update, and the step's fallbacks.

The pure pieces (``make_optimizer``, ``accumulate_gradients``, ``apply_update``,
``train_step``) are shared by the training loop and the benchmark (bench.py), so the
benchmark times exactly what training runs. ``StepRunner`` is the step of one run:
it retries a step that ran out of memory with smaller micro-batches, goes on eagerly
when a ``torch.compile``d model fails, and in a distributed run makes every rank agree
on the loss, on whether to stop, and (before the first step) on a micro-batch size.
"""
from __future__ import annotations

import contextlib
import gc
import math
from typing import Any, Callable, TypeVar

import torch
from torch.optim.adamw import adamw

from engine.model.gpt import GPT
from engine.runtime import hardware
from engine.runtime.distributed import Distributed, first_line
from engine.training.config import TrainConfig
from engine.training.events import CompileChecked, CompileFailed, MemoryBackoff, OnEvent
from engine.training.runs import RunState, StopCheck


def make_optimizer(model: GPT, cfg: TrainConfig, runtime: hardware.Runtime) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` names, betas (0.9, 0.95), weight decay on matrices and
    embeddings only: AdamW for everything, or Muon for the matrices inside the blocks and
    AdamW for the rest (``MuonAdamW``).

    The fused AdamW kernel on CUDA and on the CPU: for the compact model's 5.3M parameters
    one update took 4.3 ms fused against 10.0 ms with PyTorch's CPU default (a loop
    over tensors) and 11.7 ms with ``foreach``, in one process, alternating; about 1%
    of a training step. Other devices keep the default.
    """
    fused = True if runtime.device.type in ("cuda", "cpu") else None
    if cfg.optimizer == "adamw":
        kwargs: dict[str, Any] = {"fused": True} if fused else {}
        return torch.optim.AdamW(model.param_groups(cfg.weight_decay), lr=cfg.learning_rate,
                                 betas=(0.9, 0.95), **kwargs)
    matrices = model.block_matrices()
    in_muon = {id(p) for p, _ in matrices}
    groups = [{"params": [p for p, n in matrices if n == splits], "muon": True, "splits": splits}
              for splits in sorted({n for _, n in matrices})]
    for group in model.param_groups(cfg.weight_decay):
        group["params"] = [p for p in group["params"] if id(p) not in in_muon]
        groups.append(group)
    # Newton-Schulz in bf16 only where bf16 products are native (the autocast dtype says so).
    ns_dtype = torch.bfloat16 if runtime.autocast_dtype == torch.bfloat16 else torch.float32
    return MuonAdamW([g for g in groups if g["params"]], lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                     ns_dtype=ns_dtype, fused=fused)


# Newton-Schulz quintic coefficients (Keller Jordan's Muon; torch.optim.Muon's defaults).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def orthogonalize(g: torch.Tensor, dtype: torch.dtype, steps: int = NS_STEPS) -> torch.Tensor:
    """Matrices with g's singular vectors and singular values near 1 (Newton-Schulz), in g's dtype.

    ``g`` is one matrix (rows, cols) or a stack of them (n, rows, cols), orthogonalized
    each on its own in batched products: the compact model's 28 blocks in three stacks
    cost a third of what 28 separate iterations did. The iteration runs in ``dtype``.
    torch.optim.Muon always runs it in bf16, which a CPU without native bf16 (AVX2 only)
    computes tens of times slower than fp32: that, the batching, and the per-block
    orthogonalization of stacked matrices (``MuonAdamW``) are why Muon is written here
    rather than taken from torch.
    """
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    single = x.dim() == 2
    if single:
        x = x.unsqueeze(0)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the side with fewer rows: the Gram matrices are smaller
        x = x.mT
    # Each matrix's spectral norm is at most its Frobenius norm: now <= 1.
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    if tall:
        x = x.mT
    return (x[0] if single else x).to(g.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the parameter groups marked ``muon=True`` (2-D matrices), AdamW on the others.

    Muon keeps a momentum of the gradient (Nesterov) and steps along its orthogonalized
    form: every direction of the matrix moves by about the same amount, which a matrix's
    gradient, dominated by a few directions, would not do under AdamW. Each Muon step is
    scaled by 0.2 * sqrt(max(rows, cols)) (torch.optim.Muon's "match_rms_adamw"), giving
    it AdamW's typical update size, so one learning rate and one weight decay serve
    both kinds of group and the schedule sets a single ``lr``.

    One optimizer rather than two, so that a checkpoint holds one state dict, a
    GradScaler unscales and steps it as it does AdamW, and vocabulary growth finds the
    embedding's moments where AdamW keeps them. A Muon group's ``splits`` says how many
    matrices each of its weights stacks along the rows (q|k|v, gate|up): each block is
    orthogonalized as the matrix it is.
    """

    def __init__(self, param_groups: list[dict], lr: float, weight_decay: float,
                 betas: tuple[float, float] = (0.9, 0.95), momentum: float = 0.95, eps: float = 1e-8,
                 ns_dtype: torch.dtype = torch.float32, fused: bool | None = None) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, betas=betas, momentum=momentum, eps=eps, muon=False,
                        splits=1)
        super().__init__(param_groups, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.dim() != 2 or p.shape[0] % group["splits"] for p in group["params"]):
                raise ValueError("a Muon group takes 2-D matrices whose rows split evenly into its blocks")
        self.ns_dtype, self.fused = ns_dtype, fused

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._muon_step([g for g in self.param_groups if g["muon"]])
        for group in self.param_groups:
            if not group["muon"]:
                self._adamw_step(group)
        return loss

    def _muon_step(self, groups: list[dict]) -> None:
        """Momentum, then every block of every Muon matrix orthogonalized, blocks of one shape
        stacked into one batched iteration, then the scaled step with decoupled weight decay."""
        blocks: dict[torch.Size, list[torch.Tensor]] = {}
        owners: list[tuple[dict, torch.Tensor, list[tuple[torch.Size, int]]]] = []
        for group in groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                places = []
                for block in p.grad.lerp(buf, group["momentum"]).chunk(group["splits"]):  # Nesterov
                    stack = blocks.setdefault(block.shape, [])
                    places.append((block.shape, len(stack)))
                    stack.append(block)
                owners.append((group, p, places))
        done = {shape: orthogonalize(torch.stack(stack), self.ns_dtype) for shape, stack in blocks.items()}
        for group, p, places in owners:
            update = torch.cat([done[shape][i] for shape, i in places])
            lr = group["lr"]
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(places[0][0])))

    def _adamw_step(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            if not self.state[p]:
                self.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                     exp_avg_sq=torch.zeros_like(p))
        if not params:
            return
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
              [], [s["step"] for s in states], fused=self.fused, amsgrad=False, beta1=beta1, beta2=beta2,
              lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def is_out_of_memory(error: BaseException) -> bool:
    """True for an allocation failure of the device (CUDA, MPS) or of the CPU allocator."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def accumulate_gradients(model: GPT, x: torch.Tensor, y: torch.Tensor, runtime: hardware.Runtime,
                         micro_batches: int = 1, scaler: torch.amp.GradScaler | None = None,
                         segments: torch.Tensor | None = None, learned_total: int | None = None,
                         world_size: int = 1, no_sync: Callable[[], Any] | None = None) -> torch.Tensor:
    """Forward and backward over the batch (x, y) in ``micro_batches`` slices.

    Each slice's mean loss is weighted by its share of the learned targets (all of them
    for text; the replies in conversations), so the gradients add up to those of the
    whole batch at once: a smaller micro-batch changes memory use, not what is learned.
    Returns the batch's mean loss (a tensor; no device sync for a single slice).
    ``segments`` marks packed conversations (see ``GPT.forward``).

    In a distributed run ``model`` is the DistributedDataParallel wrapper, (x, y) this
    rank's share of the global batch, and ``learned_total`` the learned targets of the
    whole global batch. A slice's weight is then its share of those times ``world_size``,
    because DDP averages the ranks' gradients: the average is the whole batch's gradient.
    Gradients are exchanged once, in the last slice's backward (``no_sync`` around the
    others), and every rank runs every slice, even one with nothing to learn, so that all
    join each exchange. The result is this rank's part of the batch's mean loss; the
    parts of all ranks add up to it.
    """
    x, y = x.to(runtime.device, non_blocking=True), y.to(runtime.device, non_blocking=True)
    if segments is not None:
        segments = segments.to(runtime.device, non_blocking=True)
    if micro_batches == 1 and no_sync is None:
        with runtime.autocast():
            _, loss = model(x, y, segments=segments)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss.detach()
    learned = learned_total if learned_total is not None else int((y >= 0).sum())
    total = torch.zeros((), device=x.device)
    parts = list(zip(x.chunk(micro_batches), y.chunk(micro_batches),
                     segments.chunk(micro_batches) if segments is not None else [None] * micro_batches))
    for i, (xs, ys, ss) in enumerate(parts):
        share = int((ys >= 0).sum()) / max(1, learned)
        if share == 0 and no_sync is None:
            continue  # nothing to learn in this slice (its mean loss would be NaN)
        exchange = no_sync is None or i == len(parts) - 1
        with contextlib.nullcontext() if exchange else no_sync():
            with runtime.autocast():
                if share == 0:  # a zero gradient that still joins the exchange
                    logits, _ = model(xs, segments=ss)
                    part = logits.float().sum() * 0.0
                else:
                    _, loss = model(xs, ys, segments=ss)
                    part = loss * share
            weighted = part * world_size
            (scaler.scale(weighted) if scaler is not None else weighted).backward()
        total = total + part.detach()
    return total


def apply_update(model: GPT, optimizer: torch.optim.Optimizer, lr: float, grad_clip: float,
                 scaler: torch.amp.GradScaler | None = None) -> None:
    """Clip the accumulated gradients and take one optimizer step at learning rate ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def checked_loss(loss: torch.Tensor) -> float:
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError("the loss became NaN/inf; lower the learning rate and resume "
                                 "from the last checkpoint")
    return value


def train_step(model: GPT, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, lr: float,
               runtime: hardware.Runtime, grad_clip: float,
               scaler: torch.amp.GradScaler | None = None, micro_batches: int = 1) -> float:
    """One optimizer step on the batch (x, y) at learning rate ``lr``; returns the loss.

    The whole training step, shared by the training loop and the benchmark (bench.py),
    so the benchmark times exactly what training runs.
    """
    loss = accumulate_gradients(model, x, y, runtime, micro_batches, scaler)
    apply_update(model, optimizer, lr, grad_clip, scaler)
    return checked_loss(loss)


def _one_line(error: BaseException) -> str:
    """``Type: first line`` of a failure, for the event that says training goes on without compile."""
    text = first_line(error)
    return text if text == type(error).__name__ else f"{type(error).__name__}: {text}"


def release_memory(runtime: hardware.Runtime) -> None:
    """Free what a failed pass left behind before it is retried."""
    gc.collect()
    if runtime.device.type == "cuda":
        torch.cuda.empty_cache()


Result = TypeVar("Result")


def backing_off(attempt: Callable[[int], Result], micro_batches: int, most: int, optimizer: torch.optim.Optimizer,
                runtime: hardware.Runtime, give_up: str,
                on_back_off: Callable[[int], None] = lambda micro_batches: None) -> tuple[Result, int]:
    """``attempt(micro_batches)``, retried in twice the micro-batches while it runs out of memory.

    ``attempt`` runs a step's forward and backward passes over its batch in that many
    slices (``accumulate_gradients``, ``train_step``). A smaller slice changes memory use,
    not what is learned, so the same step is tried again: the partial gradients dropped,
    the failed pass's memory freed, and ``on_back_off`` told the new count. Returns what
    ``attempt`` gave and the micro-batches it ran in. Out of memory at ``most``
    micro-batches (the batch's rows: one sequence each, or fewer where the caller cannot
    change the slices) raises ``MemoryError(give_up)``. Any other error passes through.
    The one back-off of the training step (``StepRunner``), the time budget's probe and
    scripts/gpu_check.py.
    """
    while True:
        try:
            return attempt(micro_batches), micro_batches
        except Exception as error:
            if not is_out_of_memory(error):
                raise
        # Out of the except block, so that the exception's traceback, which holds the
        # activations of the failed pass, is freed first.
        optimizer.zero_grad(set_to_none=True)
        release_memory(runtime)
        if micro_batches >= most:
            raise MemoryError(give_up)
        micro_batches = min(2 * micro_batches, most)
        on_back_off(micro_batches)


class StepRunner:
    """The optimizer step of one run, with its fallbacks.

    Holds what a run's steps share: DistributedDataParallel's wrapper in a distributed
    run, the ``torch.compile``d model while it works, and the ``StopCheck`` whose votes
    ride on each step's all-reduce.
    """

    def __init__(self, model: GPT, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                 runtime: hardware.Runtime, grad_clip: float, stopping: StopCheck,
                 dist: Distributed | None = None) -> None:
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.runtime, self.grad_clip, self.stopping, self.dist = runtime, grad_clip, stopping, dist
        self.ddp: torch.nn.Module | None = dist.wrap(model) if dist is not None else None
        self.compiled: Callable | None = None  # torch.compile's wrapper while it works

    def compile(self, on_event: OnEvent) -> None:
        """``TrainConfig.compile``: try torch.compile now, and say whether it is in force."""
        self.compiled, note = hardware.compile_model(self.model if self.ddp is None else self.ddp)
        on_event(CompileChecked(self.compiled is not None, note))

    def forward(self) -> Callable:
        """What the step calls: the compiled model while it works, else DDP's wrapper or the model."""
        if self.compiled is not None:
            return self.compiled
        return self.model if self.ddp is None else self.ddp

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float, run: RunState, on_event: OnEvent,
             segments: torch.Tensor | None = None, global_step: int = 0) -> float:
        """One optimizer step, with two fallbacks that retry the same step.

        Out of memory in the forward or backward pass: the micro-batch is halved. The
        batch, learning-rate schedule and data position are unchanged, so nothing is lost.
        A failure of the compiled model (``TrainConfig.compile``): training goes on eagerly.
        ``global_step`` is the model's step before this one (for the error messages).

        In a distributed run (x, y) is the global batch; this rank trains its rows of it,
        and one all-reduce after the backward pass adds up the loss and tells every rank
        whether any was asked to stop (``StopCheck``). Running out of memory there is an
        error: the other ranks would wait for this one in the gradient exchange, which is
        why ``agree_on_micro_batches`` finds a size that fits before the first step.
        """
        rows = x.shape[0]
        most, give_up = self._memory_limit(rows, run, global_step)

        def backed_off(micro_batches: int) -> None:
            run.micro_batches = micro_batches
            on_event(MemoryBackoff(micro_batches, -(-rows // micro_batches), rows))

        while True:
            try:
                loss, _ = backing_off(lambda micro: self._accumulate(x, y, micro, segments), run.micro_batches,
                                      most, self.optimizer, self.runtime, give_up, backed_off)
                if self.compiled is not None and not math.isfinite(float(loss)):
                    # Seen when inductor reused kernels its on-disk cache kept from a run under
                    # another ATEN_CPU_CAPABILITY: NaN from the first step, where the eager model
                    # is fine. Retried eagerly; a loss that is NaN there too is the model's own,
                    # and checked_loss says so.
                    raise FloatingPointError("the compiled model's loss is not finite")
                break
            except Exception as error:
                if self.compiled is None or isinstance(error, MemoryError):  # MemoryError: backing_off gave up
                    raise
                reason = _one_line(error)
            # Out of the except block, as in ``backing_off``.
            self.optimizer.zero_grad(set_to_none=True)  # drop any partial gradients
            release_memory(self.runtime)
            self.compiled = None
            on_event(CompileFailed(reason))
        if self.dist is not None:
            loss = self._agree_after_step(loss)
        apply_update(self.model, self.optimizer, lr, self.grad_clip, self.scaler)
        return checked_loss(loss)

    def _memory_limit(self, rows: int, run: RunState, global_step: int) -> tuple[int, str]:
        """The most micro-batches a step may back off to, and what to say when even those run out of memory.

        A distributed run cannot back off inside a step (see ``step``): the micro-batches
        in force are the most, and running out of memory is an error at once.
        """
        if self.dist is not None:
            return run.micro_batches, (
                f"rank {self.dist.rank} ran out of memory ({self.runtime.device}) at step {global_step + 1} "
                "although the first step fitted; the last checkpoint is intact: run the same command to go "
                "on from it, or start a new run with a smaller --batch-size")
        return rows, (f"out of memory even with one sequence per micro-batch; use a smaller model or context "
                      f"(the last checkpoint, step {global_step}, is intact)")

    def _accumulate(self, x: torch.Tensor, y: torch.Tensor, micro: int,
                    segments: torch.Tensor | None) -> torch.Tensor:
        """Gradients of the batch (x, y); in a distributed run of this rank's rows of it."""
        forward = self.forward()
        if self.dist is None:
            return accumulate_gradients(forward, x, y, self.runtime, micro, self.scaler, segments)
        rows = self.dist.shard(x.shape[0])
        return accumulate_gradients(forward, x[rows], y[rows], self.runtime, micro, self.scaler,
                                    None if segments is None else segments[rows], learned_total=int((y >= 0).sum()),
                                    world_size=self.dist.world_size, no_sync=self.ddp.no_sync)

    def _agree_after_step(self, loss_part: torch.Tensor) -> torch.Tensor:
        """One all-reduce: the batch's mean loss from every rank's part, and whether any rank stops."""
        votes = torch.tensor(self.stopping.votes(), device=self.runtime.device)
        summed = self.dist.all_reduce_sum(torch.cat([loss_part.float().reshape(1), votes]))
        self.stopping.agree(summed[1:].tolist())
        return summed[0]

    def agree_on_micro_batches(self, x: torch.Tensor, y: torch.Tensor, segments: torch.Tensor | None,
                               run: RunState, on_event: OnEvent, global_step: int) -> None:
        """Before a distributed run's first step: find a micro-batch that every rank holds.

        Inside a step an out-of-memory error cannot be retried: the other ranks would wait
        for this one in the gradient exchange. So each rank first runs the step's forward and
        backward passes without exchanging anything (DDP's ``no_sync``), halves its
        micro-batch on its own when it runs out of memory, and all take the smallest slice
        any rank needed. Every later step has the same shapes. The gradients are dropped;
        the caller restores the random state, so this trial changes nothing that follows.
        """
        rows = self.dist.shard(x.shape[0])
        n_rows = rows.stop - rows.start
        while True:
            micro, fits, compile_failure = run.micro_batches, True, ""
            try:
                with self.ddp.no_sync():
                    accumulate_gradients(self.forward(), x[rows], y[rows], self.runtime, micro, self.scaler,
                                         None if segments is None else segments[rows])
            except Exception as error:
                if is_out_of_memory(error):
                    fits = False
                elif self.compiled is not None:
                    compile_failure = _one_line(error)
                else:
                    raise
            self.optimizer.zero_grad(set_to_none=True)
            release_memory(self.runtime)
            if compile_failure:  # torch.compile fails alike on every rank: eager from here
                self.compiled = None
                on_event(CompileFailed(compile_failure))
                continue
            wanted = micro if fits else min(2 * micro, n_rows) if micro < n_rows else n_rows + 1  # +1: nothing fits
            agreed = int(self.dist.all_reduce_max(torch.tensor([float(wanted)], device=self.runtime.device)).item())
            if agreed > n_rows:
                raise MemoryError(f"out of memory on a rank even with one sequence per micro-batch; use a smaller "
                                  f"model or context, or more processes (the last checkpoint, step "
                                  f"{global_step}, is intact)")
            if agreed == micro:
                return
            run.micro_batches = agreed
            on_event(MemoryBackoff(agreed, -(-n_rows // agreed), x.shape[0]))
