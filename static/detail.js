// One task whole, in a dialog: every parameter, its attempts, times, error,
// files (an image opens large), the retry chain both ways and a timeline
// that grows while the dialog is open. What it shows comes from the page's
// task list (kept current by the event stream) and from the server; every
// text is set as text, never as markup.

const ACTIVE = new Set(['queued', 'running']);
const STATUSES = ['queued', 'running', 'succeeded', 'partial', 'failed', 'cancelled'];
const TIMES = [['created_at', 'Created'], ['started_at', 'Started'], ['finished_at', 'Finished'],
  ['updated_at', 'Updated'], ['deadline_at', 'Deadline']];

/**
 * env: {el, relativeTime(iso), localTime(iso), formatSize(n), shortId(id),
 * creditsText(task), isLocalPath(url), task(id) -> the page's newest version
 * or undefined, tasks() -> every task the page holds, session() -> {hf} or
 * null, cardOf(id) -> the card's element, or null}.
 */
export function createDetail(env) {
  const { el } = env;
  const dialog = document.getElementById('detail');
  const viewer = document.getElementById('viewer');
  const ui = {
    title: document.getElementById('detail-title'),
    status: document.getElementById('detail-status'),
    body: document.getElementById('detail-body'),
    viewerImg: document.getElementById('viewer-img'),
    viewerName: document.getElementById('viewer-name'),
  };
  let d = null;   // the open dialog's state

  function open(id) {
    const s = env.session();
    if (!s) return;
    if (d && d.id === id) return;
    const returnTo = d ? d.returnTo : document.activeElement;
    release(false);
    d = {
      id,
      hf: s.hf,
      ctrl: new AbortController(),
      urls: new Map(),         // file url -> object URL fetched for this dialog
      timeline: new Map(),     // seq -> entry
      truncated: false,
      timelineError: '',
      timelineLoaded: false,
      retries: new Map(),      // id -> task (from the server and from the page)
      returnTo,
      loading: false,
      filesKey: null,
      parts: null,
    };
    build();
    if (!dialog.open) dialog.showModal();
    const task = env.task(id);
    if (task) render(task);
    else fetchTask(d);
    loadTimeline(d);
    loadRetries(d);
  }

  async function fetchTask(state) {
    try {
      const task = await state.hf.get(state.id);
      if (d !== state) return;
      setError('');
      render(task);
    } catch (err) {
      if (d === state) setError(`Could not load this task: ${err.message}`);
    }
  }

  async function loadTimeline(state) {
    if (state.loading) return;
    state.loading = true;
    try {
      const got = await state.hf.events(state.id);
      if (d !== state) return;
      for (const e of got.events) addEntry(e);
      state.truncated = got.truncated;
      state.timelineError = '';
    } catch (err) {
      if (d !== state) return;
      state.timelineError = `Could not load the timeline: ${err.message}`;
    }
    state.loading = false;
    state.timelineLoaded = true;
    renderTimeline();
  }

  async function loadRetries(state) {
    try {
      const page = await state.hf.list({ retryOf: state.id, limit: 50 });
      if (d !== state) return;
      for (const t of page.tasks) state.retries.set(t.id, t);
    } catch (_) { /* the page's own tasks still show the retries it knows */ }
    if (d === state) renderChain();
  }

  function close() {
    if (dialog.open) dialog.close();
    else release();
  }

  function release(refocus = true) {
    if (!d) return;
    const state = d;
    d = null;
    state.ctrl.abort();
    for (const url of state.urls.values()) URL.revokeObjectURL(url);
    if (viewer.open) viewer.close();
    ui.viewerImg.removeAttribute('src');
    ui.body.replaceChildren();
    // Back to the card of the task shown last, unless the focus has moved
    // on since the dialog closed (the user tabbed to another card).
    const back = env.cardOf(state.id) || state.returnTo;
    const here = document.activeElement;
    const unmoved = !here || here === document.body || here === state.returnTo || dialog.contains(here);
    if (refocus && unmoved && back && back.isConnected && typeof back.focus === 'function') back.focus();
  }

  function setError(text) {
    if (!d || !d.parts) return;
    d.parts.error.textContent = text;
    d.parts.error.hidden = !text;
  }

  // ------------------------------------------------------------ layout

  function section(title, className) {
    const node = el('section', `d-section ${className}`);
    node.append(el('h3', '', title));
    return node;
  }

  function build() {
    const p = {
      error: el('p', 'error d-load-error'),
      facts: el('dl', 'd-facts'),
      taskError: el('p', 'task-error d-error'),
      params: el('pre', 'd-params'),
      files: el('div', 'd-files'),
      chain: el('div', 'd-chain'),
      timeline: el('ol', 'd-timeline'),
      timelineNote: el('p', 'hint d-timeline-note'),
    };
    p.error.hidden = true;
    p.taskError.hidden = true;
    const errorSection = section('Error', 'd-error-section');
    errorSection.append(p.taskError);
    p.errorSection = errorSection;
    const params = section('Parameters', 'd-params-section');
    params.append(p.params);
    const files = section('Files', 'd-files-section');
    files.append(p.files);
    p.filesSection = files;
    const chain = section('Retries', 'd-chain-section');
    chain.append(p.chain);
    const timeline = section('Timeline', 'd-timeline-section');
    timeline.append(p.timelineNote, p.timeline);
    ui.body.replaceChildren(p.error, p.facts, errorSection, params, files, chain, timeline);
    d.parts = p;
  }

  function fact(dl, name, value, extra) {
    if (value === '' || value === null || value === undefined) return;
    const dt = el('dt', '', name);
    const dd = el('dd');
    if (value instanceof Node) dd.append(value);
    else dd.textContent = String(value);
    if (extra) dd.dataset.field = extra;
    dl.append(dt, dd);
  }

  function timeNode(iso) {
    const t = el('time');
    t.dateTime = iso;
    t.dataset.iso = iso;
    t.textContent = `${env.localTime(iso)} (${env.relativeTime(iso)})`;
    return t;
  }

  // ------------------------------------------------------------ rendering

  function render(task) {
    if (!d || !d.parts || !task || task.id !== d.id) return;
    const p = d.parts;
    const status = String(task.status || 'unknown');
    dialog.dataset.id = task.id;
    dialog.dataset.status = status;
    ui.title.textContent = `${task.provider || ''} task`;
    ui.status.textContent = status;
    ui.status.className = `status s-${STATUSES.includes(status) ? status : 'unknown'}`;

    p.facts.replaceChildren();
    fact(p.facts, 'Id', task.id, 'id');
    fact(p.facts, 'Provider', task.provider, 'provider');
    if (ACTIVE.has(status)) {
      const pct = typeof task.progress === 'number' ? ` · ${Math.round(task.progress * 100)}%` : '';
      fact(p.facts, 'Step', `${task.step || (status === 'queued' ? 'waiting' : '')}${pct}`, 'step');
    }
    fact(p.facts, 'Attempts', Number.isInteger(task.attempts) ? task.attempts : '', 'attempts');
    if (Number.isInteger(task.priority) && task.priority !== 0) fact(p.facts, 'Priority', task.priority, 'priority');
    fact(p.facts, 'Credits', env.creditsText(task), 'credits');
    fact(p.facts, 'Dedupe key', task.dedupe_key, 'dedupe-key');
    fact(p.facts, 'Provider job', task.external_id, 'external-id');
    for (const [key, name] of TIMES) {
      if (typeof task[key] === 'string' && Number.isFinite(Date.parse(task[key]))) {
        fact(p.facts, name, timeNode(task[key]), key);
      }
    }

    const err = task.error && typeof task.error === 'object' ? task.error : null;
    p.errorSection.hidden = !err;
    p.taskError.hidden = !err;
    p.taskError.replaceChildren();
    if (err) {
      if (err.code) p.taskError.append(el('code', 'd-error-code', String(err.code)));
      if (err.message) p.taskError.append(el('span', 'd-error-message', String(err.message)));
    }

    const params = task.params && typeof task.params === 'object' ? task.params : {};
    p.params.textContent = JSON.stringify(params, null, 2);

    const files = Array.isArray(task.files) ? task.files.filter((f) => f && env.isLocalPath(f.url)) : [];
    const key = JSON.stringify(files.map((f) => [f.name, f.url, f.sha256]));
    if (key !== d.filesKey) {
      d.filesKey = key;
      renderFiles(files);
    }
    p.filesSection.hidden = files.length === 0;
    renderChain();
  }

  function renderFiles(files) {
    const box = d.parts.files;
    box.replaceChildren();
    for (const f of files) {
      const name = String(f.name || f.url.split('/').pop());
      const item = el('figure', 'd-file');
      if (typeof f.content_type === 'string' && f.content_type.startsWith('image/')) {
        const button = el('button', 'd-thumb');
        button.type = 'button';
        button.setAttribute('aria-label', `Enlarge ${name}`);
        const img = el('img');
        img.alt = name;
        button.append(img);
        button.addEventListener('click', () => enlarge(f.url, name));
        item.append(button);
        loadImage(d, f.url, img);
      }
      const caption = el('figcaption', '', name);
      const size = env.formatSize(f.size);
      if (size) caption.append(el('span', 'size', ` ${size}`));
      item.append(caption);
      box.append(item);
    }
  }

  async function blobUrl(state, url) {
    if (state.urls.has(url)) return state.urls.get(url);
    const blob = await state.hf.file(url, { signal: state.ctrl.signal });
    if (state.ctrl.signal.aborted) throw Object.assign(new Error('aborted'), { code: 'aborted' });
    if (!state.urls.has(url)) state.urls.set(url, URL.createObjectURL(blob));
    return state.urls.get(url);
  }

  async function loadImage(state, url, img) {
    try {
      img.src = await blobUrl(state, url);
    } catch (err) {
      if (err.code === 'aborted') return;
      img.classList.add('broken');
      img.alt = `${img.alt} (could not load: ${err.message})`;
    }
  }

  async function enlarge(url, name) {
    const state = d;
    if (!state) return;
    ui.viewerName.textContent = name;
    ui.viewerImg.alt = name;
    ui.viewerImg.removeAttribute('src');
    if (!viewer.open) viewer.showModal();
    try {
      const src = await blobUrl(state, url);
      if (d === state && viewer.open) ui.viewerImg.src = src;
    } catch (err) {
      if (err.code !== 'aborted') ui.viewerName.textContent = `${name} (could not load: ${err.message})`;
    }
  }

  function chainLink(task, label) {
    const b = el('button', 'link d-task-link');
    b.type = 'button';
    b.dataset.open = task.id;
    b.textContent = label;
    b.title = task.id;
    return b;
  }

  function renderChain() {
    if (!d || !d.parts) return;
    const task = env.task(d.id);
    const box = d.parts.chain;
    box.replaceChildren();
    const retryOf = task && typeof task.retry_of === 'string' ? task.retry_of : '';
    if (retryOf) {
      const line = el('p', 'd-retry-of', 'Retry of ');
      const original = env.task(retryOf);
      line.append(chainLink({ id: retryOf }, original
        ? `${env.shortId(retryOf)} (${original.status})` : env.shortId(retryOf)));
      box.append(line);
    }
    for (const t of env.tasks()) if (t.retry_of === d.id) d.retries.set(t.id, env.task(t.id) || t);
    const retries = [...d.retries.values()].map((t) => env.task(t.id) || t)
      .sort((a, b) => (a.id < b.id ? -1 : 1));
    if (retries.length) {
      const line = el('p', 'd-retries', retries.length === 1 ? 'Retried as ' : 'Retried as: ');
      const list = el('ul', 'd-retry-list');
      for (const r of retries) {
        const li = el('li');
        li.append(chainLink(r, `${env.shortId(r.id)} (${r.status})`));
        list.append(li);
      }
      box.append(line, list);
    }
    if (!box.childElementCount) box.append(el('p', 'hint', 'Not a retry, and not retried.'));
  }

  function addEntry(e) {
    if (!e || !Number.isFinite(Number(e.seq))) return false;
    const seq = Number(e.seq);
    if (d.timeline.has(seq)) return false;
    d.timeline.set(seq, { ...e, seq });
    return true;
  }

  function entryText(e) {
    const parts = [String(e.status || '')];
    if (ACTIVE.has(e.status) && e.step) parts.push(String(e.step));
    if (ACTIVE.has(e.status) && typeof e.progress === 'number') parts.push(`${Math.round(e.progress * 100)}%`);
    if (e.error && typeof e.error === 'object') parts.push([e.error.code, e.error.message].filter(Boolean).join(': '));
    if (e.type === 'finished' && e.credits && e.credits !== 'none' && e.credits !== 'reserved') {
      parts.push(`credits ${e.credits}`);
    }
    return parts.filter(Boolean).join(' · ');
  }

  function renderTimeline() {
    if (!d || !d.parts) return;
    const p = d.parts;
    const entries = [...d.timeline.values()].sort((a, b) => a.seq - b.seq);
    p.timeline.replaceChildren(...entries.map((e) => {
      const li = el('li', `d-event t-${e.type}`);
      li.dataset.seq = String(e.seq);
      li.dataset.type = String(e.type);
      li.dataset.status = String(e.status || '');
      const at = el('time', 'd-at');
      at.dateTime = e.at || '';
      at.textContent = e.at ? env.localTime(e.at) : '';
      li.append(at, el('span', 'd-type', String(e.type)), el('span', 'd-what', entryText(e)));
      if (Number.isInteger(e.attempts) && e.attempts > 1) li.append(el('span', 'd-attempts', `attempt ${e.attempts}`));
      return li;
    }));
    let note = '';
    if (d.timelineError) note = d.timelineError;
    else if (!d.timelineLoaded && !entries.length) note = 'Loading…';
    else if (d.truncated) note = 'Older events are not shown: this is the newest 500.';
    else if (!entries.length) note = 'No events kept for this task (old events are deleted after a while).';
    p.timelineNote.textContent = note;
    p.timelineNote.hidden = !note;
  }

  // A newer version of any task (from the stream or an answer).
  function update(task, ev) {
    if (!d) return;
    if (task.id === d.id) {
      render(task);
      if (ev && typeof ev === 'object' && ev.task && addEntry({
        seq: ev.seq, type: ev.type, at: task.updated_at, status: task.status, step: task.step,
        progress: task.progress, attempts: task.attempts, error: task.error, credits: task.credits,
        version: task.version,
      })) renderTimeline();
      // A version that came without its event (a resync after an outage,
      // a tab that took over the stream): the server has the missed ones.
      const newest = Math.max(0, ...[...d.timeline.values()].map((e) => Number(e.version) || 0));
      if (!ev && d.timelineLoaded && Number(task.version) > newest) loadTimeline(d);
    } else if (task.retry_of === d.id || task.id === (env.task(d.id) || {}).retry_of) {
      if (task.retry_of === d.id) d.retries.set(task.id, task);
      renderChain();
    }
  }

  // The connection is up again: what could not be loaded is asked for again.
  function reconnected() {
    if (!d || !d.parts) return;
    if (d.timelineError) loadTimeline(d);
    if (!d.parts.error.hidden) fetchTask(d);
  }

  // The relative times, on the page's one clock tick.
  function retime() {
    if (!d || !d.parts) return;
    for (const t of d.parts.facts.querySelectorAll('time[data-iso]')) {
      t.textContent = `${env.localTime(t.dataset.iso)} (${env.relativeTime(t.dataset.iso)})`;
    }
  }

  // The close event comes a moment after close(): by then the dialog may
  // show another task, opened meanwhile (a card's Enter right after Escape).
  dialog.addEventListener('close', () => { if (!dialog.open) release(); });
  dialog.addEventListener('click', (e) => {
    const target = e.target instanceof Element ? e.target : null;
    const link = target && target.closest('[data-open]');
    if (link) open(link.dataset.open);
    // The close button, or the backdrop (a click on it targets the dialog).
    else if (target === dialog || (target && target.closest('.d-close'))) close();
  });
  viewer.addEventListener('click', (e) => {
    // A click on the backdrop, the image or the close button: back to the details.
    if (e.target instanceof Element && !e.target.closest('#viewer-name')) viewer.close();
  });
  viewer.addEventListener('close', () => ui.viewerImg.removeAttribute('src'));

  return {
    open,
    close,
    update,
    retime,
    reconnected,
    openId: () => (d ? d.id : null),
  };
}
