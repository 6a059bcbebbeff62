// holdfast's operator console: what the service is doing now, how each
// provider did per day, stuck tasks, every user's tasks with filters and
// bulk actions, and users with their credits. Admins only: the API answers
// anyone else 401 or 403, and the console shows nothing to them.
//
// It signs in with the same token as the page (localStorage 'holdfast.token').
// The admin figures are polled every few seconds (no event stream carries
// every user's tasks); the caller's own tasks come live through holdfast.js,
// and a change there refreshes the figures at once.
import { connect, HoldfastError } from '/static/holdfast.js';

const TOKEN_KEY = 'holdfast.token';
const REFRESH_MS = 5000;
const REQUEST_TIMEOUT_MS = 20000;
const PAGE = 100;
const MAX_SELECTION = 1000;
const STATUSES = ['queued', 'running', 'succeeded', 'partial', 'failed', 'cancelled'];
const ERROR_CODES = ['provider_rejected', 'provider_unavailable', 'timeout', 'result_expired',
  'provider_lost', 'submission_in_doubt', 'invalid_result', 'internal'];
const STUCK_WORDS = {
  past_deadline: 'past its deadline, not ended by the sweeper',
  lease_expired: 'its worker’s lease ran out (the worker is gone or stalled)',
  poll_overdue: 'a poll is overdue and no worker took it',
};

const $ = (id) => document.getElementById(id);
const state = {
  token: null, stats: null, users: [], hf: null, timer: 0, refreshing: null,
  search: null,     // {params, tasks, next, total, key}: the filtered selection
  charts: {},       // provider -> {success, duration, failures}: uPlot instances
};
// For tests and the curious: the charts and the figures they were drawn from.
window.holdfastConsole = { charts: state.charts, stats: () => state.stats, ready: false };

// ------------------------------------------------------------------ helpers

function storageGet(key) {
  try { return localStorage.getItem(key); } catch (_) { return null; }
}

function storageSet(key, value) {
  try { localStorage.setItem(key, value); } catch (_) { /* storage disabled: this tab only */ }
}

function storageRemove(key) {
  try { localStorage.removeItem(key); } catch (_) { /* storage disabled */ }
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function setText(node, text) {
  node.textContent = text || '';
  node.hidden = !text;
}

function uuid() {
  if (crypto.randomUUID) { try { return crypto.randomUUID(); } catch (_) { /* insecure context */ } }
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, '0')).join('');
}

function pct(x) { return x === null || x === undefined ? '–' : `${(x * 100).toFixed(1)}%`; }

function secs(s) {
  if (s === null || s === undefined) return '–';
  if (s < 60) return `${Number(s).toFixed(s < 10 ? 1 : 0)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

function when(isoText) {
  if (!isoText) return '–';
  const d = new Date(isoText);
  return Number.isNaN(d.getTime()) ? isoText : d.toLocaleString();
}

function row(cells, header = false) {
  const tr = el('tr');
  for (const c of cells) {
    const td = el(header ? 'th' : 'td');
    if (c instanceof Node) td.append(c); else td.textContent = c === null || c === undefined ? '' : String(c);
    tr.append(td);
  }
  return tr;
}

async function api(path, { method = 'GET', body, headers = {} } = {}) {
  const ctrl = new AbortController();
  const timer = setTimeout(() => ctrl.abort(), REQUEST_TIMEOUT_MS);
  try {
    const init = { method, headers: { Accept: 'application/json', Authorization: `Bearer ${state.token}`, ...headers },
      signal: ctrl.signal, cache: 'no-store' };
    if (body !== undefined) {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let res;
    try { res = await fetch(path, init); } catch (_) {
      throw new HoldfastError(0, ctrl.signal.aborted ? 'timeout' : 'network', 'cannot reach the server');
    }
    const text = await res.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { /* the status says enough */ }
    if (!res.ok) {
      const e = (data && data.error) || {};
      const err = new HoldfastError(res.status, e.code || `http_${res.status}`, e.message || `HTTP ${res.status}`);
      if (res.status === 401) signedOut('That token was not accepted (401).');
      throw err;
    }
    return data;
  } finally {
    clearTimeout(timer);
  }
}

function showError(err) {
  setText($('error'), err ? `${err.message}${err.status ? ` (${err.status})` : ''}` : '');
}

// ------------------------------------------------------------------ sign-in

function signedOut(message) {
  stop();
  state.token = null;
  storageRemove(TOKEN_KEY);
  document.body.dataset.state = 'signed-out';
  $('console').hidden = true;
  $('denied').hidden = true;
  $('signout').hidden = true;
  $('auth').hidden = false;
  setText($('token-error'), message || '');
  setText($('who'), '');
}

function stop() {
  clearTimeout(state.timer);
  state.timer = 0;
  if (state.hf) { state.hf.close(); state.hf = null; }
}

async function start(token) {
  state.token = token;
  $('auth').hidden = true;
  let me;
  try {
    me = await api('/api/me');
  } catch (err) {
    if (err.status !== 401) { signedOut(`Cannot check the token: ${err.message}`); }
    return;
  }
  $('signout').hidden = false;
  setText($('who'), me.user.name);
  if (!me.user.admin) {
    // Nothing else is asked of the API: a non-admin gets no admin data.
    document.body.dataset.state = 'denied';
    $('denied').hidden = false;
    return;
  }
  document.body.dataset.state = 'admin';
  $('console').hidden = false;
  try {
    state.hf = connect({ url: '', token });
    state.hf.subscribe(() => soon());
  } catch (_) { state.hf = null; /* live updates of one's own tasks only; the polls go on */ }
  await Promise.all([refresh(), loadUsers()]);
  await find();
  window.holdfastConsole.ready = true;
  document.body.dataset.ready = '1';
}

// ------------------------------------------------------------------ figures

function soon() {
  clearTimeout(state.timer);
  state.timer = setTimeout(refresh, 300);
}

async function refresh() {
  clearTimeout(state.timer);
  if (!state.token) return;
  if (state.refreshing) return state.refreshing;
  state.refreshing = (async () => {
    try {
      const days = $('days').value;
      const [stats, stuck] = await Promise.all([
        api(`/api/admin/stats?days=${encodeURIComponent(days)}`),
        api('/api/admin/tasks?stuck=1&limit=200'),
      ]);
      state.stats = stats;
      drawLive(stats);
      drawCounts(stats);
      drawCharts(stats);
      drawStuck(stuck);
      showError(null);
    } catch (err) {
      showError(err);
    } finally {
      state.refreshing = null;
      if (state.token) state.timer = setTimeout(refresh, REFRESH_MS);
      if (state.hf) $('conn').dataset.state = state.hf.state().conn;
      setText($('conn'), state.hf ? `own tasks: ${state.hf.state().conn}` : '');
    }
  })();
  return state.refreshing;
}

function card(label, value, level, note) {
  const c = el('div', `card${level ? ` level-${level}` : ''}`);
  c.append(el('span', 'label', label), el('span', 'value', value));
  if (note) c.append(el('span', 'note', note));
  if (level) c.dataset.level = level;
  return c;
}

function drawLive(stats) {
  const L = stats.live;
  const t = stats.thresholds;
  $('thresholds').textContent = `success rate warns below ${pct(t.success_rate.warn)}, alerts below `
    + `${pct(t.success_rate.alert)}; poll delay warns above ${t.poll_delay_s.warn} s, alerts above ${t.poll_delay_s.alert} s`;
  const oldest = L.oldest_active;
  const cards = [
    card('Poll lag', secs(L.poll_lag_s), L.poll_lag_level,
      L.worker_poll_behind_s === null ? '' : `worker's last claim: ${secs(L.worker_poll_behind_s)} late`),
    card('Queue depth', L.queue_depth, null, `${L.active} active`),
    card('Oldest active task', secs(L.oldest_active_s), null,
      oldest ? `${oldest.id} (${oldest.user}, ${oldest.provider}, ${oldest.status})` : 'none'),
    card('Scheduler', L.scheduler, L.scheduler === 'running' ? 'ok' : (L.scheduler === 'off' ? null : 'alert')),
    card('Event streams open', (L.streams.sse || 0) + (L.streams.poll || 0), null,
      `${L.streams.sse || 0} SSE, ${L.streams.poll || 0} long polls, at most ${L.streams.max}`),
    card('Webhook deliveries failing', L.webhooks.failing, L.webhooks.failing ? 'warn' : 'ok',
      `${L.webhooks.pending} pending, ${L.webhooks.failed} given up in 24 h`),
  ];
  for (const p of stats.providers) {
    const h = p.health;
    let health = 'not configured';
    let level = null;
    if (h) {
      health = h.ok === null ? 'not checked yet' : (h.ok ? 'healthy' : 'failing');
      level = h.ok === false ? 'alert' : (h.ok ? 'ok' : null);
    }
    const note = [h && h.error ? `last error: ${h.error}` : '', h && h.checked_at ? `checked ${when(h.checked_at)}` : '',
      `success today ${pct(p.success_rate_today)}`].filter(Boolean).join('; ');
    const c = card(`Provider ${p.name}`, health, level, note);
    c.dataset.provider = p.name;
    if (p.level) c.dataset.successLevel = p.level;
    cards.push(c);
  }
  $('live').replaceChildren(...cards);
}

function drawCounts(stats) {
  const t = $('counts');
  const head = row(['provider', ...STATUSES, 'success today'], true);
  const rows = [head];
  for (const p of stats.providers) {
    const r = row([p.name, ...STATUSES.map((s) => p.tasks[s] || 0), pct(p.success_rate_today)]);
    r.dataset.provider = p.name;
    if (p.level) r.lastChild.className = `level-${p.level}`;
    rows.push(r);
  }
  t.replaceChildren(...rows);
  const names = $('provider-names');
  names.replaceChildren(...stats.providers.map((p) => { const o = el('option'); o.value = p.name; return o; }));
}

// uPlot draws on a canvas; each chart keeps its data in `u.data` (the test
// reads it back through window.holdfastConsole.charts).
const PALETTE = ['#2f7ed8', '#e4572e', '#17a398', '#f3a712', '#8e44ad', '#6c757d', '#c0392b', '#2ecc71'];

// Three charts a row on a wide screen, one on a phone.
function chartWidth() {
  const box = $('charts');
  const width = box.clientWidth || 900;
  if (width < 600) return Math.max(240, width - 16);
  // Each chart's figure adds about 12 px of padding and border; the grid, 12 px gaps.
  return Math.max(280, Math.min(560, Math.floor((width - 3 * 12 - 2 * 12) / 3) - 4));
}

// Half a day either side, so the first and last days' bars show whole.
function dayRange(u, lo, hi) {
  return [lo - 43200, hi + 43200];
}

let resizeTimer = 0;
window.addEventListener('resize', () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => {
    const width = chartWidth();
    for (const c of Object.values(state.charts)) {
      for (const u of Object.values(c)) u.setSize({ width, height: 180 });
    }
  }, 100);
});

function makeChart(box, title, series, data, opts = {}) {
  const wrap = el('figure', 'chart');
  wrap.append(el('figcaption', null, title));
  box.append(wrap);
  const u = new window.uPlot({
    width: chartWidth(), height: 180,
    scales: { x: { time: true, range: dayRange }, y: opts.y || {} },
    axes: [{}, { values: opts.values || ((_, ticks) => ticks.map((v) => v)) , size: 60 }],
    series: [{}, ...series.map((s, i) => ({
      label: s.label, stroke: s.stroke || PALETTE[i % PALETTE.length], width: 2, spanGaps: false,
      dash: s.dash, points: { show: true, size: 5 },
      paths: opts.bars ? window.uPlot.paths.bars({ size: [0.6, 40] }) : undefined,
      fill: opts.bars ? `${s.stroke || PALETTE[i % PALETTE.length]}88` : undefined,
      value: opts.value,
    }))],
  }, data, wrap);
  return u;
}

function drawCharts(stats) {
  if (!window.uPlot) { showError(new Error('the chart library did not load')); return; }
  const box = $('charts');
  const xs = stats.day_starts;
  const key = JSON.stringify([xs, stats.history, stats.thresholds]);
  if (box.dataset.key === key) return;    // nothing new: keep the charts (and their cursor) as they are
  box.dataset.key = key;
  for (const c of Object.values(state.charts)) for (const u of Object.values(c)) u.destroy();
  for (const k of Object.keys(state.charts)) delete state.charts[k];
  box.replaceChildren();
  const providers = Object.keys(stats.history).sort();
  if (!providers.length) { box.append(el('p', 'hint', 'No task finished in these days.')); return; }
  const t = stats.thresholds.success_rate;
  for (const name of providers) {
    const h = stats.history[name];
    const section = el('section', 'provider-charts');
    section.dataset.provider = name;
    section.append(el('h3', null, name));
    const grid = el('div', 'chart-grid');
    section.append(grid);
    box.append(section);
    const n = xs.length;
    const rate = h.success_rate.map((v) => (v === null ? null : v * 100));
    const success = makeChart(grid, 'Success rate (%)', [
      { label: 'success rate' },
      { label: `warn ${t.warn * 100}%`, stroke: '#f3a712', dash: [6, 4] },
      { label: `alert ${t.alert * 100}%`, stroke: '#c0392b', dash: [2, 4] },
    ], [xs, rate, Array(n).fill(t.warn * 100), Array(n).fill(t.alert * 100)],
    { y: { range: [0, 100] }, value: (_, v) => (v === null ? '–' : `${v.toFixed(1)}%`) });
    const duration = makeChart(grid, 'Duration (s)', [{ label: 'p50' }, { label: 'p95' }],
      [xs, h.p50_s, h.p95_s], { value: (_, v) => (v === null ? '–' : secs(v)) });
    const codes = Object.keys(h.failures).sort();
    const failures = makeChart(grid, 'Failures by error code',
      codes.length ? codes.map((c) => ({ label: c })) : [{ label: 'no failures' }],
      [xs, ...(codes.length ? codes.map((c) => h.failures[c]) : [Array(n).fill(0)])],
      { bars: true, y: { range: (_, lo, hi) => [0, Math.max(1, hi)] } });
    state.charts[name] = { success, duration, failures };
  }
}

function drawStuck(data) {
  const tasks = data.tasks || [];
  $('stuck-empty').hidden = tasks.length > 0;
  if (!tasks.length) { $('stuck').replaceChildren(); return; }
  const rows = [row(['task', 'user', 'provider', 'status', 'why it is stuck', 'lease', 'next poll', 'deadline'], true)];
  for (const r of tasks) {
    const why = el('ul', 'reasons');
    for (const reason of r.stuck) {
      const li = el('li', null, STUCK_WORDS[reason] || reason);
      li.dataset.reason = reason;
      why.append(li);
    }
    const tr = row([r.task.id, r.user, r.task.provider, r.task.status, why,
      r.lease_owner ? `${r.lease_owner} until ${when(r.lease_expires_at)}` : 'none',
      when(r.next_poll_at), when(r.task.deadline_at)]);
    tr.dataset.id = r.task.id;
    rows.push(tr);
  }
  $('stuck').replaceChildren(...rows);
}

// ------------------------------------------------------------------ tasks

function filterParams() {
  const p = new URLSearchParams();
  const statuses = [...document.querySelectorAll('#f-status input:checked')].map((i) => i.value);
  if (statuses.length) p.set('status', statuses.join(','));
  for (const [id, name] of [['f-provider', 'provider'], ['f-user', 'user'], ['f-error', 'error'], ['f-q', 'q']]) {
    const v = $(id).value.trim();
    if (v) p.set(name, v);
  }
  for (const [id, name] of [['f-since', 'since'], ['f-until', 'until']]) {
    const v = $(id).value;
    if (v) p.set(name, new Date(v).toISOString());   // the browser's local time, sent as UTC
  }
  return p;
}

async function find() {
  const params = filterParams();
  setText($('bulk-result'), '');
  try {
    const q = new URLSearchParams(params);
    q.set('limit', String(PAGE));
    q.set('count', '1');
    const data = await api(`/api/admin/tasks/search?${q}`);
    // A new selection gets new keys: a repeated click of the same action on
    // it sends the same key, and the server answers it once.
    state.search = { params, tasks: data.tasks, next: data.next, total: data.total,
      keys: { cancel: uuid(), retry: uuid() } };
    drawTasks();
    showError(null);
  } catch (err) {
    state.search = null;
    drawTasks();
    setText($('found'), err.status === 400 ? `Filter refused: ${err.message}` : '');
    if (err.status !== 400) showError(err);
  }
}

async function more() {
  const s = state.search;
  if (!s || !s.next) return;
  const q = new URLSearchParams(s.params);
  q.set('limit', String(PAGE));
  q.set('before', s.next);
  const data = await api(`/api/admin/tasks/search?${q}`);
  if (state.search !== s) return;
  s.tasks.push(...data.tasks);
  s.next = data.next;
  drawTasks();
}

function drawTasks() {
  const s = state.search;
  const t = $('tasks');
  $('more').hidden = !(s && s.next);
  $('bulk-cancel').disabled = !(s && s.total);
  $('bulk-retry').disabled = !(s && s.total);
  if (!s) { t.replaceChildren(); return; }
  setText($('found'), `${s.total} task${s.total === 1 ? '' : 's'} found${s.total > MAX_SELECTION
    ? ` (bulk actions take the newest ${MAX_SELECTION})` : ''}`);
  const rows = [row(['task', 'user', 'provider', 'status', 'error', 'created', 'dedupe key', 'retry of', 'params'], true)];
  for (const { task, user } of s.tasks) {
    const params = JSON.stringify(task.params);
    const tr = row([task.id, user, task.provider, task.status, task.error ? task.error.code : '',
      when(task.created_at), task.dedupe_key || '', task.retry_of || '',
      params.length > 120 ? `${params.slice(0, 120)}…` : params]);
    tr.dataset.id = task.id;
    tr.dataset.status = task.status;
    rows.push(tr);
  }
  t.replaceChildren(...rows);
}

// Every id of the selection (newest first, at most MAX_SELECTION), fetched
// once per selection and kept: the second click acts on the same tasks.
async function selectionIds(s) {
  if (s.ids) return s.ids;
  const ids = s.tasks.map((r) => r.task.id);
  let next = s.next;
  while (next && ids.length < MAX_SELECTION) {
    const q = new URLSearchParams(s.params);
    q.set('limit', '200');
    q.set('before', next);
    const data = await api(`/api/admin/tasks/search?${q}`);
    ids.push(...data.tasks.map((r) => r.task.id));
    next = data.next;
  }
  s.ids = ids.slice(0, MAX_SELECTION);
  return s.ids;
}

const OUTCOME_WORDS = {
  cancelled: 'cancelled', retried: 'retried', already_retried: 'already retried', not_active: 'already ended',
  not_retryable: 'not failed or cancelled', not_found: 'gone', refused: 'refused',
};

async function bulk(action) {
  const s = state.search;
  if (!s || !s.total) return;
  const button = $(`bulk-${action}`);
  button.disabled = true;
  try {
    const ids = await selectionIds(s);
    const verb = action === 'cancel' ? 'Cancel' : 'Retry';
    // eslint-disable-next-line no-alert
    if (!window.confirm(`${verb} ${ids.length} task${ids.length === 1 ? '' : 's'} of every user that match these filters?`)) return;
    const res = await api('/api/admin/tasks/bulk', { method: 'POST', body: { action, ids },
      headers: { 'Idempotency-Key': s.keys[action] } });
    const parts = Object.entries(res.outcomes).map(([k, n]) => `${n} ${OUTCOME_WORDS[k] || k}`);
    setText($('bulk-result'), `${verb}: ${ids.length} selected; ${parts.join(', ')}${res.replayed ? ' (already done: this is its first answer)' : ''}.`);
    $('bulk-result').dataset.outcomes = JSON.stringify(res.outcomes);
    refresh();
    loadUsers();
  } catch (err) {
    setText($('bulk-result'), `${action} failed: ${err.message}`);
  } finally {
    button.disabled = !(state.search && state.search.total);
  }
}

// ------------------------------------------------------------------ users

async function loadUsers() {
  try {
    const data = await api('/api/admin/users');
    state.users = data.users;
    drawUsers();
  } catch (err) { showError(err); }
}

function drawUsers() {
  const rows = [row(['user', 'admin', 'balance', 'reserved', 'active', 'max active', 'rate /s', 'max priority', 'grant credits'], true)];
  for (const u of state.users) {
    let grant = '';
    if (u.credits) {
      grant = el('form', 'grant');
      const input = el('input');
      input.type = 'number';
      input.step = '1';
      input.required = true;
      input.setAttribute('aria-label', `credits for ${u.name}`);
      // One key per amount typed: sent again after a lost answer, it grants once.
      input.addEventListener('input', () => { input.dataset.key = uuid(); });
      grant.append(input, el('button', null, 'Grant'));
      grant.addEventListener('submit', (ev) => { ev.preventDefault(); grantCredits(u.name, input); });
    }
    const tr = row([u.name, u.admin ? 'yes' : '', u.credits ? u.credits.balance : 'no limit',
      u.credits ? u.credits.reserved : '', u.active, u.limits.max_active, u.limits.rate_per_s,
      u.limits.max_priority, grant]);
    tr.dataset.user = u.name;
    rows.push(tr);
  }
  $('users').replaceChildren(...rows);
  const sel = $('f-user');
  const chosen = sel.value;
  sel.replaceChildren(el('option', null, 'any'), ...state.users.map((u) => el('option', null, u.name)));
  sel.firstChild.value = '';
  sel.value = chosen;
}

async function grantCredits(name, input) {
  const amount = Number(input.value);
  if (!Number.isInteger(amount) || amount === 0) { setText($('grant-result'), 'A whole number other than 0, please.'); return; }
  // A grant is not idempotent: while one is on its way, its form takes no second.
  const button = input.form.querySelector('button');
  if (button.disabled) return;
  button.disabled = true;
  try {
    if (!input.dataset.key) input.dataset.key = uuid();
    const res = await api(`/api/admin/users/${encodeURIComponent(name)}/credits`, { method: 'POST', body: { amount },
      headers: { 'Idempotency-Key': input.dataset.key } });
    setText($('grant-result'), `${name}: ${amount > 0 ? 'granted' : 'took'} ${Math.abs(amount)}; balance now ${res.user.credits.balance}.`);
    input.value = '';
    delete input.dataset.key;
    loadUsers();
  } catch (err) {
    setText($('grant-result'), `${name}: ${err.message}`);
  } finally {
    button.disabled = false;
  }
}

// ------------------------------------------------------------------ wiring

function init() {
  const box = $('f-status');
  for (const s of STATUSES) {
    const label = el('label', 'check');
    const input = el('input');
    input.type = 'checkbox';
    input.value = s;
    input.name = 'status';
    label.append(input, document.createTextNode(` ${s}`));
    box.append(label);
  }
  const err = $('f-error');
  for (const c of ERROR_CODES) err.append(el('option', null, c));
  $('filters').addEventListener('submit', (ev) => { ev.preventDefault(); find(); });
  $('more').addEventListener('click', () => more().catch(showError));
  $('bulk-cancel').addEventListener('click', () => bulk('cancel'));
  $('bulk-retry').addEventListener('click', () => bulk('retry'));
  $('days').addEventListener('change', () => refresh());
  $('signout').addEventListener('click', () => signedOut(''));
  $('token-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const token = $('token-input').value.trim();
    if (!token) return;
    storageSet(TOKEN_KEY, token);
    $('token-input').value = '';
    start(token);
  });
  window.addEventListener('storage', (ev) => {
    if (ev.key === TOKEN_KEY && ev.newValue !== state.token) {
      if (ev.newValue) { stop(); start(ev.newValue); } else signedOut('');
    }
  });
  const token = storageGet(TOKEN_KEY);
  if (token) start(token); else signedOut('');
}

init();
