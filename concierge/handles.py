"""Session handles the server can recognise without a store: random, timestamped, signed.

A handle is 36 bytes, URL-safe base64 without padding (48 characters):

    16 random bytes | 4 bytes issue time (seconds, big-endian) | 16 bytes HMAC-SHA256 tag

The tag is computed with the server's handle key over the rest and the
principal it was minted for, so a handle
this server (or a replica sharing its keys) minted is told apart from a forged
one with no store lookup. That is what lets a fresh session cost nothing until
its first write: a handle whose session was never stored is still known to be
real. The issue time tells "expired" from "never written" for a handle whose
session is absent.

Keys come, in this order, from `Concierge(handle_keys=...)`, from
`CONCIERGE_HANDLE_KEYS` (comma-separated, the first signs, all verify: rotate
by putting the new key first), from the store (one shared secret record,
created on first use, so every replica of a persistent store agrees), or are
made at random for the process (memory stores).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass

from concierge import ids
from concierge.errors import ConfigurationError, ConflictError
from concierge.work import SessionStore

__all__ = [
    "ENV_HANDLE_KEYS",
    "LEGACY_LENGTH",
    "Handle",
    "HandleSigner",
    "key_list",
    "keys_from",
    "signer_for",
    "stored_keys",
]

ENV_HANDLE_KEYS = "CONCIERGE_HANDLE_KEYS"
_RANDOM, _TIME, _TAG = 16, 4, 16
LENGTH = 48
"""Characters in a handle."""
LEGACY_LENGTH = 43
"""Characters in an unsigned handle of earlier versions (32 random bytes): still looked up in the store."""
_CONTEXT = b"concierge-handle-v1:"
_KEY_FIELD = "handle_key"
_VERIFIED_AT_MOST = 4096
"""Handles whose verification this process remembers (the least recently used is forgotten past it)."""


@dataclass(frozen=True, slots=True)
class Handle:
    """A verified handle: its text and when it was issued (epoch seconds)."""

    text: str
    issued_at: float


def key_list(value: str | bytes | list[str | bytes] | None, env: str) -> list[bytes]:
    """Keys as an option gives them (one or a list), else from the comma-separated variable `env`; as bytes."""
    if value is None:
        raw = os.environ.get(env, "")
        items: list[str | bytes] = [k for k in raw.split(",") if k.strip()]
    elif isinstance(value, (str, bytes)):
        items = [value]
    else:
        items = list(value)
    return [k.strip().encode() if isinstance(k, str) else k for k in items]


def keys_from(value: str | bytes | list[str | bytes] | None) -> list[bytes]:
    """Handle keys from an option or `CONCIERGE_HANDLE_KEYS`; each at least 16 bytes."""
    keys = key_list(value, ENV_HANDLE_KEYS)
    for key in keys:
        if len(key) < 16:
            raise ConfigurationError(
                f"handle keys must be at least 16 bytes long (got one of {len(key)}); set {ENV_HANDLE_KEYS} "
                "to long random strings, the first used to sign"
            )
    return keys


class HandleSigner:
    """Mints and verifies handles with a list of keys (the first signs, every one verifies)."""

    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise ValueError("a HandleSigner needs at least one key")
        self.keys = keys
        self._verified: OrderedDict[tuple[str, str | None], Handle] = OrderedDict()

    def _tag(self, key: bytes, body: bytes, owner: str | None) -> bytes:
        message = _CONTEXT + body + b"|" + (owner or "").encode("utf-8", "surrogatepass")
        return hmac.new(key, message, hashlib.sha256).digest()[:_TAG]

    def mint(self, owner: str | None, now: float | None = None) -> str:
        """A new handle for the caller `owner` (the principal, `None` when unauthenticated), issued `now`."""
        issued = int(time.time() if now is None else now) & 0xFFFFFFFF
        body = secrets.token_bytes(_RANDOM) + struct.pack(">I", issued)
        raw = body + self._tag(self.keys[0], body, owner)
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    def verify(self, text: str, owner: str | None) -> Handle | None:
        """The handle if one of the keys signed it for `owner`, else `None` (forged, altered, truncated,
        or another caller's: a handle is bound to the principal it was minted for)."""
        known = self._verified.get((text, owner))
        if known is not None:  # verified before: the keys do not change, so neither does the answer
            self._verified.move_to_end((text, owner))
            return known
        handle = self._verify(text, owner)
        if handle is not None:
            self._verified[(text, owner)] = handle
            if len(self._verified) > _VERIFIED_AT_MOST:
                self._verified.popitem(last=False)
        return handle

    def _verify(self, text: str, owner: str | None) -> Handle | None:
        if len(text) != LENGTH:
            return None
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except (binascii.Error, ValueError):
            return None
        if len(raw) != _RANDOM + _TIME + _TAG:
            return None
        body, tag = raw[: _RANDOM + _TIME], raw[_RANDOM + _TIME :]
        if not any(hmac.compare_digest(tag, self._tag(key, body, owner)) for key in self.keys):
            return None
        (issued,) = struct.unpack(">I", body[_RANDOM:])
        return Handle(text, float(issued))


async def stored_keys(store: SessionStore) -> list[bytes]:
    """The handle key kept in the store (`ids.SECRETS`), created by the first process that asks."""
    for _ in range(3):
        copy = await store.load(ids.SECRETS, create=True)
        assert copy is not None
        text = copy.base.get(_KEY_FIELD)
        if text is not None:
            return [bytes.fromhex(json.loads(text))]
        copy.expiring = False
        copy.max_value_bytes = None  # the app's limit on user values does not apply to its own key
        copy.set(_KEY_FIELD, secrets.token_hex(32))
        try:
            await store.commit(copy, tool="handle key")
        except ConflictError:  # another process created it first: use theirs
            continue
        return [bytes.fromhex(json.loads(copy.changes[_KEY_FIELD] or "null"))]
    raise ConflictError("could not read or create the handle key in the store")


async def signer_for(store: SessionStore) -> HandleSigner:
    """The signer of an app given no keys: the store's key (shared by every process on it), else one per process."""
    keys = await stored_keys(store) if store.backend.persistent else [secrets.token_bytes(32)]
    return HandleSigner(keys)
