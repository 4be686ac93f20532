"""The training section: a training step's speed, its MFU, and where its time goes.

``bench_training`` times ``trainer.train_step`` (the step training runs) on random
tokens through ``TokenDataset``, then profiles a few more steps with torch.profiler
and sorts their time by kind of work (``step_category``).
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from benchlib.machine import OtherLoad, model_gemms, peak_rss_mb, spread
from engine.data.windows import TokenDataset
from engine.runtime import hardware
from model import GPT, ModelConfig
from trainer import TrainConfig, make_optimizer, train_step


def flops_per_token(model: GPT) -> int:
    """6 x (every weight a token passes through: all but the position table, the tied
    head counted as the matrix product it is) + the attention scores and mixing."""
    cfg = model.config
    n = model.num_params() - (model.wpe.weight.numel() if model.wpe is not None else 0)
    return 6 * n + 12 * cfg.n_layer * cfg.d_model * cfg.context


# Categories of a training step's time, by aten op (see ``step_category``).
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::addbmm",
              "aten::linear", "aten::matmul"}
LOSS_OPS = {"aten::cross_entropy_loss", "aten::log_softmax", "aten::_log_softmax", "aten::_log_softmax_backward_data",
            "aten::nll_loss", "aten::nll_loss_nd", "aten::nll_loss_forward", "aten::nll_loss_backward"}
ATTENTION_OPS = {"aten::softmax", "aten::_softmax", "aten::_softmax_backward_data", "aten::scaled_dot_product_attention",
                 "aten::_scaled_dot_product_flash_attention_for_cpu",
                 "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}
ELEMENTWISE_OPS = {f"aten::{name}" for name in (
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "where", "gelu", "gelu_backward",
    "native_layer_norm", "native_layer_norm_backward", "random_", "uniform_", "bernoulli_", "ge", "bitwise_and",
    "bitwise_right_shift", "bitwise_right_shift_", "fill_", "zero_", "copy_", "clone", "cat", "contiguous", "triu",
    "masked_fill", "masked_fill_", "neg", "exp", "exp_", "log", "log_", "clamp", "clamp_", "eq", "ne", "abs")}
STEP_CATEGORIES = ("matrix products", "cross-entropy / loss head", "attention softmax", "element-wise passes",
                   "optimizer (AdamW, clipping)", "other aten ops")


def step_category(name: str, ancestors: list[str]) -> str:
    """The category of one aten op of a training step, from its name and the names of
    the profiler events around it (the autograd node, the optimizer's step...).

    Matrix products count as such wherever they run, the loss head's included, so the
    plain and the fused head compare like with like; everything else inside the loss
    (its softmax, its passes) counts as the loss head."""
    if name in MATMUL_OPS:
        return "matrix products"
    if (name.startswith(("aten::_fused_adam", "aten::_foreach_")) or name == "aten::linalg_vector_norm"
            or any(a.startswith(("Optimizer.", "aten::_foreach_")) for a in ancestors)):
        return "optimizer (AdamW, clipping)"  # clip_grad_norm_: per-tensor norms, a total, one scaling
    if name in LOSS_OPS or any("FusedHeadLoss" in a or a in LOSS_OPS or "LogSoftmaxBackward" in a
                               or "NllLossBackward" in a for a in ancestors):
        return "cross-entropy / loss head"
    if name in ATTENTION_OPS:
        return "attention softmax"
    if name in ELEMENTWISE_OPS:
        return "element-wise passes"
    return "other aten ops"


def step_breakdown(step, steps: int) -> dict:
    """Where a training step's time goes: ``step()`` run ``steps`` times under
    torch.profiler, the self CPU time of every aten op summed by ``step_category``,
    in ms per step and % of the profiled step, largest first. What no aten op
    accounts for (Python, the autograd engine, the profiler itself) is its own row.

    Also which kernels ran, read off the event names: fused AdamW, the fused loss
    head, and the attention path (SDPA, or the explicit one with dropout)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    totals = dict.fromkeys(STEP_CATEGORIES, 0.0)
    names = set()
    for event in prof.events():
        names.add(event.name)
        if not event.name.startswith("aten::"):
            continue
        ancestors, parent = [], event.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        totals[step_category(event.name, ancestors)] += event.self_cpu_time_total / 1e3 / steps
    totals["not in aten ops (Python, autograd, profiler)"] = max(0.0, wall_ms - sum(totals.values()))
    rows = sorted(({"category": name, "ms": ms, "pct": 100 * ms / wall_ms} for name, ms in totals.items()),
                  key=lambda row: -row["ms"])
    sdpa = any("scaled_dot_product" in name for name in names)
    return {
        "steps": steps, "step_ms": wall_ms, "categories": rows,
        "kernels": {
            "fused_adamw": any(name.startswith("aten::_fused_adamw") for name in names),
            "fused_loss": any(name.startswith("FusedHeadLoss") for name in names),
            "attention": "scaled_dot_product_attention" if sdpa else "explicit, with dropout "
                                                                    "(model.causal_attention_with_dropout)",
        },
    }


def _paired_mfu(model: GPT, optimizer, dataset: TokenDataset, plan, runtime: hardware.Runtime, batch: int,
                first_batch: int, rounds: int) -> float:
    """The step's share of the model-shaped matrix-product rate, each step timed beside the products.

    The machine's speed drifts by tens of percent over a minute, so a rate taken
    later is a poor denominator: a few more steps, each followed by the same
    matrix products on their own, and the median of the step-by-step ratios.
    """
    cfg = model.config
    gemms, gemm_flops = model_gemms(cfg, batch)
    step_flops = flops_per_token(model) * batch * cfg.context
    ratios = []
    for i in range(rounds):
        x, y = dataset.train_batch(plan, (first_batch + i) % plan.n_batches)
        t0 = time.perf_counter()
        train_step(model, optimizer, x, y, 3e-4, runtime, grad_clip=1.0)
        t1 = time.perf_counter()
        gemms()
        t2 = time.perf_counter()
        ratios.append(step_flops / gemm_flops * (t2 - t1) / (t1 - t0))
    return statistics.median(ratios)


def bench_training(cfg: ModelConfig, batch: int, precision: str, steps: int, warmup: int,
                   seed: int = 0, profile_steps: int = 3) -> dict:
    """Training steps on random tokens through the real data path: tokens/s, MFU, memory, the profile."""
    runtime = hardware.detect_runtime("cpu", precision)
    torch.manual_seed(seed)
    model = GPT(cfg)
    optimizer = make_optimizer(model, TrainConfig(), runtime)
    model.train()
    # Random tokens through the real data path: TokenDataset windows, as in training.
    n_windows = (warmup + steps) * batch + 4
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, n_windows * (cfg.context + 1) + 2,
                                                  dtype=np.uint16)
    dataset = TokenDataset(tokens, cfg.context, val_fraction=0.01)
    plan = dataset.epoch_plan(seed, 0, batch)
    step_times, prep_times, losses = [], [], []
    with OtherLoad() as load:
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            x, y = dataset.train_batch(plan, i % plan.n_batches)
            t1 = time.perf_counter()
            losses.append(train_step(model, optimizer, x, y, 3e-4, runtime, grad_clip=1.0))
            t2 = time.perf_counter()
            if i >= warmup:
                prep_times.append(t1 - t0)
                step_times.append(t2 - t1)
    rss = peak_rss_mb()  # before the products below add their own tensors
    tokens_per_step = batch * cfg.context
    step = spread(step_times)
    fpt = flops_per_token(model)
    paired = {}
    if runtime.autocast_dtype is None:
        paired["mfu_model_paired"] = _paired_mfu(model, optimizer, dataset, plan, runtime, batch,
                                                 warmup + steps, max(3, steps // 2))
    # Last, so that the profiler's overhead touches none of the timings above.
    later = iter(range(warmup + steps + max(3, steps // 2), 10**9))

    def profiled_step() -> None:
        x, y = dataset.train_batch(plan, next(later) % plan.n_batches)
        train_step(model, optimizer, x, y, 3e-4, runtime, grad_clip=1.0)

    breakdown = step_breakdown(profiled_step, profile_steps)
    return {
        **paired,
        "breakdown": breakdown,
        "precision": runtime.precision, "steps": steps, "warmup": warmup,
        "step_s": step,
        "tokens_per_s": {"median": tokens_per_step / step["median"], "min": tokens_per_step / step["max"],
                         "max": tokens_per_step / step["min"]},
        "flops_per_token": fpt,
        "achieved_gflops": fpt * tokens_per_step / step["median"] / 1e9,
        "batch_prep_ms": statistics.median(prep_times) * 1e3,
        "batch_prep_pct_of_step": 100 * statistics.median(prep_times) / step["median"],
        "loss_first": losses[0], "loss_last": losses[-1],
        "params": model.num_params(),
        "peak_rss_mb": rss,
        "other_load": load.share,
    }

