// comfy-ws-proxy-client.js: a client of comfy_ws_proxy's WebSocket protocol (v1).
// One ES module, no dependencies, no build step; browsers and Node 20+ (pass `WebSocket`
// there, or run node with --experimental-websocket). Served by the proxy at
// /static/comfy-ws-proxy-client.js. Modelled on the Python client (comfy_ws_proxy.client).
//
//   import {ProxyClient} from "/static/comfy-ws-proxy-client.js";
//   const client = new ProxyClient("wss://proxy.example/ws", {token});   // or {tokenProvider}
//   await client.connect();
//   const job = await client.submit(workflow);      // rejects at once with a ProxyError
//   for await (const event of job) { ... }           // JSON messages, binary previews (ArrayBuffer)
//   const {status, outputs, error} = await job.result();
//
// Every request carries a `ref`; the proxy's answer echoes it. A dropped socket is reopened
// and `resume`d from the last `seq` seen. `token_expiring` asks the tokenProvider for a fresh
// token (sent as `refresh_token`); without a provider a close 4001 ends the client and
// everything pending fails with an AuthenticationError.

export const SUBPROTOCOL = "comfy-ws-proxy.v1";
export const CloseCode = Object.freeze({NORMAL: 1000, GOING_AWAY: 1001, MESSAGE_TOO_BIG: 1009,
  TOKEN_EXPIRED: 4001, TOO_MANY_CONNECTIONS: 4008, SLOW_CONSUMER: 4009});
const FINAL = {execution_success: "success", execution_error: "error", execution_interrupted: "interrupted"};
// An error with neither ref nor prompt_id and one of these codes answers the oldest request
// still unanswered (the proxy answers in order; it could read nothing of that one).
const UNREADABLE = ["invalid_message", "message_too_large"];

/** The proxy (or ComfyUI through it) refused a request. */
export class ProxyError extends Error {
  constructor(data = {}) {
    super((data.code || "error") + ": " + (data.message || ""));
    this.name = "ProxyError";
    this.data = data;
    this.code = data.code ?? null;
    this.details = data.details ?? null;
    this.nodeErrors = data.node_errors || {};
    this.promptId = data.prompt_id ?? null;
    this.proxyMessage = data.message || "";
  }
}

/** The token was refused or expired (close 4001, `unauthorized`). `reason`: expired, ... */
export class AuthenticationError extends ProxyError {
  constructor(data = {}) {
    super({code: "unauthorized", ...data});
    this.name = "AuthenticationError";
    this.reason = data.reason || (data.details && data.details.reason) || null;
  }
}

/** The connection went away before an answer (or the client was closed). */
export class ConnectionError extends Error {
  constructor(message, code = null) { super(message); this.name = "ConnectionError"; this.closeCode = code; }
}

function errorFrom(data) { return data && data.code === "unauthorized" ? new AuthenticationError(data) : new ProxyError(data); }

function deferred() {
  let resolve, reject;
  const promise = new Promise((res, rej) => { resolve = res; reject = rej; });
  return {promise, resolve, reject, done: false};
}

function settle(d, error, value) {
  if (d.done) return;
  d.done = true;
  if (error) d.reject(error); else d.resolve(value);
}

function uuid4() {
  if (globalThis.crypto && typeof globalThis.crypto.randomUUID === "function") return globalThis.crypto.randomUUID();
  const b = new Uint8Array(16);
  globalThis.crypto.getRandomValues(b);
  b[6] = (b[6] & 0x0f) | 0x40; b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** The `exp` of a JWT (epoch seconds), or null: read only, never verified. */
export function tokenExpiry(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const exp = JSON.parse(atob(part + "=".repeat((4 - part.length % 4) % 4))).exp;
    return typeof exp === "number" ? exp : null;
  } catch (e) { return null; }
}

/** One submitted prompt: its events (`on`, or `for await`), and `result()`. */
export class Job {
  constructor(promptId) {
    this.promptId = promptId;
    this.accepted = null;      // the first prompt_accepted's data
    this.events = [];          // everything received for this prompt, in order
    this.outputs = {};         // node id -> ComfyUI's output
    this._listeners = new Set();
    this._waiters = [];
    this._result = deferred();
    this._result.promise.catch(() => {});  // (seen by whoever awaits result())
  }

  get done() { return this._result.done; }

  /** Call `listener(event)` for each event from now on; returns a function that stops it. */
  on(listener) { this._listeners.add(listener); return () => this._listeners.delete(listener); }

  /** {promptId, status: success|error|interrupted|cancelled|rejected, outputs, error} */
  result() { return this._result.promise; }

  async *[Symbol.asyncIterator]() {
    let i = 0;
    for (;;) {
      while (i < this.events.length) yield this.events[i++];
      if (this._result.done) return;
      await new Promise((wake) => this._waiters.push(wake));
    }
  }

  _finish(status, error = null) {
    settle(this._result, null, {promptId: this.promptId, status, outputs: {...this.outputs}, error});
  }

  _event(item) {
    if (item && typeof item === "object" && typeof item.type === "string") {
      const data = item.data || {};
      if (item.type === "executed" && data.output != null) this.outputs[data.node] = data.output;
      if (item.type in FINAL) this._finish(FINAL[item.type], item.type === "execution_error" ? data : null);
      else if (item.type === "prompt_cancelled") this._finish("cancelled");
      else if (item.type === "error") this._finish("rejected", data);
    }
    this.events.push(item);
    for (const listener of this._listeners) {
      try { listener(item); } catch (e) { console.error(e); }
    }
    this._wake();
  }

  _fail(error) {
    settle(this._result, error);
    this._wake();
  }

  _wake() { const w = this._waiters; this._waiters = []; w.forEach((wake) => wake()); }
}

/**
 * new ProxyClient(url, {token | tokenProvider, WebSocket?, reconnect = true,
 *                       reconnectMinMs = 200, reconnectMaxMs = 10000, requestTimeoutMs = 60000})
 * url: ws(s)://host/ws. tokenProvider: () => token or a Promise of one.
 * client.on(type, fn): "message" (every JSON message), "binary", "state" ({state, ...}),
 * "session", "resumed" (prompts_state's data), "token_refreshed", "closed" (the client ended).
 */
export class ProxyClient {
  constructor(url, options = {}) {
    if (!options.token && !options.tokenProvider) throw new TypeError("ProxyClient needs a token or a tokenProvider");
    this.url = url;
    this.token = options.token || null;
    this.tokenProvider = options.tokenProvider || null;
    this.WebSocket = options.WebSocket || globalThis.WebSocket;
    if (typeof this.WebSocket !== "function") {
      throw new TypeError("no WebSocket: pass {WebSocket} (Node 20: node --experimental-websocket)");
    }
    this.reconnect = options.reconnect !== false;
    this.reconnectMinMs = options.reconnectMinMs ?? 200;
    this.reconnectMaxMs = options.reconnectMaxMs ?? 10000;
    this.requestTimeoutMs = options.requestTimeoutMs ?? 60000;
    this.ws = null;
    this.sessionId = null;
    this.userId = null;
    this.lastSeq = 0;
    this.state = "idle";       // idle | connecting | connected | reconnecting | closed
    this.failure = null;       // why the client ended
    this.jobs = new Map();     // prompt id -> Job
    this._running = null;      // the Job binary previews go to
    this._pending = new Map(); // ref -> {kind, promptId, d, survives}; insertion order = oldest first
    this._nextRef = 1;
    this._listeners = new Map();
    this._held = null;         // messages received while a resume replays
    this._ready = null;        // deferred: the current socket's session arrived
    this._closing = false;
    this._refreshing = null;
    this._timer = null;
  }

  on(type, listener) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(listener);
    return () => this._listeners.get(type).delete(listener);
  }

  _emit(type, value) {
    for (const listener of this._listeners.get(type) || []) {
      try { listener(value); } catch (e) { console.error(e); }
    }
  }

  _setState(state, detail = {}) { this.state = state; this._emit("state", {state, ...detail}); }

  // --- tokens -------------------------------------------------------------------------------
  async freshToken() {
    const token = await this.tokenProvider();
    if (typeof token !== "string" || !token) throw new TypeError("tokenProvider must return a non-empty string");
    this.token = token;
    return token;
  }

  /** Hand the open connection a fresh token (this one, or the provider's): the proxy's
   * token_refreshed data; rejects with an AuthenticationError if refused (the old one stands). */
  async refreshToken(token = null) {
    if (!token) token = this.tokenProvider ? await this.freshToken() : this.token;
    const reply = await this._request("refresh_token", {token});
    this.token = token;
    this._emit("token_refreshed", reply.data);
    return reply.data;
  }

  // --- the connection -----------------------------------------------------------------------
  /** Open the socket; resolves with the session's data ({session_id, user_id, resumed}). */
  async connect() {
    if (this.failure) throw this.failure;
    this._closing = false;
    if (!this.token) await this.freshToken();
    return this._open(false);
  }

  _open(reconnecting) {
    const ready = deferred();
    this._ready = ready;
    this._setState(reconnecting ? "reconnecting" : "connecting");
    let ws;
    try {
      ws = new this.WebSocket(this.url, [SUBPROTOCOL, "bearer." + this.token]);
    } catch (e) {
      settle(ready, e);
      return ready.promise;
    }
    this.ws = ws;
    ws.binaryType = "arraybuffer";
    let opened = false;
    ws.onopen = () => { opened = true; };
    ws.onmessage = (ev) => { if (this.ws === ws) this._receive(ev.data, ready); };
    ws.onclose = (ev) => { if (this.ws === ws) this._closed(ev, opened, ready); };
    ws.onerror = () => {};  // (onclose follows, with the code)
    return ready.promise;
  }

  _closed(ev, opened, ready) {
    this.ws = null;
    const code = ev.code;
    for (const [ref, p] of this._pending) {
      if (!p.survives) { this._pending.delete(ref); settle(p.d, new ConnectionError("connection lost before the answer", code)); }
    }
    this._held = null;
    if (this._closing) return this._end(new ConnectionError("client closed", code));
    let error = null;
    if (code === CloseCode.TOKEN_EXPIRED && !this.tokenProvider) {
      error = new AuthenticationError({reason: "expired", message: "The token expired and the proxy closed the " +
        "connection (4001); give ProxyClient a tokenProvider to refresh it"});
    } else if (!opened && !this.tokenProvider && this._tokenExpired()) {
      // (a browser cannot see the upgrade's 401; a token past its exp is what it would say)
      error = new AuthenticationError({reason: "expired", message: "The token has expired"});
    }
    if (!ready.greeted) {
      // This socket never got its session: connect() rejects, or the reconnect loop retries.
      settle(ready, error || new ConnectionError(opened ? `the proxy closed the connection (${code})`
        : "connection failed (a refused token gets HTTP 401 before the upgrade)", code));
      if (this.state === "connecting") { this._setState("idle", {code}); return; }
      if (error) this._end(error);
      return;
    }
    if (error || !this.reconnect) return this._end(error || new ConnectionError(`connection closed (${code})`, code));
    this._setState("reconnecting", {code});
    this._scheduleReconnect(this.reconnectMinMs);
  }

  _tokenExpired() {
    const exp = this.token && tokenExpiry(this.token);
    return exp !== null && exp * 1000 <= Date.now();
  }

  _scheduleReconnect(delay) {
    const jittered = delay * (0.5 + Math.random() / 2);
    this._timer = setTimeout(async () => {
      this._timer = null;
      if (this._closing || this.failure) return;
      try {
        if (this.tokenProvider) await this.freshToken();
        await this._open(true);
      } catch (e) {
        if (e instanceof AuthenticationError) return this._end(e);
        if (!this.failure && !this._closing) {
          this._scheduleReconnect(Math.min(delay * 2, this.reconnectMaxMs));
        }
      }
    }, jittered);
  }

  _end(error) {
    if (!this.failure) this.failure = error;
    if (this._timer) { clearTimeout(this._timer); this._timer = null; }
    if (this._ready) settle(this._ready, this.failure);
    for (const p of this._pending.values()) settle(p.d, this.failure);
    this._pending.clear();
    for (const job of this.jobs.values()) job._fail(this.failure);
    this._setState("closed", {error: this.failure});
    this._emit("closed", this.failure);
  }

  /** Close the socket and end the client: whatever is pending rejects with a ConnectionError. */
  close() {
    this._closing = true;
    const ws = this.ws;
    if (ws) {
      try { ws.close(1000); } catch (e) { /* already closing */ }
    } else {
      this._end(new ConnectionError("client closed"));
    }
  }

  // --- what arrives -------------------------------------------------------------------------
  _receive(raw, ready) {
    if (typeof raw !== "string") {
      if (this._held) { this._held.push({binary: raw}); return; }
      this._emit("binary", raw);
      if (this._running) this._running._event(raw);
      return;
    }
    let msg;
    try { msg = JSON.parse(raw); } catch (e) { return; }
    if (msg.type === "session") return this._session(msg, ready);
    if (!ready.done && msg.type === "error") {  // refused before the session (too_many_connections)
      settle(ready, errorFrom(msg.data || {}));
      return;
    }
    if (this._held) {
      if (msg.type !== "prompts_state") { this._held.push({msg}); return; }
      // Live messages may overtake the replay: held until it ends, then in seq order, each once.
      const held = this._held;
      this._held = null;
      held.filter((h) => h.msg).map((h) => h.msg).sort((a, b) => (a.seq || 0) - (b.seq || 0))
        .forEach((m) => this._dispatch(m));
      held.filter((h) => h.binary).forEach((h) => { this._emit("binary", h.binary); if (this._running) this._running._event(h.binary); });
      this._dispatch(msg);
      this._emit("resumed", msg.data || {});
      return;
    }
    this._dispatch(msg);
  }

  _session(msg, ready) {
    const data = msg.data || {};
    const resuming = this.sessionId !== null && this.sessionId === data.session_id && this.lastSeq > 0;
    if (this.sessionId !== data.session_id) this.lastSeq = 0;  // a new session counts from 1
    ready.greeted = true;
    this.sessionId = data.session_id;
    this.userId = data.user_id;
    if (typeof msg.seq === "number") this.lastSeq = Math.max(this.lastSeq, msg.seq);
    if (resuming) {
      this._held = [];
      this.ws.send(JSON.stringify({type: "resume", data: {session_id: this.sessionId, last_seq: this.lastSeq}}));
    }
    this._setState("connected", {resuming, sessionId: this.sessionId});
    this._emit("session", data);
    this._emit("message", msg);
    settle(ready, null, data);
  }

  _dispatch(msg) {
    if (typeof msg.seq === "number") {
      if (msg.seq <= this.lastSeq && !["error", "pong"].includes(msg.type)) return;  // seen (a replay)
      this.lastSeq = Math.max(this.lastSeq, msg.seq);
    }
    const data = msg.data && typeof msg.data === "object" ? msg.data : {};
    const promptId = typeof data.prompt_id === "string" ? data.prompt_id : null;
    this._answer(msg, data, promptId);
    this._emit("message", msg);
    if (msg.type === "token_expiring" && this.tokenProvider && !this._refreshing) {
      this._refreshing = this.refreshToken().catch((e) => console.warn("token refresh failed:", e.message))
        .finally(() => { this._refreshing = null; });
    }
    const job = promptId ? this.jobs.get(promptId) : null;
    if (!job) return;
    if (msg.type === "execution_start") this._running = job;
    else if (msg.type === "executing" && data.node == null && this._running === job) this._running = null;
    job._event(msg);
  }

  _answer(msg, data, promptId) {
    let ref = msg.ref;
    let p = ref !== undefined ? this._pending.get(ref) : undefined;
    if (!p && promptId && ["prompt_accepted", "error", "prompt_cancelled"].includes(msg.type)) {
      // a resume's replay carries no ref: a submit is matched by its prompt id
      for (const [r, q] of this._pending) if (q.kind === "submit_prompt" && q.promptId === promptId) { ref = r; p = q; break; }
    }
    if (!p && msg.type === "error" && msg.ref === undefined && !promptId && this._pending.size
        && UNREADABLE.includes(data.code)) {
      [ref, p] = this._pending.entries().next().value;
    }
    if (!p) return;
    this._pending.delete(ref);
    settle(p.d, msg.type === "error" ? errorFrom(data) : null, msg);
  }

  // --- requests -----------------------------------------------------------------------------
  async _whenConnected() {
    for (;;) {
      if (this.failure) throw this.failure;
      if (this.state === "connected" && this.ws) return;
      if (this.state === "idle") throw new ConnectionError("not connected: call connect() first");
      await new Promise((wake) => { const off = this.on("state", () => { off(); wake(); }); });
    }
  }

  async _request(kind, data, {promptId = null, survives = false, timeoutMs = this.requestTimeoutMs} = {}) {
    const ref = this._nextRef++;
    const d = deferred();
    this._pending.set(ref, {kind, promptId, d, survives});
    const timer = timeoutMs ? setTimeout(() => {
      if (this._pending.get(ref)?.d === d) this._pending.delete(ref);
      settle(d, new ConnectionError(`no answer to ${kind} in ${timeoutMs} ms`));
    }, timeoutMs) : null;
    try {
      // (a request that timed out, or a client that ended, while waiting is not sent later)
      await Promise.race([this._whenConnected(), d.promise]);
      if (d.done) return await d.promise;
      // type and ref first, a prompt's id before the prompt: a message too large for the
      // proxy to read is still answered with them (it reads its beginning)
      this.ws.send(JSON.stringify({type: kind, ref, data}));
      return await d.promise;
    } catch (e) {
      this._pending.delete(ref);
      throw e;
    } finally {
      if (timer) clearTimeout(timer);
    }
  }

  /** Submit an API-format workflow: a Job once prompt_accepted arrives; rejects at once with a
   * ProxyError (code, message, details, nodeErrors, promptId) when refused.
   * options: promptId, extraData, timeoutS, front, partialExecutionTargets. */
  async submit(prompt, options = {}) {
    const promptId = options.promptId || uuid4();
    const job = new Job(promptId);
    this.jobs.set(promptId, job);
    const data = {prompt_id: promptId};
    if (options.extraData) data.extra_data = options.extraData;
    if (options.timeoutS != null) data.timeout_s = options.timeoutS;
    if (options.front != null) data.front = options.front;
    if (options.partialExecutionTargets) data.partial_execution_targets = options.partialExecutionTargets;
    data.prompt = prompt;
    try {
      const reply = await this._request("submit_prompt", data, {promptId, survives: true});
      job.accepted = reply.data;
      return job;
    } catch (e) {
      this.jobs.delete(promptId);
      throw e;
    }
  }

  /** Cancel a prompt: the answer (prompt_cancelled: it never ran; cancel_accepted: ComfyUI
   * interrupts it, execution_interrupted follows); rejects with a ProxyError (not_found, ...). */
  cancel(promptId) { return this._request("cancel", {prompt_id: promptId}); }

  async ping(data = {}) { return (await this._request("ping", data)).data; }
}

export default ProxyClient;
