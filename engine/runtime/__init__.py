"""The machine the program runs on: device and precision, a torchrun job's processes, the file system.

Owns ``hardware`` (the one place that decides device, dtype and size presets),
``distributed`` (joining torchrun's process group, bounded waits, rank 0's files for
the others) and ``storage`` (atomic writes, journaled multi-file commits, loading
tensors without running code). May import ``engine.model`` only.
"""
