"""The model folder, the unit of persistence: its files, how a save is committed, what it records.

Owns ``model_folder`` (every file's name and format, loading and verifying a save,
the status read without loading weights) and ``records`` (what is kept as JSON, typed:
config.json's ``FolderMeta``, the ``History`` of steps, evaluations and runs, the data
sets, and the status read back). May import ``engine.model``, ``engine.runtime``
and ``engine.data``.
"""
