"""Reliability checks: every example through a real server, under load and faults.

Run them with ``nox -s reliability`` (``-- --quick`` for a smoke run); see README.md.
"""
