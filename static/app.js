// holdfast's page: an API token, a submit form and a live list of the user's
// tasks. One tab (the leader) holds the event stream and shares every event
// with the other tabs; the page keeps no task state that the server lacks.
'use strict';

(() => {
  const TOKEN_KEY = 'holdfast.token';
  const LEASE_KEY = 'holdfast.leader';   // leader lease where Web Locks are missing
  const MSG_KEY = 'holdfast.msg';        // tab messages where BroadcastChannel is missing
  const LOCK_NAME = 'holdfast-leader';
  const CHANNEL_NAME = 'holdfast';
  const PAGE_SIZE = 50;
  const POLL_WAIT_S = 25;
  const SSE_MAX_FAILURES = 3;   // errors in a row before long-polling instead
  const SSE_RETRY_MS = 60000;   // how long to poll before trying SSE again
  const OUTAGE_MS = 10000;      // a longer gap refetches the list (a planned reconnect is shorter)
  const LEASE_MS = 6000;
  const BEAT_MS = 2000;
  // How long a new lease must stay ours before we lead. A tab's write reaches
  // the others through the browser process, and a busy renderer applies it
  // late: on a loaded two-core machine 300 ms was sometimes too short, and two
  // tabs that claimed together both led (two streams) until the next beat.
  const CLAIM_MS = 1000;
  const STATUSES = ['queued', 'running', 'succeeded', 'partial', 'failed', 'cancelled'];
  const ACTIVE = new Set(['queued', 'running']);
  const RETRYABLE = new Set(['failed', 'cancelled']);
  const CONN_TEXT = {
    live: 'live', polling: 'polling', reconnecting: 'reconnecting…', offline: 'offline',
  };
  const UNAUTHORIZED = 'That token was not accepted (401). Paste a valid API token.';

  const tabId = uuid();
  const tasks = new Map();   // id -> task as the server last sent it
  const cards = new Map();   // id -> card (its elements, object URLs, file fetches)
  const hf = { role: 'follower', transport: 'none', lastSeq: 0, tasks };
  window.holdfast = hf;

  let ui = null;
  let S = null;              // the signed-in session; null when signed out
  let memToken = null;       // used when localStorage is unavailable
  let idemKey = uuid();      // one per form fill
  let idemKeyTried = false;  // sent without success: an edit starts a new fill
  let submitting = false;

  class ApiError extends Error {
    constructor(status, code, message, retryAfter = null) {
      super(message);
      this.status = status;
      this.code = code;
      this.retryAfter = retryAfter;
    }
  }

  // ---------------------------------------------------------------- helpers

  function uuid() {
    if (window.crypto && typeof crypto.randomUUID === 'function') {
      try { return crypto.randomUUID(); } catch (_) { /* insecure context */ }
    }
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function show(node, visible) { node.hidden = !visible; }

  function setText(node, text) {
    node.textContent = text;
    show(node, Boolean(text));
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

  function later(s, fn, ms) {
    const id = setTimeout(() => {
      s.timers.delete(id);
      if (!s.stopped) fn();
    }, ms);
    s.timers.add(id);
    return id;
  }

  function cancelLater(s, id) {
    clearTimeout(id);
    s.timers.delete(id);
  }

  function every(s, fn, ms) {
    s.intervals.add(setInterval(fn, ms));
  }

  function sleep(s, ms) {
    return new Promise((resolve) => later(s, resolve, ms));
  }

  function timeOf(task) {
    const t = Date.parse(task.created_at);
    return Number.isFinite(t) ? t : 0;
  }

  // Newest first; ids break ties (they sort by creation time too).
  function compareTasks(a, b) {
    return timeOf(b) - timeOf(a) || (a.id < b.id ? 1 : a.id > b.id ? -1 : 0);
  }

  function relativeTime(iso) {
    const t = Date.parse(iso);
    if (!Number.isFinite(t)) return '';
    const s = Math.round((Date.now() - t) / 1000);
    if (s < 10) return 'just now';
    if (s < 60) return `${s} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    if (s < 86400 * 14) return `${Math.floor(s / 86400)} d ago`;
    return new Date(t).toLocaleDateString();
  }

  function formatSize(n) {
    if (typeof n !== 'number' || !Number.isFinite(n)) return '';
    if (n < 1000) return `${n} B`;
    if (n < 1e6) return `${(n / 1e3).toFixed(1)} kB`;
    if (n < 1e9) return `${(n / 1e6).toFixed(1)} MB`;
    return `${(n / 1e9).toFixed(1)} GB`;
  }

  function shortId(id) {
    return id.length > 12 ? `…${id.slice(-8)}` : id;
  }

  function retryAfterSeconds(value) {
    if (!value) return null;
    const n = Number(value);
    if (Number.isFinite(n)) return Math.max(0, Math.ceil(n));
    const t = Date.parse(value);
    return Number.isFinite(t) ? Math.max(0, Math.ceil((t - Date.now()) / 1000)) : null;
  }

  // Only same-origin paths: a file URL is fetched with the user's token.
  function isLocalPath(url) {
    return typeof url === 'string' && url.startsWith('/') && !url.startsWith('//');
  }

  // ---------------------------------------------------------------- HTTP

  // Every request of a session carries its token and is aborted when the
  // session ends; pass ctrl to be able to abort a request that gets replaced.
  async function request(s, path, opts = {}) {
    const { method = 'GET', body, headers = {}, ctrl, timeoutMs = 0, as = 'json' } = opts;
    const c = ctrl || new AbortController();
    s.controllers.add(c);
    let timedOut = false;
    const timer = timeoutMs ? setTimeout(() => { timedOut = true; c.abort(); }, timeoutMs) : 0;
    try {
      const init = {
        method,
        headers: {
          Accept: as === 'json' ? 'application/json' : '*/*',
          ...headers,
          Authorization: `Bearer ${s.token}`,
        },
        signal: c.signal,
        cache: 'no-store',
      };
      if (body !== undefined) {
        init.headers['Content-Type'] = 'application/json';
        init.body = JSON.stringify(body);
      }
      const res = await fetch(path, init);
      if (!res.ok) {
        let data = null;
        try { data = await res.json(); } catch (_) { /* not JSON: use the status */ }
        if (res.status === 401) unauthorized(s);
        const e = (data && typeof data.error === 'object' && data.error) || {};
        throw new ApiError(res.status, e.code || `http_${res.status}`,
          e.message || defaultMessage(res.status), res.headers.get('Retry-After'));
      }
      if (as === 'blob') return await res.blob();
      const text = await res.text();
      if (!text) return null;
      try {
        return JSON.parse(text);
      } catch (_) {
        throw new ApiError(res.status, 'bad_response', 'The server answered with something that is not JSON.');
      }
    } catch (err) {
      if (err instanceof ApiError) throw err;
      if (c.signal.aborted && !timedOut) throw new ApiError(0, 'aborted', 'aborted');
      throw new ApiError(0, 'network', timedOut ? 'The server took too long to answer.'
        : 'Cannot reach the server.');
    } finally {
      clearTimeout(timer);
      s.controllers.delete(c);
    }
  }

  function defaultMessage(status) {
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

  function unauthorized(s) {
    if (S === s) signOut(UNAUTHORIZED);
  }

  const quiet = (err) => err.code === 'aborted' || err.status === 401;

  // ---------------------------------------------------------------- session

  function newSession(token) {
    return {
      token,
      stopped: false,
      controllers: new Set(),
      timers: new Set(),
      intervals: new Set(),
      tempUrls: new Set(),
      channel: null,
      lockCtrl: null,
      releaseLock: null,
      leaseTick: null,
      claimTimer: 0,
      es: null,
      pollGen: 0,
      pollCtrl: null,
      sseRetryTimer: 0,
      sseFailures: 0,
      downSince: 0,
      needResync: false,
      conn: 'reconnecting',
      leaderConn: null,
      next: null,
      listLoaded: false,
      loadingMore: false,
      pending: [],
      meTimer: 0,
    };
  }

  function readToken() {
    return storageGet(TOKEN_KEY) || memToken;
  }

  function start(token) {
    stop();
    const s = S = newSession(token);
    show(ui.auth, false);
    show(ui.app, true);
    show(ui.me, true);
    setText(ui.meName, '');
    setText(ui.meCredits, '');
    setText(ui.listError, '');
    show(ui.tasksEmpty, false);
    show(ui.loadMore, false);
    renderConn(s);
    // Listen to the other tabs before fetching the list, so nothing falls in between.
    s.channel = openChannel((msg) => onChannelMessage(s, msg));
    s.channel.post({ type: 'hello' });
    refreshMe(s);
    loadProviders(s);
    initialLoad(s, 1000);
    every(s, updateTimes, 30000);
    elect(s);
  }

  function stop() {
    const s = S;
    if (!s) return;
    S = null;
    s.stopped = true;
    closeTransport(s);
    for (const c of s.controllers) c.abort();
    for (const id of s.timers) clearTimeout(id);
    for (const id of s.intervals) clearInterval(id);
    if (s.lockCtrl) s.lockCtrl.abort();
    if (s.releaseLock) s.releaseLock();
    if (s.leaseTick) {
      const lease = readLease();
      if (lease && lease.id === tabId) storageRemove(LEASE_KEY);
    }
    if (s.channel) s.channel.close();
    for (const url of s.tempUrls) URL.revokeObjectURL(url);
    clearCards();
    hf.lastSeq = 0;
    setRole('follower');
    setTransport('none');
    ui.conn.dataset.state = 'offline';
    ui.conn.textContent = CONN_TEXT.offline;
    ui.connNote.textContent = '';
  }

  function signOut(message) {
    stop();
    storageRemove(TOKEN_KEY);
    memToken = null;
    showAuth(message);
  }

  function showAuth(message) {
    show(ui.app, false);
    show(ui.me, false);
    show(ui.auth, true);
    setText(ui.tokenError, message || '');
    ui.tokenInput.value = '';
    ui.tokenInput.focus();
  }

  function onTokenSubmit(e) {
    e.preventDefault();
    const token = ui.tokenInput.value.trim().replace(/^Bearer\s+/i, '');
    if (!token || !/^[\x21-\x7e]+$/.test(token)) {
      setText(ui.tokenError, 'That does not look like a token: paste it without spaces.');
      return;
    }
    if (!storageSet(TOKEN_KEY, token)) memToken = token;
    start(token);
  }

  // Another tab signed in or out: follow it, the token is shared.
  function onStorage(e) {
    if (e.key === TOKEN_KEY || e.key === null) {
      const token = readToken();
      if (!token && S) {
        stop();
        showAuth('Signed out in another tab.');
      } else if (token && (!S || S.token !== token)) {
        start(token);
      }
    } else if (e.key === LEASE_KEY && S && S.leaseTick) {
      if (!e.newValue) {
        S.leaseTick();
      } else if (hf.role === 'leader') {
        // Two tabs led at once (a claim that reached us late): the lease as
        // it stands now, not the event's older value, says who keeps the stream.
        const lease = readLease();
        if (lease && lease.id !== tabId && lease.until > Date.now()) becomeFollower(S);
      }
    }
  }

  // ---------------------------------------------------------------- leader election

  function setRole(role) {
    hf.role = role;
    document.body.dataset.role = role;
  }

  function setTransport(transport) {
    hf.transport = transport;
    document.body.dataset.transport = transport;
  }

  function setSeq(seq) {
    const n = Number(seq);
    if (Number.isFinite(n) && n > hf.lastSeq) hf.lastSeq = n;
  }

  function elect(s) {
    if (navigator.locks && typeof navigator.locks.request === 'function') {
      s.lockCtrl = new AbortController();
      // The lock is held until the tab closes (or signs out); the next waiting tab gets it.
      navigator.locks.request(LOCK_NAME, { signal: s.lockCtrl.signal }, () => {
        if (s.stopped) return undefined;
        becomeLeader(s);
        return new Promise((resolve) => { s.releaseLock = resolve; });
      }).catch(() => { /* aborted on sign-out or page hide */ });
      return;
    }
    s.leaseTick = () => leaseTick(s);
    s.leaseTick();
    every(s, s.leaseTick, BEAT_MS);
  }

  function readLease() {
    try { return JSON.parse(storageGet(LEASE_KEY)); } catch (_) { return null; }
  }

  // Fallback election: a lease in localStorage renewed by its holder. A tab
  // sees another tab's write only a moment later, so several tabs that take a
  // free lease at once (tabs opened together, followers of a closed leader)
  // each read back their own id; a claim leads only if the lease still names
  // it CLAIM_MS later, when the last writer's id has reached every tab.
  function leaseTick(s) {
    if (s.stopped || s.claimTimer) return;
    const now = Date.now();
    const lease = readLease();
    if (lease && lease.id !== tabId && lease.until > now) {
      if (hf.role === 'leader') becomeFollower(s);
      return;
    }
    // Without storage no tab can coordinate: each one keeps its own stream.
    const stored = storageSet(LEASE_KEY, JSON.stringify({ id: tabId, until: now + LEASE_MS }));
    if (hf.role === 'leader') return;
    if (!stored) {
      becomeLeader(s);
      return;
    }
    s.claimTimer = later(s, () => {
      s.claimTimer = 0;
      const claimed = readLease();
      if (claimed && claimed.id === tabId) becomeLeader(s);
    }, CLAIM_MS);
  }

  function becomeLeader(s) {
    setRole('leader');
    s.needResync = true;   // events between the last broadcast and now reached no one
    connectSse(s);
    announceConn(s);
  }

  function becomeFollower(s) {
    closeTransport(s);
    setRole('follower');
    setTransport('none');
    renderConn(s);
  }

  // ---------------------------------------------------------------- tabs

  function openChannel(onMessage) {
    if (typeof BroadcastChannel === 'function') {
      const bc = new BroadcastChannel(CHANNEL_NAME);
      bc.onmessage = (e) => onMessage(e.data);
      return { post: (msg) => bc.postMessage(msg), close: () => bc.close() };
    }
    let n = 0;
    const onStorageMsg = (e) => {
      if (e.key !== MSG_KEY || !e.newValue) return;
      try { onMessage(JSON.parse(e.newValue).msg); } catch (_) { /* another page's junk */ }
    };
    window.addEventListener('storage', onStorageMsg);
    return {
      post: (msg) => storageSet(MSG_KEY, JSON.stringify({ from: tabId, n: ++n, msg })),
      close: () => window.removeEventListener('storage', onStorageMsg),
    };
  }

  function onChannelMessage(s, msg) {
    if (s.stopped || !msg || typeof msg !== 'object') return;
    const leader = hf.role === 'leader';
    switch (msg.type) {
      case 'event':
        if (!leader) applyEvent(s, msg.ev);
        break;
      case 'tasks':
        if (!leader && Array.isArray(msg.tasks)) for (const t of msg.tasks) upsert(s, t, true);
        break;
      case 'conn':
        if (!leader) {
          setSeq(msg.lastSeq);
          s.leaderConn = CONN_TEXT[msg.conn] ? msg.conn : null;
          renderConn(s);
        }
        break;
      case 'hello':
        if (leader) announceConn(s);
        break;
      default:
    }
  }

  function announceConn(s) {
    s.channel.post({ type: 'conn', conn: s.conn, lastSeq: hf.lastSeq });
  }

  // ---------------------------------------------------------------- connection (leader)

  function setConn(s, state) {
    const changed = s.conn !== state;
    s.conn = state;
    renderConn(s);
    if (changed && hf.role === 'leader') announceConn(s);
  }

  function renderConn(s) {
    const leader = hf.role === 'leader';
    const state = leader ? s.conn : (s.leaderConn || 'reconnecting');
    ui.conn.dataset.state = state;
    ui.conn.textContent = CONN_TEXT[state];
    ui.connNote.textContent = leader || !s.leaderConn ? '' : 'via another tab';
  }

  function closeTransport(s) {
    if (s.es) {
      s.es.close();
      s.es = null;
    }
    s.pollGen += 1;
    if (s.pollCtrl) s.pollCtrl.abort();
    s.pollCtrl = null;
    if (s.sseRetryTimer) cancelLater(s, s.sseRetryTimer);
    s.sseRetryTimer = 0;
  }

  function connectSse(s) {
    closeTransport(s);
    if (typeof EventSource !== 'function') {
      startPolling(s);
      return;
    }
    // The browser reconnects by itself with Last-Event-ID, which the server
    // prefers over this URL's `since`. Without a cursor yet the stream starts
    // from now and its `ready` event says where that is; the list loaded
    // after it opens (resync) covers what came before.
    const since = hf.lastSeq ? `&since=${hf.lastSeq}` : '';
    const es = new EventSource(`/api/events?token=${encodeURIComponent(s.token)}${since}`);
    s.es = es;
    s.sseFailures = 0;
    setTransport('sse');
    setConn(s, 'reconnecting');
    es.onopen = () => {
      if (s.es !== es) return;
      const outage = s.sseFailures >= 2 || (s.downSince && Date.now() - s.downSince > OUTAGE_MS);
      s.sseFailures = 0;
      s.downSince = 0;
      setConn(s, 'live');
      if (s.needResync || outage) resync(s);
    };
    const onData = (e) => {
      if (s.es !== es) return;
      let ev;
      try { ev = JSON.parse(e.data); } catch (_) { return; }
      if (!ev || typeof ev !== 'object') return;
      if (ev.seq === undefined && e.lastEventId) ev.seq = Number(e.lastEventId);
      receiveEvent(s, ev);
    };
    // Unnamed events, or events named after their type: both are handled.
    for (const name of ['message', 'created', 'updated', 'finished']) es.addEventListener(name, onData);
    es.addEventListener('ready', (e) => {
      if (s.es !== es) return;
      setSeq(e.lastEventId);
      announceConn(s);
    });
    es.onerror = () => {
      if (s.es !== es) return;
      if (!s.downSince) s.downSince = Date.now();
      s.sseFailures += 1;
      // CLOSED: the server refused the stream (503 too many streams, 401, ...);
      // the browser will not retry, and neither do we until SSE_RETRY_MS.
      // Otherwise the server is unreachable: poll (with backoff) until it
      // answers, then stream again at once.
      if (es.readyState === EventSource.CLOSED) {
        startPolling(s, SSE_RETRY_MS);
      } else if (s.sseFailures >= SSE_MAX_FAILURES) {
        startPolling(s, 0);
      } else {
        setConn(s, 'reconnecting');
      }
    };
  }

  // sseAfterMs: when to try the stream again; 0: as soon as a poll succeeds.
  function startPolling(s, sseAfterMs) {
    closeTransport(s);
    setTransport('poll');
    // A long poll answers only when there is news: assume it works until it fails.
    setConn(s, 'polling');
    s.needResync = true;
    if (sseAfterMs) s.sseRetryTimer = later(s, () => connectSse(s), sseAfterMs);
    pollLoop(s, s.pollGen, !sseAfterMs);
  }

  async function pollLoop(s, gen, sseOnSuccess) {
    let backoff = 1000;
    // Without a cursor the server answers "from now", which is right only
    // once: a user with no events yet has cursor 0, and a second poll "from
    // now" would skip what happened between the two (a task created while
    // the list loaded, and finished before the next poll, never showed).
    let known = hf.lastSeq > 0;
    const current = () => !s.stopped && s.pollGen === gen;
    while (current()) {
      const ctrl = new AbortController();
      s.pollCtrl = ctrl;
      const started = Date.now();
      // After an outage ask at once (no wait): the answer proves the server
      // is back and the list can be refetched now rather than after a long poll.
      const wait = s.needResync ? 0 : POLL_WAIT_S;
      const since = known || hf.lastSeq ? `since=${hf.lastSeq}&` : '';
      let data;
      try {
        data = await request(s, `/api/events/poll?${since}wait=${wait}`,
          { ctrl, timeoutMs: (wait + 15) * 1000 });
      } catch (err) {
        if (!current() || err.status === 401) return;
        s.needResync = true;
        setConn(s, 'offline');
        await sleep(s, backoff + Math.random() * 500);
        backoff = Math.min(backoff * 2, 30000);
        continue;
      }
      if (!current()) return;
      backoff = 1000;
      const events = (data && Array.isArray(data.events)) ? data.events : [];
      for (const ev of events) if (ev && typeof ev === 'object') receiveEvent(s, ev);
      if (data) {
        setSeq(data.next);
        known = true;
      }
      if (sseOnSuccess) {
        connectSse(s);   // ends this loop; the stream resyncs when it opens
        return;
      }
      setConn(s, 'polling');
      if (s.needResync) resync(s);
      // A server that answers at once with nothing must not make us spin.
      if (wait && !events.length && Date.now() - started < 1000) await sleep(s, 1000);
    }
  }

  function receiveEvent(s, ev) {
    applyEvent(s, ev);
    s.channel.post({ type: 'event', ev });
  }

  // The leader refetches the first page after an outage (or when it takes
  // over) and shares it, so every tab matches the server again.
  async function resync(s) {
    s.needResync = false;
    try {
      const list = await loadFirstPage(s);
      if (hf.role === 'leader') s.channel.post({ type: 'tasks', tasks: list });
      refreshMe(s);
    } catch (err) {
      if (!s.stopped) s.needResync = true;
    }
  }

  // ---------------------------------------------------------------- tasks

  function applyEvent(s, ev) {
    if (!ev || typeof ev !== 'object') return;
    setSeq(ev.seq);
    if (!s.listLoaded) {
      s.pending.push(ev);
      return;
    }
    if (ev.task && typeof ev.task === 'object') upsert(s, ev.task, false);
    else if (typeof ev.task_id === 'string' && tasks.has(ev.task_id)) refreshTask(s, ev.task_id);
    if (ev.type === 'finished') scheduleMe(s);
  }

  async function refreshTask(s, id) {
    try {
      const data = await request(s, `/api/tasks/${encodeURIComponent(id)}`);
      upsert(s, taskOf(data), false);
    } catch (_) { /* the next event or resync brings it */ }
  }

  function taskOf(data) {
    if (data && typeof data.task === 'object') return data.task;
    return data && typeof data.id === 'string' ? data : null;
  }

  async function loadFirstPage(s) {
    try {
      const data = await request(s, `/api/tasks?limit=${PAGE_SIZE}`);
      const list = (data && Array.isArray(data.tasks)) ? data.tasks : [];
      for (const t of list) upsert(s, t, true);
      if (!s.listLoaded) {
        s.listLoaded = true;
        s.next = (data && data.next) || null;
        const pending = s.pending;
        s.pending = [];
        for (const ev of pending) applyEvent(s, ev);
      }
      setText(ui.listError, '');
      updateListChrome(s);
      return list;
    } catch (err) {
      if (!quiet(err) && !s.stopped) setText(ui.listError, `Could not load tasks: ${err.message}`);
      throw err;
    }
  }

  // Until the first page arrives, events wait in s.pending; keep trying.
  function initialLoad(s, delay) {
    loadFirstPage(s).catch((err) => {
      if (s.stopped || s.listLoaded || err.status === 401) return;
      later(s, () => { if (!s.listLoaded) initialLoad(s, Math.min(delay * 2, 30000)); }, delay);
    });
  }

  async function loadMore() {
    const s = S;
    if (!s || !s.next || s.loadingMore) return;
    s.loadingMore = true;
    ui.loadMore.disabled = true;
    try {
      const data = await request(s, `/api/tasks?limit=${PAGE_SIZE}&before=${encodeURIComponent(s.next)}`);
      for (const t of (data && Array.isArray(data.tasks)) ? data.tasks : []) upsert(s, t, true);
      s.next = (data && data.next) || null;
      setText(ui.listError, '');
    } catch (err) {
      if (!quiet(err) && !s.stopped) setText(ui.listError, `Could not load more: ${err.message}`);
    } finally {
      s.loadingMore = false;
      ui.loadMore.disabled = false;
      if (!s.stopped) updateListChrome(s);
    }
  }

  function updateListChrome(s) {
    show(ui.loadMore, Boolean(s.next));
    show(ui.tasksEmpty, s.listLoaded && tasks.size === 0);
  }

  // An event about a task older than every loaded one belongs to a page not
  // loaded yet: "load more" brings it.
  function inLoadedRange(s, task) {
    if (!s.next) return true;
    const last = ui.tasks.lastElementChild;
    const oldest = last && tasks.get(last.dataset.id);
    return !oldest || compareTasks(task, oldest) <= 0;
  }

  // Apply a task unless what is shown is as new (task.version).
  // force: the task belongs in the list (a loaded page, a submit, a retry).
  function upsert(s, task, force) {
    if (!task || typeof task !== 'object' || typeof task.id !== 'string') return;
    const old = tasks.get(task.id);
    if (old) {
      const v = Number(task.version);
      const ov = Number(old.version);
      if (Number.isFinite(v) && Number.isFinite(ov) && v <= ov) return;
      tasks.set(task.id, task);
      renderCard(s, cards.get(task.id), task);
      renderOriginal(s, task);
      return;
    }
    if (!force && !inLoadedRange(s, task)) return;
    tasks.set(task.id, task);
    const card = createCard(s, task);
    insertOrdered(card.el, task);
    renderCard(s, card, task);
    renderOriginal(s, task);
    updateListChrome(s);
  }

  // A retry that appears, or ends, shows or hides its original's Retry.
  function renderOriginal(s, task) {
    const id = typeof task.retry_of === 'string' ? task.retry_of : null;
    if (id && cards.has(id) && tasks.has(id)) renderCard(s, cards.get(id), tasks.get(id));
  }

  // The server returns a live retry (not failed or cancelled) instead of
  // making another: while one is shown, its original offers no Retry.
  function liveRetryOf(id) {
    for (const t of tasks.values()) {
      if (t.retry_of === id && !RETRYABLE.has(String(t.status))) return t;
    }
    return null;
  }

  function insertOrdered(node, task) {
    for (const other of ui.tasks.children) {
      const t = tasks.get(other.dataset.id);
      if (t && compareTasks(task, t) < 0) {
        ui.tasks.insertBefore(node, other);
        return;
      }
    }
    ui.tasks.append(node);
  }

  function clearCards() {
    for (const card of cards.values()) releaseFiles(card);
    cards.clear();
    tasks.clear();
    if (ui) ui.tasks.replaceChildren();
  }

  function createCard(s, task) {
    const card = {
      el: el('li', 'task'),
      status: el('span', 'status'),
      provider: el('span', 'provider'),
      priority: el('span', 'priority'),
      id: el('code', 'id'),
      time: el('time', 'created'),
      prompt: el('p', 'prompt'),
      progressRow: el('div', 'progress-row'),
      bar: el('progress', 'bar'),
      step: el('span', 'step'),
      meta: el('span', 'meta'),
      error: el('p', 'task-error'),
      files: el('div', 'files'),
      actions: el('div', 'actions'),
      note: el('p', 'note'),
      cancelBtn: el('button', 'cancel', 'Cancel'),
      retryBtn: el('button', 'retry', 'Retry'),
      retryOf: el('a', 'retry-of'),
      filesKey: '',
      urls: new Map(),      // file url -> object URL of its fetched blob
      filesCtrl: null,
    };
    card.el.dataset.id = task.id;
    card.bar.max = 1;
    card.cancelBtn.type = 'button';
    card.retryBtn.type = 'button';
    card.cancelBtn.addEventListener('click', () => cancelTask(s, card, task.id));
    card.retryBtn.addEventListener('click', () => retryTask(s, card, task.id));
    card.retryOf.href = '#';
    card.retryOf.hidden = true;
    const head = el('div', 'task-head');
    head.append(card.status, card.provider, card.priority, card.id, card.retryOf, card.time);
    card.progressRow.append(card.bar, card.step, card.meta);
    card.el.append(head, card.prompt, card.progressRow, card.error, card.files, card.actions, card.note);
    card.note.hidden = true;
    cards.set(task.id, card);
    return card;
  }

  function promptOf(task) {
    const p = task.params && task.params.prompt;
    if (p === undefined || p === null) return '';
    return typeof p === 'string' ? p : JSON.stringify(p);
  }

  function renderCard(s, card, task) {
    const status = String(task.status || 'unknown');
    card.el.dataset.status = status;
    card.status.textContent = status;
    card.status.className = `status s-${STATUSES.includes(status) ? status : 'unknown'}`;
    card.provider.textContent = String(task.provider || '');
    // A small badge only when the priority is not the default.
    const priority = Number.isInteger(task.priority) ? task.priority : 0;
    card.priority.hidden = priority === 0;
    card.priority.textContent = priority > 0 ? `priority +${priority}` : `priority ${priority}`;
    card.priority.title = 'higher runs first among your own tasks waiting for a slot';
    card.id.textContent = shortId(task.id);
    card.id.title = task.id;
    const retryOf = typeof task.retry_of === 'string' ? task.retry_of : '';
    card.retryOf.hidden = !retryOf;
    card.retryOf.textContent = retryOf ? `retry of ${shortId(retryOf)}` : '';
    card.retryOf.title = retryOf;
    card.retryOf.dataset.of = retryOf;
    card.time.dateTime = task.created_at || '';
    card.time.title = Number.isFinite(Date.parse(task.created_at))
      ? new Date(task.created_at).toLocaleString() : '';
    card.time.textContent = relativeTime(task.created_at);
    setText(card.prompt, promptOf(task));

    const active = ACTIVE.has(status);
    const progress = typeof task.progress === 'number' && Number.isFinite(task.progress)
      ? Math.min(1, Math.max(0, task.progress)) : null;
    card.bar.hidden = !active;
    if (progress !== null) card.bar.value = progress;
    else if (status === 'queued') card.bar.value = 0;
    else card.bar.removeAttribute('value');   // indeterminate
    const pct = active && progress !== null ? `${Math.round(progress * 100)}%` : '';
    const step = task.step ? String(task.step) : (status === 'queued' ? 'waiting' : '');
    card.step.textContent = [step, pct].filter(Boolean).join(' · ');
    card.meta.textContent = creditsText(task);
    show(card.progressRow, active || Boolean(card.step.textContent || card.meta.textContent));

    const err = task.error && typeof task.error === 'object' ? task.error : null;
    setText(card.error, err ? (err.message || err.code || 'failed') : '');
    if (err && err.code) card.error.dataset.code = String(err.code);
    else delete card.error.dataset.code;

    const files = Array.isArray(task.files) ? task.files : [];
    const key = JSON.stringify(files.map((f) => f && [f.name, f.url, f.sha256, f.size]));
    if (key !== card.filesKey) {
      card.filesKey = key;
      renderFiles(s, card, files);
    }

    placeButton(card.actions, card.cancelBtn, active);
    placeButton(card.actions, card.retryBtn, RETRYABLE.has(status) && !liveRetryOf(task.id));
    show(card.actions, card.actions.childElementCount > 0);
  }

  function creditsText(task) {
    if (!task.cost || !task.credits || task.credits === 'none') return '';
    const unit = task.cost === 1 ? 'credit' : 'credits';
    return `${task.cost} ${unit} ${task.credits}`;
  }

  function placeButton(parent, button, wanted) {
    if (wanted && button.parentNode !== parent) parent.append(button);
    else if (!wanted && button.parentNode) button.remove();
  }

  function releaseFiles(card) {
    if (card.filesCtrl) card.filesCtrl.abort();
    card.filesCtrl = null;
    for (const url of card.urls.values()) URL.revokeObjectURL(url);
    card.urls.clear();
    card.files.replaceChildren();
  }

  function renderFiles(s, card, files) {
    releaseFiles(card);
    const usable = files.filter((f) => f && isLocalPath(f.url));
    show(card.files, usable.length > 0);
    if (!usable.length) return;
    const ctrl = card.filesCtrl = new AbortController();
    const thumbs = el('div', 'thumbs');
    const links = el('ul', 'links');
    for (const f of usable) {
      const name = String(f.name || f.url.split('/').pop());
      if (typeof f.content_type === 'string' && f.content_type.startsWith('image/')) {
        const img = el('img');
        img.alt = name;
        img.decoding = 'async';
        thumbs.append(img);
        loadThumb(s, card, ctrl, f.url, img);
      }
      const a = el('a', 'file', name);
      a.href = f.url;
      a.download = name;
      a.addEventListener('click', (e) => {
        e.preventDefault();
        downloadFile(s, card, f.url, name);
      });
      const li = el('li');
      li.append(a);
      const size = formatSize(f.size);
      if (size) li.append(el('span', 'size', size));
      links.append(li);
    }
    if (thumbs.childElementCount) card.files.append(thumbs);
    card.files.append(links);
  }

  async function loadThumb(s, card, ctrl, url, img) {
    try {
      const blob = await request(s, url, { ctrl, as: 'blob' });
      if (ctrl.signal.aborted) return;
      const objectUrl = URL.createObjectURL(blob);
      card.urls.set(url, objectUrl);
      img.src = objectUrl;
    } catch (err) {
      if (err.code === 'aborted') return;
      img.classList.add('broken');
      img.alt = `${img.alt} (could not load: ${err.message})`;
    }
  }

  async function downloadFile(s, card, url, name) {
    if (s.stopped) return;
    let objectUrl = card.urls.get(url);
    if (!objectUrl) {
      try {
        objectUrl = URL.createObjectURL(await request(s, url, { as: 'blob' }));
      } catch (err) {
        if (!quiet(err)) setText(card.note, `Download failed: ${err.message}`);
        return;
      }
      s.tempUrls.add(objectUrl);
      later(s, () => {
        URL.revokeObjectURL(objectUrl);
        s.tempUrls.delete(objectUrl);
      }, 60000);
    }
    const a = el('a');
    a.href = objectUrl;
    a.download = name;
    a.hidden = true;
    document.body.append(a);
    a.click();
    a.remove();
  }

  async function cancelTask(s, card, id) {
    card.cancelBtn.disabled = true;
    setText(card.note, '');
    let data;
    try {
      data = await request(s, `/api/tasks/${encodeURIComponent(id)}/cancel`, { method: 'POST' });
    } catch (err) {
      if (quiet(err) || s.stopped) return;
      setText(card.note, `Cancel failed: ${err.message}`);
      if (err.status === 409) refreshTask(s, id);
      return;
    } finally {
      card.cancelBtn.disabled = false;
    }
    upsert(s, taskOf(data), true);
    scheduleMe(s);
  }

  async function retryTask(s, card, id) {
    card.retryBtn.disabled = true;
    setText(card.note, '');
    let data;
    try {
      data = await request(s, `/api/tasks/${encodeURIComponent(id)}/retry`, { method: 'POST' });
    } catch (err) {
      if (!quiet(err) && !s.stopped) setText(card.note, `Retry failed: ${err.message}`);
      return;
    } finally {
      card.retryBtn.disabled = false;
    }
    const task = taskOf(data);
    upsert(s, task, true);
    highlight(task);
    scheduleMe(s);
  }

  // "retry of …" links, one listener for every card (cards come and go).
  function onRetryOfClick(e) {
    const link = e.target instanceof Element ? e.target.closest('a.retry-of') : null;
    if (!link) return;
    e.preventDefault();
    if (S && link.dataset.of) showTask(S, link.dataset.of);
  }

  // The original of a retry: its card if loaded, else fetched into the list.
  async function showTask(s, id) {
    if (!tasks.has(id)) {
      let data;
      try {
        data = await request(s, `/api/tasks/${encodeURIComponent(id)}`);
      } catch (_) {
        return;   // gone (retention) or unreachable: nothing to show
      }
      if (s.stopped) return;
      upsert(s, taskOf(data), true);
    }
    highlight(tasks.get(id));
  }

  function highlight(task) {
    const card = task && cards.get(task.id);
    if (!card) return;
    card.el.classList.remove('fresh');
    void card.el.offsetWidth;   // restart the animation
    card.el.classList.add('fresh');
    if (card.el.scrollIntoView) card.el.scrollIntoView({ block: 'nearest', behavior: 'smooth' });
  }

  function updateTimes() {
    for (const [id, card] of cards) card.time.textContent = relativeTime(tasks.get(id).created_at);
  }

  // ---------------------------------------------------------------- user, providers

  async function refreshMe(s) {
    try {
      const data = await request(s, '/api/me');
      const user = (data && data.user) || {};
      setText(ui.meName, String(user.name || ''));
      const c = data && data.credits;
      if (c && typeof c === 'object') {
        const reserved = Number(c.reserved) ? ` (${c.reserved} reserved)` : '';
        setText(ui.meCredits, `${c.balance} credits${reserved}`);
      } else {
        setText(ui.meCredits, '');
      }
    } catch (_) { /* 401 signs out; otherwise the next refresh shows it */ }
  }

  function scheduleMe(s) {
    if (s.meTimer) return;
    s.meTimer = later(s, () => {
      s.meTimer = 0;
      refreshMe(s);
    }, 500);
  }

  async function loadProviders(s) {
    let list = [];
    try {
      const data = await request(s, '/api/providers');
      let p = data && data.providers;
      if (p && !Array.isArray(p) && typeof p === 'object') {
        p = Object.entries(p).map(([name, v]) => ({ name, ...(v || {}) }));
      }
      if (Array.isArray(p)) list = p.filter((x) => x && typeof x.name === 'string');
    } catch (err) {
      if (quiet(err) || s.stopped) return;
    }
    if (s.stopped) return;
    if (!list.length) list = [{ name: 'demo' }];
    const previous = ui.provider.value;
    ui.provider.replaceChildren(...list.map((p) => {
      const label = p.type && p.type !== p.name ? `${p.name} (${p.type})` : p.name;
      const option = el('option', '', label);
      option.value = p.name;
      return option;
    }));
    const names = list.map((p) => p.name);
    ui.provider.value = names.includes(previous) ? previous : (names.includes('demo') ? 'demo' : names[0]);
  }

  // ---------------------------------------------------------------- submit

  function formError(message, err) {
    setText(ui.formError, message);
    if (err) {
      ui.formError.dataset.status = String(err.status);
      ui.formError.dataset.code = String(err.code);
    } else {
      delete ui.formError.dataset.status;
      delete ui.formError.dataset.code;
    }
  }

  function submitErrorText(err) {
    switch (err.status) {
      case 0: return `${err.message} Submitting again is safe: it cannot create a second task.`;
      case 400: return `Rejected: ${err.message}`;
      case 402: return `Not enough credits: ${err.message}`;
      case 413: return `Too large: ${err.message}`;
      case 429: {
        const wait = retryAfterSeconds(err.retryAfter);
        return wait === null ? `Too busy: ${err.message}` : `Too busy: ${err.message} Try again in ${wait} s.`;
      }
      default: return `Error ${err.status}: ${err.message}`;
    }
  }

  async function onSubmit(e) {
    e.preventDefault();
    const s = S;
    if (!s || submitting) return;
    formError('');
    setText(ui.formNote, '');
    ui.params.removeAttribute('aria-invalid');

    const params = {};
    const prompt = ui.prompt.value.trim();
    if (prompt) params.prompt = prompt;
    const raw = ui.params.value.trim();
    if (raw) {
      let extra;
      try {
        extra = JSON.parse(raw);
      } catch (err) {
        ui.params.setAttribute('aria-invalid', 'true');
        formError(`Params JSON is not valid JSON: ${err.message}`);
        return;
      }
      if (!extra || typeof extra !== 'object' || Array.isArray(extra)) {
        ui.params.setAttribute('aria-invalid', 'true');
        formError('Params JSON must be an object, like {"steps": 4}.');
        return;
      }
      Object.assign(params, extra);
    }
    const body = { provider: ui.provider.value, params };
    const dedupeKey = ui.dedupeKey.value.trim();
    if (dedupeKey) {
      if (!/^[\x21-\x7e]{1,200}$/.test(dedupeKey)) {
        formError('The dedupe key must be 1-200 printable ASCII characters without spaces.');
        return;
      }
      body.dedupe_key = dedupeKey;
    }

    submitting = true;
    ui.submitBtn.disabled = true;
    idemKeyTried = true;
    let data;
    try {
      // The server refuses a dedupe key and an Idempotency-Key that differ;
      // a dedupe key protects against double submits just as well.
      data = await request(s, '/api/tasks',
        { method: 'POST', body, headers: { 'Idempotency-Key': dedupeKey || idemKey } });
    } catch (err) {
      if (!quiet(err) && !s.stopped) formError(submitErrorText(err), err);
      return;
    } finally {
      submitting = false;
      ui.submitBtn.disabled = false;
    }
    // The key stays until the form is edited (onFormInput): a second click
    // on the same form, even after this answer, gets the same task back.
    const task = taskOf(data);
    upsert(s, task, true);
    highlight(task);
    setText(ui.formNote, data && data.deduplicated
      ? 'Already submitted: this is the existing task.' : 'Submitted.');
    scheduleMe(s);
  }

  // A request sent with this key may have reached the server; an edited form
  // is a new submission and gets a new key, an unchanged one keeps it.
  function onFormInput(e) {
    if (e.target === ui.params) ui.params.removeAttribute('aria-invalid');
    if (idemKeyTried) {
      idemKey = uuid();
      idemKeyTried = false;
    }
  }

  // ---------------------------------------------------------------- boot

  function boot() {
    const byId = (id) => document.getElementById(id);
    ui = {
      auth: byId('auth'),
      app: byId('app'),
      me: byId('me'),
      meName: byId('me-name'),
      meCredits: byId('me-credits'),
      signout: byId('signout'),
      conn: byId('conn'),
      connNote: byId('conn-note'),
      tokenForm: byId('token-form'),
      tokenInput: byId('token-input'),
      tokenError: byId('token-error'),
      submitForm: byId('submit-form'),
      provider: byId('provider'),
      prompt: byId('prompt'),
      params: byId('params'),
      dedupeKey: byId('dedupe-key'),
      submitBtn: byId('submit-btn'),
      formError: byId('form-error'),
      formNote: byId('form-note'),
      tasks: byId('tasks'),
      tasksEmpty: byId('tasks-empty'),
      loadMore: byId('load-more'),
      listError: byId('list-error'),
    };
    setRole('follower');
    setTransport('none');
    ui.tokenForm.addEventListener('submit', onTokenSubmit);
    ui.signout.addEventListener('click', () => signOut(''));
    ui.submitForm.addEventListener('submit', onSubmit);
    ui.submitForm.addEventListener('input', onFormInput);
    ui.prompt.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        ui.submitBtn.click();
      }
    });
    ui.loadMore.addEventListener('click', loadMore);
    ui.tasks.addEventListener('click', onRetryOfClick);
    window.addEventListener('storage', onStorage);
    // Leaving the page (or entering the back/forward cache) closes every
    // stream, channel, timer and request; coming back starts afresh.
    window.addEventListener('pagehide', stop);
    window.addEventListener('pageshow', (e) => {
      if (e.persisted && !S) startFromStorage();
    });
    startFromStorage();
  }

  function startFromStorage() {
    const token = readToken();
    if (token) start(token);
    else showAuth('');
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', boot);
  else boot();
})();
