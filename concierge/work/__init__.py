"""The unit of work: how one request's state is loaded, used, and committed once.

Read it in this order:

- `codec`: state keys and the JSON encoding of values;
- `record`: `WorkingCopy`, one stored record as one request changes it;
- `store`: `SessionStore`, working copies in and out of a backend;
- `scopes`: which shared scopes code uses (declared, found, or loaded on use) and `on_conflict`;
- `unit`: `UnitOfWork`, one request's copies, bound to a contextvar;
- `runner`: the lock, load, run-once, commit loop.
"""

from concierge.work.codec import MAX_KEY_LENGTH, check_key, decode, encode
from concierge.work.record import WorkingCopy
from concierge.work.runner import Job, Runner
from concierge.work.scopes import SCOPES, SHARED_SCOPES, Plan, Plans
from concierge.work.store import SessionStore
from concierge.work.unit import UnitOfWork, bind, current_unit, working_copy

__all__ = [
    "MAX_KEY_LENGTH",
    "SCOPES",
    "SHARED_SCOPES",
    "Job",
    "Plan",
    "Plans",
    "Runner",
    "SessionStore",
    "UnitOfWork",
    "WorkingCopy",
    "bind",
    "check_key",
    "current_unit",
    "decode",
    "encode",
    "working_copy",
]
