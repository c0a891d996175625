"""The provisioner suites' fixtures (tests/conformance/provisioners.py)."""

from .provisioners import backend, place, shared  # noqa: F401  (fixtures)
