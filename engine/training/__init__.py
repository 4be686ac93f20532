"""Training: a run's parts, the ``Trainer`` that wires them, time budgets and continual learning.

==================  ==============================================================
``config``          ``TrainConfig``, a new model's recipe (``NEW_MODEL_RECIPE``),
                    the learning-rate schedule ``lr_at``, call limits
``runs``            where a run stands (``RunState``, ``Progress``), why it stops
                    (``StopReason``, ``StopCheck``), a time budget's clock
``events``          what training reports while it runs, and what a call returns
``step``            one optimizer step, shared with the benchmark, and its fallbacks
``evaluation``      held-out loss, perplexity and bits per byte
``checkpoint``      the training state: saved to the folder, loaded, sent to ranks
``planning``        a new model's tokenizer and shape, a budget's plan, a run's schedule
``budget``          the rules that turn minutes into a model shape and vocabulary
``loop``            the epochs of one run, on every rank alike
``dataset_memory``  what the model keeps of each data set: held-out text, rehearsal
``trainer``         the ``Trainer`` façade over one model folder
``continual``       teaching a trained model new material, before and after
==================  ==============================================================

May import ``engine.model``, ``engine.runtime``, ``engine.data`` and ``engine.folder``;
never generation, export, serving or the console.
"""
