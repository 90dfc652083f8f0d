"""A real MCP server for the integration tests: the official Python SDK's MCPServer over
Streamable HTTP on a free loopback port, with its DNS-rebinding guard on (the default for a
loopback host). Every HTTP request it receives is recorded, one JSON line in $MCP_RECORD
(method, path, the headers the tests look for, and for a POST the JSON-RPC method and the
tool, prompt or resource it names), so a test can prove what reached it.

Tools: add, echo, search_docs, get_time, delete_all; prompts: summarize, internal_notes;
resources: docs://readme, secret://keys.

Prints `listening http://127.0.0.1:PORT/mcp` once it accepts connections.
"""

import asyncio
import json
import os
import socket
import sys

import uvicorn
from mcp.server.mcpserver import MCPServer

RECORD = os.environ.get("MCP_RECORD")
WATCHED = ["authorization", "origin", "x-authenticated-user", "mcp-session-id", "mcp-protocol-version", "x-api-key"]

server = MCPServer("portcullis-test-server")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def echo(text: str) -> str:
    """Echo the text back."""
    return text


@server.tool()
def search_docs(query: str) -> str:
    """Search the documentation."""
    return f"found: {query}"


@server.tool()
def get_time() -> str:
    """The time."""
    return "12:00"


@server.tool()
def delete_all() -> str:
    """Delete everything."""
    return "deleted"


@server.prompt()
def summarize(text: str) -> str:
    """Summarize a text."""
    return f"Summarize: {text}"


@server.prompt()
def internal_notes() -> str:
    """Internal notes."""
    return "internal"


@server.resource("docs://readme")
def readme() -> str:
    """The readme."""
    return "read me"


@server.resource("secret://keys")
def secret_keys() -> str:
    """Secret keys."""
    return "top secret"


def record(line):
    with open(RECORD, "a") as f:
        f.write(json.dumps(line) + "\n")


def rpc_of(body: bytes):
    """The JSON-RPC method and what it names, as the server reads the body."""
    try:
        msg = json.loads(body)
    except ValueError:
        return {"unparsed": True}
    if not isinstance(msg, dict):
        return {"unparsed": True}
    params = msg.get("params") or {}
    return {"method": msg.get("method"), "name": params.get("name") or params.get("uri")}


def recording(app):
    async def wrapped(scope, receive, send):
        if scope["type"] != "http" or not RECORD:
            return await app(scope, receive, send)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        line = {"method": scope["method"], "path": scope["path"], "headers": {k: headers.get(k) for k in WATCHED}}
        if scope["method"] != "POST":
            record(line)
            return await app(scope, receive, send)
        chunks = []

        async def receive_recorded():
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    line["rpc"] = rpc_of(b"".join(chunks))
                    record(line)
            return message

        await app(scope, receive_recorded, send)

    return wrapped


async def main() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = server.streamable_http_app(json_response="--json" in sys.argv, host="127.0.0.1")
    config = uvicorn.Config(recording(app), log_level="warning", lifespan="on")
    srv = uvicorn.Server(config)
    task = asyncio.create_task(srv.serve(sockets=[sock]))
    while not srv.started:
        await asyncio.sleep(0.02)
    print(f"listening http://127.0.0.1:{port}/mcp", flush=True)
    await task


asyncio.run(main())
