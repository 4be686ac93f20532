"""What the console entry points share: the session, its screens and prompts, the command line.

The menu (``interface.py``) and the command line (``cli``) are two ways in to the same
actions: each makes a ``session.Session``, asks through ``console.Console`` (or reads
its flags, ``flags``), and prints what ``screens`` makes of the result. The chat
console (``chat_repl``), the progress display (``display``), the torchrun entry
(``distributed_training``) and the loss plot (``loss_plot``) sit beside them. May
import every other package; nothing in the engine imports this one.
"""
