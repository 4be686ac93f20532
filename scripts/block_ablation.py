"""Which parts of the llama block, and Muon, earn their place? An ablation at equal wall time.

    python scripts/block_ablation.py [--minutes 3] [--data ../shared/data/tinyshakespeare.txt]
                                     [--variants gpt2-adamw llama-muon ...] [--lr 1e-3] [--json out.json]

Every variant trains the same shape (d_model 256, 4 layers, 4 heads, context 256,
batch 8, dropout 0.1: the compact preset) on the same tokens (one BPE tokenizer of
8,000 tokens, the last 5% held out) for the same wall time, with the same loop: the
real training step (``trainer.train_step``) and its cosine schedule. At the end the
held-out bits per byte.

Equal wall time, but measured so that a busy machine cannot bias it: first every
variant's step is timed, a few steps each in alternating rounds (``--time-rounds``;
this phase wants a quiet machine, and takes about a minute); a variant then trains
for the number of steps its pace buys in ``--minutes``, and that part gives the same
numbers however busy the machine is meanwhile. Variants differ in one part each:

* ``gpt2-adamw``: today's recipe; ``gpt2-muon``: the same block under Muon;
* ``llama-adamw``, ``llama-muon``: rotary positions, RMSNorm, SwiGLU, no biases;
* leave-one-out from ``llama-muon``: ``-rope`` (learned positions instead),
  ``-rmsnorm`` (LayerNorm without bias instead), ``-swiglu`` (a GELU MLP of 4 x d_model,
  no bias, instead), ``+bias`` (biases on every product), ``+qknorm`` (QK-norm added).

The leave-one-out models are the llama model with one part swapped in this script
(the program itself builds only the two designs). Also printed: the steps each variant
took, and the step at which its training loss (an average over 20 steps) first reached
the final training loss of ``gpt2-adamw``, which says how much sooner a recipe gets
where today's ends. Variants run one after another; nothing else should run meanwhile.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.data.sources import open_source  # noqa: E402
from engine.data.tokenizer import train_tokenizer  # noqa: E402
from engine.data.windows import TokenDataset, tokenize_source  # noqa: E402
from engine.model.config import ModelConfig  # noqa: E402
from engine.model.gpt import GPT, MLP  # noqa: E402
from engine.runtime import hardware  # noqa: E402
from trainer import TrainConfig, estimate_loss, lr_at, make_optimizer, train_step  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
SHAPE = dict(d_model=256, n_layer=4, n_head=4, context=256, dropout=0.1)
BATCH = 8
VARIANTS = ["gpt2-adamw", "gpt2-muon", "llama-adamw", "llama-muon", "llama-muon-rope", "llama-muon-rmsnorm",
            "llama-muon-swiglu", "llama-muon+bias", "llama-muon+qknorm"]


def build(variant: str, vocab_size: int) -> tuple[GPT, str]:
    """The variant's model (seeded alike) and the optimizer it trains with."""
    arch, optimizer, *change = variant.split("-", 2)
    change = change[0] if change else ""
    if "+" in optimizer:
        optimizer, change = optimizer.split("+")[0], "+" + optimizer.split("+")[1]
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab_size, arch=arch, qk_norm=change == "+qknorm", **SHAPE)
    model = GPT(cfg)
    if change == "rope":  # learned positions instead of rotations
        model.wpe = nn.Embedding(cfg.context, cfg.d_model)
        nn.init.normal_(model.wpe.weight, std=0.02)
    elif change == "rmsnorm":
        for block in model.h:
            block.ln_1, block.ln_2 = nn.LayerNorm(cfg.d_model, bias=False), nn.LayerNorm(cfg.d_model, bias=False)
        model.ln_f = nn.LayerNorm(cfg.d_model, bias=False)
    elif change == "swiglu":
        gelu = ModelConfig(vocab_size=vocab_size, arch="gpt2", **SHAPE)
        for block in model.h:
            block.mlp = MLP(gelu)
            block.mlp.c_fc.bias, block.mlp.c_proj.bias = None, None
            nn.init.normal_(block.mlp.c_fc.weight, std=0.02)
            nn.init.normal_(block.mlp.c_proj.weight, std=0.02 / (2 * cfg.n_layer) ** 0.5)
    elif change == "+bias":
        for block in model.h:
            for name, linear in [("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj")]:
                layer = getattr(getattr(block, name), linear)
                layer.bias = nn.Parameter(torch.zeros(layer.out_features))
    elif change not in ("", "+qknorm"):
        raise SystemExit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    return model, optimizer


def step_seconds(variants: list[str], data: TokenDataset, vocab_size: int, runtime, rounds: int,
                 steps: int = 8) -> dict[str, float]:
    """Median seconds per training step of each variant, timed in alternating rounds."""
    timed: dict[str, list[float]] = {v: [] for v in variants}
    plan = data.epoch_plan(1337, 0, BATCH)
    for _ in range(rounds):
        for variant in variants:
            model, optimizer_name = build(variant, vocab_size)
            model.to(runtime.device).train()
            cfg = TrainConfig(optimizer=optimizer_name)
            optimizer = make_optimizer(model, cfg, runtime)
            for i in range(steps + 2):  # two untimed: allocations, kernel choices
                if i == 2:
                    began = time.perf_counter()
                x, y = data.train_batch(plan, i)
                train_step(model, optimizer, x, y, 1e-4, runtime, cfg.grad_clip)
            timed[variant].append((time.perf_counter() - began) / steps)
    return {v: statistics.median(t) for v, t in timed.items()}


def run(variant: str, data: TokenDataset, token_bytes, total: int, lr: float, runtime) -> dict:
    """Train ``variant`` for ``total`` steps (its pace's share of the budget) and evaluate."""
    model, optimizer_name = build(variant, len(token_bytes))
    model.to(runtime.device).train()
    cfg = TrainConfig(learning_rate=lr, optimizer=optimizer_name, weight_decay=0.01)
    optimizer = make_optimizer(model, cfg, runtime)
    losses, step, epoch = [], 0, 0
    started = time.monotonic()
    while step < total:
        plan = data.epoch_plan(cfg.seed, epoch, BATCH)
        for i in range(min(plan.n_batches, total - step)):
            x, y = data.train_batch(plan, i)
            losses.append(train_step(model, optimizer, x, y, lr_at(step, total, cfg), runtime, cfg.grad_clip))
            step += 1
        epoch += 1
    wall = time.monotonic() - started
    result = estimate_loss(model, data.val_batches(BATCH, 50), runtime, token_bytes)
    return {"variant": variant, "bpb": result.bpb, "val_loss": result.val_loss, "steps": step, "wall_s": wall,
            "params": model.num_params(), "losses": losses}


def smoothed(losses: list[float], width: int = 20) -> list[float]:
    return [sum(losses[max(0, i - width + 1):i + 1]) / (i + 1 - max(0, i - width + 1)) for i in range(len(losses))]


def steps_to_reach(losses: list[float], target: float) -> int | None:
    return next((i + 1 for i, loss in enumerate(smoothed(losses)) if loss <= target), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--variants", nargs="+", default=VARIANTS)
    p.add_argument("--lr", type=float, nargs="+", default=[1e-3], help="peak learning rates to try (each variant)")
    p.add_argument("--precision", default="auto", help="as --precision of the program (fp32 for an AVX2-like run)")
    p.add_argument("--time-rounds", type=int, default=3, help="rounds of the timing phase")
    p.add_argument("--pace", help="a JSON file of seconds per step by variant, from an earlier timing phase")
    p.add_argument("--json", default="ablation.json")
    args = p.parse_args()
    runtime = hardware.detect_runtime("cpu", args.precision)
    print(f"device: {runtime.device} ({runtime.reason})")
    source = open_source(args.data)
    tok = train_tokenizer("bpe", source.sample_for_tokenizer(), 8000)
    with tempfile.TemporaryDirectory() as cache:
        tokens = tokenize_source(source, tok, Path(cache))
        data = TokenDataset(tokens.copy(), SHAPE["context"], 0.05)
    token_bytes = tok.token_bytes()
    if args.pace:
        pace = json.loads(Path(args.pace).read_text())
    else:
        pace = step_seconds(args.variants, data, len(token_bytes), runtime, args.time_rounds)
        Path(args.json).with_suffix(".pace.json").write_text(json.dumps(pace, indent=2))
    for variant, seconds in pace.items():
        print(f"{variant:22} {seconds * 1000:7.1f} ms a step -> {int(args.minutes * 60 / seconds)} steps")
    rows = []
    for variant in args.variants:
        for lr in args.lr:
            total = max(1, int(args.minutes * 60 / pace[variant]))
            row = run(variant, data, token_bytes, total, lr, runtime)
            row.update(lr=lr, ms_per_step=pace[variant] * 1000)
            rows.append(row)
            print(f"{variant:22} lr {lr:<7g} {row['bpb']:.4f} bits/byte  {row['steps']:5d} steps  "
                  f"{row['params']:,} parameters", flush=True)
            Path(args.json).write_text(json.dumps(rows, indent=2))  # each run kept as it ends
    baseline = next((r for r in rows if r["variant"] == "gpt2-adamw"), None)
    if baseline is not None:
        target = smoothed(baseline["losses"])[-1]
        print(f"\nsteps to reach gpt2-adamw's final training loss ({target:.3f}):")
        for r in rows:
            reached = steps_to_reach(r["losses"], target)
            r["steps_to_baseline"] = reached
            print(f"  {r['variant']:22} lr {r['lr']:<7g} {reached if reached else 'not reached':>11} of {r['steps']}")
    Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
