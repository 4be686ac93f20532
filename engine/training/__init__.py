"""Training: a run's parts, the ``Trainer`` that wires them, time budgets and continual learning.

May import ``engine.model``, ``engine.runtime``, ``engine.data`` and ``engine.folder``;
never generation, export, serving or the console.
"""
