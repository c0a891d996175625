"""Real processes on loopback for tests and benchmarks: an ERA server, a jupyter_server,
and how to start, reach and stop them.

It lives under tests/ rather than in an installed package so the wheel carries no test
code. pytest imports it as ``tests.support``; bench scripts run from a checkout and put
the repository root on ``sys.path`` first (bench/contenders.py). Nothing here imports
pytest, so a benchmark does not need it.
"""
