"""The request path: how one MCP request that runs user code is served.

Follow a tool call top to bottom: `middleware` -> `call` (resolve the session
with `concierge.identity`, enforce the stage, run the tool once in a unit of
work with `concierge.work.Runner`) -> `envelope` (the result on the wire).
`read` does the same for resources and prompts, `listing` rewrites
`tools/list`, `builtins` holds the tools concierge adds. Everything here works
from one `Runtime`; nothing here imports `concierge.app`.
"""

from concierge.serve.builtins import builtin_tools
from concierge.serve.middleware import Middleware
from concierge.serve.runtime import BUILTINS, SESSION_ARG, Runtime

__all__ = ["BUILTINS", "SESSION_ARG", "Middleware", "Runtime", "builtin_tools"]
