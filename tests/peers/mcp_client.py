"""The official MCP Python SDK client, as a user runs it, for the integration tests.

    mcp_client.py oauth URL       sign in knowing only the URL: 401 -> Protected Resource
                                  Metadata -> authorization server metadata -> dynamic client
                                  registration -> authorization code with PKCE and the resource
                                  indicator -> token; then list tools and call `add`.
    mcp_client.py key URL KEY     the same calls with a static `Authorization: Bearer KEY`.
    mcp_client.py calls URL AUTH TOOL...
                                  with `Authorization: AUTH` (a Bearer key or Basic), list the
                                  tools, prompts and resources, then call each TOOL in turn in
                                  one session: each call's result, or the JSON-RPC error it got.
    mcp_client.py oauth-calls URL TOOL...
                                  sign in as `oauth` does, then as `calls` (a refused scope is
                                  the SDK's step-up: it signs in again asking for more).

The browser step of the sign-in is played by following the authorization endpoint's redirect
(the test IdP approves at once). Prints one JSON line: the tools listed and the result of
add(2, 3), or the error.
"""

import asyncio
import json
import sys
from urllib.parse import parse_qs, urlparse

import httpx2
from mcp import ClientSession
from mcp.client.auth import OAuthClientProvider, TokenStorage
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientInformationFull, OAuthClientMetadata, OAuthToken


class Memory(TokenStorage):
    def __init__(self):
        self.tokens = None
        self.client = None

    async def get_tokens(self):
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken):
        self.tokens = tokens

    async def get_client_info(self):
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull):
        self.client = client_info


class Browser:
    """Visits the authorization URL and catches the redirect back to the client."""

    def __init__(self):
        self.result = None
        self.visited = None

    async def redirect(self, url: str) -> None:
        self.visited = url
        async with httpx2.AsyncClient(follow_redirects=False) as c:
            r = await c.get(url)
        location = r.headers["location"]
        q = parse_qs(urlparse(location).query)
        self.result = AuthorizationCodeResult(code=q["code"][0], state=q.get("state", [None])[0])

    async def callback(self) -> AuthorizationCodeResult:
        return self.result


async def session_calls(http_client, url):
    async with streamable_http_client(url, http_client=http_client) as streams:
        read, write = streams[0], streams[1]
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = await session.list_tools()
            result = await session.call_tool("add", {"a": 2, "b": 3})
            text = [c.text for c in result.content if getattr(c, "type", "") == "text"]
            return {"tools": sorted(t.name for t in tools.tools), "result": text, "is_error": bool(getattr(result, "is_error", False))}


ARGUMENTS = {"add": {"a": 2, "b": 3}, "echo": {"text": "secret-argument-4242"}, "search_docs": {"query": "q"}}


async def script(http_client, url, tools):
    """List everything, then call each tool; a refused call is reported, and the next one is
    made in the same session (a refusal must not break it)."""
    from mcp.shared.exceptions import MCPError

    async with streamable_http_client(url, http_client=http_client) as streams:
        read, write = streams[0], streams[1]
        async with ClientSession(read, write) as session:
            await session.initialize()
            out = {
                "tools": sorted(t.name for t in (await session.list_tools()).tools),
                "prompts": sorted(p.name for p in (await session.list_prompts()).prompts),
                "resources": sorted(str(r.uri) for r in (await session.list_resources()).resources),
                "calls": [],
            }
            for tool in tools:
                try:
                    result = await session.call_tool(tool, ARGUMENTS.get(tool, {}))
                    text = [c.text for c in result.content if getattr(c, "type", "") == "text"]
                    out["calls"].append({"tool": tool, "result": text, "is_error": bool(getattr(result, "is_error", False))})
                except MCPError as e:
                    out["calls"].append({"tool": tool, "error": {"code": e.error.code, "message": e.error.message}})
            return out


def describe(e: BaseException) -> str:
    """The innermost errors of nested exception groups, which is what went wrong."""
    inner = getattr(e, "exceptions", None)
    if inner:
        return " | ".join(describe(x) for x in inner)
    return f"{type(e).__name__}: {e}"


async def main():
    mode, url = sys.argv[1], sys.argv[2]
    out = {}
    try:
        if mode == "calls":
            async with httpx2.AsyncClient(headers={"Authorization": sys.argv[3]}, timeout=20) as c:
                out = await script(c, url, sys.argv[4:])
        elif mode in ("oauth", "oauth-calls"):
            browser = Browser()
            provider = OAuthClientProvider(
                server_url=url,
                client_metadata=OAuthClientMetadata(
                    client_name="portcullis test client",
                    redirect_uris=["http://127.0.0.1:1/callback"],
                    grant_types=["authorization_code", "refresh_token"],
                    response_types=["code"],
                    token_endpoint_auth_method="none",
                ),
                storage=Memory(),
                redirect_handler=browser.redirect,
                callback_handler=browser.callback,
            )
            async with httpx2.AsyncClient(auth=provider, timeout=20) as c:
                if mode == "oauth":
                    out = await session_calls(c, url)
                else:
                    out = await script(c, url, sys.argv[3:])
            out["authorize_url"] = browser.visited
        else:
            key = sys.argv[3]
            async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=20) as c:
                out = await session_calls(c, url)
    except BaseException as e:  # noqa: BLE001 - the test reads what went wrong
        out = {"error": describe(e)}
    print(json.dumps(out), flush=True)


asyncio.run(main())
