// holdfast's page: an API token, a submit form and a live list of the user's
// tasks. The connection is holdfast.js's (one event stream per browser shared
// by its tabs, resumed after a reconnect, long polling as a fallback, submits
// with an Idempotency-Key); this file is the page around it, and it keeps no
// task state that the server lacks.
import { createDetail } from './detail.js';
import { connect, uuid } from './holdfast.js';

const TOKEN_KEY = 'holdfast.token';
const PAGE_SIZE = 50;
const STATUSES = ['queued', 'running', 'succeeded', 'partial', 'failed', 'cancelled'];
const ACTIVE = new Set(['queued', 'running']);
const RETRYABLE = new Set(['failed', 'cancelled']);
const CONN_TEXT = {
  live: 'live', polling: 'polling', reconnecting: 'reconnecting…', offline: 'offline', 'signed-out': 'signed out',
};
const SIGNED_OUT = { role: 'follower', transport: 'none', conn: 'signed-out', shared: false, lastSeq: 0 };
const UP = new Set(['live', 'polling']);
// A planned reconnect (each stream ends after a minute) is shorter than this:
// only a longer gap marks the active tasks' data as possibly out of date.
const STALE_AFTER_MS = 4000;
const TICK_MS = 10000;
const UNAUTHORIZED = 'That token was not accepted (401). Paste a valid API token.';

const tasks = new Map();   // id -> task as shown (the server's, newest version)
const cards = new Map();   // id -> card (its elements, object URLs, file fetches)

let ui = null;
let S = null;              // the signed-in session; null when signed out
let memToken = null;       // used when localStorage is unavailable
let idemKey = uuid();      // one per form fill
let idemKeyTried = false;  // sent without success: an edit starts a new fill
let submitting = false;
let detail = null;
// Every relative time on the page is counted from this one instant, moved
// for all of them at once, so that two of them never disagree.
let nowMs = Date.now();
const filter = { status: '', provider: '' };

// What the connection is, for the console (and the page's tests).
window.holdfast = {
  get role() { return (S ? S.hf.state() : SIGNED_OUT).role; },
  get transport() { return (S ? S.hf.state() : SIGNED_OUT).transport; },
  get lastSeq() { return (S ? S.hf.state() : SIGNED_OUT).lastSeq; },
  tasks,
};

// ---------------------------------------------------------------- helpers

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
  delete node.dataset.net;
}

// An error shown for a request: one that did not reach the server (status
// 0) is marked, and cleared once the connection is up again.
function errorText(node, text, err) {
  setText(node, text);
  if (text && err && err.status === 0) node.dataset.net = '1';
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
  const s = Math.round((nowMs - t) / 1000);
  if (s <= -60 && s > -86400 * 14) return `in ${span(-s)}`;   // a deadline
  if (s < 10) return 'just now';
  if (s < 86400 * 14) return `${span(s)} ago`;
  return new Date(t).toLocaleDateString();
}

function span(s) {
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h`;
  return `${Math.floor(s / 86400)} d`;
}

function localTime(iso) {
  const t = Date.parse(iso);
  return Number.isFinite(t) ? new Date(t).toLocaleString() : '';
}

function plural(n, one, many) {
  return `${n} ${Number(n) === 1 ? one : many}`;
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

function later(s, fn, ms) {
  const id = setTimeout(() => {
    s.timers.delete(id);
    if (!s.stopped) fn();
  }, ms);
  s.timers.add(id);
  return id;
}

// Aborted by a sign-out, or a refused token (which signs out).
const quiet = (err) => err.code === 'aborted' || err.status === 401;

// ---------------------------------------------------------------- session

function readToken() {
  return storageGet(TOKEN_KEY) || memToken;
}

function start(token) {
  stop();
  const s = S = {
    token,
    hf: connect({ url: '', token }),
    stopped: false,
    timers: new Set(),
    intervals: new Set(),
    tempUrls: new Set(),
    next: null,           // cursor of the first page not loaded yet
    listLoaded: false,
    loadingMore: false,
    pending: [],          // [task, event] that came before the first page
    meTimer: 0,
    downAt: 0,            // when the connection went down (0: it is up, live or polling)
    stale: false,         // down for longer than a planned reconnect
    downTimer: 0,
  };
  show(ui.auth, false);
  show(ui.app, true);
  show(ui.me, true);
  setText(ui.meName, '');
  setText(ui.meCredits, '');
  setText(ui.listError, '');
  show(ui.tasksEmpty, false);
  show(ui.loadMore, false);
  // Listen before fetching the list, so nothing falls in between.
  s.hf.subscribe((task, ev) => onTask(s, task, ev));
  s.hf.onState((st) => {
    if (S !== s) return;
    if (st.unauthorized) signOut(UNAUTHORIZED);
    else {
      renderConn(st);
      onConn(s, st);
    }
  });
  refreshMe(s);
  loadProviders(s);
  initialLoad(s, 1000);
  nowMs = Date.now();
  s.intervals.add(setInterval(updateTimes, TICK_MS));
}

// Up again: what failed for want of a connection is no longer the news;
// down for longer than a planned reconnect: the active tasks say their
// data may be old.
function onConn(s, st) {
  if (UP.has(st.conn)) {
    s.downAt = 0;
    if (s.downTimer) clearTimeout(s.downTimer);
    s.timers.delete(s.downTimer);
    s.downTimer = 0;
    if (s.stale) {
      s.stale = false;
      renderAllCards(s);
    }
    clearNetworkErrors();
    detail.reconnected();
    if (!s.listLoaded) loadFirstPage(s).catch(() => {});
    return;
  }
  if (!s.downAt) s.downAt = Date.now();
  if (!s.downTimer && !s.stale) {
    s.downTimer = later(s, () => {
      s.downTimer = 0;
      s.stale = true;
      renderAllCards(s);
    }, STALE_AFTER_MS);
  }
}

function clearNetworkErrors() {
  for (const node of document.querySelectorAll('[data-net]')) {
    if (node === ui.formError) {
      setText(node, 'The server can be reached again. Submitting again is safe: it cannot create a second task.');
    } else {
      setText(node, '');
    }
  }
}

function renderAllCards(s) {
  for (const [id, card] of cards) renderCard(s, card, tasks.get(id));
}

function stop() {
  const s = S;
  if (!s) return;
  S = null;
  s.stopped = true;
  s.hf.close();
  for (const id of s.timers) clearTimeout(id);
  for (const id of s.intervals) clearInterval(id);
  for (const url of s.tempUrls) URL.revokeObjectURL(url);
  if (detail) detail.close();
  clearCards();
  // The next user may have other providers; the filters start afresh.
  ui.filterProvider.replaceChildren(ui.filterProvider.options[0]);
  ui.filterStatus.value = '';
  filter.status = '';
  filter.provider = '';
  renderConn(SIGNED_OUT);
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
  if (e.key !== TOKEN_KEY && e.key !== null) return;
  const token = readToken();
  if (!token && S) {
    stop();
    showAuth('Signed out in another tab.');
  } else if (token && (!S || S.token !== token)) {
    start(token);
  }
}

// The connection line: this tab's stream, or the leading tab's ("via another tab").
function renderConn(st) {
  document.body.dataset.role = st.role;
  document.body.dataset.transport = st.transport;
  const state = CONN_TEXT[st.conn] ? st.conn : 'reconnecting';
  ui.conn.dataset.state = state;
  ui.conn.textContent = CONN_TEXT[state];
  ui.connNote.textContent = st.role === 'follower' && st.shared ? 'via another tab' : '';
}

// ---------------------------------------------------------------- tasks

// Every newer version of a task that holdfast.js sees (an event, or an
// answer); events wait until the first page is shown.
function onTask(s, task, ev) {
  if (s.stopped) return;
  if (!s.listLoaded) {
    s.pending.push([task, ev]);
    return;
  }
  const old = tasks.get(task.id);
  upsert(s, task, false);
  detail.update(task, ev);
  // A new task (from this page or elsewhere) reserves credits; one that
  // ends charges or refunds them.
  const news = ev && (ev.type === 'finished' || ev.type === 'created');
  if (news || (old && ACTIVE.has(old.status) && !ACTIVE.has(task.status))) {
    scheduleMe(s);
  }
}

async function loadFirstPage(s) {
  try {
    const page = await s.hf.list({ limit: PAGE_SIZE });
    if (s.stopped) return;
    for (const t of page.tasks) upsert(s, t, true);
    if (!s.listLoaded) {
      s.listLoaded = true;
      s.next = page.next;
      const pending = s.pending;
      s.pending = [];
      for (const [t, ev] of pending) onTask(s, t, ev);
    }
    setText(ui.listError, '');
    updateListChrome(s);
  } catch (err) {
    if (!quiet(err) && !s.stopped) errorText(ui.listError, `Could not load tasks: ${err.message}`, err);
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
    const page = await s.hf.list({ before: s.next, limit: PAGE_SIZE });
    if (s.stopped) return;
    for (const t of page.tasks) upsert(s, t, true);
    s.next = page.next;
    setText(ui.listError, '');
  } catch (err) {
    if (!quiet(err) && !s.stopped) errorText(ui.listError, `Could not load more: ${err.message}`, err);
  } finally {
    s.loadingMore = false;
    ui.loadMore.disabled = false;
    if (!s.stopped) updateListChrome(s);
  }
}

function updateListChrome(s) {
  show(ui.loadMore, Boolean(s.next));
  show(ui.tasksEmpty, s.listLoaded && tasks.size === 0);
  let shown = 0;
  for (const card of cards.values()) if (!card.el.hidden) shown += 1;
  const filtering = Boolean(filter.status || filter.provider) && s.listLoaded;
  setText(ui.filterNote, filtering
    ? `Showing ${shown} of ${plural(tasks.size, 'loaded task', 'loaded tasks')}.${s.next ? ' Load more to look further.' : ''}`
    : '');
}

function matchesFilter(task) {
  const status = String(task.status);
  if (filter.status === 'active' ? !ACTIVE.has(status) : (filter.status && status !== filter.status)) return false;
  return !filter.provider || task.provider === filter.provider;
}

function onFilterChange() {
  filter.status = ui.filterStatus.value;
  filter.provider = ui.filterProvider.value;
  for (const [id, card] of cards) card.el.hidden = !matchesFilter(tasks.get(id));
  if (S) updateListChrome(S);
}

// The provider filter offers every configured provider and any other a task names.
function providerOption(name) {
  if ([...ui.filterProvider.options].some((o) => o.value === name)) return;
  const option = el('option', '', name);
  option.value = name;
  ui.filterProvider.append(option);
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
    updateListChrome(s);
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
  card.el.tabIndex = 0;
  card.el.setAttribute('aria-haspopup', 'dialog');
  card.stale = el('p', 'stale-note');
  card.stale.hidden = true;
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
  card.el.append(head, card.prompt, card.progressRow, card.stale, card.error, card.files, card.actions, card.note);
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
  card.time.title = localTime(task.created_at);
  card.time.textContent = relativeTime(task.created_at);
  setText(card.prompt, promptOf(task));

  const active = ACTIVE.has(status);
  const progress = typeof task.progress === 'number' && Number.isFinite(task.progress)
    ? Math.min(1, Math.max(0, task.progress)) : null;
  card.bar.hidden = !active;
  if (progress !== null) card.bar.value = progress;
  else if (status === 'queued') card.bar.value = 0;
  else card.bar.removeAttribute('value');   // indeterminate
  // The step is news while the task runs; an ended task's last step
  // ("generating" when cancelled, "failed" when failed) is not.
  const pct = active && progress !== null ? `${Math.round(progress * 100)}%` : '';
  const step = !active ? '' : (task.step ? String(task.step) : (status === 'queued' ? 'waiting' : ''));
  card.step.textContent = [step, pct].filter(Boolean).join(' · ');
  card.meta.textContent = creditsText(task);
  show(card.progressRow, active || Boolean(card.step.textContent || card.meta.textContent));

  const stale = s.stale && active;
  setText(card.stale, stale ? `Not updated since ${new Date(s.downAt).toLocaleTimeString()}: the server cannot `
    + 'be reached, so this may be out of date.' : '');
  if (stale) card.el.dataset.stale = '1';
  else delete card.el.dataset.stale;

  const err = task.error && typeof task.error === 'object' ? task.error : null;
  setText(card.error, err ? String(err.message || err.code || '') : '');
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
  if (task.provider) providerOption(String(task.provider));
  card.el.hidden = !matchesFilter(task);
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
    const blob = await s.hf.file(url, { signal: ctrl.signal });
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
      objectUrl = URL.createObjectURL(await s.hf.file(url));
    } catch (err) {
      if (!quiet(err)) errorText(card.note, `Download failed: ${err.message}`, err);
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
  let task;
  try {
    task = await s.hf.cancel(id);
  } catch (err) {
    if (quiet(err) || s.stopped) return;
    errorText(card.note, `Cancel failed: ${err.message}`, err);
    // Ended meanwhile: the task as it is now (it reaches onTask).
    if (err.status === 409) s.hf.get(id).catch(() => {});
    return;
  } finally {
    card.cancelBtn.disabled = false;
  }
  upsert(s, task, true);
  scheduleMe(s);
}

async function retryTask(s, card, id) {
  card.retryBtn.disabled = true;
  setText(card.note, '');
  let task;
  try {
    task = await s.hf.retry(id);
  } catch (err) {
    if (!quiet(err) && !s.stopped) errorText(card.note, `Retry failed: ${err.message}`, err);
    return;
  } finally {
    card.retryBtn.disabled = false;
  }
  if (s.stopped) return;
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
    let task;
    try {
      task = await s.hf.get(id);
    } catch (_) {
      return;   // gone (retention) or unreachable: nothing to show
    }
    if (s.stopped) return;
    upsert(s, task, true);
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
  nowMs = Date.now();
  for (const [id, card] of cards) card.time.textContent = relativeTime(tasks.get(id).created_at);
  detail.retime();
}

// A click on a card, but not on its buttons, links or selected text, opens its details.
function onCardClick(e) {
  const target = e.target instanceof Element ? e.target : null;
  const li = target && target.closest('li.task');
  if (!li || !S || target.closest('button, a, input, select, textarea, summary')) return;
  const sel = window.getSelection && window.getSelection();
  if (sel && !sel.isCollapsed && li.contains(sel.anchorNode)) return;
  detail.open(li.dataset.id);
}

function onCardKey(e) {
  if (e.key !== 'Enter' || !S || !(e.target instanceof Element) || !e.target.matches('li.task')) return;
  e.preventDefault();
  detail.open(e.target.dataset.id);
}

// ---------------------------------------------------------------- user, providers

async function refreshMe(s) {
  try {
    const data = await s.hf.me();
    if (s.stopped) return;
    const user = (data && data.user) || {};
    setText(ui.meName, String(user.name || ''));
    const c = data && data.credits;
    if (c && typeof c === 'object') {
      const reserved = Number(c.reserved) ? ` (${c.reserved} reserved)` : '';
      setText(ui.meCredits, `${plural(c.balance, 'credit', 'credits')}${reserved}`);
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
    let p = await s.hf.providers();
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
  for (const name of names) providerOption(name);
  ui.provider.value = names.includes(previous) ? previous : (names.includes('demo') ? 'demo' : names[0]);
}

// ---------------------------------------------------------------- submit

function formError(message, err) {
  errorText(ui.formError, message, err);
  if (err) {
    ui.formError.dataset.status = String(err.status);
    ui.formError.dataset.code = String(err.code);
  } else {
    delete ui.formError.dataset.status;
    delete ui.formError.dataset.code;
  }
}

function submitErrorText(err) {
  const { message } = err;
  switch (err.status) {
    case 0: return `${message} Submitting again is safe: it cannot create a second task.`;
    case 400: return `Rejected: ${message}`;
    case 402: return `Not enough credits: ${message}`;
    case 413: return `Too large: ${message}`;
    case 429: {
      const wait = retryAfterSeconds(err.retryAfter);
      return wait === null ? `Too busy: ${message}` : `Too busy: ${message} Try again in ${wait} s.`;
    }
    default: return `Error ${err.status}: ${message}`;
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
  const dedupeKey = ui.dedupeKey.value.trim();
  if (dedupeKey && !/^[\x21-\x7e]{1,200}$/.test(dedupeKey)) {
    formError('The dedupe key must be 1-200 printable ASCII characters without spaces.');
    return;
  }

  submitting = true;
  ui.submitBtn.disabled = true;
  idemKeyTried = true;
  let result;
  try {
    // Sent with this form fill's Idempotency-Key (or its dedupe key, which
    // protects against double submits just as well), and sent again by
    // holdfast.js when an answer is lost.
    result = await s.hf.submit(ui.provider.value, params, { dedupeKey, idempotencyKey: idemKey });
  } catch (err) {
    if (!quiet(err) && !s.stopped) formError(submitErrorText(err), err);
    return;
  } finally {
    submitting = false;
    ui.submitBtn.disabled = false;
  }
  // The key stays until the form is edited (onFormInput): a second click
  // on the same form, even after this answer, gets the same task back.
  if (s.stopped) return;
  upsert(s, result.task, true);
  highlight(result.task);
  setText(ui.formNote, result.deduplicated
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
    filterStatus: byId('filter-status'),
    filterProvider: byId('filter-provider'),
    filterNote: byId('filter-note'),
    formNote: byId('form-note'),
    tasks: byId('tasks'),
    tasksEmpty: byId('tasks-empty'),
    loadMore: byId('load-more'),
    listError: byId('list-error'),
  };
  detail = createDetail({
    el, relativeTime, localTime, formatSize, shortId, creditsText, isLocalPath,
    task: (id) => tasks.get(id) || (S ? S.hf.task(id) : undefined),
    tasks: () => tasks.values(),
    session: () => S,
    cardOf: (id) => (cards.has(id) ? cards.get(id).el : null),
  });
  renderConn(SIGNED_OUT);
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
  ui.tasks.addEventListener('click', onCardClick);
  ui.tasks.addEventListener('keydown', onCardKey);
  ui.filterStatus.addEventListener('change', onFilterChange);
  ui.filterProvider.addEventListener('change', onFilterChange);
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

// A module runs once the document is parsed.
boot();