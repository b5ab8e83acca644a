"""Where ScopeMiddleware's time goes: pass-through middlewares that do a little more each.

`python -m benchmarks.profiling.middleware_breakdown [ROUNDS] [CALLS]`: each step adds one
piece of what `ScopeMiddleware` does around an ASGI app that answers at once, in interleaved
rounds; it prints the nanoseconds each adds to the bare app (median of the rounds).
"""

from __future__ import annotations

import statistics
import sys
from contextvars import ContextVar
from typing import Any

import uvloop

from alchemy_scope import ScopeMiddleware
from alchemy_scope._core import Scope, _current_scope
from benchmarks.micro import PassThrough, bare, interleaved

marker: ContextVar[int | None] = ContextVar("marker", default=None)


class TypeCheck(PassThrough):
    """+ the check of the scope type."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        await self.app(scope, receive, send)


class ContextVarSetReset(PassThrough):
    """+ a ContextVar set before the app and reset after it."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        token = marker.set(1)
        try:
            await self.app(scope, receive, send)
        finally:
            marker.reset(token)


class SlottedScope:
    """A `Scope` stand-in with `__slots__`."""

    __slots__ = ("_opened", "_token", "closed")

    def __init__(self) -> None:
        self._opened = ()
        self.closed = False


class ScopeObject(PassThrough):
    """+ a `Scope` in the ContextVar, its `_token` and `closed` set, as ScopeMiddleware does."""

    def __init__(self, app: Any, scope_class: type[Any] = Scope) -> None:
        super().__init__(app)
        self.scope_class = scope_class

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        current = self.scope_class()
        token = current._token = _current_scope.set(current)
        try:
            await self.app(scope, receive, send)
        finally:
            current.closed = True
            _current_scope.reset(token)


STEPS = {
    "bare ASGI app": bare,
    "pass-through middleware": PassThrough(bare),
    "+ scope type check": TypeCheck(bare),
    "+ ContextVar set/reset": ContextVarSetReset(bare),
    "+ Scope object, _token, closed": ScopeObject(bare),
    "  (the same, __slots__ class)": ScopeObject(bare, SlottedScope),
    "ScopeMiddleware": ScopeMiddleware(bare),
}


def main() -> None:
    """Print the nanoseconds each step adds to the bare app."""
    rounds, calls = (int(arg) for arg in (sys.argv[1:] or ["30", "100000"]))
    samples = uvloop.run(
        interleaved({name: (app, False) for name, app in STEPS.items()}, rounds, calls)
    )
    bare_samples = samples["bare ASGI app"]
    for name, values in samples.items():
        pairs = zip(values, bare_samples, strict=True)
        added = statistics.median(mine - theirs for mine, theirs in pairs)
        print(f"{name:34} {statistics.median(values):6.0f} ns  {added:+5.0f} ns")


if __name__ == "__main__":
    main()
