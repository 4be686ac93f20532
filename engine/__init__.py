"""The engine behind the four rooms: text sources, tokenizers, token windows, the model folder,
safe storage, device choice and console output. Nothing in here imports a room other than
``model.py``; the rooms (``trainer.py``, ``response_generator.py``, ``interface.py``) import it."""
