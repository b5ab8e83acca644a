"""Benchmarks of alchemy-scope: each adapter against its bare framework and the alternatives.

Run them with `nox -s bench` (about 10 minutes) or `nox -s bench -- --quick` (a one-minute
smoke run); see benchmarks/README.md.
"""
