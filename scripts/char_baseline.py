"""The yardstick for the time budget: a character-level model trained the way nanoGPT's README trains on a CPU.

    python scripts/char_baseline.py --seconds 180 [--data FILE] [--json FILE]

nanoGPT's README gives a CPU recipe for a character-level model: context 64, batch 12,
4 layers of width 128 with 4 heads, no dropout, AdamW at 1e-3 decaying to 1e-4 on a
cosine after 100 warm-up steps (betas 0.9 and 0.99, weight decay 0.1, gradients
clipped at 1.0), in fp32. This script trains that recipe for a fixed wall time, with
the cosine stretched over the time instead of over a number of steps, so that it is
compared at equal time with ``interface.py train FILE --minutes N``. The network is our
GPT-2 block (``engine.model``), which is nanoGPT's but for its biases.

It trains on the first 95% of the text's characters and reports bits per byte on the
rest: nats per character over the held-out characters, in windows of the context,
divided by ln 2 and by the held-out part's UTF-8 bytes. The held-out part is the text's
last 5%, as in the budget runs (``scripts/budget_experiment.py``), so the two numbers
compare.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.model.config import ModelConfig  # noqa: E402
from engine.model.gpt import GPT  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
CONTEXT, BATCH = 64, 12
PEAK_LR, MIN_LR, WARMUP = 1e-3, 1e-4, 100
HELD_OUT = 0.05


def learning_rate(step: int, fraction: float) -> float:
    """Linear warm-up over the first steps, then a cosine from the peak to the floor over the time."""
    if step < WARMUP:
        return PEAK_LR * (step + 1) / WARMUP
    return MIN_LR + 0.5 * (PEAK_LR - MIN_LR) * (1 + math.cos(math.pi * min(1.0, fraction)))


@torch.no_grad()
def held_out_bits_per_byte(model: GPT, ids: torch.Tensor, text: str) -> float:
    """Nats over every held-out character (windows of the context), in bits per UTF-8 byte."""
    model.eval()
    nats, usable = 0.0, (len(ids) - 1) // CONTEXT * CONTEXT
    for start in range(0, usable, CONTEXT * 64):
        rows = min(64, (usable - start) // CONTEXT)
        x = ids[start:start + rows * CONTEXT].view(rows, CONTEXT)
        y = ids[start + 1:start + 1 + rows * CONTEXT].view(rows, CONTEXT)
        _, loss = model(x, y)
        nats += float(loss) * y.numel()
    scored_bytes = len(text[1:usable + 1].encode("utf-8"))
    return nats / math.log(2) / scored_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=180.0, help="wall time of training")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--json", type=Path, help="write the result here")
    args = p.parse_args()
    torch.manual_seed(1337)
    text = args.data.read_text(encoding="utf-8", errors="replace")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    split = int(len(ids) * (1 - HELD_OUT))
    train, held_out, held_out_text = ids[:split], ids[split:], text[split:]
    model = GPT(ModelConfig(vocab_size=len(chars), context=CONTEXT, d_model=128, n_layer=4, n_head=4,
                            dropout=0.0, arch="gpt2"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, betas=(0.9, 0.99), weight_decay=0.1)
    began, step = time.monotonic(), 0
    model.train()
    while (elapsed := time.monotonic() - began) < args.seconds:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, elapsed / args.seconds)
        starts = torch.randint(len(train) - CONTEXT - 1, (BATCH,))
        x = torch.stack([train[s:s + CONTEXT] for s in starts])
        y = torch.stack([train[s + 1:s + 1 + CONTEXT] for s in starts])
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
    trained_s = time.monotonic() - began
    bpb = held_out_bits_per_byte(model, held_out, held_out_text)
    row = {"data": args.data.name, "seconds": round(trained_s, 1), "steps": step, "chars": len(chars),
           "params": model.num_params(), "threads": torch.get_num_threads(), "bpb": bpb}
    print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(row, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
