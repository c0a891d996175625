"""Conformance suites: one per interface, parametrized over its backends."""
