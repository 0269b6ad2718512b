"""The SQL backends' schema and every statement of the contract, as text.

The statements are written once, in the SQL that SQLite and PostgreSQL both
accept, with `$1`-style placeholders (asyncpg's; the SQLite backend rewrites
them to `?1`). `concierge.state._sql` runs them.

Layout:

- `concierge_sessions`: one row per session; `version` is the optimistic lock
  every commit checks and bumps in the same statement; `expires_at` is indexed
  for the sweep.
- `concierge_values`: one row per (session, key); deleting a session cascades.
- `concierge_history`: one row per checkpoint (session, version) of a commit
  made with `Commit.keep_checkpoints` > 0: the changed keys' new and previous JSON
  text, as JSON objects, and the stage change; deleting a session cascades.
- `concierge_migrations`: one row per applied step of `MIGRATIONS`.
"""

from __future__ import annotations

#: The schema, append-only: position + 1 is the version a step brings the store
#: to. Never edit or reorder a step that has shipped; append a new one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        (
            "CREATE TABLE concierge_sessions ("
            " id TEXT PRIMARY KEY,"
            " version BIGINT NOT NULL,"
            " stage TEXT,"
            " owner TEXT,"
            " created_at DOUBLE PRECISION NOT NULL,"
            " updated_at DOUBLE PRECISION NOT NULL,"
            " expires_at DOUBLE PRECISION)"
        ),
        "CREATE INDEX concierge_sessions_expires_at ON concierge_sessions (expires_at)",
        (
            "CREATE TABLE concierge_values ("
            " session_id TEXT NOT NULL REFERENCES concierge_sessions (id) ON DELETE CASCADE,"
            " key TEXT NOT NULL,"
            " value TEXT NOT NULL,"
            " PRIMARY KEY (session_id, key))"
        ),
    ),
    (
        (
            "CREATE TABLE concierge_history ("
            " session_id TEXT NOT NULL REFERENCES concierge_sessions (id) ON DELETE CASCADE,"
            " version BIGINT NOT NULL,"
            " committed_at DOUBLE PRECISION NOT NULL,"
            " tool TEXT,"
            " changes TEXT NOT NULL,"
            " previous TEXT NOT NULL,"
            " stage_changed INTEGER NOT NULL,"
            " stage TEXT,"
            " previous_stage TEXT,"
            " PRIMARY KEY (session_id, version))"
        ),
    ),
)

MIGRATIONS_TABLE = (
    "CREATE TABLE IF NOT EXISTS concierge_migrations ("
    " version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
)
_LIVE = "(expires_at IS NULL OR expires_at > $2)"

# Creation is one upsert: it inserts, or replaces a row that has expired, and
# touches nothing (0 rows) when a live session holds the id.
CREATE = (
    "INSERT INTO concierge_sessions (id, version, stage, owner, created_at, updated_at, expires_at)"
    " VALUES ($1, 1, $2, $3, $4, $4, $5)"
    " ON CONFLICT (id) DO UPDATE SET version = 1, stage = excluded.stage, owner = excluded.owner,"
    " created_at = excluded.created_at, updated_at = excluded.updated_at, expires_at = excluded.expires_at"
    " WHERE concierge_sessions.expires_at IS NOT NULL AND concierge_sessions.expires_at <= $4"
)
# The version check and the bump are one statement: 0 rows means another
# writer, a delete or an expiry got there first.
BUMP = (
    "UPDATE concierge_sessions SET version = version + 1, updated_at = $2, expires_at = $4{stage}"
    f" WHERE id = $1 AND version = $3 AND {_LIVE}"
)
# `load` first reads the session row alone: when the caller's `known_version`
# is current that is all it costs, however many keys the session holds.
# Otherwise one more statement reads the row again with its values, so the
# two always come from one snapshot.
LOAD_ROW = (
    "SELECT version, stage, owner, expires_at, created_at FROM concierge_sessions"
    " WHERE id = $1 AND (expires_at IS NULL OR expires_at > $2)"
)
LOAD_ALL = (
    "SELECT s.version, s.stage, s.owner, s.expires_at, s.created_at, v.key, v.value FROM concierge_sessions s"
    " LEFT JOIN concierge_values v ON v.session_id = s.id"
    " WHERE s.id = $1 AND (s.expires_at IS NULL OR s.expires_at > $2)"
)
VERSION = f"SELECT version FROM concierge_sessions WHERE id = $1 AND {_LIVE}"
CLEAR_VALUES = "DELETE FROM concierge_values WHERE session_id = $1"
DELETE_VALUE = "DELETE FROM concierge_values WHERE session_id = $1 AND key = $2"
PUT_VALUE = (
    "INSERT INTO concierge_values (session_id, key, value) VALUES ($1, $2, $3)"
    " ON CONFLICT (session_id, key) DO UPDATE SET value = excluded.value"
)
DELETE = "DELETE FROM concierge_sessions WHERE id = $1"
# Checkpoints: a new life of a session id starts without its predecessor's.
CLEAR_CHECKPOINTS = "DELETE FROM concierge_history WHERE session_id = $1"
PUT_CHECKPOINT = (
    "INSERT INTO concierge_history"
    " (session_id, version, committed_at, tool, changes, previous, stage_changed, stage, previous_stage)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
)
PRUNE_CHECKPOINTS = "DELETE FROM concierge_history WHERE session_id = $1 AND version <= $2"
CHECKPOINTS = (
    "SELECT version, committed_at, tool, changes, previous, stage_changed, stage, previous_stage"
    " FROM concierge_history WHERE session_id = $1 ORDER BY version"
)
# A renewal is activity too: `updated_at` moves forward (never back, whatever a caller's clock says).
TOUCH = (
    "UPDATE concierge_sessions SET expires_at = $3,"
    " updated_at = CASE WHEN updated_at > $2 THEN updated_at ELSE $2 END"
    f" WHERE id = $1 AND {_LIVE}"
)
# `list_sessions`: the page of session rows is chosen first, then only its
# values are aggregated. `{where}` is built from the filters asked for;
# `{size}` is the dialect's byte length of `v.value`.
LIST = (
    "SELECT s.id, s.version, s.stage, s.owner, s.created_at, s.updated_at, s.expires_at,"
    " COUNT(v.key), COALESCE(SUM({size}), 0)"
    " FROM (SELECT id, version, stage, owner, created_at, updated_at, expires_at FROM concierge_sessions"
    " {where} ORDER BY updated_at DESC, id LIMIT $1 OFFSET $2) s"
    " LEFT JOIN concierge_values v ON v.session_id = s.id"
    " GROUP BY s.id, s.version, s.stage, s.owner, s.created_at, s.updated_at, s.expires_at"
    " ORDER BY s.updated_at DESC, s.id"
)
