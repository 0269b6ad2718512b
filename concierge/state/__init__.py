"""State backends and the URL that chooses one.

`CONCIERGE_STATE_URL` (or `state_url=`):

- unset, empty or `memory://` -> `MemoryBackend`
- `sqlite:///relative.db`, `sqlite:////abs/path.db` -> `SQLiteBackend` (the standard `sqlite3` module)
- `postgresql://...`, `postgres://...` -> `PostgresBackend` (asyncpg; the `postgres` extra)
- `redis://...`, `rediss://...` -> `RedisBackend` (redis-py; the `redis` extra)
"""

from __future__ import annotations

import os
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from concierge.errors import ConfigurationError
from concierge.state.base import UNCHANGED, Commit, SessionRecord, StateBackend
from concierge.state.memory import MemoryBackend

__all__ = [
    "ENV_STATE_URL",
    "UNCHANGED",
    "Commit",
    "MemoryBackend",
    "SessionRecord",
    "StateBackend",
    "backend_from_url",
    "redact_url",
]

ENV_STATE_URL = "CONCIERGE_STATE_URL"
SUPPORTED = (
    "memory://, sqlite:///path.db, postgresql://user:password@host:port/db (or postgres://), "
    "redis://[:password@]host:port/db (or rediss://)"
)
POSTGRES_EXTRA = 'pip install "concierge[postgres]"'
REDIS_EXTRA = 'pip install "concierge[redis]"'


def redact_url(url: str) -> str:
    """`url` with any password (in the authority or a `password=` query item) replaced by `***`."""
    if _misread(url):
        url = _mask_loose(url)
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparseable URL>"
    secret_query = [k for k, _ in parse_qsl(parts.query, keep_blank_values=True) if k.lower() in _SECRET_PARAMS]
    if password is None and not secret_query:
        return url  # rebuilding would drop the empty authority of sqlite:///...
    if password is not None:
        host = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    if secret_query:
        items = [(k, "***" if k.lower() in _SECRET_PARAMS else v) for k, v in parse_qsl(parts.query, True)]
        parts = parts._replace(query=urlencode(items, safe="*"))
    return parts.geturl()


_SECRET_PARAMS = frozenset({"password", "sslpassword"})


def url_secrets(url: str) -> set[str]:
    """Every spelling (as written, percent-decoded) of the passwords in `url`, to scrub from driver messages."""
    return _parsed_secrets(url) | _loose_secrets(url)


def _parsed_secrets(url: str) -> set[str]:
    try:
        parts = urlsplit(url)
        found = [parts.password or "", *(v for k, v in parse_qsl(parts.query) if k.lower() in _SECRET_PARAMS)]
    except ValueError:
        return set()
    return {s for p in found if p for s in (p, unquote(p))}


def _loose_secrets(url: str) -> set[str]:
    """What a password written without percent-encoding would be: everything between the first ':' after
    `scheme://` and the last '@'. A '#', '/' or '?' in it ends the authority early, so `urlsplit`
    misreads such a URL (and finds no password, or a piece of one)."""
    _, sep, rest = url.partition("://")
    userinfo, at, _ = rest.rpartition("@")
    _, colon, password = userinfo.partition(":")
    if not (sep and at and colon and password):
        return set()
    return {password, unquote(password)}


def _misread(url: str) -> bool:
    """Whether `url` may hold a password `urlsplit` does not see (written without percent-encoding)."""
    return bool(_loose_secrets(url) - _parsed_secrets(url))


def _mask_loose(url: str) -> str:
    """`url` with everything between the first ':' after `scheme://` and the last '@' replaced by `***`."""
    scheme, _, rest = url.partition("://")
    userinfo, _, host = rest.rpartition("@")
    return f"{scheme}://{userinfo.partition(':')[0]}:***@{host}"


def backend_from_url(url: str | None) -> StateBackend:
    """Build the backend a state URL names (`None` or empty -> memory).

    Raises:
        ConfigurationError: the scheme is not supported or the URL is malformed;
            the message names `CONCIERGE_STATE_URL` and the supported forms, and
            never the password.
    """
    if url is None or not url.strip():
        return MemoryBackend()
    url = url.strip()
    try:
        return _backend_from_url(url)
    except ConfigurationError as exc:
        message = str(exc)
        if _misread(url):  # the parser's own message may hold any piece of it: say only what is wrong
            message = (
                f"{ENV_STATE_URL}={redact_url(url)!r} cannot be parsed; if its password contains '@', ':', '/', "
                f"'?', '#' or '%', write them percent-encoded (%40, %3A, %2F, %3F, %23, %25); supported: {SUPPORTED}"
            )
        for secret in sorted(url_secrets(url), key=len, reverse=True):
            message = message.replace(secret, "***")
        if message == str(exc):
            raise
        raise ConfigurationError(message) from None


def _backend_from_url(url: str) -> StateBackend:
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ConfigurationError(
            f"{ENV_STATE_URL}={redact_url(url)!r} is not a valid URL ({exc}); supported: {SUPPORTED}"
        ) from None
    scheme = parts.scheme.lower()
    if scheme == "memory":
        return MemoryBackend()
    if scheme == "sqlite":
        from concierge.state.sqlite import SQLiteBackend

        return SQLiteBackend.from_url(url)
    if scheme in ("postgresql", "postgres"):
        try:
            from concierge.state.postgres import PostgresBackend
        except ImportError as exc:
            _refuse_missing_driver(exc, url, "asyncpg", "the PostgreSQL driver (asyncpg)", POSTGRES_EXTRA)
            raise
        return PostgresBackend.from_url(url)
    if scheme in ("redis", "rediss"):
        try:
            from concierge.state.redis import RedisBackend
        except ImportError as exc:
            _refuse_missing_driver(exc, url, "redis", "the Redis client", REDIS_EXTRA)
            raise
        return RedisBackend.from_url(url)
    raise ConfigurationError(
        f"{ENV_STATE_URL}={redact_url(url)!r}: unsupported scheme {parts.scheme!r}; supported: {SUPPORTED}"
    )


def _refuse_missing_driver(exc: ImportError, url: str, package: str, what: str, extra: str) -> None:
    """Raise `ConfigurationError` when `exc` says the driver `package` is not installed (else return)."""
    if (exc.name or "").partition(".")[0] == package:
        raise ConfigurationError(
            f"{ENV_STATE_URL}={redact_url(url)!r} needs {what}, which is not installed; install it with: {extra}"
        ) from None


def backend_from_env() -> StateBackend:
    """The backend `CONCIERGE_STATE_URL` names (memory when unset)."""
    return backend_from_url(os.environ.get(ENV_STATE_URL))
