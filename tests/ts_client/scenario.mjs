// Drives a concierge server with the official TypeScript MCP SDK and prints ONE JSON
// document with what the client saw. It asserts nothing: tests/test_typescript_client.py
// does all the checking.
//
//   node scenario.mjs stdio COMMAND [ARG...]      one stdio session (the server is spawned)
//   node scenario.mjs stateful URL                streamable HTTP with mcp-session-id; two clients
//   node scenario.mjs stateless URL               stateless streamable HTTP: session handles
//   node scenario.mjs stateless-missing URL       only tools/list and one call without session_id
//
// The spawned stdio server inherits this process's environment (CONCIERGE_STATE_URL, ...).
// Exit status: 0 when the document was printed (whatever the calls returned), 1 on a
// failure outside the calls (a connection that could not be made, ...), 2 on bad usage,
// 3 when the whole run took longer than its time limit.

import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StdioClientTransport } from "@modelcontextprotocol/sdk/client/stdio.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { LATEST_PROTOCOL_VERSION } from "@modelcontextprotocol/sdk/types.js";
import { readFileSync } from "node:fs";

const RUN_LIMIT_MS = Number(process.env.SCENARIO_TIME_LIMIT_MS || 45000);
const REQUEST_TIMEOUT_MS = 20000;
const HANDLE_KEY = "concierge/session_id";
const UNKNOWN_HANDLE = "A".repeat(43); // well-formed (43 URL-safe base64 characters), never issued
const MALFORMED_HANDLE = "!!";

// The installed SDK's version, from its own package.json (not exported through the package's "exports").
const sdkVersion = JSON.parse(
  readFileSync(new URL("./node_modules/@modelcontextprotocol/sdk/package.json", import.meta.url), "utf8"),
).version;

function usage(message) {
  process.stderr.write(`${message}\nusage: node scenario.mjs stdio COMMAND [ARG...] | (stateful|stateless|stateless-missing) URL\n`);
  process.exit(2);
}

const limit = setTimeout(() => {
  process.stderr.write(`scenario did not finish within ${RUN_LIMIT_MS} ms\n`);
  process.exit(3);
}, RUN_LIMIT_MS);
limit.unref();

function errorOf(error) {
  return {
    message: error instanceof Error ? error.message : String(error),
    code: error && typeof error === "object" && "code" in error ? error.code : null,
  };
}

/** A connected client, with the protocol version the server agreed to. */
async function connect(transport, name) {
  const seen = {};
  // Client.connect hands the negotiated version to transports that take one (the HTTP
  // transport needs it for its headers); wrap (or add) the hook to record it for stdio too.
  const original = transport.setProtocolVersion?.bind(transport);
  transport.setProtocolVersion = (version) => {
    seen.protocolVersion = version;
    original?.(version);
  };
  const client = new Client({ name, version: "1.0.0" });
  await client.connect(transport, { timeout: REQUEST_TIMEOUT_MS });
  return {
    client,
    transport,
    info: {
      protocolVersion: seen.protocolVersion ?? null,
      serverInfo: client.getServerVersion() ?? null,
      wireSessionId: transport.sessionId ?? null,
    },
  };
}

function httpTransport(url) {
  return new StreamableHTTPClientTransport(new URL(url));
}

async function listTools(client) {
  const { tools } = await client.listTools(undefined, { timeout: REQUEST_TIMEOUT_MS });
  return tools.map((t) => ({
    name: t.name,
    description: t.description ?? null,
    inputSchema: t.inputSchema ?? null,
    outputSchema: t.outputSchema ?? null,
  }));
}

/** One tools/call: the arguments sent and the result as received (or what was thrown). */
async function call(client, name, args) {
  const record = { tool: name, arguments: args };
  try {
    const result = await client.callTool({ name, arguments: args }, undefined, { timeout: REQUEST_TIMEOUT_MS });
    record.result = {
      content: result.content ?? null,
      isError: result.isError ?? null,
      _meta: result._meta ?? null,
      structuredContent: result.structuredContent ?? null,
    };
  } catch (error) {
    record.thrown = errorOf(error);
  }
  return record;
}

/** The session handle a result carries: `_meta`, else its first text block's `session_id: ...` line. */
function handleOf(record) {
  const result = record?.result;
  if (!result || result.isError) return null;
  const meta = result._meta?.[HANDLE_KEY];
  if (typeof meta === "string" && meta) return meta;
  const first = (result.content ?? [])[0];
  const match = first?.type === "text" ? /^session_id: (\S+)/.exec(first.text) : null;
  if (match) return match[1];
  const structured = result.structuredContent?.session_id;
  return typeof structured === "string" && structured ? structured : null;
}

async function closeAll(connections) {
  for (const c of connections.reverse()) {
    try {
      await c.client.close();
    } catch {
      // closing is best effort; what was seen is already recorded
    }
  }
}

async function stdio(command, args) {
  const transport = new StdioClientTransport({ command, args, env: { ...process.env }, stderr: "inherit" });
  const one = await connect(transport, "concierge-ts-stdio");
  try {
    const tools = await listTools(one.client);
    const calls = {};
    calls.add_first = await call(one.client, "add_to_cart", { item: "apple" });
    calls.add_second = await call(one.client, "add_to_cart", { item: "pear" });
    calls.view = await call(one.client, "view_cart", {});
    return { connection: one.info, tools, calls };
  } finally {
    await closeAll([one]);
  }
}

async function stateful(url) {
  const opened = [];
  try {
    const one = await connect(httpTransport(url), "concierge-ts-one");
    opened.push(one);
    const tools = await listTools(one.client);
    const calls = {};
    calls.add_first = await call(one.client, "add_to_cart", { item: "apple" });
    calls.add_second = await call(one.client, "add_to_cart", { item: "pear" });
    calls.view = await call(one.client, "view_cart", {});
    // A second client on its own connection, while the first is still open.
    const two = await connect(httpTransport(url), "concierge-ts-two");
    opened.push(two);
    const second = { tools: await listTools(two.client), calls: {} };
    second.calls.view = await call(two.client, "view_cart", {});
    second.calls.add = await call(two.client, "add_to_cart", { item: "bread" });
    calls.view_after_second = await call(one.client, "view_cart", {});
    return { connection: one.info, tools, calls, second: { connection: two.info, ...second } };
  } finally {
    await closeAll(opened);
  }
}

async function stateless(url, { onlyMissing }) {
  const one = await connect(httpTransport(url), "concierge-ts-stateless");
  try {
    const tools = await listTools(one.client);
    const calls = {};
    calls.missing = await call(one.client, "add_to_cart", { item: "apple" });
    if (onlyMissing) return { connection: one.info, tools, calls };

    calls.issued = await call(one.client, "add_to_cart", { item: "apple", session_id: "new" });
    const handle = handleOf(calls.issued);
    if (handle !== null) {
      calls.active_add = await call(one.client, "add_to_cart", { item: "pear", session_id: handle });
      calls.active_view = await call(one.client, "view_cart", { session_id: handle });
    }
    calls.unknown = await call(one.client, "add_to_cart", { item: "plum", session_id: UNKNOWN_HANDLE });
    calls.malformed = await call(one.client, "add_to_cart", { item: "plum", session_id: MALFORMED_HANDLE });
    calls.start = await call(one.client, "start_session", {});
    const started = handleOf(calls.start);
    if (started !== null) {
      calls.started_view = await call(one.client, "view_cart", { session_id: started });
    }
    return { connection: one.info, tools, calls, handles: { issued: handle, started } };
  } finally {
    await closeAll([one]);
  }
}

async function main() {
  const [mode, target, ...rest] = process.argv.slice(2);
  if (!mode || !target) usage("missing arguments");
  let seen;
  if (mode === "stdio") seen = await stdio(target, rest);
  else if (rest.length) usage(`unexpected arguments: ${rest.join(" ")}`);
  else if (mode === "stateful") seen = await stateful(target);
  else if (mode === "stateless") seen = await stateless(target, { onlyMissing: false });
  else if (mode === "stateless-missing") seen = await stateless(target, { onlyMissing: true });
  else usage(`unknown mode ${JSON.stringify(mode)}`);
  const document = { mode, sdkVersion, clientProtocolVersion: LATEST_PROTOCOL_VERSION, ...seen };
  process.stdout.write(JSON.stringify(document) + "\n");
}

try {
  await main();
  process.exitCode = 0;
} catch (error) {
  process.stderr.write(`scenario failed: ${error instanceof Error ? error.stack : String(error)}\n`);
  process.exitCode = 1;
}
// The stdio child and HTTP sockets are closed above; do not wait on anything left behind.
process.exit(process.exitCode);
