"""Growing a trained tokenizer without moving any existing token.

BPE: the old merges are applied to the new data first (that is the old tokenizer's
segmentation), then merging continues on what is left. New merges rank after every
old merge and new tokens get ids after every old id, so old ids keep their meaning.

SentencePiece: the same merge learning runs on the new data as segmented by the old
model, and each merged piece is appended to the model proto with a score below every
existing piece, so old text keeps its segmentation wherever a new piece does not
save tokens.

Either way the caller gets the grown tokenizer plus, for each new token, the old
ids it is made of (to initialise its embedding as their mean).
"""
from __future__ import annotations

import heapq
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from engine.data.chat_format import CHAT_TOKENS
from engine.data.tokenizer import (
    BaseTokenizer,
    BPETokenizer,
    SentencePieceTokenizer,
    chunk_text,
)


@dataclass
class Expansion:
    tokenizer: BaseTokenizer
    added: list[str]  # readable form of each new token, in id order
    parts: list[list[int]] = field(default_factory=list)  # old ids each new token is made of

    @property
    def n_added(self) -> int:
        return len(self.added)


def expand_tokenizer(old: BaseTokenizer, texts: list[str], max_new: int = 1000,
                     min_frequency: int = 3) -> Expansion:
    """Grow ``old`` with at most ``max_new`` tokens frequent in ``texts``."""
    if max_new < 1:
        raise ValueError("the number of new tokens must be at least 1")
    if isinstance(old, BPETokenizer):
        return _expand_bpe(old, texts, max_new, min_frequency)
    if isinstance(old, SentencePieceTokenizer):
        return _expand_sentencepiece(old, texts, max_new, min_frequency)
    raise TypeError(f"cannot expand a {type(old).__name__}")


# -- BPE ---------------------------------------------------------------------------------


def learn_merges(words: Counter, known: set[str], max_new: int, min_frequency: int) -> list[tuple[str, str]]:
    """Continue BPE on ``words`` (tuples of current symbols -> count).

    Returns new merges in order. A pair whose concatenation is already a token is
    never merged: an old merge could then apply after it and the learner's picture
    of the segmentation would no longer match the tokenizer's.

    >>> learn_merges(Counter({("a", "b", "c"): 5, ("a", "b"): 2}), {"a", "b", "c"}, 5, 2)
    [('a', 'b'), ('ab', 'c')]
    """
    symbols = [list(w) for w in words]
    counts = list(words.values())
    pair_count: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, sym in enumerate(symbols):
        for pair in zip(sym, sym[1:]):
            pair_count[pair] += counts[i]
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in pair_count.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    made: set[str] = set()
    while heap and len(merges) < max_new:
        neg, pair = heapq.heappop(heap)
        if -neg != pair_count.get(pair, 0):
            continue  # a stale heap entry; the current count was pushed separately
        if -neg < min_frequency:
            break
        joined = pair[0] + pair[1]
        if joined in known or joined in made:
            pair_count.pop(pair)
            continue
        merges.append(pair)
        made.add(joined)
        touched: set[tuple[str, str]] = set()
        for i in list(where.pop(pair, ())):
            sym, c = symbols[i], counts[i]
            for p in zip(sym, sym[1:]):
                pair_count[p] -= c
                touched.add(p)
            merged, j = [], 0
            while j < len(sym):
                if j + 1 < len(sym) and (sym[j], sym[j + 1]) == pair:
                    merged.append(joined)
                    j += 2
                else:
                    merged.append(sym[j])
                    j += 1
            symbols[i] = merged
            for p in zip(merged, merged[1:]):
                pair_count[p] += c
                where[p].add(i)
                touched.add(p)
        pair_count.pop(pair, None)
        for p in touched:
            if pair_count.get(p, 0) > 0:
                heapq.heappush(heap, (-pair_count[p], p))
    return merges


def _expand_bpe(old: BPETokenizer, texts: list[str], max_new: int, min_frequency: int) -> Expansion:
    hf = old._tok
    words: Counter = Counter()
    for text in texts:
        for chunk in chunk_text(text):
            words.update(w for w, _ in hf.pre_tokenizer.pre_tokenize_str(chunk))
    vocab = hf.get_vocab()
    segmented: Counter = Counter()
    for word, count in words.items():
        segmented[tuple(t.value for t in hf.model.tokenize(word))] += count
    merges = learn_merges(segmented, set(vocab), max_new, min_frequency)
    spec = json.loads(hf.to_str())
    model = spec["model"]
    as_strings = bool(model["merges"]) and isinstance(model["merges"][0], str)
    next_id = max(vocab.values()) + 1
    added, parts = [], []
    for a, b in merges:
        token = a + b
        model["vocab"][token] = next_id
        next_id += 1
        model["merges"].append(f"{a} {b}" if as_strings else [a, b])
        added.append(token)
        parts.append([vocab[t.value] for t in hf.model.tokenize(token)])
    grown = BPETokenizer.from_bytes(json.dumps(spec, ensure_ascii=False).encode("utf-8"))
    readable = [grown.decode([grown._tok.token_to_id(t)]) for t in added]
    return Expansion(grown, readable, parts)


# -- SentencePiece -------------------------------------------------------------------------


def _spm_words(old: SentencePieceTokenizer, texts: list[str]) -> Counter:
    """New text as words, each a tuple of the old model's pieces.

    A word starts at a piece that begins with the space marker; newline and byte
    pieces stand alone (a byte piece is not text, so it must not be merged).
    """
    sp = old._sp
    words: Counter = Counter()
    for ids in old.encode_batch([c for t in texts for c in chunk_text(t)]):
        word: list[str] = []
        for i in ids:
            piece = sp.id_to_piece(i)
            alone = sp.is_byte(i) or sp.is_control(i) or piece == "\n"
            if word and (alone or piece.startswith("\u2581")):
                words[tuple(word)] += 1
                word = []
            if not alone:
                word.append(piece)
        if word:
            words[tuple(word)] += 1
    return words


def _expand_sentencepiece(old: SentencePieceTokenizer, texts: list[str], max_new: int,
                          min_frequency: int) -> Expansion:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(old.to_bytes())
    existing = {p.piece for p in proto.pieces}
    merges = learn_merges(_spm_words(old, texts), existing, max_new, min_frequency)
    normal = pb.ModelProto.SentencePiece.Type.NORMAL
    floor = min(p.score for p in proto.pieces if p.type == normal)
    added, parts = [], []
    for rank, (a, b) in enumerate(merges):
        new = proto.pieces.add()
        new.piece = a + b
        # Below every old piece, so old text keeps its segmentation unless a new piece
        # replaces several old ones; earlier merges (more frequent) score higher.
        new.score = floor - 1.0 - rank * 1e-3
        new.type = normal
        added.append(new.piece.replace("\u2581", " "))
        parts.append(old.encode(added[-1]))
    grown = SentencePieceTokenizer(proto.SerializeToString())
    return Expansion(grown, added, parts)


# -- the chat tokens --------------------------------------------------------------------------


def add_chat_tokens(old: BaseTokenizer) -> BaseTokenizer:
    """``old`` with the reserved chat tokens appended as special tokens (new ids at the end).

    Every existing id keeps its meaning. Like the tokens a new tokenizer reserves, they
    are never produced from text: BPE matches no special token in text it encodes, and
    SentencePiece places control pieces only by id.
    """
    if old.chat_token_ids() is not None:
        return old
    if isinstance(old, BPETokenizer):
        spec = json.loads(old.to_bytes())
        next_id = old.vocab_size
        for token in CHAT_TOKENS:
            spec["added_tokens"].append({"id": next_id, "content": token, "single_word": False, "lstrip": False,
                                         "rstrip": False, "normalized": False, "special": True})
            next_id += 1
        return BPETokenizer.from_bytes(json.dumps(spec, ensure_ascii=False).encode("utf-8"))
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(old.to_bytes())
    for token in CHAT_TOKENS:
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = token, 0.0, pb.ModelProto.SentencePiece.Type.CONTROL
    return SentencePieceTokenizer(proto.SerializeToString())


# -- measurements ------------------------------------------------------------------------------


def tokens_per_byte(tok: BaseTokenizer, texts: list[str]) -> float:
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
    return n_tokens / max(1, n_bytes)


def tokenization_drift(old: BaseTokenizer, new: BaseTokenizer, texts: list[str]) -> float:
    """Share of the bytes of ``texts`` whose line now tokenizes differently."""
    lines = [line for t in texts for line in t.splitlines(keepends=True) if line]
    if not lines:
        return 0.0
    changed = sum(len(a.encode("utf-8")) for a, x, y in
                  zip(lines, old.encode_batch(lines), new.encode_batch(lines)) if x != y)
    return changed / max(1, sum(len(a.encode("utf-8")) for a in lines))
