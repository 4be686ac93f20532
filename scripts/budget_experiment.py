"""What does a time budget buy? The budget mode's choice against fixed shapes, same minutes.

    python scripts/budget_experiment.py [--minutes 3 10 30] [--data ../shared/data/tinyshakespeare.txt]
    python scripts/budget_experiment.py --minutes 3 --shapes 128x4 192x4 256x4   # a sweep, for the rules
    python scripts/budget_experiment.py --minutes 3 --vocab-sizes auto 1024 2048 4096 8000   # EMBED_SHARE
    python scripts/budget_experiment.py --minutes 3 10 --recipes before-22 default --no-compact   # issue 22's goal

For every budget it runs the real command line, one run at a time, in turns:

* ``interface.py train DATA --minutes N``: the budget mode picks the shape (and the vocabulary);
* ``interface.py train DATA --minutes N --preset compact --dropout 0.1 --lr 1e-3
  --target-vocab-size 8000``: today's fixed CPU model with today's settings, its schedule
  fitted to the same minutes;
* with ``--shapes``, each ``DxL`` shape pinned the same way (heads of 64 dimensions).

With ``--recipes`` the budget mode runs once per recipe (``RECIPES`` below): ``default``
is whatever a new model gets today (``NEW_MODEL_RECIPE``); ``before-22`` is the recipe
new models had before the llama block (the GPT-2 block, AdamW, an 8,000-token
vocabulary); the others name a block and an optimizer and leave the vocabulary to the
plan. ``--precision fp32`` goes to every run (with ``ATEN_CPU_CAPABILITY=avx2`` in the
environment: an AVX2-only CPU).

With ``--vocab-sizes`` each of those runs once per size: a number pins the vocabulary
(``--target-vocab-size``, which turns the plan's vocabulary rule off: the tokenizer is
trained to that size, lowered only where the text cannot support it), ``auto`` leaves
it to the plan (``budget.plan_vocabulary``; the compact preset then keeps 8,000).

It prints a table of the held-out bits per byte each reached (the last 5% of the text;
runs with the same vocabulary train the same tokenizer from the same data, and bits per
byte compare runs across vocabularies), with the shape, the vocabulary, the steps and
the wall time, and whether a run ended with the weights of an earlier, better pass.
Nothing else should run on the machine.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
RECIPES = {
    "default": [],
    "before-22": ["--arch", "gpt2", "--optimizer", "adamw", "--target-vocab-size", "8000"],
    "gpt2-adamw": ["--arch", "gpt2", "--optimizer", "adamw"],
    "llama-adamw": ["--arch", "llama", "--optimizer", "adamw"],
    "llama-muon": ["--arch", "llama", "--optimizer", "muon"],
}


def train(data: Path, minutes: float, folder: Path, flags: list[str]) -> dict:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "interface.py"), "train", str(data), "--minutes", str(minutes),
                           "--model-dir", str(folder), *flags], capture_output=True, text=True, cwd=ROOT)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"training failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    status = subprocess.run([sys.executable, str(ROOT / "interface.py"), "status", "--json", "--model-dir",
                             str(folder)], capture_output=True, text=True, cwd=ROOT, check=True)
    info = json.loads(status.stdout)
    lines = (proc.stdout + proc.stderr).splitlines()
    plan = next((line for line in lines if "time budget" in line), "")
    kept = next((line for line in lines if "kept the weights of pass" in line), "")
    m = info["model"]
    return {"shape": f"{m.get('arch', 'gpt2')} d{m['d_model']} x{m['n_layer']} ctx{m['context']} drop{m['dropout']}",
            "vocab": m["vocab_size"],
            "bpb": info["last_eval"]["bpb"], "steps": info["steps"], "tokens": info["tokens_seen"],
            "wall_s": round(wall, 1), "plan": plan.strip(), "kept": kept.strip()}


def shape_flags(spec: str) -> list[str]:
    d, layers = (int(v) for v in spec.lower().split("x"))
    return ["--d-model", str(d), "--n-layer", str(layers), "--n-head", str(max(1, d // 64))]


def vocab_flags(size: str) -> list[str]:
    """``auto``: the plan chooses; a number pins the vocabulary (the last --target-vocab-size given wins)."""
    return [] if size == "auto" else ["--target-vocab-size", str(int(size))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, nargs="+", default=[3, 10, 30])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--shapes", nargs="*", default=[], metavar="DxL", help="also train these shapes pinned")
    p.add_argument("--no-auto", action="store_true", help="skip the budget mode's own choice")
    p.add_argument("--no-compact", action="store_true", help="skip the fixed compact preset")
    p.add_argument("--vocab-sizes", nargs="+", default=["auto"], metavar="V",
                   help="run each configuration once per vocabulary: a size pins it, 'auto' lets the plan choose")
    p.add_argument("--recipes", nargs="+", default=["default"], choices=sorted(RECIPES),
                   help="run the budget mode once per recipe")
    p.add_argument("--precision", help="--precision for every run (fp32: as an AVX2-only CPU trains)")
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="budget-experiment-"))
    rows = []
    for minutes in args.minutes:
        runs = [] if args.no_auto else [
            ("budget mode" if len(args.recipes) == 1 else f"budget {recipe}", RECIPES[recipe])
            for recipe in args.recipes]
        if not args.no_compact:
            runs.append(("compact preset", ["--preset", "compact", "--dropout", "0.1", "--lr", "1e-3",
                                            "--target-vocab-size", "8000"]))
        runs += [(f"pinned {spec}", shape_flags(spec)) for spec in args.shapes]
        for label, flags in runs:
            for size in args.vocab_sizes:
                name = label if len(args.vocab_sizes) == 1 else f"{label} v{size}"
                folder = work / f"{name.replace(' ', '_')}_{minutes:g}"
                precision = ["--precision", args.precision] if args.precision else []
                row = {"minutes": minutes, "run": name,
                       **train(args.data, minutes, folder, flags + vocab_flags(size) + precision)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.json:  # each run kept as it ends
                    args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    print(f"\n{'minutes':>7} | {'run':<22} | {'shape':<32} | {'vocab':>6} | {'steps':>6} | {'tokens':>10} | "
          f"{'wall s':>6} | bpb")
    for r in rows:
        best = "  (best pass kept)" if r["kept"] else ""
        print(f"{r['minutes']:>7g} | {r['run']:<22} | {r['shape']:<32} | {r['vocab']:>6} | {r['steps']:>6} | "
              f"{r['tokens']:>10,} | {r['wall_s']:>6} | {r['bpb']:.4f}{best}")


if __name__ == "__main__":
    main()
