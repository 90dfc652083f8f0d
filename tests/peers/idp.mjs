// A real OAuth 2.1 / OIDC authorization server for the integration tests: oauth2-mock-server
// (JWKS, discovery, /authorize with PKCE, /token), with what MCP clients that know only a URL
// need besides: dynamic client registration (RFC 7591) advertised in the metadata, RFC 8414
// metadata, and the audience of the token set from the RFC 8707 `resource` parameter.
//
// Test hooks under /test/ (never in a real IdP): mint a token with any claims, forge `alg:
// none` and HS256 tokens, rotate the signing key, make the JWKS endpoint fail, count JWKS
// fetches. Prints `listening <base URL>` on stdout once ready. Loopback only.
import http from "node:http";
import { createHmac, randomUUID } from "node:crypto";
import { OAuth2Server } from "oauth2-mock-server";

const server = new OAuth2Server();
let current = await server.issuer.keys.generate("RS256");
await server.issuer.keys.generate("ES256");
let jwksRequests = 0;
let jwksFails = false;
const clients = new Map();

function b64url(s) {
  return Buffer.from(s).toString("base64url");
}

function readBody(req) {
  return new Promise((resolve) => {
    let data = "";
    req.on("data", (c) => (data += c));
    req.on("end", () => resolve(data));
  });
}

function json(res, status, body, headers = {}) {
  res.writeHead(status, { "content-type": "application/json", ...headers });
  res.end(JSON.stringify(body));
}

// What each authorization code was issued for (the scope asked at /authorize), for the token.
const granted = new Map();
// The scope of each authorization asked for, in order (/test/stats).
const scopesAsked = [];
server.service.on("beforeAuthorizeRedirect", (redirect, req) => {
  const code = redirect.url.searchParams.get("code");
  scopesAsked.push(req.query.scope ?? null);
  if (code) granted.set(code, { scope: req.query.scope, resource: req.query.resource });
});

// The token endpoint: aud from the `resource` parameter (RFC 8707), the scope granted at
// /authorize (or asked now), client_id set.
server.service.on("beforeTokenSigning", (token, req) => {
  const body = req.body || {};
  const grant = (body.code && granted.get(body.code)) || {};
  const resource = body.resource || grant.resource;
  if (resource) token.payload.aud = resource;
  const scope = body.scope || grant.scope;
  if (scope) token.payload.scope = scope;
  if (body.client_id) token.payload.client_id = body.client_id;
  token.payload.sub = token.payload.sub || "johndoe";
});

async function mint(spec) {
  const kid = spec.kid ?? current.kid;
  return server.issuer.buildToken({
    kid,
    expiresIn: spec.expiresIn ?? 3600,
    scopesOrTransform: (header, payload) => {
      Object.assign(header, spec.header || {});
      Object.assign(payload, { sub: "alice" }, spec.claims || {});
      for (const k of spec.remove || []) delete payload[k];
    },
  });
}

const handler = server.service.requestHandler;
const httpServer = http.createServer(async (req, res) => {
  const url = new URL(req.url, `http://${req.headers.host}`);
  const base = server.issuer.url;
  if (url.pathname === "/.well-known/openid-configuration" || url.pathname === "/.well-known/oauth-authorization-server") {
    // Authorization server metadata with registration (RFC 7591) and S256 PKCE advertised.
    const metadata = {
      issuer: base,
      authorization_endpoint: `${base}/authorize`,
      token_endpoint: `${base}/token`,
      jwks_uri: `${base}/jwks`,
      registration_endpoint: `${base}/register`,
      response_types_supported: ["code"],
      grant_types_supported: ["authorization_code", "refresh_token", "client_credentials"],
      code_challenge_methods_supported: ["S256"],
      token_endpoint_auth_methods_supported: ["none"],
      scopes_supported: ["mcp:tools", "mcp:admin"],
    };
    return json(res, 200, metadata);
  }
  if (url.pathname === "/jwks") {
    jwksRequests += 1;
    if (jwksFails) return json(res, 503, { error: "unavailable" });
  }
  if (url.pathname === "/register" && req.method === "POST") {
    const meta = JSON.parse((await readBody(req)) || "{}");
    const client = {
      ...meta,
      client_id: randomUUID(),
      client_id_issued_at: Math.floor(Date.now() / 1000),
      token_endpoint_auth_method: "none",
    };
    clients.set(client.client_id, client);
    return json(res, 201, client);
  }
  if (url.pathname.startsWith("/test/")) {
    const spec = req.method === "POST" ? JSON.parse((await readBody(req)) || "{}") : {};
    switch (url.pathname) {
      case "/test/token":
        return json(res, 200, { token: await mint(spec) });
      case "/test/jwks":
        // The published key set, for a test that writes it to a jwks_file.
        return json(res, 200, { keys: server.issuer.keys.toJSON() });
      case "/test/forge": {
        // Unsigned (alg none), or HS256 with the RSA public key as the HMAC secret.
        const header = spec.alg === "none" ? { alg: "none", typ: "JWT", kid: current.kid } : { alg: "HS256", typ: "JWT", kid: current.kid };
        const now = Math.floor(Date.now() / 1000);
        const payload = { iss: base, aud: spec.aud, sub: "mallory", exp: now + 3600, iat: now, scope: spec.scope };
        const signing = `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(payload))}`;
        if (spec.alg === "none") return json(res, 200, { token: `${signing}.` });
        const secret = JSON.stringify(server.issuer.keys.toJSON().find((k) => k.kid === current.kid));
        const sig = createHmac("sha256", secret).update(signing).digest("base64url");
        return json(res, 200, { token: `${signing}.${sig}` });
      }
      case "/test/rotate": {
        // A new signing key: tokens are signed with it from now on; the old one stays published.
        current = await server.issuer.keys.generate("RS256");
        return json(res, 200, { kid: current.kid });
      }
      case "/test/jwks-fail":
        jwksFails = spec.fail === true;
        return json(res, 200, { fail: jwksFails });
      case "/test/stats":
        return json(res, 200, {
          jwks_requests: jwksRequests,
          clients: clients.size,
          scopes_asked: scopesAsked,
          signing_kid: current.kid,
          keys: server.issuer.keys.toJSON().map((k) => ({ kid: k.kid, alg: k.alg })),
        });
      default:
        return json(res, 404, { error: "not_found" });
    }
  }
  return handler(req, res);
});

await new Promise((resolve) => httpServer.listen(0, "127.0.0.1", resolve));
const { port } = httpServer.address();
server.issuer.url = `http://127.0.0.1:${port}`;
process.stdout.write(`listening http://127.0.0.1:${port}\n`);
process.stdin.on("end", () => process.exit(0));
process.stdin.resume();
