"""Profiling helpers behind the "where the time goes" section of benchmarks/README.md.

Each runs on its own from the repository root with the bench environment, for example
`.nox/bench/bin/python -m benchmarks.profiling.middleware_breakdown`. To try a change of the
core without touching the checkout, copy `core/src/alchemy_scope` to a scratch directory,
edit it there and put that directory first: `PYTHONPATH=/tmp/patched:. ...`.
"""
