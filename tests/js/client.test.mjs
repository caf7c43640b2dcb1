// The JavaScript client against a real proxy (started by tests/test_js_client.py, which passes
// PROXY_WS_URL, the tokens and WORKFLOW_DIR in the environment and drives the proxy's clock:
// at each step() this script prints "STEP <name>" and waits for "GO" on stdin).
// Run: node --experimental-websocket --test-reporter=spec tests/js/client.test.mjs
import {after, test} from "node:test";
import assert from "node:assert/strict";
import {readFileSync} from "node:fs";
import {join} from "node:path";
import {createInterface} from "node:readline";
import {AuthenticationError, ProxyClient, ProxyError} from "../../comfy_ws_proxy/static/comfy-ws-proxy-client.js";

const env = process.env;
const URL = env.PROXY_WS_URL;
const workflow = (name) => JSON.parse(readFileSync(join(env.WORKFLOW_DIR, name + ".json"), "utf8"));
const lines = createInterface({input: process.stdin})[Symbol.asyncIterator]();

async function step(name) {
  process.stdout.write("STEP " + name + "\n");
  const {value} = await lines.next();
  assert.equal(value, "GO");
}

const clients = [];
function newClient(options) { const c = new ProxyClient(URL, options); clients.push(c); return c; }
// (a failed test must leave neither a socket open nor node waiting on stdin)
after(() => { clients.forEach((c) => c.close()); process.stdin.destroy(); });

const once = (client, type) => new Promise((resolve) => { const off = client.on(type, (v) => { off(); resolve(v); }); });

test("submit: events for the prompt, then its result", async () => {
  const client = newClient({token: env.TOKEN_ALICE});
  const session = await client.connect();
  assert.equal(session.user_id, "alice");
  const job = await client.submit(workflow("success-ws"));
  assert.equal(job.accepted.prompt_id, job.promptId);
  const seen = [];
  for await (const event of job) seen.push(event instanceof ArrayBuffer ? "binary" : event.type);
  const result = await job.result();
  assert.equal(result.status, "success");
  assert.ok(Object.keys(result.outputs).length > 0, JSON.stringify(result));
  assert.ok(seen.includes("execution_start") && seen.includes("execution_success"), seen.join());
  assert.ok(seen.includes("binary"), "no preview frame: " + seen.join());
  client.close();
  await assert.rejects(client.ping(), {name: "ConnectionError"});
});

test("a refusal rejects the submit at once, by its ref", async () => {
  const client = newClient({token: env.TOKEN_ALICE});
  await client.connect();
  const promptId = "0b0c1d2e-3f40-4152-8364-758697a8b9ca";
  const refused = await client.submit({}, {promptId}).then(() => null, (e) => e);
  assert.ok(refused instanceof ProxyError, String(refused));
  assert.equal(refused.code, "invalid_message");
  assert.equal(refused.promptId, promptId);
  assert.match(refused.proxyMessage, /non-empty object 'prompt'/);
  const invalid = await client.submit(workflow("validation-fail")).then(() => null, (e) => e);
  assert.equal(invalid.code, "invalid_prompt");
  assert.ok(Object.keys(invalid.nodeErrors).length > 0);
  assert.equal(client.jobs.size, 0);
  assert.deepEqual(await client.ping({still: "here"}), {still: "here"});
  client.close();
});

test("cancel interrupts a running prompt", async () => {
  const client = newClient({token: env.TOKEN_ALICE});
  await client.connect();
  await step("hold");  // the simulator will stop inside node 3
  const job = await client.submit(workflow("long-running"));
  const inNode3 = (e) => e.type === "executing" && e.data.node === "3";
  await new Promise((resolve) => {
    if (job.events.some(inNode3)) return resolve();
    const off = job.on((e) => { if (inNode3(e)) { off(); resolve(); } });
  });
  const answer = await client.cancel(job.promptId);
  assert.equal(answer.type, "cancel_accepted");
  assert.equal(answer.data.prompt_id, job.promptId);
  await step("release");
  const result = await job.result();
  assert.equal(result.status, "interrupted");
  await assert.rejects(client.cancel("00000000-0000-4000-8000-000000000000"), (e) => e instanceof ProxyError && !!e.code);
  client.close();
});

test("a dropped socket is reopened and resumed: the prompt's events arrive once, in order", async () => {
  const client = newClient({token: env.TOKEN_CAROL, reconnectMinMs: 20});
  await client.connect();
  await step("hold");
  const job = await client.submit(workflow("long-running"));
  const inNode3 = (e) => e.type === "executing" && e.data.node === "3";
  await new Promise((resolve) => {
    if (job.events.some(inNode3)) return resolve();
    const off = job.on((e) => { if (inNode3(e)) { off(); resolve(); } });
  });
  const resumed = once(client, "resumed");
  const sessionId = client.sessionId;
  await step("drop");  // carol's TCP connection just ends
  const state = await resumed;
  assert.equal(client.sessionId, sessionId);
  assert.ok(state.prompts.some((p) => p.prompt_id === job.promptId), JSON.stringify(state));
  await step("release");
  const result = await job.result();
  assert.equal(result.status, "success");
  const seqs = job.events.filter((e) => typeof e.seq === "number").map((e) => e.seq);
  assert.deepEqual(seqs, [...new Set(seqs)].sort((a, b) => a - b));
  client.close();
});

test("token_expiring: the provider's token goes over in band; 4001 without one ends the client", async () => {
  const provided = [];
  const refreshing = newClient({token: env.TOKEN_SHORT,
    tokenProvider: async () => { provided.push(env.TOKEN_FRESH); return env.TOKEN_FRESH; }});
  await refreshing.connect();
  if (env.JS_DEBUG) refreshing.on("message", (m) => console.log("refreshing <", JSON.stringify(m)));
  const plain = newClient({token: env.TOKEN_SHORT});
  await plain.connect();
  const warned = once(plain, "message");
  const refreshed = once(refreshing, "token_refreshed");
  await step("hold");
  const job = await plain.submit(workflow("long-running"));  // still running at the deadline
  await step("warn");  // the proxy's clock moves into the warning: token_expiring to both
  const data = await refreshed;
  assert.equal(refreshing.token, env.TOKEN_FRESH);
  assert.ok(data.deadline > 0, JSON.stringify(data));
  assert.equal(provided.length, 1);
  assert.ok(warned);
  const ended = once(plain, "closed");
  await step("expire");  // past the short token's deadline: error unauthorized, close 4001
  const failure = await ended;
  assert.ok(failure instanceof AuthenticationError, String(failure));
  assert.equal(failure.reason, "expired");
  await assert.rejects(job.result(), AuthenticationError);
  await assert.rejects(plain.submit(workflow("success")), AuthenticationError);
  // the refreshed connection lives on
  assert.deepEqual(await refreshing.ping({}), {});
  assert.equal(refreshing.state, "connected");
  await step("release");
  refreshing.close();
});
