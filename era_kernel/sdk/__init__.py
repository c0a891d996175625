"""Client libraries that code in a session imports (``era_storage``), kept as plain files
the kernels load from these directories: ``python/`` (on ``PYTHONPATH``) and ``node/``
(on ``NODE_PATH``). They depend on nothing but the language's standard library."""

from pathlib import Path

PYTHON_DIR = Path(__file__).parent / "python"
NODE_DIR = Path(__file__).parent / "node"
