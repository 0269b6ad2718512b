"""The options of `Concierge(...)`, checked once at start-up into `Settings`.

Every bad option is a `ConfigurationError` naming the option, what was given
and what is accepted.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from concierge import request_state
from concierge.errors import ConfigurationError
from concierge.handles import keys_from
from concierge.state import ENV_STATE_URL, StateBackend, backend_from_url
from concierge.work.scopes import OnConflict, on_conflict_of

__all__ = ["DEFAULT_MAX_VALUE_BYTES", "DEFAULT_SWEEP_INTERVAL", "DEFAULT_TTL", "ENV_TTL", "Settings", "seconds"]

DEFAULT_TTL = timedelta(hours=24)
ENV_TTL = "CONCIERGE_SESSION_TTL"
DEFAULT_MAX_VALUE_BYTES = 1_000_000
DEFAULT_SWEEP_INTERVAL = 60.0
DEFAULT_NEW_SESSIONS_PER_MINUTE = 120
DEFAULT_MAX_LIVE_SESSIONS = 1000
DEFAULT_MAX_KEYS = 10_000
DEFAULT_MAX_SESSION_BYTES = 16_000_000
UNSET: Any = ...

Handles = Literal["required", "optional"]
"""Whether a stateful tool's `session_id` argument is required on handle wires (or a missing one starts a session)."""


def seconds(
    ttl: float | timedelta | None,
    *,
    what: str = "session_ttl",
    none: str = " for never",
    error: type[Exception] = ConfigurationError,
) -> float | None:
    """A positive duration in seconds from seconds or a `timedelta`; `None` stays `None` (no limit)."""
    if ttl is None:
        return None
    value = ttl.total_seconds() if isinstance(ttl, timedelta) else float(ttl)
    if value <= 0:
        raise error(f"{what} must be positive (or None{none}), got {ttl!r}")
    return value


def _ttl_from_env() -> float | None:
    raw = os.environ.get(ENV_TTL)
    if raw is None or not raw.strip():
        return DEFAULT_TTL.total_seconds()
    if raw.strip().lower() in ("none", "never", "0"):
        return None
    try:
        return seconds(float(raw))
    except ValueError:
        raise ConfigurationError(f"{ENV_TTL}={raw!r} is not a number of seconds (or 'none')") from None


@dataclass(frozen=True)
class Settings:
    """The checked options of one app (see `Concierge` for each one's meaning)."""

    backend: StateBackend
    ttl: float | None
    max_value_bytes: int | None
    clock: Callable[[], float]
    initial_state: Mapping[str, Any] | Callable[[], Any] | None
    sweep_interval: float | None
    keep_closed: bool
    max_live_objects: int
    keep_checkpoints: int
    roaming: bool
    on_conflict: OnConflict
    handles: Handles
    handle_keys: list[bytes]
    request_state_keys: list[bytes]
    sdk_request_state: bool
    """Whether the SDK's own `request_state_security=` was given (then concierge leaves request state alone)."""
    max_new_sessions_per_minute: int | None
    max_live_sessions_per_caller: int | None
    max_keys_per_session: int | None
    max_session_bytes: int | None
    tune_gc: bool

    @classmethod
    def of(
        cls,
        *,
        state: StateBackend | None = None,
        state_url: str | None = None,
        session_ttl: float | timedelta | None = UNSET,
        max_value_bytes: int | None = DEFAULT_MAX_VALUE_BYTES,
        clock: Callable[[], float] | None = None,
        initial_state: Mapping[str, Any] | Callable[[], Any] | None = None,
        sweep_interval: float | None = DEFAULT_SWEEP_INTERVAL,
        keep_closed_sessions: bool = True,
        max_live_objects: int = 1024,
        keep_checkpoints: int = UNSET,
        history: int = UNSET,
        roaming: bool | None = None,
        on_conflict: str = "error",
        handles: str = "required",
        handle_keys: str | bytes | list[str | bytes] | None = None,
        request_state_keys: str | bytes | list[str | bytes] | None = None,
        sdk_request_state: bool = False,
        max_new_sessions_per_minute: int | None = DEFAULT_NEW_SESSIONS_PER_MINUTE,
        max_live_sessions_per_caller: int | None = DEFAULT_MAX_LIVE_SESSIONS,
        max_keys_per_session: int | None = DEFAULT_MAX_KEYS,
        max_session_bytes: int | None = DEFAULT_MAX_SESSION_BYTES,
        tune_gc: bool = True,
    ) -> Settings:
        if initial_state is not None and not (isinstance(initial_state, Mapping) or callable(initial_state)):
            raise ConfigurationError(
                f"initial_state must be a dict or a callable returning one, not {type(initial_state).__name__}"
            )
        if sweep_interval is not None and sweep_interval <= 0:
            raise ConfigurationError(f"sweep_interval must be positive (or None for no sweep), got {sweep_interval!r}")
        if not isinstance(tune_gc, bool):
            raise ConfigurationError(f"tune_gc must be True or False, not {tune_gc!r}")
        if handles not in ("required", "optional"):
            raise ConfigurationError(f"handles must be 'required' or 'optional', not {handles!r}")
        if state is not None and state_url is not None:
            raise ConfigurationError("pass either state= or state_url=, not both")
        if sdk_request_state and request_state_keys is not None:
            raise ConfigurationError("pass either request_state_keys= or the SDK's request_state_security=, not both")
        keep = _keep_checkpoints(keep_checkpoints, history)
        backend = state if state is not None else backend_from_url(state_url or os.environ.get(ENV_STATE_URL))
        if keep and not backend.supports_checkpoints:
            raise ConfigurationError(
                f"keep_checkpoints={keep} needs a store that records checkpoints (every built-in store does); "
                f"{type(backend).__name__} does not"
            )
        return cls(
            backend=backend,
            ttl=_ttl_from_env() if session_ttl is UNSET else seconds(session_ttl),
            max_value_bytes=max_value_bytes,
            clock=clock if clock is not None else time.time,
            initial_state=initial_state,
            sweep_interval=sweep_interval,
            keep_closed=keep_closed_sessions,
            max_live_objects=max_live_objects,
            keep_checkpoints=keep,
            roaming=backend.persistent if roaming is None else bool(roaming),
            on_conflict=on_conflict_of(on_conflict, "Concierge(on_conflict=...)"),
            handles=handles,  # type: ignore[arg-type]
            handle_keys=keys_from(handle_keys),
            request_state_keys=[] if sdk_request_state else request_state.keys_from(request_state_keys),
            sdk_request_state=sdk_request_state,
            max_new_sessions_per_minute=_limit(max_new_sessions_per_minute, "max_new_sessions_per_minute"),
            max_live_sessions_per_caller=_limit(max_live_sessions_per_caller, "max_live_sessions_per_caller"),
            max_keys_per_session=_limit(max_keys_per_session, "max_keys_per_session"),
            max_session_bytes=_limit(max_session_bytes, "max_session_bytes"),
            tune_gc=tune_gc,
        )


def _limit(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigurationError(f"{name} must be a positive whole number (or None for no limit), got {value!r}")
    return value


def _keep_checkpoints(keep: Any, history: Any) -> int:
    if history is not UNSET:
        if keep is not UNSET:
            raise ConfigurationError("pass keep_checkpoints=N, not also its old name history=N")
        warnings.warn(
            "Concierge(history=N) is deprecated; use keep_checkpoints=N", DeprecationWarning, stacklevel=4
        )
        keep = history
    if keep is UNSET:
        return 0
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise ConfigurationError(
            f"keep_checkpoints must be a whole number of checkpoints (0 = off), got {keep!r}"
        )
    return keep
