"""The model folder, the unit of persistence: its files, how a save is committed, what it records.

Owns ``model_folder`` (every file's name and format, loading and verifying a save,
the status read without loading weights) and ``records`` (the typed rows kept as
JSON: evaluations, data sets, runs). May import ``engine.model``, ``engine.runtime``
and ``engine.data``.
"""
