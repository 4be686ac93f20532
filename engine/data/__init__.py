"""Data in: training text and conversations, tokenizers, token windows and the chat format.

Owns where text comes from (``sources``; ``conversations``, in the forms
``conversation_formats`` reads: OpenAI, ShareGPT, Alpaca), the two tokenizers and
their growth (``tokenizer``, ``vocab_growth``), the one chat format (``chat_format``)
and how text and conversations become training rows (``windows``, ``chat_windows``).
May import ``engine.model`` and ``engine.runtime``.
"""
