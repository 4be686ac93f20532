"""The library behind custom-llm's entry points (the menu, the command line, the server).

Packages by job, listed from the bottom up. Each may import the packages listed above
it and never one below it, and nothing here imports the top-level modules
(``interface``, ``model``, ``trainer``, ``response_generator``): those are the faces
over this package. ``tests/test_layout.py`` checks both rules.

==============  ================================================================
``model``       the network: ``ModelConfig``, ``GPT``, the generation ``Decoder``
``runtime``     the machine: device and precision, the processes of a torchrun
                job, files written atomically
``data``        text and conversations in, tokenizers, token windows, chat format
``folder``      the model folder on disk: its files, saves, records and status
``training``    a training run in parts, the ``Trainer`` that wires them, time
                budgets, continual learning
``generation``  sampling, streaming text, Q&A / chat / completion
``export``      the model for transformers (a folder) and llama.cpp (GGUF)
``serving``     the OpenAI-compatible HTTP server
``app``         what the console entry points share: the session, the command
                line, the chat console, the display
==============  ================================================================

``training``, ``generation`` and ``export`` sit side by side: none imports another.
"""
