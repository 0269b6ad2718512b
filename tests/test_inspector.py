"""`python -m concierge sessions`: list, show, export, delete and purge-expired on every backend.

SQLite and PostgreSQL stores are inspected by real `python -m concierge`
subprocesses. A memory store lives in one process, so it is inspected by
calling `concierge.cli.sessions.main` with the backend object.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from concierge import ids
from concierge.cli.sessions import main
from concierge.state import Commit, StateBackend, backend_from_url
from concierge.state.memory import MemoryBackend

LIMIT = 60
PREFIX = "concierge sessions: error: "
HANDLE = "Qm9vdHN0cmFwLWhhbmRsZS1mb3ItdGVzdHMtb25seQ0123"
#: What the populated store holds: id -> (values, stage, seconds since its last commit, expiry from now).
SESSIONS: dict[str, tuple[dict[str, object], str | None, float, float | None]] = {
    "global": ({"visits": 41}, None, 5, None),
    f"h:{HANDLE}": ({"cart": ["apple", "milk"], "note": "Zoë"}, "cart", 10, 3600),
    "http:6a1f0c": ({"step": 2}, "browse", 100, 3000),
    "user:alice": ({"prefs": {"currency": "EUR"}}, None, 2 * 86400, None),
    "sse:old": ({"cart": ["tea"]}, None, 4000, -60),  # expired a minute ago, not swept
}
LIVE_NEWEST_FIRST = ["global", f"h:{HANDLE}", "http:6a1f0c", "user:alice"]


def _text(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


async def _populate(backend: StateBackend, now: float) -> None:
    await backend.open()
    for sid, (values, stage, ago, ttl) in SESSIONS.items():
        at = now - ago
        expires = None if ttl is None else now + ttl
        changes = {key: _text(value) for key, value in values.items()}
        owner = "alice" if sid.startswith("user:") else None
        await backend.commit(Commit(sid, 0, changes, stage=stage, owner=owner, expires_at=expires), now=at - 1)
        await backend.commit(Commit(sid, 1, {}, expires_at=expires), now=at)  # version 2, last activity `at`


@dataclass
class Done:
    code: int
    out: str
    err: str


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CONCIERGE_")}


def _subprocess(*args: str, cwd: Path, env: dict[str, str] | None = None) -> Done:
    done = subprocess.run(
        [sys.executable, "-m", "concierge", "sessions", *args],
        check=False,
        cwd=cwd,
        env=_env() if env is None else env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=LIMIT,
    )
    return Done(done.returncode, done.stdout, done.stderr)


@dataclass
class Store:
    """A store populated with `SESSIONS` at `now`.

    Calling it runs the inspector on the store as a user would: a subprocess
    (in this process for a memory store). `inline` runs it in this process
    whatever the store, for checks that need no process boundary.
    """

    cli: Callable[..., Done]
    inline: Callable[..., Done]
    now: float

    def __call__(self, *args: str) -> Done:
        return self.cli(*args)


@pytest.fixture
def run(state_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Store:
    now = time.time()
    if state_url.startswith("memory"):
        memory = MemoryBackend()
        anyio.run(_populate, memory, now)
    else:

        async def populate() -> None:
            async with backend_from_url(state_url) as backend:
                await _populate(backend, now)

        anyio.run(populate)

    def inline(*args: str) -> Done:
        capsys.readouterr()
        if state_url.startswith("memory"):
            code = main(list(args), backend=memory)
        else:
            code = main(["--url", state_url, *args])
        out, err = capsys.readouterr()
        return Done(code, out, err)

    if state_url.startswith("memory"):
        return Store(inline, inline, now)
    return Store(lambda *args: _subprocess("--url", state_url, *args, cwd=tmp_path), inline, now)


def _ok(done: Done) -> str:
    assert done.code == 0, done.err
    assert done.err == ""
    return done.out


def _failed(done: Done, code: int = 1) -> str:
    """The one-line error of a failed command (nothing on stdout)."""
    assert done.code == code, (done.out, done.err)
    assert done.out == ""
    assert done.err.startswith(PREFIX) and done.err.count("\n") == 1, done.err
    assert "Traceback" not in done.err
    return done.err


def _ids(done: Done) -> list[str]:
    return [row["session_id"] for row in json.loads(_ok(done))]


# -- list ---------------------------------------------------------------------------------
def test_list_prints_a_table_of_live_sessions_newest_first(run: Store) -> None:
    lines = _ok(run("list")).splitlines()
    assert lines[0].split() == ["ID", "SCOPE", "STAGE", "KEYS", "SIZE", "LAST", "ACTIVITY", "EXPIRES"]
    rows = lines[1:]
    assert [row.split()[0] for row in rows] == LIVE_NEWEST_FIRST
    handle_row = rows[1].split()
    cart_bytes = len(_text(["apple", "milk"]).encode()) + len(_text("Zoë").encode())
    assert handle_row[1:6] == ["session", "cart", "2", str(cart_bytes), "B"]
    assert re.search(r"\(1\ds ago\)", rows[1]) and "(in 59m)" in rows[1]
    assert rows[0].split()[1:3] == ["global", "-"] and rows[0].endswith("never")
    assert rows[3].split()[1] == "user" and "(2d ago)" in rows[3]
    assert all(len(row.split()) >= 7 for row in rows)


def test_list_json_describes_each_session(run: Store) -> None:
    listed = json.loads(_ok(run("list", "--json")))
    assert [row["session_id"] for row in listed] == LIVE_NEWEST_FIRST
    handle = listed[1]
    assert handle == {
        "session_id": f"h:{HANDLE}",
        "scope": "session",
        "stage": "cart",
        "version": 2,
        "owner": None,
        "keys": 2,
        "size": len(_text(["apple", "milk"]).encode()) + len(_text("Zoë").encode()),
        "created_at": pytest.approx(run.now - 11),
        "updated_at": pytest.approx(run.now - 10),
        "expires_at": pytest.approx(run.now + 3600),
        "expired": False,
    }
    assert [row["scope"] for row in listed] == ["global", "session", "session", "user"]
    assert listed[3]["owner"] == "alice" and listed[3]["expires_at"] is None


def test_list_filters_by_scope_prefix_stage_and_expiry(run: Store) -> None:
    assert _ids(run.inline("list", "--json", "--scope", "session")) == [f"h:{HANDLE}", "http:6a1f0c"]
    assert _ids(run.inline("list", "--json", "--scope", "user")) == ["user:alice"]
    assert _ids(run.inline("list", "--json", "--scope", "global")) == ["global"]
    assert _ids(run.inline("list", "--json", "--prefix", "http:")) == ["http:6a1f0c"]
    assert _ids(run.inline("list", "--json", "--stage", "cart")) == [f"h:{HANDLE}"]
    assert _ids(run.inline("list", "--json", "--scope", "session", "--stage", "browse")) == ["http:6a1f0c"]
    assert _ids(run.inline("list", "--json", "--prefix", "nothing:")) == []
    everything = json.loads(_ok(run.inline("list", "--json", "--include-expired")))
    assert [row["session_id"] for row in everything] == [*LIVE_NEWEST_FIRST[:3], "sse:old", "user:alice"]
    assert [row["expired"] for row in everything] == [False, False, False, True, False]
    (expired_row,) = [
        row for row in _ok(run.inline("list", "--include-expired")).splitlines() if row.startswith("sse:")
    ]
    assert expired_row.endswith("(expired 1m ago)")


def test_list_pages_with_limit_and_offset(run: Store) -> None:
    assert _ids(run.inline("list", "--json", "--limit", "2")) == LIVE_NEWEST_FIRST[:2]
    assert _ids(run.inline("list", "--json", "--limit", "2", "--offset", "2")) == LIVE_NEWEST_FIRST[2:]
    assert _ids(run.inline("list", "--json", "--offset", "4")) == []
    assert _ids(run.inline("list", "--json", "--scope", "session", "--limit", "1", "--offset", "1")) == ["http:6a1f0c"]
    first = _ok(run.inline("list", "--limit", "2"))
    assert first.rstrip().endswith("more with --offset 2")
    assert _ok(run.inline("list", "--offset", "4")) == "no sessions after the first 4\n"
    assert _ok(run.inline("list", "--prefix", "nothing:")) == "no sessions\n"


# -- show and export ----------------------------------------------------------------------
def test_show_prints_the_metadata_and_the_state_as_pretty_json(run: Store) -> None:
    out = _ok(run("show", f"h:{HANDLE}"))
    head, state = out.split("\nstate:\n")
    fields = dict(line.split(None, 1) for line in head.splitlines() if not line.startswith("last activity"))
    assert fields["session_id"] == f"h:{HANDLE}"
    assert (fields["scope"], fields["stage"], fields["version"], fields["owner"]) == ("session", "cart", "2", "-")
    assert fields["keys"].startswith("2 (")
    assert "(in 59m)" in fields["expires"]
    assert "last activity" in head
    assert json.loads(state) == {"cart": ["apple", "milk"], "note": "Zoë"}
    assert state.startswith("{\n  ")  # indented
    assert '"Zoë"' in state


def test_a_bare_handle_names_its_session(run: Store) -> None:
    assert json.loads(_ok(run("show", "--json", HANDLE))) == json.loads(_ok(run.inline("export", f"h:{HANDLE}")))
    assert json.loads(_ok(run.inline("export", HANDLE)))["session_id"] == f"h:{HANDLE}"


def test_export_prints_one_json_document_of_the_session(run: Store) -> None:
    document = json.loads(_ok(run("export", f"h:{HANDLE}")))
    assert document == {
        "session_id": f"h:{HANDLE}",
        "scope": "session",
        "stage": "cart",
        "version": 2,
        "owner": None,
        "created_at": pytest.approx(run.now - 11),
        "updated_at": pytest.approx(run.now - 10),
        "expires_at": pytest.approx(run.now + 3600),
        "expired": False,
        "state": {"cart": ["apple", "milk"], "note": "Zoë"},
    }
    assert json.loads(_ok(run.inline("show", "--json", f"h:{HANDLE}"))) == document
    bucket = json.loads(_ok(run.inline("export", "user:alice")))
    assert (bucket["scope"], bucket["owner"], bucket["expires_at"]) == ("user", "alice", None)
    assert bucket["state"] == {"prefs": {"currency": "EUR"}}
    assert json.loads(_ok(run.inline("export", "global")))["scope"] == "global"


def test_an_expired_session_not_yet_purged_is_shown_flagged(run: Store) -> None:
    out = _ok(run.inline("show", "sse:old"))
    assert "(expired 1m ago); not swept yet" in out
    assert json.loads(out.split("\nstate:\n")[1]) == {"cart": ["tea"]}
    document = json.loads(_ok(run.inline("export", "sse:old")))
    assert document["expired"] is True and document["state"] == {"cart": ["tea"]}


def test_an_unknown_id_is_a_one_line_error(run: Store) -> None:
    for command in ("show", "export", "delete"):
        err = _failed(run(command, "nope") if command == "show" else run.inline(command, "nope"))
        assert "no session 'nope'" in err and "also tried 'h:nope'" in err
    assert "no session 'http:nope' in this store" in _failed(run.inline("show", "http:nope"))


def test_an_id_with_a_storage_prefix_is_looked_up_as_given_only(run: Store) -> None:
    for given in ("http:nope", "wire:nope", "user:nobody"):
        err = _failed(run.inline("show", given))
        assert f"no session {given!r} in this store" in err and "also tried" not in err


def test_list_takes_every_kind_of_stored_id_as_a_scope(run: Store) -> None:
    by_kind = {kind: _ids(run.inline("list", "--json", "--scope", kind)) for kind in ids.KINDS}
    assert by_kind == {
        "session": [f"h:{HANDLE}", "http:6a1f0c"],
        "user": ["user:alice"],
        "global": ["global"],
        "wire": [],
        "caller": [],
        "secrets": [],
    }


# -- delete and purge-expired -------------------------------------------------------------
def test_delete_removes_the_session_and_all_its_state(run: Store) -> None:
    assert _ok(run("delete", HANDLE)) == f"deleted h:{HANDLE}\n"
    assert f"h:{HANDLE}" not in _ids(run.inline("list", "--json", "--include-expired"))
    _failed(run.inline("show", f"h:{HANDLE}"))
    _failed(run.inline("delete", f"h:{HANDLE}"))
    assert json.loads(_ok(run.inline("delete", "--json", "user:alice"))) == {"deleted": "user:alice"}
    assert _ids(run.inline("list", "--json")) == ["global", "http:6a1f0c"]


def test_an_expired_session_can_be_deleted_before_it_is_purged(run: Store) -> None:
    assert _ok(run.inline("delete", "sse:old")) == "deleted sse:old\n"
    assert _ok(run.inline("purge-expired")) == "purged 0 expired sessions\n"


def test_purge_expired_deletes_only_expired_sessions_and_prints_the_count(run: Store) -> None:
    assert _ok(run("purge-expired")) == "purged 1 expired session\n"
    assert _ids(run.inline("list", "--json", "--include-expired")) == LIVE_NEWEST_FIRST
    assert json.loads(_ok(run.inline("--json", "purge-expired"))) == {"purged": 0}
    _failed(run.inline("show", "sse:old"))


# -- the store URL and errors ---------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_store_comes_from_the_environment_when_no_url_is_given(durable_state_url: str, tmp_path: Path) -> None:
    async def populate() -> None:
        async with backend_from_url(durable_state_url) as backend:
            await _populate(backend, time.time())

    anyio.run(populate)
    done = _subprocess("--json", "list", cwd=tmp_path, env={**_env(), "CONCIERGE_STATE_URL": durable_state_url})
    assert _ids(done) == LIVE_NEWEST_FIRST
    # --url wins over the environment
    done = _subprocess("list", "--url", durable_state_url, cwd=tmp_path, env={**_env(), "CONCIERGE_STATE_URL": "x"})
    assert done.code == 0, done.err


def test_no_store_at_all_is_a_usage_error(tmp_path: Path) -> None:
    err = _failed(_subprocess("list", cwd=tmp_path), 2)
    assert "pass --url or set CONCIERGE_STATE_URL" in err


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("ftp://user:hunter2@example.com/x", "unsupported scheme 'ftp'"),
        ("postgresql://user:hunter2@localhost:99999/db", "malformed"),
        ("sqlite://somehost/state.db", "malformed"),
        ("memory://", "cannot be inspected from another one"),
    ],
)
def test_a_bad_url_is_a_one_line_usage_error_without_the_password(tmp_path: Path, url: str, says: str) -> None:
    done = _subprocess("--url", url, "list", cwd=tmp_path)
    err = _failed(done, 2)
    assert says in err
    assert "hunter2" not in err


def test_an_unreachable_postgres_is_a_one_line_error_without_the_password(tmp_path: Path) -> None:
    port = _free_port()  # nothing listens on it
    for url, command in [
        (f"postgresql://admin:s3cr%40tpw@127.0.0.1:{port}/db", ["list"]),
        (f"postgres://admin@127.0.0.1:{port}/db?password=qw3rty-pw", ["show", "x"]),
    ]:
        err = _failed(_subprocess("--url", url, *command, cwd=tmp_path), 1)
        assert f"127.0.0.1:{port}" in err and "unavailable" in err
        for secret in ("s3cr", "tpw", "qw3rty"):
            assert secret not in err


def test_a_missing_sqlite_file_is_an_error_and_is_not_created(tmp_path: Path) -> None:
    target = tmp_path / "typo.db"
    err = _failed(_subprocess("--url", f"sqlite:///{target}", "list", cwd=tmp_path), 1)
    assert "typo.db" in err and "does not exist" in err
    assert not target.exists()


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--limit", "-1"], backend=MemoryBackend()) == 2
    assert "is negative" in capsys.readouterr().err
    assert main([], backend=MemoryBackend()) == 2
    assert main(["frobnicate"], backend=MemoryBackend()) == 2
    done = _subprocess("--help", cwd=tmp_path)
    assert done.code == 0
    for command in ("list", "show", "export", "delete", "purge-expired"):
        assert command in done.out


def test_a_store_that_cannot_list_says_so_and_still_shows_sessions(capsys: pytest.CaptureFixture[str]) -> None:
    class Minimal(MemoryBackend):
        list_sessions = StateBackend.list_sessions

    backend = Minimal()
    anyio.run(_populate, backend, time.time())
    assert main(["list"], backend=backend) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(PREFIX) and "cannot list its sessions" in err
    assert main(["export", "global"], backend=backend) == 0
    document = json.loads(capsys.readouterr().out)
    assert "updated_at" not in document and document["state"] == {"visits": 41}


def test_the_handle_key_record_is_listed_but_its_value_is_never_printed(tmp_path: Path) -> None:
    from concierge.handles import stored_keys
    from concierge.work import SessionStore

    url = f"sqlite:///{tmp_path / 'keys.db'}"

    async def make() -> bytes:
        store = SessionStore(backend_from_url(url))
        async with store.opened():
            return (await stored_keys(store))[0]

    key = anyio.run(make)
    shown = subprocess.run(
        [sys.executable, "-m", "concierge", "sessions", "--url", url, "show", "secrets"],
        capture_output=True, text=True, timeout=60,
    )
    exported = subprocess.run(
        [sys.executable, "-m", "concierge", "sessions", "--url", url, "export", "secrets"],
        capture_output=True, text=True, timeout=60,
    )
    assert shown.returncode == 0 and exported.returncode == 0, shown.stderr + exported.stderr
    assert "<secret>" in shown.stdout and "<secret>" in exported.stdout
    assert key.hex() not in shown.stdout + exported.stdout + shown.stderr + exported.stderr
