"""Conversations as training windows, with the loss on the assistant's tokens only.

Each conversation is rendered by ``engine.data.chat_format`` (the same ids Chat builds)
and becomes one or more examples no longer than a window. A conversation longer than
the context is cut at exchange boundaries (a user turn and its reply), each piece
keeping the system message; a single exchange that alone is too long keeps the end
of the question and the start of the reply (then without its ``<|end|>``, so a cut
reply never teaches the model to stop there).

Examples are packed whole into rows of ``context + 1`` ids, padded at the end, and
never split across rows. Each starts with end-of-text, and the model is told where
each one begins (``segments``): its positions restart at 0 and it attends to nothing
of its neighbours, so a packed conversation trains exactly as it is later used, alone
at the start of the context. Targets that are not learned are -1, which the loss ignores.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.data.chat_format import ChatTokenIds, Message
from engine.data.tokenizer import EOT_ID, BaseTokenizer
from engine.data.windows import EpochPlan
from engine.runtime import storage

IGNORE = -1  # the target value the loss skips


@dataclass
class ChatExample:
    ids: list[int]
    targets: list[bool]  # targets[k]: ids[k] is learned (predicted from ids[:k])


def _cut_exchange(user: list[int], reply: list[int], room: int, chat: ChatTokenIds) -> ChatExample:
    """One exchange squeezed into ``room`` ids: the end of the question, the start of the reply."""
    content = room - 5  # <|user|> ... <|end|> <|assistant|> ... <|end|>
    if content < 2:
        raise ValueError(f"a context of {room} tokens is too short for a conversation")
    keep_reply = min(len(reply), max(content // 2, content - len(user)))
    keep_user = min(len(user), content - keep_reply)
    whole_reply = keep_reply == len(reply)
    ids = [chat.user, *user[len(user) - keep_user:], chat.end, chat.assistant, *reply[:keep_reply]]
    targets = [False] * (keep_user + 3) + [True] * keep_reply
    if whole_reply:
        ids.append(chat.end)
        targets.append(True)
    return ChatExample(ids, targets)


def conversation_examples(tok: BaseTokenizer, chat: ChatTokenIds, messages: list[Message],
                          context: int) -> list[ChatExample]:
    """The examples of one conversation, each at most ``context + 1`` ids.

    A conversation that fits gives exactly ``chat_format.render``'s ids and targets.
    """
    limit = context + 1
    system = messages[0] if messages[0].role == "system" else None
    turns = messages[1:] if system else messages
    head = [tok.eot_id]
    if system:
        head += [chat.system, *tok.encode(system.content), chat.end]
        if len(head) > limit // 2:  # a system message that leaves no room for turns is left out
            head = [tok.eot_id]
    encoded = [tok.encode(m.content) for m in turns]
    examples: list[ChatExample] = []
    current = ChatExample(list(head), [False] * len(head))
    for i in range(0, len(turns) - 1, 2):  # (user, reply) pairs; a trailing question is dropped
        user, reply = encoded[i], encoded[i + 1]
        part = ChatExample([chat.user, *user, chat.end, chat.assistant, *reply, chat.end],
                           [False] * (len(user) + 3) + [True] * (len(reply) + 1))
        if len(head) + len(part.ids) > limit:
            part = _cut_exchange(user, reply, limit - len(head), chat)
        if len(current.ids) + len(part.ids) > limit:
            examples.append(current)
            current = ChatExample(list(head), [False] * len(head))
        current.ids += part.ids
        current.targets += part.targets
    if len(current.ids) > len(head):
        examples.append(current)
    return examples


def pack_rows(examples: list[ChatExample], context: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Whole examples packed first-fit, in order, into rows of ``context + 1`` ids.

    Returns (ids, targets): int64 ids padded with ``pad_id`` and bool targets.
    """
    limit = context + 1
    rows: list[tuple[list[int], list[bool]]] = []
    for ex in examples:
        if not rows or len(rows[-1][0]) + len(ex.ids) > limit:
            rows.append(([], []))
        rows[-1][0].extend(ex.ids)
        rows[-1][1].extend(ex.targets)
    ids = np.full((len(rows), limit), pad_id, dtype=np.int64)
    targets = np.zeros((len(rows), limit), dtype=bool)
    for r, (row_ids, row_targets) in enumerate(rows):
        ids[r, :len(row_ids)] = row_ids
        targets[r, :len(row_targets)] = row_targets
    return ids, targets


def inputs_and_targets(ids: np.ndarray, targets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, y, segments) for rows: y is the next id where it is learned, else IGNORE.

    Every example starts with end-of-text and holds no other, so counting them labels
    the examples of a row: the model then keeps each one to itself (``GPT.forward``).
    """
    x = torch.from_numpy(ids[:, :-1].copy())
    y = torch.from_numpy(np.where(targets[:, 1:], ids[:, 1:], IGNORE))
    segments = torch.from_numpy(np.cumsum(ids[:, :-1] == EOT_ID, axis=1))
    return x, y, segments


class ChatDataset:
    """Packed conversation rows, split into training and held-out conversations.

    Offers what the Trainer's loop needs from a dataset (``epoch_plan``,
    ``train_batch``, ``val_batches``, ``window``, ``n_train_tokens``).
    """

    def __init__(self, train_ids: np.ndarray, train_targets: np.ndarray, val_ids: np.ndarray,
                 val_targets: np.ndarray) -> None:
        self.train_ids, self.train_targets = train_ids, train_targets
        self.val_ids, self.val_targets = val_ids, val_targets
        self.window = train_ids.shape[1] - 1
        self.shortened = False

    @classmethod
    def build(cls, tok: BaseTokenizer, chat: ChatTokenIds, train: list[list[Message]], val: list[list[Message]],
              context: int) -> ChatDataset:
        """Render and pack the training and the held-out conversations."""
        parts = []
        for convs in (train, val):
            examples = [ex for c in convs for ex in conversation_examples(tok, chat, c, context)]
            parts.append(pack_rows(examples, context, tok.pad_id))
        return cls(*parts[0], *parts[1])

    @property
    def n_train_tokens(self) -> int:
        """Ids one epoch feeds the model (rows x window, padding included)."""
        return len(self.train_ids) * self.window

    def epoch_plan(self, seed: int, epoch: int, batch_size: int) -> EpochPlan:
        rng = np.random.default_rng([seed, epoch, 3])
        return EpochPlan(0, rng.permutation(len(self.train_ids)), min(batch_size, len(self.train_ids)))

    def train_batch(self, plan: EpochPlan, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = plan.batch_windows(i)
        return inputs_and_targets(self.train_ids[rows], self.train_targets[rows])

    def val_batches(self, batch_size: int, max_batches: int | None = None):
        for b, start in enumerate(range(0, len(self.val_ids), batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            yield inputs_and_targets(self.val_ids[start:start + batch_size], self.val_targets[start:start + batch_size])

    def val_batch_count(self, batch_size: int, max_batches: int) -> int:
        """How many batches ``val_batches(batch_size, max_batches)`` yields (a time budget keeps time for them)."""
        return min(max_batches, -(-len(self.val_ids) // batch_size))

    # -- the cache that makes a resume exact ---------------------------------------------------
    def save(self, path: Path) -> None:
        def write(f) -> None:
            buf = io.BytesIO()
            np.savez(buf, train_ids=self.train_ids, train_targets=self.train_targets,
                     val_ids=self.val_ids, val_targets=self.val_targets)
            f.write(buf.getvalue())

        storage.atomic_write(path, write)

    @classmethod
    def load(cls, path: Path) -> ChatDataset:
        if not path.exists():
            raise FileNotFoundError(f"the conversation cache {path.name} is gone; train on the conversations again")
        try:
            with np.load(path, allow_pickle=False) as data:  # plain arrays only: nothing is executed
                return cls(data["train_ids"], data["train_targets"], data["val_ids"], data["val_targets"])
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"the conversation cache {path.name} is damaged ({exc}); delete it and train on "
                             "the conversations again") from None
