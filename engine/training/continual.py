"""Continuous learning: teach a trained model new material without losing the old.

One workflow above the Trainer: measure every data set the model has seen, grow the
vocabulary for the new text (optional), train on it while replaying earlier data
(rehearsal, on by default in ``TrainConfig``), then measure again. The report holds
the before/after table, so the menu can show what was gained and what was kept.
"""
from __future__ import annotations

from engine.data.sources import Source, source_from_texts
from engine.training.events import ContinualReport, DatasetComparison, OnEvent, ignore_events
from engine.training.planning import GROWTH_SAMPLE_BYTES
from engine.training.runs import StopFlag
from engine.training.trainer import Trainer


def train_on_new_data(trainer: Trainer, new_data: list[str] | Source, epochs: int = 5, expand_vocab: bool = True,
                      max_new_tokens: int = 1000, on_event: OnEvent = ignore_events,
                      stop: StopFlag | None = None, minutes: float = 0.0) -> ContinualReport:
    """Optional vocabulary growth, then training with rehearsal; a before/after report.

    ``minutes`` > 0 trains for that time instead of ``epochs`` (the model keeps its size)."""
    source = new_data if isinstance(new_data, Source) else source_from_texts(new_data, name="new text")
    with trainer.folder.writer_lock():  # one writer for the whole workflow
        trainer.load()
        before = trainer.evaluate_datasets()
        growth = None
        if expand_vocab:
            texts = list(source.sample_for_tokenizer(GROWTH_SAMPLE_BYTES))
            growth = trainer.grow_vocabulary(texts, max_new_tokens, on_event)
        result = trainer.train(source, epochs, on_event, stop, minutes)
        after = trainer.evaluate_datasets()
        trainer.remember_results(after)
    table = [DatasetComparison(name, before.get(name), res) for name, res in after.items()]
    return ContinualReport(growth, result, table)
