"""A real MCP server for the integration tests: the official Python SDK's MCPServer over
Streamable HTTP on a free loopback port, with its DNS-rebinding guard on (the default for a
loopback host). Every HTTP request it receives is recorded, one JSON line in $MCP_RECORD
(method, path, and the headers the tests look for), so a test can prove what reached it.

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


def recording(app):
    async def wrapped(scope, receive, send):
        if scope["type"] == "http" and RECORD:
            headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
            line = {"method": scope["method"], "path": scope["path"], "headers": {k: headers.get(k) for k in WATCHED}}
            with open(RECORD, "a") as f:
                f.write(json.dumps(line) + "\n")
        await app(scope, receive, send)

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
