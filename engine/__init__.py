"""The engine behind the rooms: text sources, tokenizers, token windows, the model folder,
safe storage, exports, device choice and console output. Nothing in here imports a room other
than ``model.py``; the rooms (``trainer.py``, ``response_generator.py``, ``interface.py``,
``cli.py``) import it."""
