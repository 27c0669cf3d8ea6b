// The Outpost hub's dashboard: one more client of /api/v1/ (docs/dashboard.md).
// Plain JavaScript, no build step, no third-party code: it is served from the
// hub's binary to air-gapped plants. Every text from the API goes into the
// page as text (textContent), never as HTML. The bearer token lives in this
// tab's sessionStorage only; buttons the caller's role may not use are not
// shown, and the API refuses them anyway.
'use strict';
(() => {
  const TOKEN = 'outpost.token';
  const REFRESH_MS = 5000;
  const main = document.getElementById('main');
  let me = null; // GET /api/v1/whoami
  let timer = null;

  // ---- helpers ---------------------------------------------------------------

  // h('a', {href: '#/x'}, 'text', child): an element; attributes starting with
  // "on" are listeners; children are nodes or strings (as text).
  function h(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
      else if (k === 'text') e.textContent = v;
      else e.setAttribute(k, v === true ? '' : String(v));
    }
    for (const k of kids.flat(Infinity)) {
      if (k === null || k === undefined || k === false) continue;
      e.append(k instanceof Node ? k : document.createTextNode(String(k)));
    }
    return e;
  }

  const can = (p) => !!me && me.permissions.includes(p);
  const enc = encodeURIComponent;

  function when(ns) {
    if (ns === null || ns === undefined) return '—';
    const d = new Date(ns / 1e6);
    return d.toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z');
  }

  function ago(ns) {
    if (ns === null || ns === undefined) return '—';
    const s = Math.max(0, (Date.now() - ns / 1e6) / 1000);
    if (s < 90) return `${Math.round(s)} s ago`;
    if (s < 5400) return `${Math.round(s / 60)} min ago`;
    if (s < 172800) return `${Math.round(s / 3600)} h ago`;
    return `${Math.round(s / 86400)} d ago`;
  }

  const num = (n) => (n === null || n === undefined ? '—' : Number(n).toLocaleString('en'));
  const badge = (text, cls) => h('span', { class: `badge ${cls || text}` }, text);
  const labelsText = (l) => Object.entries(l || {}).map(([k, v]) => `${k}=${v}`).join(', ');

  function say(text) {
    document.getElementById('status').textContent = text;
  }

  // "a=1, b=2" -> {a: "1", b: "2"}
  function parseLabels(text) {
    const out = {};
    for (const p of text.split(',').map((s) => s.trim()).filter(Boolean)) {
      const i = p.indexOf('=');
      if (i < 1) throw new Error(`label "${p}" is not name=value`);
      out[p.slice(0, i).trim()] = p.slice(i + 1).trim();
    }
    return out;
  }

  class ApiError extends Error {
    constructor(status, detail) {
      super(detail);
      this.status = status;
    }
  }

  // A request to /api/v1 with the token; the JSON answer, or an ApiError
  // with the problem document's detail.
  async function api(method, path, body) {
    const headers = { Authorization: `Bearer ${sessionStorage.getItem(TOKEN) || ''}` };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    const r = await fetch(`/api/v1${path}`, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: 'no-store',
    });
    const type = r.headers.get('content-type') || '';
    const data = type.includes('json') ? await r.json() : await r.text();
    if (r.status === 401) {
      signOut(`Signed out: ${data && data.detail ? data.detail : 'the token was refused'}`);
      throw new ApiError(401, 'signed out');
    }
    if (!r.ok) throw new ApiError(r.status, (data && data.detail) || `${r.status} ${r.statusText}`);
    return { data, headers: r.headers, status: r.status };
  }
  const get = async (path) => (await api('GET', path)).data;

  // Runs f, showing its failure in `where` (or the status line).
  async function attempt(where, f) {
    try {
      return await f();
    } catch (e) {
      if (e.status === 401) return undefined;
      const msg = h('p', { class: 'error', role: 'alert' }, e.message);
      if (where) where.replaceChildren(msg);
      else say(e.message);
      return undefined;
    }
  }

  function table(head, rows, opts) {
    return h('table', opts || {},
      h('thead', {}, h('tr', {}, head.map((c) => (c instanceof Node ? c : h('th', { scope: 'col' }, c))))),
      h('tbody', {}, rows));
  }

  function every(f) {
    clearInterval(timer);
    timer = setInterval(() => { if (!document.hidden) f(); }, REFRESH_MS);
  }

  // ---- sign-in ---------------------------------------------------------------

  function signOut(why) {
    sessionStorage.removeItem(TOKEN);
    me = null;
    clearInterval(timer);
    document.getElementById('nav').hidden = true;
    document.getElementById('signout').hidden = true;
    document.getElementById('who').textContent = '';
    signIn(why);
  }

  function signIn(why) {
    const input = h('input', { id: 'token', type: 'password', autocomplete: 'off', required: true, spellcheck: 'false' });
    const err = h('p', { id: 'signin-error', class: 'error', role: 'alert' }, why || '');
    const form = h('form', {
      class: 'signin',
      onsubmit: async (ev) => {
        ev.preventDefault();
        sessionStorage.setItem(TOKEN, input.value.trim());
        me = null;
        await start();
      },
    },
    h('h1', {}, 'Sign in'),
    h('p', {}, 'Paste an API token (', h('code', {}, 'outpost-hub token create'),
      ') or an access token (JWT) from your identity provider. It is kept in this tab only.'),
    h('label', { for: 'token' }, 'Token', input),
    h('p', {}, h('button', { type: 'submit' }, 'Sign in')),
    err);
    main.replaceChildren(form);
    input.focus();
  }

  async function start() {
    if (!sessionStorage.getItem(TOKEN)) return signIn();
    try {
      me = await get('/whoami');
    } catch (e) {
      if (e.status !== 401) signOut(e.message);
      return undefined;
    }
    document.getElementById('who').textContent = `${me.subject} · ${me.role}`;
    document.getElementById('signout').hidden = false;
    const nav = document.getElementById('nav');
    nav.hidden = false;
    for (const a of nav.querySelectorAll('[data-needs]')) a.hidden = !can(a.dataset.needs);
    return route();
  }

  // ---- routing ---------------------------------------------------------------

  const pages = {};

  function route() {
    clearInterval(timer);
    if (!me) return start();
    const [path, query] = location.hash.replace(/^#/, '').split('?');
    const parts = path.split('/').filter(Boolean);
    const name = pages[parts[0]] ? parts[0] : 'fleet';
    for (const a of document.querySelectorAll('#nav a')) {
      if (a.getAttribute('href') === `#/${name}`) a.setAttribute('aria-current', 'page');
      else a.removeAttribute('aria-current');
    }
    main.replaceChildren();
    say('');
    return pages[name](decodeURIComponent(parts[1] || ''), new URLSearchParams(query || ''));
  }

  // ---- fleet -----------------------------------------------------------------

  const FLEET_COLUMNS = [
    ['Agent', 'id'], ['Health', 'health'], ['Certificate', 'cert_not_after'], ['Labels', null],
    ['Backlog', 'backlog'], ['Last seen', 'last_seen'], ['Policy', 'policy_version'],
    ['Version', 'agent_version'], ['Stored events/s', null],
  ];

  // Each agent's stored-event counter (GET /api/v1/kpis,
  // outpost_hub_events_stored_total{agent}) at each refresh of the Fleet
  // page, newest last: the rate between two readings is a point of its
  // sparkline. Kept while the tab is open; nothing is kept by the hub.
  const RATE_POINTS = 24;
  const stored = { start: null, agents: new Map() };

  function noteStored(k) {
    if (stored.start !== k.process.start_time_seconds) {
      // Another hub process: its counters began again.
      stored.start = k.process.start_time_seconds;
      stored.agents.clear();
    }
    for (const [id, a] of Object.entries(k.process.agents)) {
      const seen = stored.agents.get(id) || [];
      if (!seen.length || seen[seen.length - 1][0] < k.now) seen.push([k.now, a.events_stored]);
      if (seen.length > RATE_POINTS + 1) seen.shift();
      stored.agents.set(id, seen);
    }
  }

  // Events per second between successive readings of one agent.
  function rates(id) {
    const seen = stored.agents.get(id) || [];
    const out = [];
    for (let i = 1; i < seen.length; i += 1) {
      out.push(Math.max(0, seen[i][1] - seen[i - 1][1]) / ((seen[i][0] - seen[i - 1][0]) / 1e9));
    }
    return out;
  }

  const SVG = 'http://www.w3.org/2000/svg';
  // An inline SVG line of `values` (oldest left), scaled to its maximum.
  function sparkline(values) {
    const w = 96;
    const ht = 20;
    const svg = document.createElementNS(SVG, 'svg');
    svg.setAttribute('width', w);
    svg.setAttribute('height', ht);
    svg.setAttribute('viewBox', `0 0 ${w} ${ht}`);
    svg.setAttribute('class', 'spark');
    svg.setAttribute('aria-hidden', 'true');
    const max = Math.max(...values, 0) || 1;
    const step = w / (RATE_POINTS - 1);
    const x0 = w - step * (values.length - 1);
    const frame = document.createElementNS(SVG, 'rect');
    frame.setAttribute('width', w);
    frame.setAttribute('height', ht);
    svg.append(frame);
    const line = document.createElementNS(SVG, 'polyline');
    line.setAttribute('points', values.map((v, i) => `${(x0 + i * step).toFixed(1)},${(ht - 1 - (v / max) * (ht - 2)).toFixed(1)}`).join(' '));
    svg.append(line);
    return svg;
  }

  function rateCell(id) {
    const r = rates(id);
    if (!r.length) return h('td', { class: 'num', 'data-rate': '' }, '—');
    const last = r[r.length - 1];
    return h('td', { class: 'num', 'data-rate': last, title: `${r.length} readings, ${REFRESH_MS / 1000} s apart` },
      r.length > 1 ? sparkline(r) : '', ' ', last.toFixed(1));
  }

  pages.fleet = async (_, q) => {
    const st = {
      label: q.get('label') || '', q: q.get('q') || '', health: q.get('health') || '',
      sort: q.get('sort') || 'id', offset: Number(q.get('offset') || 0), limit: Number(q.get('limit') || 50),
    };
    const cards = h('div', { class: 'cards', 'aria-label': 'Fleet summary' });
    const body = h('div', {});
    const pager = h('div', { class: 'bar' });
    const field = (id, text, value, hint) => h('label', { for: id }, text,
      h('input', { id, name: id, value, placeholder: hint || '' }));
    const healthSel = h('select', { id: 'f-health', name: 'health' },
      ['', 'connected', 'stale', 'offline', 'revoked', 'cert-expiring'].map((v) => h('option', { value: v, selected: v === st.health }, v || 'any')));
    const limitSel = h('select', { id: 'f-limit', name: 'limit' },
      [25, 50, 100, 200, 500].map((v) => h('option', { value: v, selected: v === st.limit }, v)));
    const form = h('form', {
      class: 'bar', role: 'search',
      onsubmit: (ev) => {
        ev.preventDefault();
        st.label = form.querySelector('#f-label').value.trim();
        st.q = form.querySelector('#f-q').value.trim();
        st.health = healthSel.value;
        st.limit = Number(limitSel.value);
        st.offset = 0;
        load();
      },
    },
    field('f-q', 'Agent id contains', st.q),
    field('f-label', 'Labels', st.label, 'site=north,line=3'),
    h('label', { for: 'f-health' }, 'Health', healthSel),
    h('label', { for: 'f-limit' }, 'Per page', limitSel),
    h('button', { type: 'submit' }, 'Filter'));
    main.append(h('h1', {}, 'Fleet'), cards, form, body, pager);

    let latest = 0;
    async function load(focusSort) {
      const qs = new URLSearchParams();
      for (const k of ['label', 'q', 'health']) if (st[k]) qs.set(k, st[k]);
      qs.set('sort', st.sort);
      qs.set('offset', st.offset);
      qs.set('limit', st.limit);
      history.replaceState(null, '', `#/fleet?${qs}`);
      await attempt(body, async () => {
        const [page, sum, pol, k] = await Promise.all([
          api('GET', `/fleet?${qs}`), get('/fleet/summary'), get('/policy'), get('/kpis')]);
        noteStored(k);
        latest = pol.version;
        const total = Number(page.headers.get('x-total-count') || page.data.length);
        cards.replaceChildren(
          ...[['Agents', sum.agents], ['Connected', sum.connected, 'connected'], ['Stale', sum.stale, 'stale'],
            ['Offline', sum.offline, 'offline'], ['Revoked', sum.revoked, 'revoked'],
            ['Certificates expiring', sum.cert_expiring, 'expiring'], ['Policy refused', sum.policy_errors, 'refused'],
            ['Backlog (events)', num(sum.backlog_events)], ['Policy in force', latest ? `v${latest}` : 'none']]
            .map(([t, v, c]) => h('div', { class: 'card' }, h('b', { class: v && c ? c : '' }, v), t)));
        const dir = st.sort.startsWith('-') ? 'descending' : 'ascending';
        const key = st.sort.replace(/^-/, '');
        const head = FLEET_COLUMNS.map(([t, k]) => (k
          ? h('th', { scope: 'col', 'aria-sort': key === k ? dir : 'none', class: k === 'backlog' ? 'num' : '' },
            h('button', {
              type: 'button', 'data-sort': k,
              onclick: () => { st.sort = (key === k && dir === 'ascending') ? `-${k}` : k; st.offset = 0; load(k); },
            }, t, key === k ? (dir === 'ascending' ? ' ▲' : ' ▼') : ''))
          : h('th', { scope: 'col' }, t)));
        const rows = page.data.map((a) => h('tr', { 'data-agent': a.agent_id },
          h('td', {}, h('a', { href: `#/agent/${enc(a.agent_id)}` }, a.agent_id)),
          h('td', {}, badge(a.health)),
          h('td', {}, a.cert_expiring ? badge('expiring') : '', ' ', a.cert_not_after ? h('span', { class: 'muted' }, when(a.cert_not_after).slice(0, 10)) : '—'),
          h('td', {}, labelsText(a.labels)),
          h('td', { class: 'num' }, num(a.backlog_events)),
          h('td', { title: when(a.last_seen) }, ago(a.last_seen)),
          h('td', {}, policyCell(a, latest)),
          h('td', {}, a.agent_version || '—'),
          rateCell(a.agent_id)));
        body.replaceChildren(table(head, rows, { 'aria-label': 'Agents' }),
          rows.length ? '' : h('p', { class: 'muted' }, 'No agent matches.'));
        const first = total ? st.offset + 1 : 0;
        pager.replaceChildren(
          h('button', { type: 'button', class: 'secondary', disabled: st.offset === 0, onclick: () => { st.offset = Math.max(0, st.offset - st.limit); load(); } }, 'Previous'),
          h('span', { id: 'fleet-range' }, `Agents ${first}–${st.offset + page.data.length} of ${total}`),
          h('button', { type: 'button', class: 'secondary', disabled: st.offset + st.limit >= total, onclick: () => { st.offset += st.limit; load(); } }, 'Next'));
        if (focusSort) body.querySelector(`[data-sort="${focusSort}"]`)?.focus();
        say(`Updated ${new Date().toLocaleTimeString()}`);
      });
    }
    await load();
    every(() => load());
  };

  function policyCell(a, latest) {
    if (a.policy_error) return h('span', {}, badge('refused'), ' ', h('span', { class: 'muted' }, a.policy_error));
    if (a.policy_version === null || a.policy_version === undefined) return '—';
    const v = `v${a.policy_version} of v${latest}`;
    return a.policy_version < latest ? h('span', {}, v, ' ', badge('behind')) : v;
  }

  // ---- one agent -------------------------------------------------------------

  pages.agent = async (id) => {
    const info = h('div', {});
    const streams = h('div', {});
    const audit = h('div', {});
    const actions = h('div', {});
    const cmds = h('div', {});
    main.append(h('p', {}, h('a', { href: '#/fleet' }, '← Fleet')), h('h1', {}, `Agent ${id}`), info,
      actions, h('h2', {}, 'Streams, last value'), streams, h('h2', {}, 'Recent commands'), cmds, h('h2', {}, 'Recent audit entries'), audit);
    async function load() {
      await attempt(info, async () => {
        const [a, pol] = await Promise.all([get(`/agents/${enc(id)}`), get('/policy')]);
        const kv = [
          ['Health', badge(a.health)], ['Labels', labelsText(a.labels) || '—'],
          ['Sessions', a.sessions], ['First seen', when(a.first_seen)], ['Last seen', `${when(a.last_seen)} (${ago(a.last_seen)})`],
          ['Agent version', a.agent_version || '—'], ['Protocol', a.protocol_version ?? '—'],
          ['Policy', policyCell(a, pol.version)], ['Highest seq stored', num(a.watermark)],
          ['Backlog', `${num(a.backlog_events)} events, ${num(a.backlog_bytes)} bytes`],
          ['Dropped / changed by the hub', `${num(a.policy_dropped)} / ${num(a.policy_modified)}`],
          ['Labels it stated, ignored', num(a.labels_ignored)],
          ['Certificate', h('span', {}, a.cert_serial ? `serial ${a.cert_serial}, ` : '',
            a.cert_not_after ? `expires ${when(a.cert_not_after)} ` : 'expiry unknown ', a.cert_expiring ? badge('expiring') : '')],
          ['Revoked', a.revoked ? `${when(a.revoked.at)} by ${a.revoked.by}: ${a.revoked.reason}` : 'no'],
        ];
        info.replaceChildren(h('dl', { class: 'kv' }, kv.map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)])));
        if (!actions.dataset.built) buildActions(a);
      });
      await attempt(streams, async () => {
        const [tail, stats] = await Promise.all([
          get(`/events/tail?agent=${enc(id)}&limit=500`), get(`/events/stats?agent=${enc(id)}`)]);
        const last = new Map();
        for (const e of tail.events || tail) last.set(e.stream, e);
        const s = (stats[0] || {});
        const rows = [...last.values()].sort((x, y) => x.stream.localeCompare(y.stream)).map((e) => h('tr', {},
          h('td', {}, e.stream), h('td', {}, typeof e.value === 'object' ? JSON.stringify(e.value) : String(e.value)),
          h('td', {}, e.quality && e.quality.status === 'good' ? 'good' : badge(e.quality ? e.quality.status : '?', 'stale')),
          h('td', {}, when(e.ts))));
        streams.replaceChildren(h('p', { class: 'muted' }, `${num(s.count || 0)} events stored; the last value of each stream among the newest 500.`),
          table(['Stream', 'Last value', 'Quality', 'Event time'], rows, { 'aria-label': 'Streams' }));
      });
      await attempt(cmds, async () => {
        const c = await get(`/commands?agent=${enc(id)}&limit=20`);
        const l = c.commands || c;
        cmds.replaceChildren(l.length ? commandsTable(l) : h('p', { class: 'muted' }, 'None.'));
      });
      await attempt(audit, async () => {
        const log = await get('/audit?limit=2000');
        const mine = log.entries.filter((e) => e.target === id || e.target.startsWith(`${id} `)).slice(-20).reverse();
        audit.replaceChildren(auditTable(mine));
      });
    }
    function buildActions(a) {
      actions.dataset.built = '1';
      const out = h('p', { role: 'status' });
      if (can('operate')) {
        const set = h('input', { id: 'l-set', placeholder: 'line=3, site=north' });
        const rm = h('input', { id: 'l-rm', placeholder: 'site' });
        actions.append(h('h2', {}, 'Labels'), h('form', {
          class: 'bar',
          onsubmit: (ev) => {
            ev.preventDefault();
            attempt(out, async () => {
              const r = await api('POST', `/agents/${enc(id)}/labels`, {
                set: parseLabels(set.value), remove: rm.value.split(',').map((s) => s.trim()).filter(Boolean) });
              out.textContent = r.data.changed ? `Labels now: ${labelsText(r.data.new)}` : 'Nothing changed.';
              load();
            });
          },
        }, h('label', { for: 'l-set' }, 'Set (name=value, …)', set), h('label', { for: 'l-rm' }, 'Remove (names)', rm),
        h('button', { type: 'submit' }, 'Change labels')));
      }
      if (can('administer')) {
        const reason = h('input', { id: 'revoke-reason', maxlength: 512 });
        actions.append(h('h2', {}, 'Revocation'), h('div', { class: 'bar' },
          h('label', { for: 'revoke-reason' }, 'Reason', reason),
          h('button', { type: 'button', class: 'danger', onclick: () => attempt(out, async () => {
            if (!window.confirm(`Revoke ${id}? It is refused from its next handshake.`)) return;
            await api('POST', `/agents/${enc(id)}/revoke`, { reason: reason.value });
            out.textContent = 'Revoked.'; load();
          }) }, 'Revoke'),
          h('button', { type: 'button', class: 'secondary', onclick: () => attempt(out, async () => {
            const r = await api('POST', `/agents/${enc(id)}/reinstate`, {});
            out.textContent = r.data.reinstated ? 'Reinstated.' : 'It was not revoked.'; load();
          }) }, 'Reinstate')));
      }
      actions.append(out);
      void a;
    }
    await load();
    every(load);
  };

  function auditTable(entries) {
    return table(['#', 'Time', 'Actor', 'Action', 'Target', 'Result', 'Detail'], entries.map((e) => h('tr', {},
      h('td', { class: 'num' }, e.id), h('td', {}, when(e.ts)), h('td', {}, e.actor), h('td', {}, e.action),
      h('td', {}, e.target), h('td', {}, e.result === 'ok' ? 'ok' : badge(e.result, 'refused')), h('td', {}, e.detail))),
    { 'aria-label': 'Audit entries' });
  }

  // ---- sinks -----------------------------------------------------------------

  // A latency quantile in seconds as the page shows it (ms below 1 s); the
  // exact value stays in data-value, as the API gave it.
  const latency = (s) => (s === null || s === undefined ? '—' : s < 1 ? `${(s * 1000).toFixed(1)} ms` : `${s.toFixed(2)} s`);
  const kv = (v, text) => ({ 'data-value': v === null || v === undefined ? '' : v, text });

  // The hub's KPIs (GET /api/v1/kpis): the same numbers as its Prometheus
  // endpoint at the same instant (docs/metrics.md).
  function kpiPanel(k) {
    const sinks = Object.entries(k.sinks);
    return h('section', { 'aria-label': 'Delivery KPIs', id: 'kpis' },
      h('h2', {}, 'Delivery KPIs'),
      h('div', { class: 'cards' },
        [['Stored', 'kpi-stored', k.process.events_stored], ['Dropped by policy', 'kpi-dropped', k.process.policy_dropped_events],
          ['Hub uptime', 'kpi-uptime', null, `${num(Math.round(k.uptime_seconds / 60))} min`]]
          .map(([t, id, v, text]) => h('div', { class: 'card' }, h('b', { id, ...kv(v, text || num(v)) }), t))),
      table(['Sink', 'Delivered', 'Latency p50', 'p95', 'p99', 'Timed'], sinks.map(([id, s]) => {
        const l = s.latency || {};
        return h('tr', { 'data-kpi-sink': id }, h('td', {}, id),
          h('td', { class: 'num', ...kv(s.delivered_events, num(s.delivered_events)) }),
          h('td', { class: 'num', ...kv(l.p50_seconds, latency(l.p50_seconds)) }),
          h('td', { class: 'num', ...kv(l.p95_seconds, latency(l.p95_seconds)) }),
          h('td', { class: 'num', ...kv(l.p99_seconds, latency(l.p99_seconds)) }),
          h('td', { class: 'num', ...kv(l.count, num(l.count || 0)) }));
      }), { 'aria-label': 'Sink KPIs' }),
      h('p', { class: 'muted' }, 'Stored and dropped are this hub process\'s counts since it started; latency is from the hub\'s commit to the sink\'s acceptance.'));
  }

  pages.sinks = async () => {
    const body = h('div', {});
    const kpis = h('div', {});
    main.append(h('h1', {}, 'Sinks'), body, kpis);
    const load = () => attempt(body, async () => {
      const [sinks, k] = await Promise.all([get('/sinks'), get('/kpis')]);
      kpis.replaceChildren(kpiPanel(k));
      body.replaceChildren(table(['Sink', 'Queue', 'Lag', 'Delivered', 'Last delivered', 'Rejected', 'Residency refusals', 'Failures', 'Last error'],
        sinks.map((s) => h('tr', { 'data-sink': s.sink },
          h('td', {}, s.sink, s.configured ? '' : h('span', { class: 'muted' }, ' (no longer configured)')),
          h('td', { class: 'num' }, num(s.pending)),
          h('td', { class: 'num' }, s.lag_seconds === null || s.lag_seconds === undefined ? '—' : `${s.lag_seconds.toFixed(1)} s`),
          h('td', { class: 'num' }, num(s.delivered)), h('td', {}, ago(s.last_delivered_at)),
          h('td', { class: 'num' }, num(s.rejected)), h('td', { class: 'num' }, num(s.refused_residency)),
          h('td', { class: 'num' }, num(s.failures)),
          h('td', {}, s.last_error ? h('span', {}, h('span', { class: 'error' }, s.last_error), ` (${ago(s.last_error_at)})`) : '—'))),
        { 'aria-label': 'Sinks' }), sinks.length ? '' : h('p', { class: 'muted' }, 'No sinks are configured.'));
    });
    await load();
    every(load);
  };

  // ---- policy ----------------------------------------------------------------

  function diffView(text) {
    return h('pre', { class: 'diff' }, text.split('\n').map((l) => h('span', {
      class: l.startsWith('+') ? 'diff-add' : l.startsWith('-') ? 'diff-del' : '' }, `${l}\n`)));
  }

  pages.policy = async () => {
    const current = h('div', {});
    const proposals = h('div', {});
    const edit = h('div', {});
    const history = h('div', {});
    const diff = h('div', {});
    main.append(h('h1', {}, 'Policy'), current, h('h2', {}, 'Proposals'), proposals, edit,
      h('h2', {}, 'History'), history, h('h2', {}, 'Compare two versions'), diff);
    const twoPerson = me.policy_approval === 'two-person';
    let inForce = null;

    async function load() {
      await attempt(current, async () => {
        inForce = await get('/policy');
        current.replaceChildren(inForce.version
          ? h('div', {}, h('p', { id: 'policy-version' }, `Version ${inForce.version} in force, applied ${when(inForce.applied_at)} by ${inForce.actor} from ${inForce.source}.`),
            h('pre', { 'aria-label': 'The text in force' }, inForce.text))
          : h('p', { id: 'policy-version' }, 'No policy applied: every stream is stored, nothing is routed elsewhere.'));
      });
      await attempt(proposals, async () => {
        const list = await get('/policy/proposals');
        const rows = list.slice().reverse().map((p) => h('tr', { 'data-proposal': p.id },
          h('td', { class: 'num' }, p.id), h('td', {}, badge(p.status, p.status === 'pending' ? 'stale' : p.status === 'approved' ? 'connected' : 'refused')),
          h('td', {}, p.proposed_by), h('td', {}, when(p.proposed_at)), h('td', {}, p.source),
          h('td', {}, p.version ? `v${p.version}` : (p.reason || '')),
          h('td', {}, h('details', {}, h('summary', {}, 'Text'), h('pre', {}, p.text)),
            p.status === 'pending' && can('approve-policy') ? decide(p) : '')));
        proposals.replaceChildren(rows.length
          ? table(['#', 'State', 'Proposed by', 'When', 'Source', 'Outcome', ''], rows, { 'aria-label': 'Proposals' })
          : h('p', { class: 'muted' }, twoPerson ? 'No proposals.' : 'Policy changes apply at once (policy_approval = "single").'));
      });
      await attempt(history, async () => {
        const hist = await get('/policy/history');
        history.replaceChildren(table(['Version', 'Applied', 'By', 'Source', 'Digest', ''],
          hist.slice().reverse().map((v) => h('tr', {},
            h('td', { class: 'num' }, v.version), h('td', {}, when(v.applied_at)), h('td', {}, v.actor),
            h('td', {}, v.source), h('td', {}, h('code', {}, (v.digest || '').slice(0, 12))),
            h('td', {}, can('propose-policy') && inForce && v.version !== inForce.version
              ? h('button', { type: 'button', class: 'secondary', onclick: () => submit({ version: v.version }) },
                `${twoPerson ? 'Propose rollback' : 'Roll back'} to v${v.version}`) : ''))),
          { 'aria-label': 'Policy history' }));
        if (!diff.dataset.built || diff.dataset.built !== String(hist.length)) {
          diff.dataset.built = String(hist.length);
          buildDiff(hist, diff);
        }
      });
    }

    function decide(p) {
      const out = h('span', { role: 'status' });
      if (p.proposed_by === me.subject) return h('span', { class: 'muted' }, 'your own: another approver decides');
      return h('span', { class: 'bar' },
        h('button', { type: 'button', onclick: () => attempt(out, async () => {
          const r = await api('POST', `/policy/proposals/${p.id}/approve`);
          say(`Proposal ${p.id} approved: version ${r.data.applied.version} in force.`); load();
        }) }, `Approve proposal ${p.id}`),
        h('button', { type: 'button', class: 'secondary', onclick: () => attempt(out, async () => {
          const reason = window.prompt('Why reject it?') || '';
          await api('POST', `/policy/proposals/${p.id}/reject`, { reason });
          say(`Proposal ${p.id} rejected.`); load();
        }) }, `Reject proposal ${p.id}`), out);
    }

    const result = h('div', { id: 'policy-result', role: 'status' });
    async function submit(body) {
      await attempt(result, async () => {
        const r = await api('POST', '/policy', body);
        if (r.status === 202) result.replaceChildren(h('p', {}, `Proposed as proposal ${r.data.id}: an approver must approve it.`));
        else result.replaceChildren(h('p', {}, r.data.outcome === 'new' ? `Version ${r.data.version} applied.` : `Unchanged: version ${r.data.version} is in force.`));
        await load();
      });
    }

    await load();
    if (can('propose-policy')) {
      // Built after the first load, so the text in force is there to edit.
      const text = h('textarea', { id: 'policy-text', spellcheck: 'false' });
      text.value = (inForce && inForce.text) || '';
      const source = h('input', { id: 'policy-source', value: 'dashboard' });
      edit.append(h('h2', {}, twoPerson ? 'Propose a new version' : 'Apply a new version'),
        h('label', { for: 'policy-text' }, 'Policy text (TOML, docs/policy.md)', text),
        h('div', { class: 'bar' }, h('label', { for: 'policy-source' }, 'Source', source),
          h('button', { type: 'button', class: 'secondary', onclick: () => attempt(result, async () => {
            const r = await api('POST', '/policy/dry-run', { text: text.value });
            result.replaceChildren(dryRunView(r.data));
          }) }, 'Dry run'),
          h('button', { type: 'button', onclick: () => submit({ text: text.value, source: source.value }) }, twoPerson ? 'Propose' : 'Apply')),
        result);
    }
  };

  function dryRunView(d) {
    const head = h('p', {}, d.valid ? badge('valid', 'connected') : badge('refused'), ' ',
      d.error || '', ` residency: ${d.residency ? d.residency.verdict : '?'}${d.residency && d.residency.detail ? ` (${d.residency.detail})` : ''}; `,
      `${d.agents_checked} agents checked against v${d.current_version}, ${d.agents.length} change.`);
    const rows = [];
    for (const a of d.agents) {
      rows.push(h('tr', {}, h('td', {}, a.agent_id), h('td', {}, `rules ${a.rules_before} → ${a.rules_after}${a.limits_changed ? ', limits change' : ''}`), h('td', {}, ''), h('td', {}, '')));
      for (const s of a.streams) rows.push(h('tr', {}, h('td', {}, ''), h('td', {}, s.stream), h('td', {}, s.before), h('td', {}, s.after)));
    }
    return h('div', { id: 'dry-run' }, head, rows.length ? table(['Agent', 'Stream', 'Before', 'After'], rows, { 'aria-label': 'Dry run' }) : '');
  }

  function buildDiff(hist, where) {
    if (hist.length < 2) {
      where.replaceChildren(h('p', { class: 'muted' }, 'Fewer than two versions.'));
      return;
    }
    const opts = (sel) => hist.map((v) => h('option', { value: v.version, selected: v.version === sel }, `v${v.version}`));
    const from = h('select', { id: 'diff-from' }, opts(hist[hist.length - 2].version));
    const to = h('select', { id: 'diff-to' }, opts(hist[hist.length - 1].version));
    const out = h('div', {});
    where.replaceChildren(h('form', {
      class: 'bar',
      onsubmit: (ev) => {
        ev.preventDefault();
        attempt(out, async () => {
          const d = await get(`/policy/diff?from=${from.value}&to=${to.value}`);
          out.replaceChildren(d.diff ? diffView(d.diff) : h('p', {}, 'The texts are the same.'));
        });
      },
    }, h('label', { for: 'diff-from' }, 'From', from), h('label', { for: 'diff-to' }, 'To', to),
    h('button', { type: 'submit' }, 'Show diff')), out);
  }

  // ---- audit -----------------------------------------------------------------

  pages.audit = async () => {
    const verdict = h('div', { id: 'audit-verdict' });
    const anchor = h('div', {});
    const trail = h('div', {});
    const anchorIn = h('input', { id: 'anchor-in', placeholder: '42:9f…', size: 40 });
    const filters = { actor: '', action: '', target: '', result: '' };
    const limitSel = h('select', { id: 'a-limit' }, ['200', '1000', '5000'].map((v) => h('option', { value: v }, v)));
    let entries = [];
    const fields = Object.keys(filters).map((k) => h('label', { for: `a-${k}` }, k[0].toUpperCase() + k.slice(1),
      h('input', { id: `a-${k}`, oninput: (ev) => { filters[k] = ev.target.value.trim(); show(); } })));
    main.append(h('h1', {}, 'Audit'), h('h2', {}, 'Verification'), verdict,
      h('form', { class: 'bar', onsubmit: (ev) => { ev.preventDefault(); verify(anchorIn.value.trim()); } },
        h('label', { for: 'anchor-in' }, 'Anchor kept elsewhere (ID:HASH)', anchorIn), h('button', { type: 'submit' }, 'Verify')),
      h('h2', {}, 'Anchor export'), anchor, h('h2', {}, 'Trail'),
      h('div', { class: 'bar', role: 'search' }, fields, h('label', { for: 'a-limit' }, 'Newest', limitSel)), trail);
    limitSel.addEventListener('change', () => loadTrail());

    async function verify(a) {
      await attempt(verdict, async () => {
        const v = await get(`/audit/verify${a ? `?anchor=${enc(a)}` : ''}`);
        verdict.replaceChildren(v.status === 'intact'
          ? h('p', {}, badge('intact'), ` ${num(v.entries)} entries, every signature checked from entry ${v.first_signed ?? '—'}${v.anchor ? `, anchor ${v.anchor} holds` : ''}. Head ${v.head ? v.head.slice(0, 16) : '—'}…`)
          : h('p', {}, badge('broken'), ` at entry ${v.id}: ${v.reason}`));
      });
    }
    function show() {
      const f = entries.filter((e) => Object.entries(filters).every(([k, v]) => !v || String(e[k]).includes(v)));
      trail.replaceChildren(h('p', { class: 'muted' }, `${f.length} of ${entries.length} entries, newest first.`), auditTable(f.slice().reverse()));
    }
    async function loadTrail() {
      await attempt(trail, async () => {
        entries = (await get(`/audit?limit=${limitSel.value}`)).entries;
        show();
      });
    }
    await verify('');
    await attempt(anchor, async () => {
      const [a, key] = await Promise.all([get('/audit/anchor').catch((e) => (e.status === 409 ? null : Promise.reject(e))), get('/audit/key')]);
      const kids = [h('p', {}, `Audit key ${key.algorithm}, fingerprint `, h('code', {}, key.fingerprint))];
      if (a) {
        const blob = new Blob([`${JSON.stringify(a, null, 2)}\n`], { type: 'application/json' });
        kids.push(h('p', {}, 'Newest entry: ', h('code', { id: 'anchor' }, a.anchor), ` (${when(a.ts)}). Keep it where the hub cannot reach, and verify against it later. `,
          h('a', { href: URL.createObjectURL(blob), download: `outpost-audit-anchor-${a.id}.json` }, 'Download the anchor')));
      } else kids.push(h('p', {}, 'The log is empty.'));
      anchor.replaceChildren(...kids);
    });
    await loadTrail();
  };

  // ---- commands --------------------------------------------------------------

  function commandsTable(list) {
    return table(['Made', 'Agent', 'Kind', 'Target', 'Detail', 'By', 'State', 'Outcome'], list.map((c) => h('tr', { 'data-command': c.id },
      h('td', {}, when(c.created_at)), h('td', {}, h('a', { href: `#/agent/${enc(c.agent_id)}` }, c.agent_id)),
      h('td', {}, c.kind), h('td', {}, c.target), h('td', {}, c.detail), h('td', {}, `${c.actor} (${c.role})`),
      h('td', {}, badge(c.state, c.state === 'succeeded' ? 'connected' : c.state === 'pending' || c.state === 'delivered' ? 'stale' : 'refused')),
      h('td', {}, c.reason || (c.value === null || c.value === undefined ? '' : JSON.stringify(c.value))))),
    { 'aria-label': 'Commands' });
  }

  pages.commands = async () => {
    const list = h('div', {});
    const out = h('div', { role: 'status' });
    main.append(h('h1', {}, 'Commands'));
    if (can('operate')) {
      const agent = h('input', { id: 'c-agent', required: true, placeholder: 'gw-1' });
      const kind = h('select', { id: 'c-kind' }, ['read', 'write', 'publish'].map((k) => h('option', { value: k }, k)));
      const target = h('input', { id: 'c-target', required: true, placeholder: 'plc1/setpoint or a topic' });
      const value = h('input', { id: 'c-value', placeholder: '21.5 (write), payload (publish)' });
      const ttl = h('input', { id: 'c-ttl', value: '10m', size: 6 });
      main.append(h('form', {
        class: 'bar',
        onsubmit: (ev) => {
          ev.preventDefault();
          attempt(out, async () => {
            const body = { agent: agent.value.trim(), ttl: ttl.value.trim() };
            if (kind.value === 'read') body.read = { tag: target.value.trim() };
            else if (kind.value === 'write') {
              let v = value.value.trim();
              try { v = JSON.parse(v); } catch (_) { /* a string */ }
              body.write = { tag: target.value.trim(), value: v };
            } else body.publish = { topic: target.value.trim(), payload: value.value };
            const r = await api('POST', '/commands', body);
            const made = Array.isArray(r.data) ? r.data : (r.data.commands || [r.data]);
            out.replaceChildren(h('p', {}, made.map((c) => `${c.agent_id}: ${c.state}${c.reason ? ` (${c.reason})` : ''}`).join('; ')));
            load();
          });
        },
      }, h('label', { for: 'c-agent' }, 'Agent', agent), h('label', { for: 'c-kind' }, 'Kind', kind),
      h('label', { for: 'c-target' }, 'Tag or topic', target), h('label', { for: 'c-value' }, 'Value', value),
      h('label', { for: 'c-ttl' }, 'Expires after', ttl), h('button', { type: 'submit' }, 'Send command')), out);
    }
    main.append(list);
    const load = () => attempt(list, async () => {
      const cmds = await get('/commands?limit=200');
      list.replaceChildren(h('p', { class: 'muted' }, 'The newest 200, newest first.'), commandsTable(cmds.commands || cmds));
    });
    await load();
    every(load);
  };

  // ---- enrollment tokens -----------------------------------------------------

  pages.enrollments = async () => {
    const list = h('div', {});
    const out = h('div', { role: 'status' });
    main.append(h('h1', {}, 'Enrollment tokens'));
    if (!can('administer')) {
      main.append(h('p', {}, 'Enrollment tokens are for the admin role.'));
      return;
    }
    const id = h('input', { id: 'e-agent', required: true, placeholder: 'gw-9' });
    const labels = h('input', { id: 'e-labels', placeholder: 'site=north' });
    const ttl = h('input', { id: 'e-ttl', value: '1h' });
    main.append(h('form', {
      class: 'bar',
      onsubmit: (ev) => {
        ev.preventDefault();
        attempt(out, async () => {
          const r = await api('POST', '/enrollments', { agent_id: id.value.trim(), labels: parseLabels(labels.value), ttl: ttl.value.trim() });
          out.replaceChildren(h('p', {}, `Token for ${r.data.agent_id}, shown this once, valid until ${when(r.data.expires_at)}: `,
            h('code', { id: 'enroll-token' }, r.data.token)));
          load();
        });
      },
    }, h('label', { for: 'e-agent' }, 'Agent id', id), h('label', { for: 'e-labels' }, 'Labels', labels),
    h('label', { for: 'e-ttl' }, 'Valid for (1m to 30d)', ttl), h('button', { type: 'submit' }, 'Create token')), out, list);
    async function load() {
      await attempt(list, async () => {
        const toks = await get('/enrollments');
        list.replaceChildren(table(['Agent', 'State', 'Labels', 'Created', 'By', 'Expires', 'Used from', ''], toks.map((t) => h('tr', {},
          h('td', {}, t.agent_id), h('td', {}, badge(t.state, t.state === 'pending' ? 'stale' : t.state === 'used' ? 'connected' : 'offline')),
          h('td', {}, labelsText(t.labels)), h('td', {}, when(t.created_at)), h('td', {}, t.created_by),
          h('td', {}, when(t.expires_at)), h('td', {}, t.used_from || '—'),
          h('td', {}, t.state === 'pending' ? h('button', { type: 'button', class: 'danger', onclick: () => attempt(out, async () => {
            await api('DELETE', `/enrollments/${enc(t.agent_id)}`);
            out.textContent = `Pending tokens of ${t.agent_id} revoked.`; load();
          }) }, `Revoke ${t.agent_id}`) : ''))), { 'aria-label': 'Enrollment tokens' }));
      });
    }
    await load();
  };

  // ---- start -----------------------------------------------------------------

  document.getElementById('signout').addEventListener('click', () => signOut('Signed out.'));
  window.addEventListener('hashchange', route);
  start();
})();
