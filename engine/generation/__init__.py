"""Generation: choosing tokens, turning them into text, and Q&A, chat and completion.

Owns ``sampling`` (``GenerationConfig``, ``sample_next_token``), ``streaming`` (ids to
safe text) and ``generator`` (``ResponseGenerator``, ``ChatSession``). May import
``engine.model``, ``engine.runtime``, ``engine.data`` and ``engine.folder``.
"""
