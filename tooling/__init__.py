"""The harness that benchmarks/, reliability/ and the tests share.

Real servers on loopback ports, an in-process ASGI driver, memory figures, and the pieces of
reports.
"""
