"""How good are a chat model's replies? Measures on everyday openings the model never saw.

    python scripts/reply_quality.py MODEL_DIR [--json out.json] [--show 5]

Each of the ``OPENINGS`` below (written for this measure, and checked against the
training conversations: any that a model's data contains word for word is left out
and reported) is sent as the first message of a chat, and the reply is sampled with
the default settings (temperature 0.8, top-k 50, top-p 0.95, repetition penalty 1.1,
at most 200 tokens), one fixed seed per opening. Over the replies:

- English words: the share of reply words that ``wordfreq`` knows in English (a Zipf
  frequency above 0; numbers are not counted). Gibberish such as "Pincience" scores 0.
- Turn end: the share of replies the model ended itself with ``<|end|>`` within the
  200 tokens; role leaks: replies that wrote another role's token or a "User:" line.
- Distinct-2: distinct word bigrams over all bigrams of all replies (1.0: no bigram
  repeats; low values mean the model says the same thing to everyone).
- Mean reply length in words.
- Held-out assistant bits per byte: the loss on the assistant replies of conversations
  held out of fine-tuning (given with ``--held-out builtin`` or a conversation file).

wordfreq is a benchmark dependency (requirements-bench.txt), not a runtime one.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.data.chat_format import Message, render  # noqa: E402
from engine.data.chat_windows import ChatDataset  # noqa: E402
from engine.data.conversations import open_conversations, split_conversations  # noqa: E402
from engine.runtime import hardware  # noqa: E402
from response_generator import GenerationConfig, ResponseGenerator  # noqa: E402
from trainer import Trainer, estimate_loss  # noqa: E402

# Everyday first lines of a conversation, written for this measure.
OPENINGS = [
    "Hi! How has your week been so far?", "Good morning, did you sleep well?", "Hey, what are you up to tonight?",
    "What did you have for breakfast today?", "Have you seen any good movies lately?",
    "I just got back from a long walk in the park.", "What kind of music do you listen to when you work?",
    "Do you prefer cats or dogs?", "It has been raining all day here.", "Any plans for the holidays?",
    "I'm thinking about learning to play the guitar.", "What's your favourite thing to cook?",
    "Have you ever been to the ocean?", "My neighbour's dog kept me up all night.",
    "What do you usually do on Sunday afternoons?", "I finally finished the book I was reading.",
    "Do you like hiking?", "Guess what happened to me at the grocery store today.", "I'm so tired after work today.",
    "Is it cold where you live?", "Do you play any video games?", "What's the last trip you took?",
    "I started going to the gym again.", "Coffee or tea in the morning?", "Do you have any brothers or sisters?",
    "What did you want to be when you were a kid?", "I burned my toast this morning.",
    "Have you tried any new restaurants recently?", "What's your favourite season and why?",
    "My car broke down on the way home.", "Do you watch any sports?", "I can't decide what to have for dinner.",
    "What's something that made you laugh this week?", "Are you a morning person?",
    "I just adopted a kitten!", "What's your favourite kind of weather?", "Do you like to read before bed?",
    "How do you relax after a stressful day?", "I'm planning a picnic for Saturday.",
    "What's the best advice anyone ever gave you?", "Do you enjoy going to concerts?",
    "My phone battery died in the middle of the day.", "Have you ever tried painting?",
    "What's your go-to snack?", "I got a new job offer today!", "Do you like spicy food?",
    "What's a skill you'd love to learn?", "The traffic this morning was terrible.",
    "Do you have a favourite board game?", "What are you most looking forward to this month?",
    "I just moved to a new apartment.", "Do you remember your first pet?", "What's your favourite dessert?",
    "I've been baking bread lately.", "Would you rather live in the city or the countryside?",
    "How was your weekend?", "I'm learning a new language this year.", "What makes a good friend, in your opinion?",
    "Do you like going to the beach?", "I forgot my umbrella and got soaked.",
    "What's the most interesting place you've visited?", "Do you ever take naps in the afternoon?",
    "I think I'm catching a cold.", "What's your favourite holiday tradition?", "Do you like to dance?",
    "My sister is getting married next month.", "What do you think about working from home?",
    "Have you ever grown your own vegetables?", "I watched the sunrise this morning.",
    "What's a movie you could watch over and over?", "Do you have any hobbies?",
    "I just got back from visiting my grandparents.", "What's the weather like today?",
    "Do you prefer summer or winter?", "I ran my first five kilometres today.",
    "What's your favourite animal?", "Do you like trying new foods?", "I can't stop listening to this one song.",
    "What would you do with a free day?", "Do you drink a lot of water?", "My plants keep dying.",
    "What was your favourite subject in school?", "Are you good at keeping secrets?",
    "I'm nervous about my exam tomorrow.", "Do you believe in luck?", "What's the best gift you've ever received?",
    "I just cleaned my whole house.", "I finally fixed the leaky tap in my kitchen.", "What's something you're proud of?",
    "My friend just told me a terrible joke.", "Do you follow the news much?",
    "What's your favourite way to spend an evening?", "I think I need a vacation.",
    "Have you ever been on a boat?", "What do you like about your hometown?", "I'm trying to eat healthier.",
    "Do you have a favourite colour?", "What's the funniest thing that happened to you recently?",
    "Nice to meet you! Where are you from?", "What song has been stuck in your head lately?",
]
WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")
REPLY_TOKENS = GenerationConfig().max_new_tokens  # the length limit a user gets


@dataclass(frozen=True)
class Reply:
    opening: str
    text: str
    ended: bool  # the model closed its turn (<|end|>, or end of text) within the limit
    leaked: bool  # it wrote another role's token or a "User:" line


@dataclass(frozen=True)
class ReplyQuality:
    replies: int
    english_words: float
    turn_end: float
    role_leaks: float
    distinct_2: float
    mean_words: float
    held_out_bpb: float | None = None
    left_out_openings: int = 0  # openings found word for word in the training conversations


def words(text: str) -> list[str]:
    """The words of a text (letters and inner apostrophes), lower-cased; numbers are not words."""
    return [w.lower() for w in WORD.findall(text)]


def english_share(texts: list[str]) -> float:
    """Share of the words of ``texts`` that wordfreq knows in English (0.0 with no words at all)."""
    try:
        from wordfreq import zipf_frequency
    except ImportError:
        raise SystemExit("the reply measure needs wordfreq: python -m pip install -r requirements-bench.txt") from None

    all_words = [w for t in texts for w in words(t)]
    if not all_words:
        return 0.0
    known = {w: zipf_frequency(w, "en") > 0 for w in set(all_words)}
    return sum(known[w] for w in all_words) / len(all_words)


def distinct_2(texts: list[str]) -> float:
    """Distinct word bigrams over all word bigrams, across every text (0.0 with no bigram)."""
    bigrams = [pair for t in texts for pair in zip(words(t), words(t)[1:])]
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def summarize(replies: list[Reply], held_out_bpb: float | None = None, left_out: int = 0) -> ReplyQuality:
    texts = [r.text for r in replies]
    n = max(1, len(replies))
    return ReplyQuality(replies=len(replies), english_words=english_share(texts),
                        turn_end=sum(r.ended for r in replies) / n, role_leaks=sum(r.leaked for r in replies) / n,
                        distinct_2=distinct_2(texts), mean_words=statistics.fmean(len(words(t)) for t in texts)
                        if texts else 0.0, held_out_bpb=held_out_bpb, left_out_openings=left_out)


def fresh_openings(conversations: list[list[Message]]) -> tuple[list[str], int]:
    """The openings no training conversation contains word for word (case and spacing aside)."""
    def key(text: str) -> str:
        return " ".join(text.lower().split())

    seen = {key(m.content) for conv in conversations for m in conv}
    kept = [o for o in OPENINGS if key(o) not in seen]
    return kept, len(OPENINGS) - len(kept)


def sample_replies(gen: ResponseGenerator, openings: list[str], limit: int = REPLY_TOKENS) -> list[Reply]:
    """One reply per opening, default sampling settings, seed i for opening i."""
    chat = gen.chat_ids
    replies = []
    for i, opening in enumerate(openings):
        cfg = GenerationConfig(max_new_tokens=limit, seed=i)
        if chat is not None:
            ids = gen.fit_prompt(render(gen.tokenizer, chat, [Message("user", opening)], open_reply=True)[0], limit)
            out = list(gen.generate_ids(ids, cfg, stop_ids=frozenset({chat.end})))
            text = gen.tokenizer.decode(out).strip()
            ended = gen.finish_reason == "stop"
            leaked = chat.user in out or chat.system in out or chat.assistant in out or "User:" in text
        else:  # a model never fine-tuned on conversations: the plain prompt Chat uses for it
            text = "".join(gen.chat([Message("user", opening)], cfg)).strip()
            ended = gen.last_stats.finish_reason == "stop"
            leaked = "User:" in text
        replies.append(Reply(opening, text, ended, leaked))
    return replies


def held_out_bpb(folder: Path, conversations: list[list[Message]], runtime) -> float:
    """Bits per byte of the assistant replies of the conversations fine-tuning holds out."""
    trainer = Trainer(str(folder), runtime=runtime)
    trainer.load()
    tok = trainer.tokenizer
    _, held_out = split_conversations(conversations, trainer.config.seed)
    data = ChatDataset.build(tok, tok.chat_token_ids(), [], held_out, trainer.model.config.context)
    return estimate_loss(trainer.model, data.val_batches(8), runtime, tok.token_bytes()).bpb


def measure(folder: Path, conversations: list[list[Message]] | None = None) -> tuple[ReplyQuality, list[Reply]]:
    """Reply quality of the model in ``folder``; ``conversations``: what it was fine-tuned on."""
    runtime = hardware.detect_runtime()
    gen = ResponseGenerator(str(folder), runtime)
    openings, left_out = fresh_openings(conversations or [])
    replies = sample_replies(gen, openings)
    bpb = held_out_bpb(folder, conversations, runtime) if conversations and gen.chat_ids is not None else None
    return summarize(replies, bpb, left_out), replies


def print_quality(label: str, q: ReplyQuality) -> None:
    bpb = f"{q.held_out_bpb:.3f}" if q.held_out_bpb is not None else "-"
    print(f"{label}: English words {q.english_words:.1%} | turn end {q.turn_end:.1%} | role leaks "
          f"{q.role_leaks:.1%} | distinct-2 {q.distinct_2:.3f} | mean reply {q.mean_words:.1f} words | held-out "
          f"assistant {bpb} bits/byte | {q.replies} openings ({q.left_out_openings} left out: in the data)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model_dir")
    p.add_argument("--held-out", default="", metavar="FILE",
                   help="the conversations the model was fine-tuned on ('builtin': the built-in set); "
                        "their held-out part gives the bits per byte, and openings found in them are left out")
    p.add_argument("--json", help="write the numbers and the replies here")
    p.add_argument("--show", type=int, default=5, help="print this many replies")
    args = p.parse_args()
    conversations = None
    if args.held_out:
        conversations = open_conversations("" if args.held_out == "builtin" else args.held_out).conversations
    quality, replies = measure(Path(args.model_dir), conversations)
    for r in replies[:args.show]:
        print(f"> {r.opening}\n  {r.text!r}")
    print_quality(Path(args.model_dir).name, quality)
    if args.json:
        Path(args.json).write_text(json.dumps({"quality": asdict(quality), "replies": [asdict(r) for r in replies]},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
