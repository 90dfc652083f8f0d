// The official MCP TypeScript SDK client, as a user runs it, for the integration tests.
//
//   node mcp_client.mjs oauth URL    sign in knowing only the URL (the SDK's OAuth flow: 401 ->
//                                    Protected Resource Metadata -> authorization server
//                                    metadata -> dynamic registration -> authorization code
//                                    with PKCE and the resource indicator), then list tools
//                                    and call `add`
//   node mcp_client.mjs key URL KEY  the same calls with a static `Authorization: Bearer KEY`
//   node mcp_client.mjs calls URL KEY TOOL...
//                                    with the key, list the tools, then call each TOOL in turn:
//                                    each call's result, or the JSON-RPC error it got
//
// The browser step is played by following the authorization endpoint's redirect (the test IdP
// approves at once). Prints one JSON line: the tools listed and the result of add(2, 3), or
// the error.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { UnauthorizedError } from "@modelcontextprotocol/sdk/client/auth.js";

const [mode, url, key] = process.argv.slice(2);
const out = {};

class MemoryProvider {
  constructor() {
    this.client = undefined;
    this.saved = undefined;
    this.verifier = undefined;
    this.code = undefined;
  }
  get redirectUrl() {
    return "http://127.0.0.1:1/callback";
  }
  get clientMetadata() {
    return {
      client_name: "portcullis test client (TypeScript SDK)",
      redirect_uris: ["http://127.0.0.1:1/callback"],
      grant_types: ["authorization_code", "refresh_token"],
      response_types: ["code"],
      token_endpoint_auth_method: "none",
    };
  }
  clientInformation() {
    return this.client;
  }
  saveClientInformation(info) {
    this.client = info;
  }
  tokens() {
    return this.saved;
  }
  saveTokens(tokens) {
    this.saved = tokens;
  }
  async redirectToAuthorization(authorizationUrl) {
    out.authorize_url = authorizationUrl.toString();
    const r = await fetch(authorizationUrl, { redirect: "manual" });
    this.code = new URL(r.headers.get("location")).searchParams.get("code");
  }
  saveCodeVerifier(v) {
    this.verifier = v;
  }
  codeVerifier() {
    return this.verifier;
  }
}

async function calls(transport) {
  const client = new Client({ name: "portcullis-test", version: "1.0.0" });
  await client.connect(transport);
  const tools = await client.listTools();
  const result = await client.callTool({ name: "add", arguments: { a: 2, b: 3 } });
  await client.close();
  return {
    tools: tools.tools.map((t) => t.name).sort(),
    result: result.content.filter((c) => c.type === "text").map((c) => c.text),
    is_error: Boolean(result.isError),
  };
}

async function script(transport, tools) {
  const client = new Client({ name: "portcullis-test", version: "1.0.0" });
  await client.connect(transport);
  const listed = await client.listTools();
  const calls = [];
  for (const tool of tools) {
    try {
      const args = tool === "add" ? { a: 2, b: 3 } : tool === "search_docs" ? { query: "q" } : {};
      const result = await client.callTool({ name: tool, arguments: args });
      calls.push({
        tool,
        result: result.content.filter((c) => c.type === "text").map((c) => c.text),
        is_error: Boolean(result.isError),
      });
    } catch (e) {
      calls.push({ tool, error: { code: e?.code, message: e?.message } });
    }
  }
  await client.close();
  return { tools: listed.tools.map((t) => t.name).sort(), calls };
}

try {
  if (mode === "calls") {
    const transport = new StreamableHTTPClientTransport(new URL(url), {
      requestInit: { headers: { Authorization: `Bearer ${key}` } },
    });
    Object.assign(out, await script(transport, process.argv.slice(5)));
  } else if (mode === "oauth") {
    const provider = new MemoryProvider();
    const first = new StreamableHTTPClientTransport(new URL(url), { authProvider: provider });
    try {
      Object.assign(out, await calls(first));
    } catch (e) {
      if (!(e instanceof UnauthorizedError) || !provider.code) throw e;
      // Back from the "browser": exchange the code, then connect again.
      await first.finishAuth(provider.code);
      Object.assign(out, await calls(new StreamableHTTPClientTransport(new URL(url), { authProvider: provider })));
    }
  } else {
    const transport = new StreamableHTTPClientTransport(new URL(url), {
      requestInit: { headers: { Authorization: `Bearer ${key}` } },
    });
    Object.assign(out, await calls(transport));
  }
} catch (e) {
  out.error = `${e?.name}: ${e?.message}`;
}
process.stdout.write(JSON.stringify(out) + "\n");
process.exit(0);
