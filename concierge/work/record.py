"""`WorkingCopy`: one stored record's values as one request sees and changes them.

A session, a user bucket and the global bucket are each one record in the
store. A request works on a copy of each record it touches: the values as
loaded (`base`, never mutated) plus what it changed (`changes`). Committing a
copy writes only its changes, under the version check of the loaded `version`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from concierge.work.codec import check_key, decode, encode

__all__ = ["Saved", "WorkingCopy"]

Saved = tuple["WorkingCopy", dict[str, "str | None"], bool, "str | None", bool]
"""What `WorkingCopy.save` returns for `WorkingCopy.restore`."""


@dataclass(eq=False)
class WorkingCopy:
    """One request's working copy of one stored record.

    Attributes:
        session_id: the record's storage id (see `concierge.ids`).
        version: the version loaded (0: the record does not exist yet).
        base: the stored values when loaded (key -> JSON text); never mutated.
        stage: the workflow stage, as loaded or as changed by this request.
        owner: the principal recorded when the record was created.
        changes: keys written (JSON text) or deleted (`None`) by this request.
        cleared: every loaded key is dropped (`terminate_session`).
        must_persist: commit the record even if nothing changed (it must exist).
        expiring: whether the session TTL applies (shared buckets never expire).
        detached: the record is gone from the store (an expired session whose
            end hooks run): it can be read, and nothing of it is written.
        reads: the keys this request read from `base` (what its writes may depend on).
        read_all: the request read the record whole (`keys()`): every key counts as read.
        rebasable: every read of `base` goes through this copy's API, so the
            changes may move onto a newer version of the record (`rebase`).
    """

    session_id: str
    version: int = 0
    base: dict[str, str] = field(default_factory=dict)
    stage: str | None = None
    owner: str | None = None
    expires_at: float | None = None
    created_at: float = 0.0
    max_value_bytes: int | None = None
    changes: dict[str, str | None] = field(default_factory=dict)
    cleared: bool = False
    stage_changed: bool = False
    must_persist: bool = False
    expiring: bool = True
    detached: bool = False
    base_bytes: int | None = None
    """The UTF-8 bytes of `base` (keys and values), when the store knows them; counted on first need."""
    base_stage: str | None = field(default=None, init=False)
    """The stage when loaded; never mutated."""
    reads: set[str] = field(default_factory=set)
    read_all: bool = False
    rebasable: bool = False

    def __post_init__(self) -> None:
        self.base_stage = self.stage

    # -- the dict API -----------------------------------------------------------
    def raw(self, key: str) -> str | None:
        """The JSON text under `key` as this request sees it, `None` when absent."""
        if key in self.changes:
            return self.changes[key]
        if self.cleared:
            return None
        self.reads.add(key)
        return self.base.get(key)

    def get(self, key: str, default: Any = None) -> Any:
        """A fresh decoded copy of the value under `key`, or `default`."""
        text = self.raw(check_key(key))
        return default if text is None else decode(text)

    def set(self, key: str, value: Any) -> None:
        """Encode `value` now (refusing what JSON cannot hold) and record it as a change."""
        key = check_key(key)
        self.changes[key] = encode(key, value, self.max_value_bytes)

    def delete(self, key: str) -> None:
        """Record the removal of `key`; nothing is recorded when it is absent."""
        key = check_key(key)
        if self.raw(key) is not None or key in self.changes:
            self.changes[key] = None

    def keys(self) -> Iterator[str]:
        """The keys this request sees, sorted."""
        self.read_all = True
        visible = set() if self.cleared else set(self.base)
        for key, value in self.changes.items():
            if value is None:
                visible.discard(key)
            else:
                visible.add(key)
        return iter(sorted(visible))

    def clear(self) -> None:
        """Drop every key (and the stage), as `terminate_session` does."""
        self.cleared = True
        self.changes.clear()
        self.set_stage(None)

    def set_stage(self, stage: str | None) -> None:
        if stage != self.stage:
            self.stage = stage
            self.stage_changed = True

    # -- what a commit writes ---------------------------------------------------
    @property
    def dirty(self) -> bool:
        """Whether committing this copy writes anything."""
        return bool(self.changes) or self.cleared or self.stage_changed or self.must_persist

    def overwritten(self) -> dict[str, str | None]:
        """What committing this copy overwrites: each changed key's loaded JSON text (`None`: absent).

        A cleared copy overwrites every key it loaded.
        """
        before: dict[str, str | None] = dict(self.base) if self.cleared else {}
        for key in self.changes:
            before.setdefault(key, self.base.get(key))
        return before

    def committed_values(self) -> dict[str, str]:
        """The record's values as they stand after this copy commits."""
        values = {} if self.cleared else dict(self.base)
        for key, value in self.changes.items():
            if value is None:
                values.pop(key, None)
            else:
                values[key] = value
        return values

    def committed_size(self) -> tuple[int, int]:
        """The keys and the UTF-8 bytes (keys and values) the record holds after this copy commits.

        Counted from `base_bytes` and the changes alone, so a write to a large
        record does not re-measure every value it holds.
        """
        if self.base_bytes is None:
            self.base_bytes = sum(_size(key, text) for key, text in self.base.items())
        keys, size = (0, 0) if self.cleared else (len(self.base), self.base_bytes)
        for key, text in self.changes.items():
            old = None if self.cleared else self.base.get(key)
            if old is not None:
                keys, size = keys - 1, size - _size(key, old)
            if text is not None:
                keys, size = keys + 1, size + _size(key, text)
        return keys, size

    # -- a newer version underneath -------------------------------------------------
    def can_rebase(self, fresh: WorkingCopy) -> bool:
        """Whether this copy's changes may move onto `fresh`, a newer load of the same record.

        They may when nothing the request read differs there: every value it
        read, and the stage it ran in, are the same. Committing the changes on
        top of `fresh` is then what running the request after the other writer
        would have done, so a commit that lost the version race to a write
        that did not touch what it read still lands, and no code runs twice.
        """
        if not self.rebasable or self.detached or fresh.detached or fresh.session_id != self.session_id:
            return False
        if self.version == 0 and self.expiring:
            return False  # a session created elsewhere meanwhile: its start must not be overlaid
        if fresh.stage != self.base_stage or (self.version > 0 and fresh.owner != self.owner):
            return False
        if self.read_all:
            return fresh.base == self.base
        return all(fresh.base.get(key) == self.base.get(key) for key in self.reads)

    def rebase(self, fresh: WorkingCopy) -> None:
        """Move this copy's changes onto `fresh` (check `can_rebase` first)."""
        self.version, self.base, self.base_bytes = fresh.version, fresh.base, fresh.base_bytes
        self.expires_at, self.created_at = fresh.expires_at, fresh.created_at
        if fresh.owner is not None:
            self.owner = fresh.owner

    # -- undo (a hook that raised leaves nothing behind) -------------------------
    def save(self) -> Saved:
        """What this copy holds now, for `restore`."""
        return (self, dict(self.changes), self.cleared, self.stage, self.stage_changed)

    @staticmethod
    def restore(saved: Saved) -> None:
        """Drop every change made since `save`."""
        copy, changes, cleared, stage, stage_changed = saved
        copy.changes, copy.cleared, copy.stage, copy.stage_changed = changes, cleared, stage, stage_changed


def _size(key: str, text: str) -> int:
    return len(key.encode()) + len(text.encode())
