"""A server protected by the SDK's bearer-token auth, for the user-scope tests.

    python tests/servers/auth_server.py PORT [--stateless]

Tokens are fixed: `token-<name>` authenticates subject `<name>` (client
`test-client`, issuer `https://auth.test`); anything else is refused.
"""

from __future__ import annotations

import argparse

from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings

from concierge import Concierge


class FixedTokens:
    """A `TokenVerifier` that knows `token-<name>` for any name."""

    async def verify_token(self, token: str) -> AccessToken | None:
        if not token.startswith("token-"):
            return None
        return AccessToken(
            token=token,
            client_id="test-client",
            scopes=["user"],
            subject=token.removeprefix("token-"),
            claims={"iss": "https://auth.test"},
        )


def build(port: int) -> Concierge:
    app = Concierge(
        "auth-server",
        token_verifier=FixedTokens(),
        auth=AuthSettings(
            issuer_url="https://auth.test",
            resource_server_url=f"http://127.0.0.1:{port}/mcp",
            required_scopes=["user"],
        ),
    )

    @app.tool()
    def add_to_saved_cart(item: str) -> dict:
        """Add to the caller's cart, kept across sessions."""
        cart = app.get_state("cart", [], scope="user")
        cart.append(item)
        app.set_state("cart", cart, scope="user")
        return {"cart": cart}

    @app.tool()
    def saved_cart() -> dict:
        """The caller's cart, kept across sessions."""
        return {"cart": app.get_state("cart", [], scope="user")}

    @app.on_session_end
    def record_end(session_id: str, reason: str) -> None:
        ended = app.get_state("ended", [], scope="global")
        app.set_state("ended", [*ended, [session_id, reason, app.get_state("notes", [])]], scope="global")

    @app.tool()
    def ended_sessions() -> dict:
        """Sessions that have ended, with why."""
        return {"ended": app.get_state("ended", [], scope="global")}

    @app.tool()
    def note(text: str) -> dict:
        """Keep a note in this session."""
        notes = app.get_state("notes", [])
        notes.append(text)
        app.set_state("notes", notes)
        return {"notes": notes}

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--stateless", action="store_true")
    args = parser.parse_args()
    build(args.port).run("streamable-http", host="127.0.0.1", port=args.port, stateless_http=args.stateless)


if __name__ == "__main__":
    main()
