"""Generation: choosing tokens, turning them into text, and Q&A, chat and completion.

Owns ``sampling`` (``GenerationConfig``, ``sample_next_token``), ``streaming`` (ids to
safe text), ``prompts`` (a request's prompt, fitted: ``PreparedRequest``),
``token_loop`` (one generation a step at a time: ``TokenLoop``, ``Reply``) and
``generator`` (``ResponseGenerator``, ``ChatSession``: one answer at a time). May import
``engine.model``, ``engine.runtime``, ``engine.data`` and ``engine.folder``.
"""
