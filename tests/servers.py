"""Real servers for end-to-end tests: uvicorn and hypercorn on 127.0.0.1, in this event loop.

The same servers as the benchmarks' and the reliability checks' (see tooling/servers.py).
"""

from tooling.servers import hypercorn_server, uvicorn_server

__all__ = ["hypercorn_server", "uvicorn_server"]
