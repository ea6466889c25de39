/* loupelive web viewer.
 *
 * Plain JavaScript, no build step, no dependencies, nothing fetched from the
 * network except the relay's own WebSocket (/ws next to this page).
 * All text from the relay goes into the DOM through textContent / attributes,
 * never through innerHTML.
 */
(function () {
  'use strict';

  // ------------------------------------------------------------------ constants

  const ROW_H = 20;              // px, must match --row-h in style.css
  const OVERSCAN = 8;            // rows rendered above and below the viewport
  const QUERY = new URLSearchParams(location.search);
  const MAX_ROWS = positiveInt(QUERY.get('max_rows'), 100000);
  const TOKEN_KEY = 'loupelive.token';
  const TABS_KEY = 'loupelive.tabs';
  const ENDED_KEEP_MS = 10 * 60 * 1000;
  const SPARK_POINTS = 60;
  const BACKOFF_FIRST = 500;
  const BACKOFF_MAX = 5000;
  const DEFAULT_LEVEL = 10;

  const LEVEL_NO = { DEBUG: 10, INFO: 20, WARNING: 30, ERROR: 40, CRITICAL: 50 };
  const LEVEL_ALIAS = { WARN: 'WARNING', FATAL: 'CRITICAL', TRACE: 'DEBUG' };
  const STATUS_TEXT = { running: 'running', disconnected: 'disconnected', ended: 'ended', crashed: 'crashed' };
  const STATUS_ORDER = { running: 0, disconnected: 1, crashed: 2, ended: 3 };
  const OVER = new Set(['ended', 'crashed']);
  // End codes after which the session is gone for good: never re-watch.
  const FINAL_END = new Set(['session_ended', 'agent_lost']);
  const BAD_END = new Set(['agent_lost', 'slow_consumer', 'bad_stream', 'internal', 'limit_reached']);
  const END_TEXT = {
    session_ended: 'session ended',
    agent_lost: 'agent lost (crashed)',
    slow_consumer: 'disconnected by the relay: slow consumer',
    unknown_session: 'unknown session (it has ended, or the relay restarted)',
    stopped: 'stream stopped',
    shutdown: 'the relay is shutting down',
    limit_reached: 'refused by the relay: limit reached',
    bad_stream: 'the stream could not be decoded',
    internal: 'relay error',
  };
  const GAP_TEXT = {
    viewer_slow: 'this viewer fell behind and the relay skipped ahead',
    agent_overflow: "the agent's buffer overflowed before they could be sent",
    history_unavailable: 'no longer held by the agent',
    stream_restart: "the agent's stream restarted",
    relay_restart: 'the relay restarted',
    missing: 'they never arrived',
  };

  // ------------------------------------------------------------------ helpers

  function positiveInt(value, fallback) {
    const n = parseInt(value, 10);
    return Number.isFinite(n) && n > 0 ? n : fallback;
  }
  function str(v) { return v == null ? '' : String(v); }
  function num(v) { const n = Number(v); return Number.isFinite(n) ? n : 0; }
  function $(sel, root) { return (root || document).querySelector(sel); }
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text != null) e.textContent = text;
    return e;
  }
  function setText(node, text) {
    if (node._t !== text) { node._t = text; node.textContent = text; }
  }
  function setAttr(node, name, value) {
    const key = '_a_' + name;
    if (node[key] !== value) { node[key] = value; node.setAttribute(name, value); }
  }
  function cssToken(s) { return str(s).replace(/[^A-Za-z0-9_-]/g, '_') || 'unknown'; }
  function storageGet(key) { try { return sessionStorage.getItem(key); } catch (e) { return null; } }
  function storageSet(key, v) { try { sessionStorage.setItem(key, v); } catch (e) { /* storage disabled */ } }
  function storageDel(key) { try { sessionStorage.removeItem(key); } catch (e) { /* storage disabled */ } }

  function pad(n, w) { let s = String(n); while (s.length < w) s = '0' + s; return s; }
  function fmtClock(sec, ms) {
    const d = new Date(sec * 1000);
    const s = pad(d.getHours(), 2) + ':' + pad(d.getMinutes(), 2) + ':' + pad(d.getSeconds(), 2);
    return ms === false ? s : s + '.' + pad(d.getMilliseconds(), 3);
  }
  function fmtDate(sec) {
    const d = new Date(sec * 1000);
    return d.getFullYear() + '-' + pad(d.getMonth() + 1, 2) + '-' + pad(d.getDate(), 2);
  }
  function fmtTz(sec) {
    const off = -new Date(sec * 1000).getTimezoneOffset();
    const a = Math.abs(off);
    return 'UTC' + (off < 0 ? '−' : '+') + pad(Math.floor(a / 60), 2) + ':' + pad(a % 60, 2);
  }
  function fmtFull(sec) { return fmtDate(sec) + ' ' + fmtClock(sec) + ' ' + fmtTz(sec); }
  function fmtStarted(sec) {
    if (!sec) return '';
    const now = Date.now() / 1000;
    if (fmtDate(sec) === fmtDate(now)) return fmtClock(sec, false);
    return fmtDate(sec) + ' ' + fmtClock(sec, false).slice(0, 5);
  }
  function fmtInt(n) { return Math.round(num(n)).toLocaleString('en-US'); }
  function fmtRate(r) {
    if (!r || r < 0.05) return '0';
    if (r < 10) return r.toFixed(1);
    if (r < 100000) return Math.round(r).toLocaleString('en-US');
    return (r / 1000).toFixed(0) + 'k';
  }
  function fmtSeconds(s, signed) {
    const sign = signed ? (s < 0 ? '−' : '+') : '';
    const a = Math.abs(s);
    if (a < 0.001) return sign + (a * 1e6).toFixed(0) + ' µs';
    if (a < 1) return sign + (a * 1000).toFixed(a < 0.01 ? 2 : 1) + ' ms';
    return sign + a.toFixed(3) + ' s';
  }
  function oneLine(s) { return s.indexOf('\n') < 0 && s.indexOf('\r') < 0 ? s : s.replace(/\r?\n|\r/g, ' ⏎ '); }
  function plural(n, word) { return n + ' ' + word + (n === 1 ? '' : 's'); }
  // First index in arr (sorted by ._i) whose ._i >= i.
  function lowerBound(arr, i) {
    let lo = 0, hi = arr.length;
    while (lo < hi) { const mid = (lo + hi) >>> 1; if (arr[mid]._i < i) lo = mid + 1; else hi = mid; }
    return lo;
  }
  function normStatus(s) { s = str(s).toLowerCase(); return s || 'running'; }
  function isOver(status) { return OVER.has(normStatus(status)); }
  function canonLevel(level) {
    if (typeof level === 'number') {
      if (level >= 50) return 'CRITICAL';
      if (level >= 40) return 'ERROR';
      if (level >= 30) return 'WARNING';
      if (level >= 20) return 'INFO';
      return 'DEBUG';
    }
    const up = str(level).toUpperCase();
    return LEVEL_ALIAS[up] || up;
  }

  // ------------------------------------------------------------------ DOM refs

  const dom = {
    login: $('#login'),
    loginForm: $('#login-form'),
    token: $('#token'),
    loginButton: $('#login-button'),
    loginError: $('#login-error'),
    app: $('#app'),
    connStatus: $('#conn-status'),
    relayVersion: $('#relay-version'),
    notice: $('#notice'),
    logout: $('#logout'),
    themeToggle: $('#theme-toggle'),
    tabs: $('#tabs'),
    homeTab: $('#tab-sessions'),
    sessionCount: $('#session-count'),
    views: $('#views'),
    panel: $('#sessions-panel'),
    sessionFilter: $('#session-filter'),
    pauseList: $('#pause-list'),
    clearEnded: $('#clear-ended'),
    listStatus: $('#list-status'),
    table: $('#sessions'),
    tbody: $('#sessions tbody'),
    thead: $('#sessions thead'),
    sessionsEmpty: $('#sessions-empty'),
    viewTemplate: $('#view-template'),
  };

  // ------------------------------------------------------------------ frame scheduler

  let frameRequested = false;
  let listDirty = true;
  let listOrderDirty = true;
  const dirtyTabs = new Set();

  function requestFrame() {
    if (!frameRequested) { frameRequested = true; requestAnimationFrame(frame); }
  }
  function frame() {
    frameRequested = false;
    if (listDirty) {
      listDirty = false;
      try { renderList(); } catch (err) { console.error('loupelive: session list render failed', err); }
    }
    if (dirtyTabs.size) {
      const todo = Array.from(dirtyTabs);
      dirtyTabs.clear();
      for (const tab of todo) {
        try { tab.render(); } catch (err) { console.error('loupelive: view render failed', err); }
      }
    }
  }

  // ------------------------------------------------------------------ connection

  const conn = {
    ws: null,
    gen: 0,              // incremented for every socket
    token: null,
    authed: false,
    everAuthed: false,
    authFailed: false,
    backoff: BACKOFF_FIRST,
    timer: null,
    history: 500,        // the relay's default history count (from welcome)
    restored: false,
  };

  function wsUrl() {
    const dir = location.pathname.replace(/[^/]*$/, '');
    return (location.protocol === 'https:' ? 'wss:' : 'ws:') + '//' + location.host + dir + 'ws';
  }

  function setConn(stateName) {
    const text = {
      connected: 'connected',
      connecting: 'connecting…',
      reconnecting: 'reconnecting…',
      offline: 'offline',
    }[stateName] || stateName;
    dom.connStatus.textContent = text;
    dom.connStatus.className = 'conn-status conn-' + stateName;
    for (const tab of tabs.values()) tab.markDirty();
  }

  function send(msg) {
    const ws = conn.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(JSON.stringify(msg));
    return true;
  }

  function connect() {
    clearTimeout(conn.timer);
    conn.timer = null;
    if (conn.ws) {
      const old = conn.ws;
      conn.ws = null;
      try { old.close(1000); } catch (err) { /* already closed */ }
    }
    conn.authed = false;
    conn.authFailed = false;
    conn.gen++;
    resetSubs();
    let ws;
    try {
      ws = new WebSocket(wsUrl());
    } catch (err) {
      console.error('loupelive: cannot open WebSocket', err);
      scheduleReconnect();
      return;
    }
    conn.ws = ws;
    setConn(conn.everAuthed ? 'reconnecting' : 'connecting');
    ws.onopen = function () {
      if (ws !== conn.ws) return;
      ws.send(JSON.stringify({ type: 'auth', token: conn.token == null ? '' : conn.token }));
    };
    ws.onmessage = function (ev) {
      if (ws !== conn.ws) return;
      dispatch(ev.data);
    };
    ws.onclose = function (ev) {
      if (ws !== conn.ws) return;
      onClosed(ev);
    };
    ws.onerror = function () { /* a close event follows */ };
  }

  function onClosed(ev) {
    const wasAuthed = conn.authed;
    conn.ws = null;
    conn.authed = false;
    resetSubs();
    if (conn.authFailed) return;
    if (!wasAuthed && ev.code === 1008) {
      authFailure(ev.reason || 'the relay refused the token');
      return;
    }
    if (!dom.login.hidden) {
      dom.loginButton.disabled = false;
      dom.loginError.textContent = 'Cannot reach the relay' + (ev.reason ? ' (' + ev.reason + ')' : '') + '; retrying…';
    }
    setConn('reconnecting');
    scheduleReconnect();
  }

  function scheduleReconnect() {
    clearTimeout(conn.timer);
    const delay = conn.backoff;
    conn.backoff = Math.min(conn.backoff * 2, BACKOFF_MAX);
    conn.timer = setTimeout(connect, delay);
  }

  function authFailure(reason) {
    conn.authFailed = true;
    conn.authed = false;
    clearTimeout(conn.timer);
    conn.timer = null;
    storageDel(TOKEN_KEY);
    const ws = conn.ws;
    conn.ws = null;
    if (ws) { try { ws.close(1000); } catch (err) { /* closed */ } }
    resetSubs();
    setConn('offline');
    showLogin(reason || 'the relay refused the token');
  }

  function showLogin(reason) {
    dom.app.hidden = true;
    dom.logout.hidden = true;
    dom.login.hidden = false;
    dom.loginButton.disabled = false;
    dom.loginError.textContent = reason || '';
    dom.token.value = '';           // a refused token is not kept, even in the form
    dom.token.focus();
  }

  function showApp() {
    dom.login.hidden = true;
    dom.app.hidden = false;
    dom.logout.hidden = false;
    dom.loginError.textContent = '';
    dom.loginButton.disabled = false;
    listDirty = true;
    if (state.active) { const t = tabs.get(state.active); if (t) t.markDirty(); }
    requestFrame();
  }

  function logout() {
    storageDel(TOKEN_KEY);
    conn.token = null;
    conn.everAuthed = false;
    authFailure('');
    dom.loginError.textContent = '';
  }

  let noticeTimer = null;
  function notice(text) {
    dom.notice.textContent = text;
    dom.notice.title = text;
    dom.notice.hidden = false;
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(function () { dom.notice.hidden = true; }, 8000);
  }

  // ------------------------------------------------------------------ dispatcher

  function dispatch(data) {
    let msg;
    try {
      msg = JSON.parse(data);
    } catch (err) {
      console.warn('loupelive: ignoring a message that is not JSON', err);
      return;
    }
    if (!msg || typeof msg !== 'object') { console.warn('loupelive: ignoring a non-object message', msg); return; }
    const handler = Object.prototype.hasOwnProperty.call(HANDLERS, msg.type) ? HANDLERS[msg.type] : null;
    if (!handler) { console.debug('loupelive: ignoring message of unknown type', msg.type); return; }
    try {
      handler(msg);
    } catch (err) {
      console.error('loupelive: failed to handle a "' + msg.type + '" message', err, msg);
    }
  }

  const HANDLERS = {
    welcome: function (msg) {
      conn.authed = true;
      conn.everAuthed = true;
      conn.backoff = BACKOFF_FIRST;
      const h = Number(msg.history);
      if (Number.isFinite(h) && h >= 0) conn.history = Math.floor(h);
      dom.relayVersion.textContent = str(msg.relay);
      storageSet(TOKEN_KEY, conn.token == null ? '' : conn.token);
      dom.token.value = '';
      showApp();
      setConn('connected');
      if (list.paused) send({ type: 'pause_list' });
      if (!conn.restored) { conn.restored = true; restoreTabs(); }
      for (const tab of tabs.values()) tab.resumeWatch();
    },
    error: function (msg) {
      const code = str(msg.code);
      const reason = str(msg.reason);
      if (code === 'bad_token') {
        authFailure(reason || 'bad token');
        return;
      }
      console.warn('loupelive: relay error', code, reason);
      notice('relay: ' + code + (reason ? ': ' + reason : ''));
    },
    snapshot: function (msg) {
      const seen = new Set();
      for (const info of Array.isArray(msg.sessions) ? msg.sessions : []) {
        const e = upsertSession(info);
        if (e) seen.add(e.id);
        else if (info && info.session_id != null) seen.add(String(info.session_id));
      }
      for (const [id, e] of Array.from(sessions)) {
        if (!seen.has(id) && !e.endedAt) removeSession(id, false);
      }
      markListDirty(true);
    },
    session: function (msg) {
      upsertSession(msg.session);
    },
    counts: function (msg) {
      const now = Date.now();
      for (const c of Array.isArray(msg.counts) ? msg.counts : []) {
        if (!c || c.session_id == null) continue;
        const id = String(c.session_id);
        const e = sessions.get(id);
        const tab = tabs.get(id);
        const target = e ? e.info : (tab && tab.info);
        if (!target) continue;
        for (const k of ['records', 'critical', 'errors', 'warnings', 'last_record_at']) {
          if (c[k] != null) target[k] = c[k];
        }
        if (e) {
          noteRecords(e, num(c.records), now);
          e.dirty = true;
        }
        if (tab) tab.markDirty();
      }
      markListDirty(list.sortKey === 'errors');
    },
    ended: function (msg) {
      const base = msg.session && typeof msg.session === 'object' ? Object.assign({}, msg.session) : {};
      if (base.session_id == null) base.session_id = msg.session_id;
      if (base.session_id == null) return;
      base.status = str(msg.status || base.status || 'ended');
      if (!isOver(base.status)) base.status = 'ended';
      const e = upsertSession(base);
      if (e) {
        e.endReason = str(msg.reason);
        if (!e.endedAt) e.endedAt = Date.now();
        e.dirty = true;
      }
      const tab = tabs.get(String(base.session_id));
      if (tab) {
        if (!e) tab.setInfo(Object.assign(tab.info || {}, base));
        tab.markDirty();
      }
    },
    watching: function (msg) {
      const tab = subs.get(msg.sub);
      if (!tab) return;
      tab.pending = Math.max(0, tab.pending - 1);
      if (tab.pending === 0) tab.rewatching = false;
      if (msg.session && typeof msg.session === 'object') {
        const e = upsertSession(msg.session);
        if (!e) tab.setInfo(Object.assign(tab.info || {}, msg.session));
      }
      tab.markDirty();
    },
    records: function (msg) {
      const tab = subs.get(msg.sub);
      if (!tab || tab.stale()) return;
      tab.addRecords(Array.isArray(msg.records) ? msg.records : [], msg.history === true);
    },
    live: function (msg) {
      const tab = subs.get(msg.sub);
      if (!tab || tab.stale()) return;
      tab.setLive();
    },
    gap: function (msg) {
      const tab = subs.get(msg.sub);
      if (!tab || tab.stale()) return;
      tab.addGap(msg);
    },
    end: function (msg) {
      const tab = subs.get(msg.sub);
      if (!tab) return;
      // The old subscription of a re-sent watch may say it was stopped.
      if (tab.stale() && str(msg.code) === 'stopped') return;
      tab.pending = 0;
      tab.rewatching = false;
      tab.addEnd(str(msg.code), str(msg.reason));
    },
  };

  // ------------------------------------------------------------------ session list

  const sessions = new Map();      // session_id -> entry
  const dismissed = new Set();     // ended sessions removed from the list by hand or by age
  const list = { paused: false, filter: [], sortKey: 'started', sortDir: -1 };
  const SORT_KEYS = {
    app: function (e) { return str(e.info.app).toLowerCase(); },
    environment: function (e) { return str(e.info.environment).toLowerCase(); },
    host: function (e) { return str(e.info.host).toLowerCase(); },
    user: function (e) { return str(e.info.user).toLowerCase(); },
    pid: function (e) { return num(e.info.pid); },
    started: function (e) { return num(e.info.started_at); },
    viewers: function (e) { return num(e.info.viewers); },
    rate: function (e) { return e.rate; },
    errors: function (e) { return (num(e.info.errors) + num(e.info.critical)) * 1e9 + num(e.info.warnings); },
    status: function (e) { const s = normStatus(e.info.status); return s in STATUS_ORDER ? STATUS_ORDER[s] : 9; },
  };

  function markListDirty(order) {
    listDirty = true;
    if (order) listOrderDirty = true;
    requestFrame();
  }

  function upsertSession(info) {
    if (!info || typeof info !== 'object' || info.session_id == null) return null;
    const id = String(info.session_id);
    let e = sessions.get(id);
    if (!e) {
      if (isOver(info.status) && dismissed.has(id)) {
        const tab = tabs.get(id);
        if (tab) tab.setInfo(Object.assign(tab.info || {}, info));
        return null;
      }
      e = newEntry(id, info);
      sessions.set(id, e);
      listOrderDirty = true;
    } else {
      Object.assign(e.info, info);
    }
    if (info.records != null) noteRecords(e, num(info.records), Date.now());
    if (isOver(e.info.status)) {
      if (!e.endedAt) e.endedAt = Date.now();
    } else {
      e.endedAt = 0;
      dismissed.delete(id);
    }
    e.dirty = true;
    const tab = tabs.get(id);
    if (tab) tab.setInfo(e.info);
    markListDirty(true);
    return e;
  }

  function removeSession(id, dismiss) {
    const e = sessions.get(id);
    if (!e) return;
    sessions.delete(id);
    if (dismiss) dismissed.add(id);
    if (e.tr.parentNode) e.tr.parentNode.removeChild(e.tr);
    markListDirty(true);
  }

  // Rates come from successive "records" totals, measured on the client.
  function noteRecords(e, records, now) {
    if (e.baseT == null || records < e.baseR) { e.baseT = now; e.baseR = records; return; }
    const dt = (now - e.baseT) / 1000;
    if (dt < 0.3) return;
    e.measured = (records - e.baseR) / dt;
    e.measuredAt = now;
    e.baseT = now;
    e.baseR = records;
  }

  const SVG_NS = 'http://www.w3.org/2000/svg';
  function newEntry(id, info) {
    const tr = el('tr', 'session');
    tr.dataset.sessionId = id;
    const cell = function (cls) { const td = el('td', cls); tr.appendChild(td); return td; };
    const e = {
      id: id, info: Object.assign({}, info), tr: tr, c: {}, spark: [], rate: 0,
      baseT: null, baseR: 0, measured: 0, measuredAt: 0, endedAt: 0, endReason: '', dirty: true,
    };
    const c = e.c;
    c.app = cell('s-app');
    c.appName = el('b');
    c.appVer = el('span', 'ver');
    c.app.append(c.appName, c.appVer);
    c.env = cell('s-env');
    c.host = cell('s-host');
    c.user = cell('s-user');
    c.pid = cell('s-pid num');
    c.started = cell('s-started');
    c.viewers = cell('s-viewers num');
    c.viewersN = el('span');
    c.streaming = el('span', 'streaming', '●');
    c.streaming.title = 'streaming';
    c.viewers.append(c.viewersN, c.streaming);
    c.rate = cell('s-rate');
    const svg = document.createElementNS(SVG_NS, 'svg');
    svg.setAttribute('class', 'spark');
    svg.setAttribute('viewBox', '0 0 ' + (SPARK_POINTS - 1) + ' 16');
    svg.setAttribute('preserveAspectRatio', 'none');
    svg.setAttribute('aria-hidden', 'true');
    c.sparkArea = document.createElementNS(SVG_NS, 'polygon');
    c.sparkArea.setAttribute('class', 'area');
    c.sparkLine = document.createElementNS(SVG_NS, 'polyline');
    svg.append(c.sparkArea, c.sparkLine);
    c.rateText = el('span', 'rate');
    c.rate.append(svg, c.rateText);
    c.errs = cell('s-errs');
    c.crit = el('span', 'n-crit');
    c.err = el('span', 'n-err');
    c.warn = el('span', 'n-warn');
    c.errs.append(c.crit, c.err, c.warn);
    c.status = cell('s-status');
    c.dismissTd = cell('s-dismiss');
    c.dismiss = el('button', 'dismiss', '×');
    c.dismiss.type = 'button';
    c.dismiss.title = 'remove from the list';
    c.dismissTd.appendChild(c.dismiss);
    return e;
  }

  function sessionTitle(i) {
    const parts = ['session ' + str(i.session_id)];
    if (i.domain) parts.push('domain ' + i.domain);
    if (i.os) parts.push('os ' + i.os);
    if (i.runtime) parts.push('runtime ' + i.runtime);
    if (i.agent_version) parts.push('agent ' + i.agent_version);
    if (i.tags && typeof i.tags === 'object') {
      const tags = Object.keys(i.tags).map(function (k) { return k + '=' + str(i.tags[k]); });
      if (tags.length) parts.push('tags ' + tags.join(', '));
    }
    return parts.join('\n');
  }

  function sparkPoints(arr) {
    const n = arr.length;
    if (!n) return ['', ''];
    let max = 0;
    for (const v of arr) if (v > max) max = v;
    if (max <= 0) max = 1;
    const off = SPARK_POINTS - n;
    const pts = [];
    for (let i = 0; i < n; i++) pts.push((off + i) + ',' + (15.5 - (arr[i] / max) * 14).toFixed(1));
    const line = pts.join(' ');
    const area = line + ' ' + (SPARK_POINTS - 1) + ',16 ' + off + ',16';
    return [line, area];
  }

  function renderEntry(e) {
    const i = e.info, c = e.c;
    const st = normStatus(i.status);
    const over = OVER.has(st);
    setText(c.appName, str(i.app) || '(unknown app)');
    setText(c.appVer, str(i.app_version));
    setAttr(c.app, 'title', sessionTitle(i));
    setText(c.env, str(i.environment));
    setText(c.host, str(i.host));
    setText(c.user, str(i.user));
    setText(c.pid, i.pid ? str(i.pid) : '');
    setText(c.started, fmtStarted(num(i.started_at)));
    setAttr(c.started, 'title', i.started_at ? fmtFull(num(i.started_at)) : '');
    setText(c.viewersN, str(num(i.viewers)));
    c.streaming.hidden = !i.streaming;
    setText(c.rateText, fmtRate(e.rate));
    if (e.sparkDirty !== false) {
      const pts = sparkPoints(e.spark);
      c.sparkLine.setAttribute('points', pts[0]);
      c.sparkArea.setAttribute('points', pts[1]);
      e.sparkDirty = false;
    }
    const crit = num(i.critical), errs = num(i.errors), warns = num(i.warnings);
    c.crit.hidden = crit === 0;
    setText(c.crit, crit + ' crit');
    setText(c.err, errs + ' err');
    c.err.className = errs ? 'n-err' : 'n-err n-zero';
    setText(c.warn, warns + ' warn');
    c.warn.className = warns ? 'n-warn' : 'n-warn n-zero';
    const stCls = 'status-' + cssToken(st);
    let statusText = STATUS_TEXT[st] || st;
    let statusTitle = statusText;
    if (over && e.endReason) {
      // The relay may give a code (session_ended, agent_lost) or a sentence.
      const known = END_TEXT[e.endReason];
      statusTitle = statusText + ': ' + (known || e.endReason);
      if (!known) statusText = statusTitle;
      else if (e.endReason !== 'session_ended' && e.endReason !== 'agent_lost') statusText += ': ' + known;
    }
    setText(c.status, statusText);
    setAttr(c.status, 'title', statusTitle);
    const tdCls = 's-status ' + stCls;
    if (c.status.className !== tdCls) c.status.className = tdCls;
    c.dismiss.hidden = !over;
    let cls = 'session ' + stCls;
    if (errs + crit > 0) cls += ' has-errors';
    if (over) cls += ' ended';
    if (tabs.has(e.id)) cls += ' open';
    if (e.tr.className !== cls) e.tr.className = cls;
  }

  function entryHaystack(e) {
    const i = e.info;
    const parts = [i.app, i.app_version, i.environment, i.host, i.domain, i.user, i.pid, i.os, i.runtime,
      i.session_id, normStatus(i.status)];
    if (i.tags && typeof i.tags === 'object') {
      for (const k of Object.keys(i.tags)) parts.push(k + '=' + str(i.tags[k]));
    }
    return parts.map(str).join(' ').toLowerCase();
  }

  function renderList() {
    for (const e of sessions.values()) {
      if (e.dirty) { e.dirty = false; renderEntry(e); }
    }
    let running = 0;
    for (const e of sessions.values()) if (!isOver(e.info.status)) running++;
    setText(dom.sessionCount, String(running));
    if (!listOrderDirty) return;
    listOrderDirty = false;
    const terms = list.filter;
    const rows = [];
    for (const e of sessions.values()) {
      if (terms.length) {
        const hay = entryHaystack(e);
        if (!terms.every(function (t) { return hay.indexOf(t) >= 0; })) continue;
      }
      rows.push(e);
    }
    const key = SORT_KEYS[list.sortKey] || SORT_KEYS.started;
    const dir = list.sortDir;
    rows.sort(function (a, b) {
      const ka = key(a), kb = key(b);
      if (ka < kb) return -dir;
      if (ka > kb) return dir;
      const sa = num(a.info.started_at), sb = num(b.info.started_at);
      if (sa !== sb) return sb - sa;
      return a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
    });
    const tbody = dom.tbody;
    let node = tbody.firstChild;
    for (const e of rows) {
      if (node === e.tr) node = node.nextSibling;
      else tbody.insertBefore(e.tr, node);
    }
    while (node) { const next = node.nextSibling; tbody.removeChild(node); node = next; }
    dom.sessionsEmpty.hidden = rows.length > 0;
    dom.sessionsEmpty.textContent = sessions.size ? 'No sessions match the filter.' : 'No sessions yet.';
    const shown = rows.length === sessions.size ? plural(sessions.size, 'session')
      : rows.length + ' of ' + plural(sessions.size, 'session');
    setText(dom.listStatus, shown + (list.paused ? ' · updates paused' : ''));
  }

  function setListPaused(paused) {
    if (list.paused === paused) return;
    list.paused = paused;
    dom.pauseList.textContent = paused ? 'Resume list updates' : 'Pause list updates';
    dom.pauseList.setAttribute('aria-pressed', paused ? 'true' : 'false');
    dom.pauseList.classList.toggle('active', paused);
    send({ type: paused ? 'pause_list' : 'resume_list' });
    markListDirty(true);
  }

  function listTick(now) {
    if (list.paused) return;
    for (const e of Array.from(sessions.values())) {
      const over = isOver(e.info.status);
      e.rate = !over && now - e.measuredAt < 2500 ? e.measured : 0;
      e.spark.push(e.rate);
      if (e.spark.length > SPARK_POINTS) e.spark.shift();
      e.sparkDirty = true;
      e.dirty = true;
      if (e.endedAt && now - e.endedAt > ENDED_KEEP_MS) removeSession(e.id, true);
    }
    markListDirty(list.sortKey === 'rate');
  }

  // ------------------------------------------------------------------ tabs

  const tabs = new Map();          // session_id -> LogTab
  const subs = new Map();          // sub -> LogTab
  const state = { active: null, nextSub: 1 };

  function resetSubs() {
    for (const tab of tabs.values()) { tab.pending = 0; tab.rewatching = false; }
  }

  function persistTabs() {
    storageSet(TABS_KEY, JSON.stringify({ open: Array.from(tabs.keys()), active: state.active }));
  }

  function restoreTabs() {
    let saved = null;
    try { saved = JSON.parse(storageGet(TABS_KEY) || 'null'); } catch (err) { saved = null; }
    if (!saved || !Array.isArray(saved.open)) return;
    for (const id of saved.open) if (typeof id === 'string' && !tabs.has(id)) openTab(id, false);
    if (saved.active && tabs.has(saved.active)) activate(saved.active);
  }

  function openTab(id, focus) {
    let tab = tabs.get(id);
    if (!tab) {
      tab = new LogTab(id);
      tabs.set(id, tab);
      subs.set(tab.sub, tab);
      tab.resumeWatch();
      const e = sessions.get(id);
      if (e) e.dirty = true;
      markListDirty(false);
      persistTabs();
    }
    if (focus !== false) activate(id);
    return tab;
  }

  function closeTab(id) {
    const tab = tabs.get(id);
    if (!tab) return;
    if (conn.authed && tab.watchGen === conn.gen) send({ type: 'unwatch', sub: tab.sub });
    tabs.delete(id);
    subs.delete(tab.sub);
    dirtyTabs.delete(tab);
    tab.destroy();
    const e = sessions.get(id);
    if (e) e.dirty = true;
    markListDirty(false);
    if (state.active === id) {
      const ids = Array.from(tabs.keys());
      activate(ids.length ? ids[ids.length - 1] : null);
    }
    persistTabs();
  }

  function activate(id) {
    if (id != null && !tabs.has(id)) id = null;
    const prev = state.active != null ? tabs.get(state.active) : null;
    if (prev && state.active !== id) prev.deactivate();
    state.active = id;
    dom.homeTab.classList.toggle('active', id == null);
    dom.homeTab.setAttribute('aria-selected', id == null ? 'true' : 'false');
    dom.panel.hidden = id != null;
    for (const tab of tabs.values()) {
      if (tab.id === id) tab.activateView();
      else tab.view.hidden = true;
      tab.tabEl.classList.toggle('active', tab.id === id);
      tab.tabEl.setAttribute('aria-selected', tab.id === id ? 'true' : 'false');
    }
    if (id == null) markListDirty(true);
    updateTitle();
    persistTabs();
  }

  function updateTitle() {
    const tab = state.active != null ? tabs.get(state.active) : null;
    const title = tab ? tab.tabLabel.textContent + ' — loupelive' : 'loupelive';
    if (document.title !== title) document.title = title;
  }

  function LogTab(id) {
    this.id = id;
    this.sub = state.nextSub++;
    const entry = sessions.get(id);
    this.info = entry ? entry.info : { session_id: id };
    this.rows = [];
    this.matching = [];
    this.counter = 0;            // ordinal of the next stored row (row._i)
    this.lastSeq = null;
    this.dropped = 0;
    this.minLevel = DEFAULT_LEVEL;
    this.textRe = null;
    this.filterDirty = false;
    this.paused = false;
    this.pauseReason = null;
    this.pauseStartI = 0;
    this.newCount = 0;
    this.state = 'history';
    this.endCode = null;
    this.endReason = '';
    this.pending = 0;            // watch messages without their "watching" reply yet
    this.rewatching = false;     // a re-sent watch on the same socket: drop the old stream's leftovers
    this.watchGen = -1;          // socket generation of the last watch sent
    this.corrected = false;
    this.selected = null;
    this.ver = 0;                // bump to force re-filling every rendered row
    this.pool = [];
    this.spacerH = -1;
    this.lastTop = null;         // scrollTop at the last render (null: unknown)
    this.restoreTop = null;
    this.shiftRows = 0;
    this.savedTop = 0;
    this.revealRow = null;
    this.rate = 0;
    this.rateAcc = 0;
    this.rateWin = [];
    this.rateT = Date.now();
    this.attrs = {};
    this.build();
  }

  LogTab.prototype.build = function () {
    const self = this;
    // the tab
    const tabEl = el('div', 'tab');
    tabEl.dataset.sessionId = this.id;
    tabEl.setAttribute('role', 'tab');
    tabEl.tabIndex = 0;
    this.tabDot = el('span', 'tab-dot', '●');
    this.tabLabel = el('span', 'tab-label');
    const close = el('button', 'tab-close', '×');
    close.type = 'button';
    close.title = 'close tab';
    tabEl.append(this.tabDot, this.tabLabel, close);
    tabEl.addEventListener('click', function (ev) {
      if (ev.target.closest('.tab-close')) { ev.stopPropagation(); closeTab(self.id); return; }
      activate(self.id);
    });
    tabEl.addEventListener('auxclick', function (ev) { if (ev.button === 1) { ev.preventDefault(); closeTab(self.id); } });
    tabEl.addEventListener('keydown', function (ev) {
      if (ev.key === 'Enter' && ev.target === tabEl) activate(self.id);
    });
    dom.tabs.appendChild(tabEl);
    this.tabEl = tabEl;

    // the view
    const view = dom.viewTemplate.content.firstElementChild.cloneNode(true);
    view.dataset.sessionId = this.id;
    view.hidden = true;
    this.view = view;
    this.levelSel = $('.level-filter', view);
    this.textInput = $('.text-filter', view);
    this.regexBox = $('.regex-toggle', view);
    this.correctedBox = $('.corrected-time', view);
    this.pauseBtn = $('.pause', view);
    this.newCountEl = $('.new-count', view);
    this.banner = $('.end-banner', view);
    this.bannerText = $('.end-text', view);
    this.rewatchBtn = $('.rewatch', view);
    this.droppedNote = $('.dropped-note', view);
    this.grid = $('.grid', view);
    this.spacer = $('.spacer', view);
    this.rowsEl = $('.rows', view);
    this.emptyEl = $('.grid-empty', view);
    this.details = $('.details', view);
    this.statusLine = $('.status-line', view);
    this.levelSel.value = String(this.minLevel);

    this.levelSel.addEventListener('change', function () { self.setMinLevel(parseInt(self.levelSel.value, 10) || DEFAULT_LEVEL); });
    this.textInput.addEventListener('input', function () { self.compileFilter(); });
    this.regexBox.addEventListener('change', function () { self.compileFilter(); });
    this.correctedBox.addEventListener('change', function () {
      self.corrected = self.correctedBox.checked;
      self.ver++;
      if (self.selected) self.showDetails(self.selected);
      self.markDirty();
    });
    this.pauseBtn.addEventListener('click', function () { self.togglePause(); });
    this.newCountEl.addEventListener('click', function () { self.resume(); });
    this.rewatchBtn.addEventListener('click', function () { self.rewatch(); });
    this.grid.addEventListener('scroll', function () { self.onScroll(); }, { passive: true });
    this.rowsEl.addEventListener('click', function (ev) { self.onRowClick(ev); });
    $('.details-close', view).addEventListener('click', function () { self.select(null); });
    if (typeof ResizeObserver === 'function') {
      this.resizeObs = new ResizeObserver(function () { self.markDirty(); });
      this.resizeObs.observe(this.grid);
    }

    // status line
    const sl = this.statusLine;
    this.st = {
      status: el('span', 'st-status'),
      state: el('span', 'st-state'),
      rows: el('span', 'st-rows'),
      rate: el('span', 'st-rate'),
      clock: el('span', 'st-clock'),
      rtt: el('span', 'st-rtt'),
      info: el('span', 'st-info'),
    };
    sl.append(this.st.status, this.st.state, this.st.rows, this.st.rate, this.st.clock, this.st.rtt, this.st.info);

    dom.views.appendChild(view);
    this.updateLabel();
    this.markDirty();
  };

  LogTab.prototype.destroy = function () {
    if (this.resizeObs) this.resizeObs.disconnect();
    this.tabEl.remove();
    this.view.remove();
    this.rows = [];
    this.matching = [];
  };

  LogTab.prototype.markDirty = function () {
    dirtyTabs.add(this);
    requestFrame();
  };

  LogTab.prototype.isActive = function () { return state.active === this.id && !dom.app.hidden; };

  LogTab.prototype.setInfo = function (info) {
    this.info = info;
    this.updateLabel();
    this.markDirty();
    // The relay restarted and the agent registered again: pick the stream up.
    if (this.endCode === 'unknown_session' && normStatus(info.status) === 'running' && conn.authed) this.rewatch();
  };

  LogTab.prototype.updateLabel = function () {
    const i = this.info || {};
    const label = (str(i.app) || this.id) + (i.host ? '@' + i.host : '');
    setText(this.tabLabel, label);
    if (state.active === this.id) updateTitle();
    setAttr(this.tabEl, 'title', label + '\nsession ' + this.id);
    const st = normStatus(i.status);
    const cls = 'tab-dot status-' + cssToken(st);
    if (this.tabDot.className !== cls) this.tabDot.className = cls;
    setAttr(this.tabDot, 'title', STATUS_TEXT[st] || st);
  };

  // ---- watching

  LogTab.prototype.watch = function (history, afterSeq) {
    if (!conn.authed) return false;
    if (this.watchGen === conn.gen) this.rewatching = true;
    this.watchGen = conn.gen;
    this.pending++;
    this.state = 'history';
    send({
      type: 'watch', sub: this.sub, session_id: this.id, history: history,
      min_level: this.minLevel, after_seq: afterSeq,
    });
    this.markDirty();
    return true;
  };

  // (Re)start the stream after a new connection: continue after the last seq seen.
  LogTab.prototype.resumeWatch = function () {
    if (!conn.authed || this.watchGen === conn.gen) return;
    if (this.endCode && FINAL_END.has(this.endCode)) return;
    this.clearEnd();
    if (this.lastSeq === null) this.watch(conn.history, null);
    else this.watch(0, this.lastSeq);
  };

  LogTab.prototype.rewatch = function () {
    if (!conn.authed) return;
    this.clearEnd();
    if (this.lastSeq === null) this.watch(conn.history, null);
    else this.watch(0, this.lastSeq);
  };

  LogTab.prototype.clearEnd = function () {
    this.endCode = null;
    this.endReason = '';
    if (this.state === 'ended') this.state = 'history';
    this.markDirty();
  };

  LogTab.prototype.stale = function () { return this.pending > 0 && this.rewatching; };

  LogTab.prototype.setLive = function () {
    if (this.state !== 'ended') this.state = 'live';
    this.markDirty();
  };

  // ---- storing rows

  LogTab.prototype.addRecords = function (records, history) {
    let added = 0;
    const rows = this.rows, matching = this.matching;
    for (let k = 0; k < records.length; k++) {
      const r = records[k];
      if (!r || typeof r !== 'object') continue;
      const seq = Number(r.seq);
      const hasSeq = r.seq != null && Number.isFinite(seq);
      if (hasSeq && this.lastSeq !== null && seq <= this.lastSeq) continue;   // already have it
      r.kind = 'record';
      if (hasSeq) r.seq = seq;
      r.timestamp = num(r.timestamp);
      r.level = canonLevel(r.level);
      r._lv = LEVEL_NO[r.level] || 20;
      r._lc = LEVEL_NO[r.level] ? r.level : cssToken(r.level || 'OTHER');
      r.logger = str(r.logger);
      r.thread = str(r.thread);
      r.message = str(r.message);
      r.exception = r.exception == null || r.exception === '' ? null : String(r.exception);
      if (!r.fields || typeof r.fields !== 'object') r.fields = {};
      r._i = this.counter++;
      rows.push(r);
      if (hasSeq) this.lastSeq = seq;
      if (this.matches(r)) {
        matching.push(r);
        if (this.paused) this.newCount++;
      }
      added++;
    }
    if (!added) return;
    if (!history) this.rateAcc += added;
    this.trim();
    this.markDirty();
  };

  LogTab.prototype.addGap = function (msg) {
    const first = Number(msg.first_seq), last = Number(msg.last_seq);
    if (Number.isFinite(last) && this.lastSeq !== null && last <= this.lastSeq) return;  // already covered
    const reason = str(msg.reason) || 'unknown';
    const row = { kind: 'gap', first_seq: first, last_seq: last, reason: reason, _i: this.counter++ };
    this.rows.push(row);
    this.matching.push(row);
    if (Number.isFinite(last)) this.lastSeq = this.lastSeq === null ? last : Math.max(this.lastSeq, last);
    this.trim();
    this.markDirty();
  };

  LogTab.prototype.addEnd = function (code, reason) {
    const lastRow = this.rows[this.rows.length - 1];
    if (!(lastRow && lastRow.kind === 'end' && lastRow.code === code)) {
      const row = { kind: 'end', code: code, reason: reason, _i: this.counter++ };
      this.rows.push(row);
      this.matching.push(row);
      this.trim();
    }
    this.state = 'ended';
    this.endCode = code;
    this.endReason = reason;
    this.markDirty();
  };

  LogTab.prototype.trim = function () {
    const excess = this.rows.length - MAX_ROWS;
    if (excess <= 0) return;
    const keepFrom = this.rows[excess]._i;
    this.rows.splice(0, excess);
    this.dropped += excess;
    const k = lowerBound(this.matching, keepFrom);
    if (k > 0) {
      this.matching.splice(0, k);
      this.shiftRows += k;
    }
  };

  LogTab.prototype.clear = function () {
    this.rows = [];
    this.matching = [];
    this.lastSeq = null;
    this.dropped = 0;
    this.newCount = 0;
    this.pauseStartI = this.counter;
    this.shiftRows = 0;
    this.restoreTop = 0;
    this.select(null);
    this.ver++;
  };

  // ---- filters

  LogTab.prototype.matches = function (r) {
    if (r.kind !== 'record') return true;
    if (r._lv < this.minLevel) return false;
    const re = this.textRe;
    if (re) {
      return re.test(r.message) || re.test(r.logger) || re.test(r.thread) || (r.exception !== null && re.test(r.exception));
    }
    return true;
  };

  LogTab.prototype.compileFilter = function () {
    const text = this.textInput.value;
    const regex = this.regexBox.checked;
    this.textRe = null;
    this.textInput.classList.remove('invalid');
    this.textInput.removeAttribute('title');
    if (text) {
      if (regex) {
        try {
          this.textRe = new RegExp(text, 'i');
        } catch (err) {
          this.textInput.classList.add('invalid');
          this.textInput.title = 'invalid regular expression: ' + (err && err.message ? err.message : String(err));
        }
      } else {
        // Plain text: a case-insensitive substring, matched as an escaped RegExp (fast in V8).
        this.textRe = new RegExp(text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&'), 'i');
      }
    }
    this.filterDirty = true;
    this.markDirty();
  };

  LogTab.prototype.refilter = function () {
    this.filterDirty = false;
    let anchorI = null;
    if (this.paused && this.isActive() && this.matching.length) {
      const idx = Math.max(0, Math.floor(this.grid.scrollTop / ROW_H) - this.shiftRows);
      const anchor = this.matching[Math.min(idx, this.matching.length - 1)];
      if (anchor) anchorI = anchor._i;
    }
    const rows = this.rows;
    const out = [];
    for (let k = 0; k < rows.length; k++) if (this.matches(rows[k])) out.push(rows[k]);
    this.matching = out;
    this.shiftRows = 0;
    if (this.paused) {
      let n = 0;
      for (let k = lowerBound(out, this.pauseStartI); k < out.length; k++) if (out[k].kind === 'record') n++;
      this.newCount = n;
      if (anchorI !== null) this.restoreTop = lowerBound(out, anchorI) * ROW_H;
    }
    this.ver++;
  };

  LogTab.prototype.setMinLevel = function (level) {
    const old = this.minLevel;
    if (level === old) return;
    this.minLevel = level;
    if (this.levelSel.value !== String(level)) this.levelSel.value = String(level);
    // A stream that is over is only filtered locally (use "Reconnect stream" to restart it).
    const finished = this.state === 'ended';
    if (level > old || finished) {
      // Filter what we have; ask the relay to stop sending what is now below the minimum.
      this.filterDirty = true;
      if (!finished) {
        if (this.lastSeq === null) this.watch(conn.history, null);
        else this.watch(0, this.lastSeq);
      }
    } else {
      // Records below the old minimum were never received: start over with history.
      this.clear();
      this.clearEnd();
      this.state = 'history';
      this.watch(conn.history, null);
    }
    this.markDirty();
  };

  // ---- pause / follow

  LogTab.prototype.pause = function (reason) {
    if (this.paused) { if (reason === 'user') this.pauseReason = 'user'; this.markDirty(); return; }
    this.paused = true;
    this.pauseReason = reason || 'user';
    this.pauseStartI = this.counter;
    this.newCount = 0;
    this.markDirty();
  };

  LogTab.prototype.resume = function () {
    this.paused = false;
    this.pauseReason = null;
    this.newCount = 0;
    this.restoreTop = null;
    this.markDirty();
  };

  LogTab.prototype.togglePause = function () {
    if (this.paused) this.resume(); else this.pause('user');
  };

  // Any scroll position other than the one we last rendered at was made by the
  // user (wheel, scrollbar, keys, or a test setting scrollTop): scrolling up
  // stops following (a pause that scrolling back to the bottom undoes).
  LogTab.prototype.checkUserScroll = function () {
    if (this.lastTop === null || !this.isActive()) return;
    const grid = this.grid;
    const top = grid.scrollTop;
    if (Math.abs(top - this.lastTop) < 1) return;
    this.lastTop = top;
    const atBottom = top + grid.clientHeight >= grid.scrollHeight - ROW_H / 2;
    if (!this.paused && !atBottom) this.pause('scroll');
    else if (this.paused && this.pauseReason === 'scroll' && atBottom) this.resume();
  };

  LogTab.prototype.onScroll = function () {
    this.checkUserScroll();
    this.markDirty();
  };

  LogTab.prototype.deactivate = function () {
    this.savedTop = this.grid.scrollTop;
    this.view.hidden = true;
  };

  LogTab.prototype.activateView = function () {
    const wasHidden = this.view.hidden;
    this.view.hidden = false;
    if (wasHidden) {
      this.spacerH = -1;
      this.lastTop = null;
      this.ver++;
      if (this.paused) this.restoreTop = this.savedTop;
    }
    this.markDirty();
  };

  // ---- selection / details

  LogTab.prototype.onRowClick = function (ev) {
    const node = ev.target.closest('.row');
    if (!node || !node._row || node._row.kind !== 'record') return;
    const sel = window.getSelection && window.getSelection();
    if (sel && !sel.isCollapsed && String(sel).length) return;   // the user is selecting text
    this.select(node._row === this.selected ? null : node._row);
  };

  LogTab.prototype.select = function (row) {
    this.selected = row;
    this.ver++;
    if (row) {
      this.showDetails(row);
      this.revealRow = row;
    } else {
      this.details.hidden = true;
    }
    this.markDirty();
  };

  LogTab.prototype.moveSelection = function (delta) {
    const m = this.matching;
    if (!m.length) return;
    let idx;
    if (!this.selected) idx = delta > 0 ? 0 : m.length - 1;
    else {
      const at = lowerBound(m, this.selected._i);
      if (m[at] === this.selected) idx = at + delta;
      else idx = delta > 0 ? at : at - 1;          // the selected row is filtered out
    }
    while (idx >= 0 && idx < m.length && m[idx].kind !== 'record') idx += delta > 0 ? 1 : -1;
    if (idx < 0 || idx >= m.length) return;
    if (!this.paused) this.pause('scroll');
    this.select(m[idx]);
  };

  LogTab.prototype.displayTs = function (r) {
    const off = this.info && typeof this.info.clock_offset === 'number' ? this.info.clock_offset : 0;
    return this.corrected ? r.timestamp - off : r.timestamp;
  };

  LogTab.prototype.showDetails = function (r) {
    const d = this.details;
    d.hidden = false;
    const badge = $('.d-level', d);
    badge.className = 'badge d-level lv-' + (LEVEL_NO[r.level] ? r.level : 'OTHER');
    badge.textContent = r.level;
    $('.d-time', d).textContent = r.timestamp ? fmtFull(r.timestamp) : '(no timestamp)';
    $('.d-seq', d).textContent = 'seq ' + str(r.seq);
    $('.d-message', d).textContent = r.message;
    const exc = $('.d-exception', d);
    exc.hidden = !r.exception;
    exc.textContent = r.exception || '';
    const fieldsTable = $('.d-fields', d);
    const tbody = fieldsTable.tBodies[0];
    tbody.textContent = '';
    const keys = Object.keys(r.fields || {}).sort();
    for (const k of keys) {
      const tr = el('tr');
      tr.append(el('td', null, k), el('td', null, str(r.fields[k])));
      tbody.appendChild(tr);
    }
    fieldsTable.hidden = keys.length === 0;
    const meta = $('.d-meta', d);
    meta.textContent = '';
    const add = function (k, v) {
      if (v === '' || v == null) return;
      meta.append(el('dt', null, k), el('dd', null, str(v)));
    };
    add('logger', r.logger);
    add('thread', r.thread + (r.thread_id ? ' (id ' + r.thread_id + ')' : ''));
    let src = '';
    if (r.file) src = r.file + (r.line ? ':' + r.line : '');
    if (r.function) src += (src ? ' in ' : '') + r.function + '()';
    add('source', src);
    add('module', r.module);
    add('process', r.process ? r.process : '');
    add('timestamp', r.timestamp ? r.timestamp.toFixed(6) + '  (' + new Date(r.timestamp * 1000).toISOString() + ')' : '');
    const off = this.info && typeof this.info.clock_offset === 'number' ? this.info.clock_offset : null;
    if (off !== null && r.timestamp) add('relay time', fmtFull(r.timestamp - off) + '  (clock offset ' + fmtSeconds(off, true) + ')');
    add('seq', r.seq);
  };

  // ---- rendering

  LogTab.prototype.fillRow = function (node, r) {
    node._row = r;
    node._ver = this.ver;
    const c = node._c;
    if (r.kind === 'record') {
      let cls = 'row record level-' + r._lc;
      if (r.exception) cls += ' has-exception';
      if (r === this.selected) cls += ' selected';
      node.className = cls;
      node.setAttribute('data-seq', str(r.seq));
      node.removeAttribute('data-first-seq');
      node.removeAttribute('data-last-seq');
      let t;
      if (this.corrected) t = fmtClock(this.displayTs(r));
      else { t = r._tf; if (t === undefined) { t = fmtClock(r.timestamp); r._tf = t; } }
      c.time.textContent = t;
      c.time.className = this.corrected ? 'c-time corrected' : 'c-time';
      c.badge.className = 'badge lv-' + (LEVEL_NO[r.level] ? r.level : 'OTHER');
      c.badge.textContent = r.level;
      c.logger.textContent = r.logger;
      c.thread.textContent = r.thread;
      c.marker.hidden = !r.exception;
      c.text.textContent = oneLine(r.message);
    } else if (r.kind === 'gap') {
      node.className = 'row gap';
      node.removeAttribute('data-seq');
      node.setAttribute('data-first-seq', str(r.first_seq));
      node.setAttribute('data-last-seq', str(r.last_seq));
      c.marker.hidden = true;
      c.text.textContent = gapText(r);
    } else {
      node.className = 'row end' + (BAD_END.has(r.code) ? ' bad' : '');
      node.removeAttribute('data-seq');
      node.removeAttribute('data-first-seq');
      node.removeAttribute('data-last-seq');
      c.marker.hidden = true;
      c.text.textContent = '■ ' + endText(r.code, r.reason);
    }
  };

  function makeRowNode() {
    const node = el('div', 'row');
    const time = el('span', 'c-time');
    const level = el('span', 'c-level');
    const badge = el('span', 'badge');
    level.appendChild(badge);
    const logger = el('span', 'c-logger');
    const thread = el('span', 'c-thread');
    const msg = el('span', 'c-msg');
    const marker = el('span', 'exc-marker', 'exc');
    marker.title = 'this record has an exception';
    const text = el('span', 'm');
    msg.append(marker, text);
    node.append(time, level, logger, thread, msg);
    node._c = { time: time, badge: badge, logger: logger, thread: thread, marker: marker, text: text };
    node._row = null;
    return node;
  }

  function gapText(r) {
    const a = r.first_seq, b = r.last_seq;
    const n = Number.isFinite(a) && Number.isFinite(b) ? b - a + 1 : null;
    let s = '⚠ ' + (n === null ? 'records' : n === 1 ? '1 record' : n + ' records') + ' lost (seq ' +
      (a === b ? str(a) : str(a) + '–' + str(b)) + '): ' + r.reason;
    if (GAP_TEXT[r.reason]) s += ' — ' + GAP_TEXT[r.reason];
    return s;
  }

  function endText(code, reason) {
    const base = END_TEXT[code] || ('stream ended' + (code ? ': ' + code : ''));
    return reason && reason !== base && reason !== code ? base + ' — ' + reason : base;
  }

  LogTab.prototype.render = function () {
    if (this.filterDirty) this.refilter();
    if (!this.isActive()) { this.updateChrome(); return; }
    this.checkUserScroll();
    this.updateChrome();
    const grid = this.grid;
    const m = this.matching;
    const n = m.length;
    const totalH = n * ROW_H;
    if (this.spacerH !== totalH) { this.spacer.style.height = totalH + 'px'; this.spacerH = totalH; }
    const viewH = grid.clientHeight;
    const maxTop = Math.max(0, totalH - viewH);
    let top = grid.scrollTop;
    let want = null;
    if (!this.paused) want = maxTop;
    else if (this.restoreTop !== null) want = Math.min(this.restoreTop, maxTop);
    else if (this.shiftRows) want = Math.max(0, top - this.shiftRows * ROW_H);
    if (this.paused && this.revealRow) {
      const idx = lowerBound(m, this.revealRow._i);
      if (m[idx] === this.revealRow) {
        const base = want !== null ? want : top;
        const y = idx * ROW_H;
        if (y < base) want = y;
        else if (y + ROW_H > base + viewH) want = Math.min(maxTop, y + ROW_H - viewH);
      }
    }
    this.revealRow = null;
    this.restoreTop = null;
    this.shiftRows = 0;
    if (want !== null && Math.abs(want - top) >= 1) {
      grid.scrollTop = want;
      top = grid.scrollTop;
    }
    this.lastTop = top;
    const first = Math.max(0, Math.floor(top / ROW_H) - OVERSCAN);
    const last = Math.min(n, Math.ceil((top + viewH) / ROW_H) + OVERSCAN);
    const need = Math.max(0, last - first);
    const ty = 'translateY(' + (first * ROW_H) + 'px)';
    if (this.rowsEl._ty !== ty) { this.rowsEl._ty = ty; this.rowsEl.style.transform = ty; }
    const pool = this.pool;
    while (pool.length < need) {
      const node = makeRowNode();
      this.rowsEl.appendChild(node);
      pool.push(node);
    }
    for (let k = 0; k < pool.length; k++) {
      const node = pool[k];
      if (k < need) {
        const r = m[first + k];
        if (node._row !== r || node._ver !== this.ver) this.fillRow(node, r);
        if (node.hidden) node.hidden = false;
      } else if (!node.hidden) {
        node.hidden = true;
        node.className = 'row';
        node.removeAttribute('data-seq');
        node._row = null;
      }
    }
    let empty = '';
    if (!n) {
      if (this.rows.length) empty = 'No records match the filters.';
      else if (this.state === 'history') empty = conn.authed ? 'Loading…' : 'Waiting for the relay…';
      else if (this.state === 'live') empty = 'No records yet; waiting for new ones…';
      else empty = 'No records.';
    }
    setText(this.emptyEl, empty);
    this.emptyEl.hidden = !empty;
  };

  // Everything outside the grid: data attributes, buttons, notes, status line.
  LogTab.prototype.updateChrome = function () {
    const v = this.view;
    const newCount = this.paused ? this.newCount : 0;
    const attrs = {
      'data-total-rows': String(this.rows.length),
      'data-matching-rows': String(this.matching.length),
      'data-new-count': String(newCount),
      'data-state': this.state,
      'data-last-seq': this.lastSeq === null ? '-1' : String(this.lastSeq),
      'data-paused': this.paused ? 'true' : 'false',
      'data-dropped-rows': String(this.dropped),
      'data-min-level': String(this.minLevel),
    };
    for (const k in attrs) {
      if (this.attrs[k] !== attrs[k]) { this.attrs[k] = attrs[k]; v.setAttribute(k, attrs[k]); }
    }
    setText(this.pauseBtn, this.paused ? 'Resume' : 'Pause');
    this.pauseBtn.classList.toggle('active', this.paused);
    setAttr(this.pauseBtn, 'aria-pressed', this.paused ? 'true' : 'false');
    setText(this.newCountEl, newCount > 0 ? newCount + ' new' : '');
    this.newCountEl.hidden = !(newCount > 0);
    setAttr(this.newCountEl, 'title', 'records received since pausing; click to jump to live');

    this.droppedNote.hidden = this.dropped === 0;
    setText(this.droppedNote, this.dropped ? this.dropped + ' older rows dropped (this tab keeps the newest ' + MAX_ROWS + ')' : '');

    const ended = this.state === 'ended' && this.endCode !== null;
    this.banner.hidden = !ended;
    if (ended) {
      setText(this.bannerText, endText(this.endCode, this.endReason));
      this.banner.classList.toggle('bad', BAD_END.has(this.endCode));
      this.rewatchBtn.hidden = FINAL_END.has(this.endCode);
    }

    // status line
    const i = this.info || {};
    const st = normStatus(i.status);
    setText(this.st.status, STATUS_TEXT[st] || st);
    const stCls = 'st-status status-' + cssToken(st);
    if (this.st.status.className !== stCls) this.st.status.className = stCls;
    const stateText = !conn.authed && this.state !== 'ended' ? 'reconnecting…' : this.state;
    setText(this.st.state, stateText);
    const stateCls = 'st-state state-' + this.state;
    if (this.st.state.className !== stateCls) this.st.state.className = stateCls;
    let rowsText = fmtInt(this.rows.length) + ' rows';
    if (this.matching.length !== this.rows.length) rowsText += ' · ' + fmtInt(this.matching.length) + ' shown';
    setText(this.st.rows, rowsText);
    setText(this.st.rate, fmtRate(this.rate) + ' rec/s');
    const off = typeof i.clock_offset === 'number' ? i.clock_offset : null;
    setText(this.st.clock, off === null ? '' : 'clock offset ' + fmtSeconds(off, true));
    const rtt = num(i.rtt);
    setText(this.st.rtt, rtt > 0 ? 'rtt ' + fmtSeconds(rtt, false) : '');
    const infoParts = [];
    if (i.app) infoParts.push(str(i.app) + (i.app_version ? ' ' + i.app_version : ''));
    for (const k of ['environment', 'host', 'user']) if (i[k]) infoParts.push(str(i[k]));
    if (i.pid) infoParts.push('pid ' + i.pid);
    if (i.runtime) infoParts.push(str(i.runtime));
    infoParts.push(this.id);
    setText(this.st.info, infoParts.join(' · '));
    this.updateLabel();
  };

  // Records/s received live by this tab, averaged over the last few seconds.
  LogTab.prototype.tick = function (now) {
    const dt = (now - this.rateT) / 1000;
    if (dt <= 0.2) return;
    this.rateWin.push([this.rateAcc, dt]);
    if (this.rateWin.length > 3) this.rateWin.shift();
    let n = 0, t = 0;
    for (const w of this.rateWin) { n += w[0]; t += w[1]; }
    this.rate = t > 0 ? n / t : 0;
    this.rateAcc = 0;
    this.rateT = now;
    this.markDirty();
  };

  LogTab.prototype.publicState = function () {
    return {
      sessionId: this.id, sub: this.sub, totalRows: this.rows.length, matchingRows: this.matching.length,
      newCount: this.paused ? this.newCount : 0, state: this.state, lastSeq: this.lastSeq, paused: this.paused,
      droppedRows: this.dropped, minLevel: this.minLevel, endCode: this.endCode,
    };
  };

  // ------------------------------------------------------------------ events

  dom.loginForm.addEventListener('submit', function (ev) {
    ev.preventDefault();
    conn.token = dom.token.value;
    conn.backoff = BACKOFF_FIRST;
    dom.loginButton.disabled = true;
    dom.loginError.textContent = '';
    connect();
  });

  dom.logout.addEventListener('click', logout);

  // Colour theme: auto (follow the system), dark or light; remembered in localStorage.
  const THEME_KEY = 'loupelive.theme';
  function applyTheme(theme) {
    if (theme !== 'dark' && theme !== 'light') theme = 'auto';
    if (theme === 'auto') document.documentElement.removeAttribute('data-theme');
    else document.documentElement.setAttribute('data-theme', theme);
    dom.themeToggle.textContent = 'Theme: ' + theme;
    return theme;
  }
  let theme = 'auto';
  try { theme = applyTheme(localStorage.getItem(THEME_KEY)); } catch (err) { theme = applyTheme('auto'); }
  dom.themeToggle.addEventListener('click', function () {
    theme = applyTheme({ auto: 'dark', dark: 'light', light: 'auto' }[theme]);
    try { localStorage.setItem(THEME_KEY, theme); } catch (err) { /* storage disabled */ }
  });

  dom.homeTab.addEventListener('click', function () { activate(null); });
  dom.homeTab.addEventListener('keydown', function (ev) { if (ev.key === 'Enter') activate(null); });

  dom.pauseList.addEventListener('click', function () { setListPaused(!list.paused); });
  dom.clearEnded.addEventListener('click', function () {
    for (const e of Array.from(sessions.values())) if (isOver(e.info.status)) removeSession(e.id, true);
  });
  dom.sessionFilter.addEventListener('input', function () {
    list.filter = dom.sessionFilter.value.toLowerCase().split(/\s+/).filter(Boolean);
    markListDirty(true);
  });
  dom.thead.addEventListener('click', function (ev) {
    const th = ev.target.closest('th[data-sort]');
    if (!th) return;
    const key = th.dataset.sort;
    if (list.sortKey === key) list.sortDir = -list.sortDir;
    else {
      list.sortKey = key;
      list.sortDir = key === 'started' || key === 'rate' || key === 'errors' || key === 'viewers' ? -1 : 1;
    }
    for (const h of dom.thead.querySelectorAll('th')) h.classList.remove('sorted-asc', 'sorted-desc');
    th.classList.add(list.sortDir > 0 ? 'sorted-asc' : 'sorted-desc');
    markListDirty(true);
  });
  dom.tbody.addEventListener('click', function (ev) {
    const tr = ev.target.closest('tr.session');
    if (!tr) return;
    const id = tr.dataset.sessionId;
    if (ev.target.closest('.dismiss')) { ev.stopPropagation(); removeSession(id, true); return; }
    openTab(id, true);
  });
  dom.tbody.addEventListener('auxclick', function (ev) {
    if (ev.button !== 1) return;
    const tr = ev.target.closest('tr.session');
    if (tr) { ev.preventDefault(); openTab(tr.dataset.sessionId, false); }
  });

  function isTyping(t) {
    if (!t || !t.tagName) return false;
    if (t.isContentEditable) return true;
    if (t.tagName === 'TEXTAREA' || t.tagName === 'SELECT') return true;
    if (t.tagName === 'INPUT') return !/^(checkbox|radio|button|submit|reset)$/i.test(t.type);
    return false;
  }

  document.addEventListener('keydown', function (ev) {
    if (ev.ctrlKey || ev.metaKey || ev.altKey || ev.defaultPrevented) return;
    if (dom.app.hidden) return;
    const t = ev.target;
    const tab = state.active != null ? tabs.get(state.active) : null;
    if (ev.key === 'Escape') {
      if (isTyping(t)) { t.blur(); return; }
      if (tab && tab.selected) { tab.select(null); ev.preventDefault(); }
      return;
    }
    if (isTyping(t)) return;
    if (ev.key === '/') {
      ev.preventDefault();
      const input = tab ? tab.textInput : dom.sessionFilter;
      input.focus();
      input.select();
    } else if (ev.key === 'p' || ev.key === ' ') {
      if (ev.key === ' ' && t && (t.tagName === 'BUTTON' || t.tagName === 'INPUT' || t.tagName === 'A' || t.getAttribute('role') === 'tab')) return;
      ev.preventDefault();
      if (tab) tab.togglePause();
      else if (ev.key === 'p') setListPaused(!list.paused);
    } else if (tab && (ev.key === 'ArrowDown' || ev.key === 'j') && tab.selected) {
      ev.preventDefault();
      tab.moveSelection(1);
    } else if (tab && (ev.key === 'ArrowUp' || ev.key === 'k') && tab.selected) {
      ev.preventDefault();
      tab.moveSelection(-1);
    } else if (tab && ev.key === 'End' && t === tab.grid) {
      ev.preventDefault();
      tab.resume();
    }
  });

  setInterval(function () {
    try {
      const now = Date.now();
      listTick(now);
      for (const tab of tabs.values()) tab.tick(now);
    } catch (err) {
      console.error('loupelive: tick failed', err);
    }
  }, 1000);

  // ------------------------------------------------------------------ debug API (read-only)

  function publicRow(r) {
    const out = {};
    for (const k in r) if (k.charCodeAt(0) !== 95 /* _ */) out[k] = r[k];
    if (r.fields) out.fields = Object.assign({}, r.fields);
    return out;
  }

  window.loupe = Object.freeze({
    maxRows: MAX_ROWS,
    rowHeight: ROW_H,
    rows: function (sessionId) {
      const tab = tabs.get(String(sessionId));
      return tab ? tab.rows.map(publicRow) : [];
    },
    matching: function (sessionId) {
      const tab = tabs.get(String(sessionId));
      if (!tab) return [];
      if (tab.filterDirty) tab.refilter();
      return tab.matching.map(publicRow);
    },
    tabs: function () { return Array.from(tabs.keys()); },
    activeTab: function () { return state.active; },
    state: function (sessionId) {
      const tab = tabs.get(String(sessionId));
      return tab ? tab.publicState() : null;
    },
    sessions: function () {
      return Array.from(sessions.values()).map(function (e) {
        return Object.assign({}, e.info, { rate: e.rate });
      });
    },
    connection: function () {
      return { authed: conn.authed, connected: !!conn.ws && conn.ws.readyState === WebSocket.OPEN, listPaused: list.paused };
    },
    // Render a tab now (synchronously) and return the time it took in ms.
    renderNow: function (sessionId) {
      const tab = tabs.get(String(sessionId));
      if (!tab) return null;
      const t0 = performance.now();
      tab.render();
      return performance.now() - t0;
    },
  });

  // ------------------------------------------------------------------ start

  const stored = storageGet(TOKEN_KEY);
  if (stored !== null) {
    conn.token = stored;
    showApp();
    connect();
  } else {
    setConn('offline');
    showLogin('');
  }
})();
