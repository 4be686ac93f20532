"""The benchmark's parts; ``bench.py`` at the top of the project is the script that runs them.

One module per section (``training``, ``generation``, ``data_path``, ``reference``,
``quality``, ``server_load``), what they share about the machine (``machine``: how
busy it is, its matrix-product rate), running them in order (``sections``) and
printing the report (``report``). This package measures the program and is not part
of it: it imports ``engine`` and the top-level modules (``model``, ``trainer``,
``response_generator``, ``interface`` as a child process), and nothing imports it
but ``bench.py``.
"""
