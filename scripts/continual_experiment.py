"""Measure continuous learning: train on A, continue on B with vocabulary growth,
with and without rehearsal, and report what the model kept of A.

    python scripts/continual_experiment.py [--a FILE] [--b FILE|builtin] [--tokenizer bpe]

Defaults: A is ../shared/data/tinyshakespeare.txt, B is the built-in corpus (the
Python documentation topics), a deliberately different domain. Prints a table and
writes JSON next to the work folder. Uses the real Trainer, nothing special-cased.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.data.sources import open_source  # noqa: E402
from engine.training import continual  # noqa: E402
from trainer import Trainer  # noqa: E402

MODEL = dict(d_model=128, n_layer=4, n_head=4, context=128)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", default=str(Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"))
    p.add_argument("--b", default="builtin", help="a file, or 'builtin' for the Python docs corpus")
    p.add_argument("--tokenizer", default="bpe", choices=["bpe", "sentencepiece"])
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--epochs-a", type=int, default=2)
    p.add_argument("--epochs-b", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=500)
    p.add_argument("--json", default="continual_results.json")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="continual-"))
    train = dict(target_vocab_size=args.vocab, batch_size=8, learning_rate=1e-3, warmup_steps=20, seed=0)
    base = work / "after_a"
    t0 = time.time()
    Trainer(str(base), args.tokenizer, model_overrides=MODEL, train_overrides=train).train(
        open_source(args.a), args.epochs_a)
    print(f"trained on A in {time.time() - t0:.0f}s")
    source_b = open_source("" if args.b == "builtin" else args.b)
    results = {}
    for share in (0.2, 0.0):
        folder = work / f"rehearsal_{share}"
        shutil.copytree(base, folder)
        trainer = Trainer(str(folder), args.tokenizer, train_overrides={**train, "rehearsal": share})
        t0 = time.time()
        report = continual.train_on_new_data(trainer, source_b, epochs=args.epochs_b, expand_vocab=True,
                                             max_new_tokens=args.new_tokens)
        print(f"continued on B with rehearsal {share:.0%} in {time.time() - t0:.0f}s")
        results[share] = {"expansion": asdict(report.growth),
                          "table": [{"dataset": Path(r.name).name,
                                     "bpb_before": r.before.bpb if r.before else None,
                                     "bpb_after": r.after.bpb} for r in report.table]}
    ex = results[0.2]["expansion"]
    print(f"\nvocabulary {ex['old_vocab']} -> {ex['new_vocab']} ({ex['added']} added), e.g. {ex['examples'][:8]}")
    print(f"tokens per byte on B: {ex['tokens_per_byte_before']:.3f} -> {ex['tokens_per_byte_after']:.3f}; "
          f"drift on A's held-out text: {ex['drift']:.1%}")
    print(f"\n{'rehearsal':>9} | {'dataset':<45} | {'bpb before':>10} | {'bpb after':>9}")
    for share, res in results.items():
        for row in res["table"]:
            before = f"{row['bpb_before']:.4f}" if row["bpb_before"] is not None else "(new)"
            print(f"{share:>9.0%} | {row['dataset']:<45} | {before:>10} | {row['bpb_after']:>9.4f}")
    a_name = results[0.2]["table"][0]
    loss_with = results[0.2]["table"][0]["bpb_after"] - a_name["bpb_before"]
    loss_without = results[0.0]["table"][0]["bpb_after"] - a_name["bpb_before"]
    print(f"\nA's bpb rose by {loss_with:+.4f} with rehearsal and {loss_without:+.4f} without")
    Path(args.json).write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
