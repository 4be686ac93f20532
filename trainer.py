"""Training: build or load a model folder, run epochs or a time budget, checkpoint, resume exactly.

The code lives in ``engine/training/``; this module is where the rest of the program
and its users find it:

- ``Trainer`` (``engine/training/trainer.py``): owns one model folder. ``train(source,
  epochs)`` starts a run on that data or resumes the interrupted one exactly (same
  data order, learning-rate schedule and random state); ``train_conversations`` fine-
  tunes on chats; progress goes to a callback, so the caller decides the wording.
- ``TrainConfig`` and ``lr_at``: the training settings and the learning-rate schedule.
- ``train_step``, ``accumulate_gradients``, ``make_optimizer``: one optimizer step,
  shared by the Trainer and the benchmark so that the benchmark times what trains.
- ``estimate_loss``: held-out loss, perplexity and bits per byte.
"""
from engine.training.trainer import (
    TrainConfig,
    Trainer,
    accumulate_gradients,
    estimate_loss,
    lr_at,
    make_optimizer,
    train_step,
)

__all__ = ["TrainConfig", "Trainer", "accumulate_gradients", "estimate_loss", "lr_at", "make_optimizer", "train_step"]
