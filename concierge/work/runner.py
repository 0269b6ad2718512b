"""The loop every piece of user code runs in: lock, load, run once, commit.

`Runner.run(job, body)`:

1. takes the session's lock in this process (calls on one session never race);
2. loads the session into a working copy (or creates an empty one);
3. locks and loads the shared buckets the job's plans name, in lock order;
4. binds the unit of work and runs `body` - once;
5. commits every dirty copy in one atomic backend call, or nothing if `keep`
   says the result is a failure; with a `Tally`, a new (or ended) session's
   caller record is updated in that same call.

A conflict at commit (another process wrote one of the records since it was
loaded) is reported as `ConflictError`; the body runs again on fresh values
only when its plan says `retry` (`on_conflict="retry"`), up to `ATTEMPTS` runs.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, StatusCode

from concierge import ids
from concierge.errors import ConflictError, StateUnavailableError
from concierge.work.record import WorkingCopy
from concierge.work.scopes import ATTEMPTS, Plan
from concierge.work.store import SessionStore
from concierge.work.telemetry import INSTRUMENTS, TRACER, session_hash, tracing
from concierge.work.unit import BucketLoader, UnitOfWork, bind

__all__ = ["NO_USER", "Beginning", "Job", "Runner", "Tally"]

NO_USER = (
    "user state needs to know who the caller is, and this HTTP request carries no access token. "
    "Protect the server with the SDK's auth (token_verifier= and auth=) so each caller has an identity, "
    "or keep this state in scope='session'"
)


class Beginning(Protocol):
    """What happens inside the first unit of work of a new session (see `concierge.lifecycle`)."""

    start: Plan
    """The plan of the start hooks: its scopes are loaded for a new session."""

    @property
    def seeds(self) -> bool:
        """Whether a new session is given state (initial_state, start hooks), so it must be stored."""

    async def begin(self, unit: UnitOfWork) -> None:
        """Seed the new session of `unit` and run the start hooks."""


class Tally(Protocol):
    """A record counting the sessions of one caller, kept in step with them (see `concierge.serve.held`).

    Its commits are serialised on `record_id`'s lock in this process; another
    process's commit to it meanwhile is met by loading it again and committing
    the unit once more: what the user code wrote did not depend on it.
    """

    record_id: str

    async def admit(self) -> None:
        """Called before the user code of a new session runs; raises a `ConciergeError` to refuse it."""

    async def updated(self, session: WorkingCopy, new: bool) -> WorkingCopy | None:
        """The record, loaded now, with `session` added (`new`) or removed (ended); `None`: nothing to write.

        Raises a `ConciergeError` to refuse the commit (nothing is written).
        """

    async def used(self) -> None:
        """The caller used one of its sessions (keeps the record alive as long as them); never raises."""


def _always(result: Any) -> bool:
    return True


@dataclass
class Job:
    """One piece of user code to run on one session.

    Attributes:
        session_id: the storage id of the session.
        label: what runs (a tool's name), recorded in the checkpoints its commit makes.
        plans: the plans whose scopes are loaded up front; the first also
            decides `retry` and learns the scopes loaded on first use.
        user: the principal whose `user` bucket the code reaches, given the
            loaded session (`None`: no `user` scope in this request).
        create: a missing session is created (else the job finds nothing).
        owner: the principal making the request, recorded on a new session.
        check_owner: the session must belong to `owner` (a supplied handle).
        load: loads the session instead of the store (end hooks of an expired one).
        keep: whether the result is a success whose writes are committed.
        create_until: a missing session is created only until this time (a
            signed handle never written); later it is refused as expired.
        companions: records written with a new session's first commit, in the
            same transaction (a roaming HTTP session's wire record).
        tally: counts the sessions of the caller (its live-session cap), in
            the commits that create or end one; `None`: not counted.
        fresh: the session id was made for this call, so no record of it can
            exist: the first attempt starts from an empty copy without a load.
        catch_up: before starting from held values, let in the store's change
            notices already on their way (`SessionStore.load`); `False` for
            code that uses no state, which a notice could not change.
    """

    session_id: str
    label: str | None
    plans: Sequence[Plan]
    user: Callable[[WorkingCopy], str | None]
    create: bool = True
    owner: str | None = None
    check_owner: bool = False
    load: Callable[[], Awaitable[WorkingCopy | None]] | None = None
    keep: Callable[[Any], bool] = field(default=_always)
    create_until: float | None = None
    companions: Callable[[], Awaitable[list[WorkingCopy]]] | None = None
    tally: Tally | None = None
    fresh: bool = False
    catch_up: bool = True


class Runner:
    """Runs jobs against one store; see the module docstring."""

    def __init__(self, store: SessionStore, beginning: Beginning) -> None:
        self.store = store
        self.beginning = beginning

    async def run(self, job: Job, body: Callable[[UnitOfWork], Awaitable[Any]]) -> tuple[Any, UnitOfWork | None]:
        """Run `body(unit)` in a unit of work on the job's session, and commit it if `job.keep(result)`.

        Returns `(None, None)` when the session is unknown (`body` was not called).

        Raises:
            ConflictError: another process committed to the session or a
                bucket first (on every attempt, with `retry`).
            StateUnavailableError: the store could not be reached.
        """
        store = self.store
        attempts = ATTEMPTS if job.plans and job.plans[0].retry else 1
        started = time.perf_counter()
        outcome = "unknown session"
        span: Span | None = None
        if tracing():  # else nobody would see a span: none is made
            span = TRACER.start_span("concierge.unit")  # a child of the request's span
            entered = otel_context.attach(trace.set_span_in_context(span))
            if span.is_recording():
                span.set_attribute("mcp.session.id", session_hash(job.session_id))
                span.set_attribute("concierge.store", store.backend.scheme or type(store.backend).__name__)
                if job.label:
                    span.set_attribute("concierge.what", job.label)
        try:
            await store.acquire(job.session_id)
            try:
                for attempt in range(1, attempts + 1):
                    if attempt > 1:
                        INSTRUMENTS.retries.add(1)
                    t0 = time.perf_counter()
                    if job.fresh and attempt == 1:
                        session: WorkingCopy | None = store.blank(job.session_id)
                    elif job.load is not None:
                        session = await job.load()
                    else:
                        session = await store.load(job.session_id, create=job.create, catch_up=job.catch_up)
                    if span is not None:
                        span.set_attribute("concierge.attempt", attempt)
                        span.set_attribute("concierge.load_ms", (time.perf_counter() - t0) * 1000)
                    if session is None or session.stage == ids.ENDED:
                        return None, None
                    if job.check_owner and session.version > 0 and session.owner != job.owner:
                        return None, None
                    if session.version == 0 and job.create_until is not None and store.clock() >= job.create_until:
                        return None, None
                    try:
                        result, unit, outcome = await self._attempt(job, body, session, span)
                    except ConflictError:
                        INSTRUMENTS.conflicts.add(1)
                        if attempt >= attempts:
                            outcome = "conflict"
                            raise
                        await anyio.sleep(random.uniform(0, 0.002 * 2 ** min(attempt - 1, 6)))
                        continue
                    return result, unit
            finally:
                store.release(job.session_id)
        except BaseException as exc:
            if isinstance(exc, StateUnavailableError):
                outcome = "store unavailable"
            elif not isinstance(exc, ConflictError):  # a conflict's outcome is set where it is judged
                outcome = "failed"
            if span is not None:  # as `start_as_current_span` would
                span.record_exception(exc)
                span.set_status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            INSTRUMENTS.duration.record(time.perf_counter() - started, {"outcome": outcome})
            if span is not None:
                span.set_attribute("concierge.outcome", outcome)
                span.end()
                otel_context.detach(entered)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _attempt(
        self, job: Job, body: Callable[[UnitOfWork], Awaitable[Any]], session: WorkingCopy, span: Span | None
    ) -> tuple[Any, UnitOfWork, str]:
        """Run the body once on `session` and commit; the result, the unit and the outcome."""
        store = self.store
        new = session.version == 0 and not session.detached
        if new:
            session.owner = job.owner
            session.must_persist = self.beginning.seeds  # its hooks ran: they must not run again
        session.rebasable = True  # user code reads it only through the state API, which records each read
        unit = UnitOfWork(session, tool=job.label)
        user = job.user(session)
        if user is None:
            unit.scope_errors["user"] = NO_USER
        loader = unit.loader = BucketLoader(store, unit, user)
        try:
            if new and job.tally is not None:
                await job.tally.admit()  # before any user code: a refused session runs nothing
            plans = job.plans
            scopes = plans[0].scopes if len(plans) == 1 else set().union(*(p.scopes for p in plans))
            if new:
                scopes = scopes | self.beginning.start.scopes
            if scopes:
                await loader.preload(scopes)
            with bind(unit):
                if new:
                    await self.beginning.begin(unit)
                result = await body(unit)
            if span is not None and unit.buckets:
                span.set_attribute("concierge.scopes", sorted(unit.buckets))
            if plans and unit.loaded_on_use:
                plans[0].scopes |= unit.loaded_on_use  # loaded up front from now on, in lock order
            if not job.keep(result):
                return result, unit, "not kept"
            await store.renew(session)
            extra = await job.companions() if new and session.dirty and job.companions is not None else []
            copies = [*unit.copies(), *extra]
            if not new and job.tally is not None:
                await job.tally.used()
            if not any(c.dirty and not c.detached for c in copies):
                if span is not None:
                    span.set_attribute("concierge.version", session.version)
                return result, unit, "nothing to write"
            t0 = time.perf_counter()
            ended = session.stage == ids.ENDED and session.stage_changed
            if job.tally is not None and session.dirty and (new or ended):
                await self._commit_counted(job.tally, copies, session, new, job.label)
            else:
                await store.commit(*copies, tool=job.label)
            if span is not None:
                span.set_attribute("concierge.commit_ms", (time.perf_counter() - t0) * 1000)
                span.set_attribute("concierge.version", session.version + (1 if session.dirty else 0))
            INSTRUMENTS.commits.add(1)
            return result, unit, "committed"
        finally:
            loader.release()

    async def _commit_counted(
        self, tally: Tally, copies: list[WorkingCopy], session: WorkingCopy, new: bool, label: str | None
    ) -> None:
        """Commit `copies` with the tally's record, retrying only when that record alone moved meanwhile."""
        store = self.store
        async with store.locked(tally.record_id):
            for attempt in range(1, ATTEMPTS + 1):
                record = await tally.updated(session, new)
                try:
                    await store.commit(*copies, *([record] if record is not None else []), tool=label)
                    return
                except ConflictError:
                    if record is None or attempt == ATTEMPTS:
                        raise
                    fresh = await store.load(tally.record_id, create=True)
                    if fresh is None or fresh.version == record.version:
                        raise  # one of the unit's own records moved: a real conflict
                    INSTRUMENTS.retries.add(1)
                    await anyio.sleep(random.uniform(0, 0.002 * 2 ** min(attempt - 1, 6)))
