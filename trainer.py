"""Training: build or load a model folder, run epochs or a time budget, checkpoint, resume exactly.

The code lives in ``engine/training/``; this module is where the rest of the program
and its users find it:

- ``Trainer`` (``engine/training/trainer.py``): owns one model folder. ``train(source,
  epochs)`` starts a run on that data or resumes the interrupted one exactly (same
  data order, learning-rate schedule and random state); ``train_conversations`` fine-
  tunes on chats; progress goes to a callback, so the caller decides the wording.
- ``TrainConfig`` and ``lr_at`` (``engine/training/config.py``): the training settings
  and the learning-rate schedule.
- ``train_step``, ``accumulate_gradients``, ``make_optimizer`` (``engine/training/step.py``):
  one optimizer step, shared by the Trainer and the benchmark so that the benchmark
  times what trains.
- ``estimate_loss`` (``engine/training/evaluation.py``): held-out loss, perplexity and
  bits per byte.
"""
from engine.training.config import TrainConfig, lr_at
from engine.training.evaluation import estimate_loss
from engine.training.step import accumulate_gradients, make_optimizer, train_step
from engine.training.trainer import Trainer

__all__ = ["TrainConfig", "Trainer", "accumulate_gradients", "estimate_loss", "lr_at", "make_optimizer", "train_step"]
