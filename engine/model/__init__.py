"""The network: its config, its layers, ``GPT`` for training and ``Decoder`` for generation.

Owns every tensor computation of the model. Imports only PyTorch: it is the bottom of
the engine, and every other package may import it.
"""
