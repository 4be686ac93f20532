"""What the console entry points share: the command line, the chat console, the display.

The menu (``interface.py``) and the command line (``cli``) are two ways in to the same
actions. May import every other package; nothing in the engine imports this one.
"""
