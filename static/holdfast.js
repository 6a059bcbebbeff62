// holdfast in your own page: live task updates from one event stream per
// browser, shared by its tabs, that resume without loss after a reconnect or
// a server restart. An ES module with no dependency and no build step:
//
//   import { connect } from '/static/holdfast.js';
//   const hf = connect({ url: '', token });
//   const off = hf.subscribe((task) => render(task));
//   hf.onState((st) => showConnection(st));   // live, polling, reconnecting, offline
//   await hf.restore();                       // the tasks from before a reload
//   const { task } = await hf.submit('demo', { prompt: 'a cat' });
//   ...
//   hf.close();                               // every timer, stream and channel released
//
// One tab (the leader, chosen with Web Locks, or a lease in localStorage
// where those are missing) holds the stream and passes every event to the
// others over a BroadcastChannel (or localStorage events). The stream is
// Server-Sent Events; on a 503 (too many streams), when the server is down,
// or without EventSource it long-polls /api/events/poll instead.

const PAGE_SIZE = 50;
const POLL_WAIT_S = 25;
const REQUEST_TIMEOUT_MS = 30000;
const SSE_MAX_FAILURES = 3;   // errors in a row before long-polling instead
const SSE_RETRY_MS = 60000;   // after a refused stream, how long to poll before trying again
const OUTAGE_MS = 10000;      // a longer gap refetches the tasks (a planned reconnect is shorter)
const LEASE_MS = 6000;
const BEAT_MS = 2000;
// How long a new lease must stay ours before we lead: another tab's write
// reaches this one late on a busy machine (the bundled page measured 300 ms
// as too short), and two tabs that both lead hold two streams.
const CLAIM_MS = 1000;
const SUBMIT_ATTEMPTS = 4;

/** An answer other than 2xx, or no answer (status 0, code 'network',
 * 'timeout' or 'aborted'); `code` is the API's error code. */
export class HoldfastError extends Error {
  constructor(status, code, message, retryAfter = null) {
    super(message);
    this.name = 'HoldfastError';
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

/** A random UUID (v4), e.g. for an Idempotency-Key of your own. */
export function uuid() {
  if (globalThis.crypto && typeof crypto.randomUUID === 'function') {
    try { return crypto.randomUUID(); } catch (_) { /* insecure context */ }
  }
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

// Tabs of different users (or servers) must not share a stream; the name
// carries a digest of the token rather than the token.
function scopeOf(url, token) {
  let h = 0x811c9dc5;
  for (let i = 0; i < token.length; i += 1) h = Math.imul(h ^ token.charCodeAt(i), 0x01000193) >>> 0;
  return `holdfast.js:${url}:${h.toString(16)}`;
}

function storageGet(key) {
  try { return localStorage.getItem(key); } catch (_) { return null; }
}

function storageSet(key, value) {
  try { localStorage.setItem(key, value); return true; } catch (_) { return false; }
}

function storageRemove(key) {
  try { localStorage.removeItem(key); } catch (_) { /* storage disabled */ }
}

// For an answer without the API's error body (a proxy's, say).
function statusMessage(status) {
  switch (status) {
    case 401: return 'Unauthorized.';
    case 402: return 'Not enough credits.';
    case 404: return 'Not found.';
    case 409: return 'Not possible in the task’s current state.';
    case 413: return 'The request is larger than the server accepts.';
    case 429: return 'Too many requests.';
    case 503: return 'The server is busy.';
    default: return `The server answered ${status}.`;
  }
}

function taskOf(data) {
  if (data && typeof data.task === 'object') return data.task;
  return data && typeof data.id === 'string' ? data : null;
}

/**
 * Connect to the holdfast server at `url` ('' for this page's origin) with an
 * API token. Returns a client: subscribe(onTask) -> unsubscribe, onState(fn)
 * -> unsubscribe, restore(), list(opts), get(id), events(id), submit(provider,
 * params, opts), cancel(id), retry(id), me(), providers(), file(path), state(),
 * close().
 */
export function connect({ url = '', token } = {}) {
  if (typeof token !== 'string' || !token) throw new TypeError('connect({url, token}): token is required');
  const base = String(url).replace(/\/+$/, '');
  const scope = scopeOf(base, token);
  const s = {
    tabId: uuid(),
    stopped: false,
    role: 'follower',
    transport: 'none',
    conn: 'reconnecting',
    shared: false,          // conn is the leader's, passed on by another tab
    unauthorized: false,    // the server refused the token (401)
    lastSeq: 0,
    tasks: new Map(),
    subscribers: new Set(),
    watchers: new Set(),
    shown: '',
    controllers: new Set(),
    timers: new Set(),
    intervals: new Set(),
    sleepers: new Set(),
    channel: null,
    lockCtrl: null,
    releaseLock: null,
    leasing: false,
    onLeaseStorage: null,
    claimTimer: 0,
    es: null,
    pollGen: 0,
    pollCtrl: null,
    sseRetryTimer: 0,
    sseFailures: 0,
    downSince: 0,
    needResync: false,
  };

  // ------------------------------------------------------------ timers

  function later(fn, ms) {
    const id = setTimeout(() => {
      s.timers.delete(id);
      if (!s.stopped) fn();
    }, ms);
    s.timers.add(id);
    return id;
  }

  function cancelLater(id) {
    clearTimeout(id);
    s.timers.delete(id);
  }

  // close() wakes every sleeper, so that a submit() waiting to send again
  // settles (with an 'aborted' error) instead of hanging for good.
  function sleep(ms) {
    return new Promise((resolve) => {
      s.sleepers.add(resolve);
      later(() => { s.sleepers.delete(resolve); resolve(); }, ms);
    });
  }

  // ------------------------------------------------------------ HTTP

  // Every request is aborted by close(), by its own timeout, and by the
  // caller's `signal`. `as: 'blob'` answers with the body as a Blob: the
  // timeout ends with the answer's headers, as a large file may take longer.
  async function request(path, opts = {}) {
    const { method = 'GET', body, headers = {}, ctrl, signal, as = 'json', timeoutMs = REQUEST_TIMEOUT_MS } = opts;
    if (s.stopped) throw new HoldfastError(0, 'aborted', 'the client is closed');
    const c = ctrl || new AbortController();
    s.controllers.add(c);
    let timedOut = false;
    const timer = setTimeout(() => { timedOut = true; c.abort(); }, timeoutMs);
    const onAbort = () => c.abort();
    if (signal) {
      if (signal.aborted) c.abort();
      else signal.addEventListener('abort', onAbort);
    }
    try {
      const init = {
        method,
        headers: { Accept: as === 'json' ? 'application/json' : '*/*', ...headers, Authorization: `Bearer ${token}` },
        signal: c.signal,
        cache: 'no-store',
      };
      if (body !== undefined) {
        init.headers['Content-Type'] = 'application/json';
        init.body = JSON.stringify(body);
      }
      const res = await fetch(base + path, init);
      if (res.ok && as === 'blob') {
        clearTimeout(timer);
        return await res.blob();
      }
      const text = await res.text();
      let data = null;
      try { data = text ? JSON.parse(text) : null; } catch (_) { /* not JSON: the status says enough */ }
      if (!res.ok) {
        if (res.status === 401 && !s.unauthorized) {
          s.unauthorized = true;
          notify();
        }
        const e = (data && typeof data.error === 'object' && data.error) || {};
        throw new HoldfastError(res.status, e.code || `http_${res.status}`,
          e.message || statusMessage(res.status), res.headers.get('Retry-After'));
      }
      return data;
    } catch (err) {
      if (err instanceof HoldfastError) throw err;
      if (timedOut) throw new HoldfastError(0, 'timeout', 'The server took too long to answer.');
      if (c.signal.aborted) throw new HoldfastError(0, 'aborted', 'aborted');
      throw new HoldfastError(0, 'network', 'Cannot reach the server.');
    } finally {
      clearTimeout(timer);
      if (signal) signal.removeEventListener('abort', onAbort);
      s.controllers.delete(c);
    }
  }

  // ------------------------------------------------------------ tasks

  // Keeps the newest version of each task and tells the subscribers (with
  // the event that brought it, or null); an older version (a late event, a
  // list fetched before it) changes nothing.
  function upsert(task, ev = null) {
    if (!task || typeof task !== 'object' || typeof task.id !== 'string') return;
    const old = s.tasks.get(task.id);
    if (old) {
      const v = Number(task.version);
      const ov = Number(old.version);
      if (Number.isFinite(v) && Number.isFinite(ov) && v <= ov) return;
    }
    s.tasks.set(task.id, task);
    for (const fn of [...s.subscribers]) {
      try { fn(task, ev); } catch (err) { setTimeout(() => { throw err; }, 0); }
    }
  }

  function currentState() {
    return {
      role: s.role, transport: s.transport, conn: s.conn, shared: s.shared,
      unauthorized: s.unauthorized, lastSeq: s.lastSeq,
    };
  }

  // Tells the onState watchers when what state() says has changed (but for
  // lastSeq, which moves with every event).
  function notify() {
    if (!s.watchers.size) return;
    const st = currentState();
    const key = JSON.stringify({ ...st, lastSeq: 0 });
    if (key === s.shown) return;
    s.shown = key;
    for (const fn of [...s.watchers]) {
      try { fn(st); } catch (err) { setTimeout(() => { throw err; }, 0); }
    }
  }

  function setSeq(seq) {
    const n = Number(seq);
    if (Number.isFinite(n) && n > s.lastSeq) s.lastSeq = n;
  }

  function applyEvent(ev) {
    if (!ev || typeof ev !== 'object') return;
    setSeq(ev.seq);
    if (ev.task && typeof ev.task === 'object') upsert(ev.task, ev);
    else if (typeof ev.task_id === 'string') refreshTask(ev.task_id, ev);
  }

  async function get(id) {
    const task = taskOf(await request(`/api/tasks/${encodeURIComponent(id)}`));
    upsert(task);
    return task;
  }

  async function refreshTask(id, ev) {
    try {
      upsert(taskOf(await request(`/api/tasks/${encodeURIComponent(id)}`)), ev);
    } catch (_) { /* the next event or resync brings it */ }
  }

  // One page of the caller's tasks, newest first; `next` is the cursor of
  // the page after it (null at the end).
  async function list({ before = null, limit = PAGE_SIZE, status = null, retryOf = null } = {}) {
    let query = `limit=${encodeURIComponent(limit)}`;
    if (before) query += `&before=${encodeURIComponent(before)}`;
    if (status) query += `&status=${encodeURIComponent(status)}`;
    if (retryOf) query += `&retry_of=${encodeURIComponent(retryOf)}`;
    const data = await request(`/api/tasks?${query}`);
    const tasks = (data && Array.isArray(data.tasks)) ? data.tasks : [];
    for (const t of tasks) upsert(t);
    return { tasks, next: (data && data.next) || null };
  }

  // A task's timeline: {events, truncated}, its newest events oldest first.
  async function events(id) {
    const data = await request(`/api/tasks/${encodeURIComponent(id)}/events`);
    return {
      events: (data && Array.isArray(data.events)) ? data.events : [],
      truncated: Boolean(data && data.truncated),
    };
  }

  async function restore() {
    return (await list()).tasks;
  }

  // ------------------------------------------------------------ tabs

  function openChannel(onMessage) {
    if (typeof BroadcastChannel === 'function') {
      const bc = new BroadcastChannel(scope);
      bc.onmessage = (e) => onMessage(e.data);
      return { post: (msg) => bc.postMessage(msg), close: () => bc.close() };
    }
    const key = `${scope}:msg`;
    let n = 0;
    const onStorage = (e) => {
      if (e.key !== key || !e.newValue) return;
      try { onMessage(JSON.parse(e.newValue).msg); } catch (_) { /* another page's junk */ }
    };
    window.addEventListener('storage', onStorage);
    return {
      post: (msg) => storageSet(key, JSON.stringify({ from: s.tabId, n: ++n, msg })),
      close: () => window.removeEventListener('storage', onStorage),
    };
  }

  function onChannelMessage(msg) {
    if (s.stopped || !msg || typeof msg !== 'object') return;
    const leader = s.role === 'leader';
    if (msg.type === 'event' && !leader) applyEvent(msg.ev);
    else if (msg.type === 'tasks' && !leader && Array.isArray(msg.tasks)) msg.tasks.forEach(upsert);
    else if (msg.type === 'conn' && !leader) {
      setSeq(msg.lastSeq);
      s.conn = typeof msg.conn === 'string' ? msg.conn : 'reconnecting';
      s.shared = true;
      notify();
    } else if (msg.type === 'hello' && leader) announceConn();
  }

  function announceConn() {
    if (s.channel) s.channel.post({ type: 'conn', conn: s.conn, lastSeq: s.lastSeq });
  }

  function setConn(state) {
    const changed = s.conn !== state;
    s.conn = state;
    if (changed && s.role === 'leader') announceConn();
    notify();
  }

  // ------------------------------------------------------------ election

  const leaseKey = `${scope}:leader`;

  function elect() {
    if (navigator.locks && typeof navigator.locks.request === 'function') {
      s.lockCtrl = new AbortController();
      // Held until close() or the tab goes away; the next waiting tab gets it.
      navigator.locks.request(`${scope}:leader`, { signal: s.lockCtrl.signal }, () => {
        if (s.stopped) return undefined;
        becomeLeader();
        return new Promise((resolve) => { s.releaseLock = resolve; });
      }).catch(() => { /* aborted by close() */ });
      return;
    }
    s.leasing = true;
    s.onLeaseStorage = onLeaseStorage;
    window.addEventListener('storage', onLeaseStorage);
    leaseTick();
    s.intervals.add(setInterval(leaseTick, BEAT_MS));
  }

  // The lease changed in another tab. Given up (its tab closed): claim it at
  // once rather than at the next beat. Taken while this tab leads (two
  // claims crossed): the lease as it stands now, not this event's older
  // value, says who keeps the stream.
  function onLeaseStorage(e) {
    if (s.stopped || (e.key !== leaseKey && e.key !== null)) return;
    if (!e.newValue) {
      leaseTick();
    } else if (s.role === 'leader') {
      const lease = readLease();
      if (lease && lease.id !== s.tabId && lease.until > Date.now()) becomeFollower();
    }
  }

  function readLease() {
    try { return JSON.parse(storageGet(leaseKey)); } catch (_) { return null; }
  }

  // A lease renewed by its holder. Tabs that take a free lease together each
  // read back their own id at first; a claim leads only if the lease still
  // names it CLAIM_MS later, when the last writer's id has reached every tab.
  function leaseTick() {
    if (s.stopped || s.claimTimer) return;
    const now = Date.now();
    const lease = readLease();
    if (lease && lease.id !== s.tabId && lease.until > now) {
      if (s.role === 'leader') becomeFollower();
      return;
    }
    // Without storage no tab can coordinate: each keeps its own stream.
    const stored = storageSet(leaseKey, JSON.stringify({ id: s.tabId, until: now + LEASE_MS }));
    if (s.role === 'leader') return;
    if (!stored) {
      becomeLeader();
      return;
    }
    s.claimTimer = later(() => {
      s.claimTimer = 0;
      const claimed = readLease();
      if (claimed && claimed.id === s.tabId) becomeLeader();
    }, CLAIM_MS);
  }

  function becomeLeader() {
    s.role = 'leader';
    s.shared = false;
    s.needResync = true;   // events between the last leader's broadcast and now reached no tab
    connectSse();
    announceConn();
  }

  // The leader's state comes with its next message; hello asks for it now.
  function becomeFollower() {
    closeTransport();
    s.role = 'follower';
    s.transport = 'none';
    s.conn = 'reconnecting';
    s.shared = false;
    notify();
    if (s.channel) s.channel.post({ type: 'hello' });
  }

  // ------------------------------------------------------------ stream (leader)

  function closeTransport() {
    if (s.es) {
      s.es.close();
      s.es = null;
    }
    s.pollGen += 1;
    if (s.pollCtrl) s.pollCtrl.abort();
    s.pollCtrl = null;
    if (s.sseRetryTimer) cancelLater(s.sseRetryTimer);
    s.sseRetryTimer = 0;
  }

  function receiveEvent(ev) {
    applyEvent(ev);
    if (s.channel) s.channel.post({ type: 'event', ev });
  }

  function connectSse() {
    closeTransport();
    if (typeof EventSource !== 'function') {
      startPolling(0);
      return;
    }
    // The browser reconnects by itself with Last-Event-ID, which the server
    // prefers over `since`. Without a cursor the stream starts from now and
    // its `ready` event says where that is; the resync when it opens covers
    // what came before.
    const since = s.lastSeq ? `&since=${s.lastSeq}` : '';
    const es = new EventSource(`${base}/api/events?token=${encodeURIComponent(token)}${since}`);
    s.es = es;
    s.sseFailures = 0;
    s.transport = 'sse';
    setConn('reconnecting');
    es.onopen = () => {
      if (s.es !== es) return;
      const outage = s.sseFailures >= 2 || (s.downSince && Date.now() - s.downSince > OUTAGE_MS);
      s.sseFailures = 0;
      s.downSince = 0;
      setConn('live');
      if (s.needResync || outage) resync();
    };
    const onData = (e) => {
      if (s.es !== es) return;
      let ev;
      try { ev = JSON.parse(e.data); } catch (_) { return; }
      if (!ev || typeof ev !== 'object') return;
      if (ev.seq === undefined && e.lastEventId) ev.seq = Number(e.lastEventId);
      receiveEvent(ev);
    };
    for (const name of ['message', 'created', 'updated', 'finished']) es.addEventListener(name, onData);
    es.addEventListener('ready', (e) => {
      if (s.es !== es) return;
      setSeq(e.lastEventId);
      announceConn();
    });
    es.onerror = () => {
      if (s.es !== es) return;
      if (!s.downSince) s.downSince = Date.now();
      s.sseFailures += 1;
      // CLOSED: the server refused the stream (503 too many streams, 401):
      // the browser will not retry, and neither do we until SSE_RETRY_MS.
      // Otherwise the server is unreachable: poll with backoff until it
      // answers, then stream again at once.
      if (es.readyState === EventSource.CLOSED) startPolling(SSE_RETRY_MS);
      else if (s.sseFailures >= SSE_MAX_FAILURES) startPolling(0);
      else setConn('reconnecting');
    };
  }

  // sseAfterMs: when to try the stream again; 0: as soon as a poll succeeds
  // (never, without EventSource).
  function startPolling(sseAfterMs) {
    closeTransport();
    s.transport = 'poll';
    setConn('polling');
    s.needResync = true;
    if (sseAfterMs) s.sseRetryTimer = later(connectSse, sseAfterMs);
    pollLoop(s.pollGen, !sseAfterMs && typeof EventSource === 'function');
  }

  async function pollLoop(gen, sseOnSuccess) {
    let backoff = 1000;
    // Without a cursor the server answers "from now", which is right only
    // once: a second poll "from now" would skip what happened in between.
    let known = s.lastSeq > 0;
    const current = () => !s.stopped && s.pollGen === gen;
    while (current()) {
      const ctrl = new AbortController();
      s.pollCtrl = ctrl;
      const started = Date.now();
      // After an outage ask without waiting: the answer proves the server is
      // back and the tasks can be refetched now rather than after a long poll.
      const wait = s.needResync ? 0 : POLL_WAIT_S;
      const since = known || s.lastSeq ? `since=${s.lastSeq}&` : '';
      let data;
      try {
        data = await request(`/api/events/poll?${since}wait=${wait}`, { ctrl, timeoutMs: (wait + 15) * 1000 });
      } catch (err) {
        if (!current() || err.status === 401) return;
        s.needResync = true;
        setConn('offline');
        await sleep(backoff + Math.random() * 500);
        backoff = Math.min(backoff * 2, 30000);
        continue;
      }
      if (!current()) return;
      backoff = 1000;
      const events = (data && Array.isArray(data.events)) ? data.events : [];
      for (const ev of events) if (ev && typeof ev === 'object') receiveEvent(ev);
      if (data) {
        setSeq(data.next);
        known = true;
      }
      if (sseOnSuccess) {
        connectSse();   // ends this loop; the stream resyncs when it opens
        return;
      }
      setConn('polling');
      if (s.needResync) resync();
      // A server that answers at once with nothing must not make us spin.
      if (wait && !events.length && Date.now() - started < 1000) await sleep(1000);
    }
  }

  // After an outage, or on taking over, the leader refetches the tasks and
  // shares them, so every tab matches the server again.
  async function resync() {
    s.needResync = false;
    try {
      const list = await restore();
      if (s.role === 'leader' && s.channel) s.channel.post({ type: 'tasks', tasks: list });
    } catch (_) {
      if (!s.stopped) s.needResync = true;
    }
  }

  // ------------------------------------------------------------ actions

  function retryDelayMs(err, attempt) {
    const after = Number(err.retryAfter);
    const ms = Number.isFinite(after) && after >= 0 ? after * 1000 : 500 * 2 ** attempt;
    return Math.min(ms, 10000) + Math.random() * 250;
  }

  async function submit(provider, params = {}, opts = {}) {
    const body = { provider, params };
    if (opts.dedupeKey) body.dedupe_key = opts.dedupeKey;
    if (opts.webhook) body.webhook = opts.webhook;
    if (opts.webhookEvents) body.webhook_events = opts.webhookEvents;
    // The server refuses a dedupe key and an Idempotency-Key that differ.
    const key = opts.dedupeKey || opts.idempotencyKey || uuid();
    for (let attempt = 0; ; attempt += 1) {
      try {
        const data = await request('/api/tasks', { method: 'POST', body, headers: { 'Idempotency-Key': key } });
        upsert(taskOf(data));
        return { task: taskOf(data), deduplicated: Boolean(data && data.deduplicated) };
      } catch (err) {
        // Sending again is safe: the same Idempotency-Key returns the task
        // the lost answer was about instead of making a second one.
        const again = err.code === 'network' || err.code === 'timeout' || err.status === 429 || err.status === 503;
        if (!again || attempt + 1 >= SUBMIT_ATTEMPTS || s.stopped) throw err;
        await sleep(retryDelayMs(err, attempt));
      }
    }
  }

  async function act(id, what) {
    const data = await request(`/api/tasks/${encodeURIComponent(id)}/${what}`, { method: 'POST' });
    const task = taskOf(data);
    upsert(task);
    return task;
  }

  function onPageHide() {
    // A lease left behind would keep the other tabs waiting for LEASE_MS.
    if (s.leasing) {
      const lease = readLease();
      if (lease && lease.id === s.tabId) storageRemove(leaseKey);
    }
  }

  function close() {
    if (s.stopped) return;
    s.stopped = true;
    closeTransport();
    for (const c of s.controllers) c.abort();
    for (const id of s.timers) clearTimeout(id);
    for (const id of s.intervals) clearInterval(id);
    s.timers.clear();
    s.intervals.clear();
    for (const wake of s.sleepers) wake();
    s.sleepers.clear();
    if (s.lockCtrl) s.lockCtrl.abort();
    if (s.releaseLock) s.releaseLock();
    onPageHide();
    window.removeEventListener('pagehide', onPageHide);
    if (s.onLeaseStorage) window.removeEventListener('storage', s.onLeaseStorage);
    s.onLeaseStorage = null;
    if (s.channel) s.channel.close();
    s.channel = null;
    s.subscribers.clear();
    s.watchers.clear();
    s.role = 'follower';
    s.transport = 'none';
    s.conn = 'offline';
    s.shared = false;
  }

  // Listen to the other tabs before anything else, so no event falls between.
  s.channel = openChannel(onChannelMessage);
  s.channel.post({ type: 'hello' });
  window.addEventListener('pagehide', onPageHide);
  elect();

  return {
    /** Calls onTask(task, event) with each newer version of any of the
     * caller's tasks: `event` is the server's event that brought it ({seq,
     * type: 'created'|'updated'|'finished', task}), or null for a task that
     * came in an answer (a list, a submit); returns the function that stops it. */
    subscribe(onTask) {
      if (typeof onTask !== 'function') throw new TypeError('subscribe(onTask): a function');
      const fn = (t, ev) => onTask(t, ev);
      s.subscribers.add(fn);
      return () => { s.subscribers.delete(fn); };
    },
    /** Calls onChange(state()) now and whenever the role, transport or
     * connection changes; returns the function that stops it. */
    onState(onChange) {
      if (typeof onChange !== 'function') throw new TypeError('onState(onChange): a function');
      const fn = (st) => onChange(st);
      s.watchers.add(fn);
      s.shown = JSON.stringify({ ...currentState(), lastSeq: 0 });
      onChange(currentState());
      return () => { s.watchers.delete(fn); };
    },
    /** The caller's newest tasks (active and recent), e.g. after a reload;
     * each also goes to the subscribers. */
    restore,
    /** One page of the caller's tasks, newest first: list({before, limit,
     * status, retryOf}) resolves to {tasks, next}; pass `next` as `before`
     * for the page after it (null: no more). `status`: 'active', 'terminal'
     * or statuses joined by commas; `retryOf`: a task id, for the tasks that
     * retry it. Each task also goes to the subscribers. */
    list,
    /** One task, fetched; it also goes to the subscribers. */
    get,
    /** A task's timeline: {events: [{seq, type, at, status, step, progress,
     * attempts, error, credits, version}], truncated}, oldest first, the
     * newest 500 at most (truncated: older ones were left out). */
    events,
    /** POST /api/tasks, always with an Idempotency-Key (opts.dedupeKey,
     * opts.idempotencyKey or a new one), sent again on a lost answer, 429 or
     * 503. Resolves to {task, deduplicated}. */
    submit,
    /** Cancel a queued or running task; resolves to the task. */
    cancel: (id) => act(id, 'cancel'),
    /** Run a failed or cancelled task again; resolves to the new task. */
    retry: (id) => act(id, 'retry'),
    /** The newest version seen of a task, or undefined. */
    task: (id) => s.tasks.get(id),
    /** GET /api/me: {user, credits, limits, ...}. */
    me: () => request('/api/me'),
    /** GET /api/providers: the configured providers, as the server lists them. */
    providers: async () => {
      const data = await request('/api/providers');
      return (data && data.providers) || [];
    },
    /** A task's file (a path from task.files[].url) as a Blob, fetched with
     * the token; opts.signal (or close()) aborts it. */
    file: (path, opts = {}) => request(path, { as: 'blob', signal: opts.signal }),
    /** {role: 'leader'|'follower', transport: 'sse'|'poll'|'none',
     * conn: 'live'|'polling'|'reconnecting'|'offline', shared (conn is the
     * leading tab's), unauthorized (the server refused the token), lastSeq}. */
    state: currentState,
    /** Stop: the stream, every request, timer and channel, the leadership. */
    close,
  };
}
