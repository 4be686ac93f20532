"""Export: a trained model for other programs, as a transformers folder or a GGUF file.

Owns ``model_export`` (the one export call, and where an export may be written),
``hf_folder`` (the Hugging Face layout) and ``gguf_file`` (llama.cpp's format). May
import ``engine.model``, ``engine.runtime``, ``engine.data`` and ``engine.folder``.
"""
