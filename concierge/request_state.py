"""The keys that seal `requestState` on the 2026-07-28 wire, shared by every replica.

A tool that elicits or samples on the 2026-07-28 wire answers the first call
with an `input_required` result carrying a sealed `requestState`; the client
calls again with its answers and that state, and behind a load balancer the
second call may reach another replica. The SDK seals with a key it makes per
process unless it is given one, so that replica would refuse the state
("Invalid or expired requestState").

Keys come, in this order, from `Concierge(request_state_keys=...)`, from
`CONCIERGE_REQUEST_STATE_KEYS` (comma-separated, each at least 32 bytes; the
first seals, all unseal: rotate by putting the new key first), on a persistent
store from the handle keys (derived, one from each, under a context of their
own so the two keys differ: the store's secret record gives every replica the
same ones), or, with a memory store, the SDK's own key of the process. An app
given the SDK's own `request_state_security=` keeps it untouched.

The sealed state names the server as its audience, which stops state minted by
another service that shares the keys: explicit keys therefore need a named app.
Keys derived from handle keys are shared only by apps that already accept each
other's handles (those on one store, or given the same handle keys), so an
unnamed app on a store gets them, under a fixed audience.
"""

from __future__ import annotations

import hashlib
import hmac

from mcp.server.request_state import AESGCMRequestStateCodec, InvalidRequestState, RequestStateSecurity

from concierge.errors import ConfigurationError
from concierge.handles import key_list

__all__ = ["ENV_REQUEST_STATE_KEYS", "MIN_KEY_BYTES", "UNNAMED_AUDIENCE", "SharedKeys", "derived", "keys_from"]

ENV_REQUEST_STATE_KEYS = "CONCIERGE_REQUEST_STATE_KEYS"
MIN_KEY_BYTES = 32
"""The shortest key the SDK's `AESGCMRequestStateCodec` accepts (mcp 2.3.0)."""
_CONTEXT = b"concierge-request-state-v1"
UNNAMED_AUDIENCE = "concierge:unnamed"
"""The audience of an unnamed app's state, sealed under keys derived from its handle keys."""


def keys_from(value: str | bytes | list[str | bytes] | None) -> list[bytes]:
    """Request-state keys from an option or `CONCIERGE_REQUEST_STATE_KEYS` (empty: none given)."""
    keys = key_list(value, ENV_REQUEST_STATE_KEYS)
    for key in keys:
        if not isinstance(key, bytes) or len(key) < MIN_KEY_BYTES:
            got = f"one of {len(key)} bytes" if isinstance(key, bytes) else f"a {type(key).__name__}"
            raise ConfigurationError(
                f"request-state keys must be at least {MIN_KEY_BYTES} bytes long (got {got}); set "
                f"request_state_keys= or {ENV_REQUEST_STATE_KEYS} to long random strings, the first used to seal "
                '(make one with: python -c "import secrets; print(secrets.token_hex(32))")'
            )
    if keys:
        try:
            AESGCMRequestStateCodec(keys)
        except (TypeError, ValueError) as exc:  # a repeated key; or a rule of a newer SDK
            raise ConfigurationError(f"request-state keys: {exc}") from None
    return keys


def derived(handle_keys: list[bytes]) -> list[bytes]:
    """The request-state keys derived from handle keys, one from each (never equal to a handle key)."""
    return [hmac.new(key, _CONTEXT, hashlib.sha256).digest() for key in handle_keys]


class SharedKeys:
    """A `RequestStateCodec` (the SDK's public protocol) whose keys may arrive when the server starts.

    It seals and unseals with the SDK's AES-GCM codec; until its keys are
    installed, sealing fails (the SDK answers "Internal error") and unsealing
    refuses every token.
    """

    def __init__(self, keys: list[bytes] | None = None) -> None:
        self._codec: AESGCMRequestStateCodec | None = None
        if keys:
            self.install(keys)

    @property
    def ready(self) -> bool:
        return self._codec is not None

    def install(self, keys: list[bytes]) -> None:
        self._codec = AESGCMRequestStateCodec(keys)

    def seal(self, payload: bytes) -> str:
        if self._codec is None:
            raise RuntimeError("concierge: the request-state keys are set when the server starts")
        return self._codec.seal(payload)

    def unseal(self, token: str) -> bytes:
        if self._codec is None:
            raise InvalidRequestState("keys not loaded")
        return self._codec.unseal(token)

    @classmethod
    def for_app(cls, keys: list[bytes], *, persistent: bool, name: str | None) -> SharedKeys | None:
        """The codec an app seals with: its `keys`, else (on a persistent store) keys set at start-up, else `None`.

        Raises:
            ConfigurationError: keys were given to an app without a name.
        """
        if keys and not name:
            raise ConfigurationError(
                f"request_state_keys (or {ENV_REQUEST_STATE_KEYS}) need a named server: the name is the audience "
                "sealed into every requestState, which stops state minted by another service sharing the keys. "
                'Name the app: Concierge("my-service", ...)'
            )
        if not keys and not persistent:
            return None
        return cls(keys)

    def security(self, name: str | None) -> RequestStateSecurity:
        """The SDK policy sealing with these keys; an unnamed app gets a fixed audience (see the module)."""
        return RequestStateSecurity(codec=self, audience=None if name else UNNAMED_AUDIENCE)
