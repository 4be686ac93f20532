"""Does conversation fine-tuning make a chat model, and what does the model forget?

    python scripts/chat_experiment.py [--pretrain-minutes 4] [--epochs 12] [--json chat_results.json]

1. Pretrain the default model (the compact preset on a CPU) on the built-in text
   corpus for a fixed time, as a new user's first training does.
2. Fine-tune a copy on the built-in conversations with rehearsal (the default), and
   another copy without it. A tenth of the conversations is held out.
3. On the held-out conversations, before and after: the assistant-token loss and bits
   per byte; the turn-end rate (replies that end with <|end|> within 64 tokens); role
   leaks (replies that start writing the user's side); and bits per byte on the
   pretraining text's held-out part, to see what was forgotten.

"Before" asks the pretrained model the way Chat asks a model that was never
fine-tuned (the plain User:/AI: prompt), and counts a reply as ended when the model
starts a new line with "User:" or stops the document; "after" uses the learned format.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.data.chat_format import render  # noqa: E402
from engine.data.chat_windows import ChatDataset  # noqa: E402
from engine.data.conversations import builtin_conversations, split_conversations  # noqa: E402
from engine.data.sources import builtin_source  # noqa: E402
from engine.runtime import hardware  # noqa: E402
from response_generator import GenerationConfig, ResponseGenerator, render_plain  # noqa: E402
from trainer import Trainer, estimate_loss  # noqa: E402

REPLY_TOKENS = 64
# The length limit a user gets (GenerationConfig's max_new_tokens): a tenth of the
# held-out reference replies are themselves longer than 64 tokens, so a model that
# answers as the data does cannot end all of them within 64.
DEFAULT_REPLY_TOKENS = GenerationConfig().max_new_tokens


def held_out_chat_loss(trainer: Trainer, held_out) -> tuple[float, float]:
    """Assistant-token loss (nats) and bits per byte on the held-out conversations."""
    tok = trainer.tokenizer
    data = ChatDataset.build(tok, tok.chat_token_ids(), [], held_out, trainer.model.config.context)
    result = estimate_loss(trainer.model, data.val_batches(8), trainer.runtime, tok.token_bytes())
    return result.val_loss, result.bpb


def reply_behaviour(folder: Path, held_out, learned: bool, limit: int = REPLY_TOKENS) -> tuple[float, float]:
    """(turn-end rate, role-leak rate) of greedy replies of at most ``limit`` tokens to each
    held-out first question."""
    gen = ResponseGenerator(str(folder), hardware.detect_runtime())
    tok = gen.tokenizer
    chat = tok.chat_token_ids()
    cfg = GenerationConfig(temperature=0, max_new_tokens=limit, repetition_penalty=1.1)
    ended = leaked = 0
    for conv in held_out:
        question = conv[:2] if conv[0].role == "system" else conv[:1]
        if learned:
            ids = gen.fit_prompt(render(tok, chat, question, open_reply=True)[0], limit)
            out = list(gen.generate_ids(ids, cfg, stop_ids=frozenset({chat.end})))
            ended += gen.finish_reason == "stop" and len(out) < limit
            text = tok.decode(out)
            leaked += chat.user in out or chat.system in out or "User:" in text
        else:
            ids = gen.fit_prompt(tok.encode(render_plain(question)), limit)
            text = tok.decode(list(gen.generate_ids(ids, cfg)))
            cut = text.find("\nUser:")
            ended += cut >= 0 or gen.finish_reason == "stop"
            leaked += cut >= 0 and not text[:cut].strip()  # wrote the user's side before any reply
    return ended / len(held_out), leaked / len(held_out)


def text_bpb(trainer: Trainer) -> float:
    results = trainer.evaluate_datasets()
    return next(r.bpb for name, r in results.items() if "built-in corpus" in name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrain-minutes", type=float, default=4.0)
    p.add_argument("--epochs", type=int, default=30, help="passes over the conversations (the menu's default)")
    p.add_argument("--json", default="chat_results.json")
    p.add_argument("--workdir", help="keep the models here (default: a temporary folder)")
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="chat-experiment-"))
    if args.workdir and work.exists() and any(work.iterdir()):
        # An old pretrained folder would be trained further, not made afresh: not this experiment.
        raise SystemExit(f"--workdir {work} is not empty; give an empty or new folder")
    base = work / "pretrained"
    runtime = hardware.detect_runtime()
    print(f"device: {runtime.device} ({runtime.reason})")

    t0 = time.time()
    pre = Trainer(str(base), "bpe", train_overrides={"max_minutes": args.pretrain_minutes}, runtime=runtime)
    result = pre.train(builtin_source(), 100)
    print(f"pretrained {result.steps} steps in {time.time() - t0:.0f} s")

    source = builtin_conversations()
    _, held_out = split_conversations(source.conversations, pre.config.seed)
    pre_trainer = Trainer(str(base), runtime=runtime)
    pre_trainer.load()
    loss, bpb = held_out_chat_loss(pre_trainer, held_out)  # the chat tokens exist, untrained
    rows = {"before": {"chat_loss": loss, "chat_bpb": bpb, "text_bpb": text_bpb(pre_trainer)}}
    rows["before"]["turn_end"], rows["before"]["role_leak"] = reply_behaviour(base, held_out, learned=False)

    for label, rehearsal in (("after (rehearsal 20%)", 0.2), ("after (no rehearsal)", 0.0)):
        folder = work / label.replace(" ", "_").replace("(", "").replace(")", "").replace("%", "")
        shutil.copytree(base, folder)
        trainer = Trainer(str(folder), runtime=runtime, train_overrides={"rehearsal": rehearsal})
        t0 = time.time()
        trainer.train_conversations(source, args.epochs)
        seconds = time.time() - t0
        loss, bpb = held_out_chat_loss(trainer, held_out)
        turn_end, leak = reply_behaviour(folder, held_out, learned=True)
        turn_end_default, _ = reply_behaviour(folder, held_out, learned=True, limit=DEFAULT_REPLY_TOKENS)
        rows[label] = {"chat_loss": loss, "chat_bpb": bpb, "text_bpb": text_bpb(trainer), "turn_end": turn_end,
                       "turn_end_default_limit": turn_end_default, "role_leak": leak, "seconds": seconds}

    print(f"\n{len(held_out)} held-out conversations; replies of at most {REPLY_TOKENS} tokens, greedy\n")
    print(f"{'':24} | {'assist. loss':>12} | {'assist. bpb':>11} | {'turn-end':>8} | {'role leak':>9} | "
          f"{'text bpb':>8}")
    for label, r in rows.items():
        print(f"{label:24} | {r['chat_loss']:>12.3f} | {r['chat_bpb']:>11.3f} | {r['turn_end']:>8.1%} | {r['role_leak']:>9.1%} | "
              f"{r['text_bpb']:>8.4f}")
    before = rows["before"]["text_bpb"]
    for label, r in rows.items():
        if label != "before":
            print(f"{label}: turn-end within {DEFAULT_REPLY_TOKENS} tokens (the default length limit) "
                  f"{r['turn_end_default_limit']:.1%}")
            print(f"{label}: text bpb {r['text_bpb'] - before:+.4f}, fine-tuning took {r['seconds']:.0f} s")
    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
