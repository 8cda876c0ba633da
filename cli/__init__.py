"""The ``surgery`` command-line interface (installed as ``robust_surgery.cli``)."""
