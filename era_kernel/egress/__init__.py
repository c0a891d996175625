"""Egress: the policy of where a session's code may connect out (policy.py) and the
proxy that enforces it, the sandbox's only way out (proxy.py, gate.py)."""
