"""Moved to :mod:`tooling.postgres`; kept for the callers that import it from here."""

from tooling.postgres import APP_ROLE, PrivatePostgres

__all__ = ["APP_ROLE", "PrivatePostgres"]
