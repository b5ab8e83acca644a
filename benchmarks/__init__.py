"""Benchmarks of alchemy-scope: both commit policies against the framework and the seed's pattern.

Run them with `nox -s bench` (about 1.5 hours, on a quiet machine) or
`nox -s bench -- --quick` (a smoke run); see benchmarks/README.md.
"""
