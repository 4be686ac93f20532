"""What every console entry point shares: the errors a user can cause.

Anything a user can cause (a bad path, a full disk, a diverging loss) is shown as one
line, after which the menu carries on and the command line exits with status 1;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, OSError, MemoryError)
