// The multiagents dashboard: one page, no build step, over the HTTP API.
// Routes live after `#`: #/runs, #/runs/ID, #/dead-letters, #/dead-letters/ID,
// #/workers, #/definitions, #/definitions/NAME, #/charts.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const STATUSES = ["running", "compensating", "completed", "compensated", "failed", "compensation_failed", "cancelled", "timed_out"];
const TERMINAL = new Set(["completed", "compensated", "failed", "compensation_failed", "cancelled", "timed_out"]);

// ---------------------------------------------------------------- helpers

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "style") el.style.cssText = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function badge(status) {
  return h("span", { class: `badge ${status}`, "data-status": status }, (status || "").replace("_", " "));
}

function ago(ms) {
  const s = Math.max(0, (Date.now() - ms) / 1000);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

function duration(ms) {
  if (ms === null || ms === undefined) return "";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
  return `${(ms / 60000).toFixed(1)} min`;
}

function when(ms) {
  return ms ? new Date(ms).toLocaleString() : "";
}

// Run ids made in the same second share their first characters (UUIDv7):
// the short form keeps the first group and the random end.
function short(id) {
  const s = String(id);
  return s.length > 20 ? `${s.slice(0, 8)}…${s.slice(-6)}` : s;
}

function json(v) {
  return JSON.stringify(v, null, 2);
}

function toast(text, bad = false) {
  const t = $("#toast");
  t.textContent = text;
  t.className = bad ? "show bad" : "show";
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (t.className = ""), 4000);
}

// ---------------------------------------------------------------- the API

const api = {
  key: localStorage.getItem("multiagents.key") || "",
  me: null,

  headers(extra = {}) {
    const hs = { ...extra };
    if (this.key) hs.Authorization = `Bearer ${this.key}`;
    return hs;
  },

  async call(method, path, body) {
    const init = { method, headers: this.headers() };
    if (body !== undefined) {
      init.body = typeof body === "string" ? body : JSON.stringify(body);
      init.headers["Content-Type"] = "application/json";
    }
    const res = await fetch(path, init);
    if (res.status === 401) {
      await askKey("The key was refused or is missing.");
      return this.call(method, path, body);
    }
    const type = res.headers.get("content-type") || "";
    const data = type.includes("json") ? await res.json() : await res.text();
    if (!res.ok) {
      const detail = data && data.detail ? `${data.title}: ${data.detail}` : `${res.status} ${res.statusText}`;
      const err = new Error(detail);
      err.problem = data;
      err.status = res.status;
      throw err;
    }
    return data;
  },

  get(path) { return this.call("GET", path); },
  post(path, body) { return this.call("POST", path, body); },
  del(path, body) { return this.call("DELETE", path, body); },

  // May the caller do what `scope` allows? (Scopes nest: admin ⊃ operate ⊃ read.)
  may(scope) {
    const s = (this.me && this.me.scopes) || [];
    if (scope === "read") return s.includes("read") || s.includes("operate") || s.includes("admin");
    if (scope === "operate") return s.includes("operate") || s.includes("admin");
    return s.includes(scope);
  },
};

function askKey(why) {
  return new Promise((resolve) => {
    const dialog = $("#key-dialog");
    $("#key-why").textContent = why || "";
    $("#key-input").value = "";
    dialog.onclose = async () => {
      api.key = $("#key-input").value.trim();
      localStorage.setItem("multiagents.key", api.key);
      resolve();
    };
    if (!dialog.open) dialog.showModal();
  });
}

async function whoAmI() {
  api.me = await api.get("/v1/me");
  $("#who").textContent = api.me.keys_required ? `key: ${api.me.name} (${api.me.scopes.join(", ")})` : "";
  if (api.me.keys_required) $("#who").append(" ", h("a", { href: "#", onclick: (e) => { e.preventDefault(); forgetKey(); } }, "forget"));
}

async function forgetKey() {
  api.key = "";
  localStorage.removeItem("multiagents.key");
  await askKey("Enter another key.");
  await whoAmI();
  route();
}

// An action button, shown only when the key's scopes allow it.
function action(label, scope, onclick, cls = "") {
  if (!api.may(scope)) return null;
  return h("button", { class: cls, onclick, "data-action": label.toLowerCase() }, label);
}

// ---------------------------------------------------------------- live updates (SSE over fetch, so the key goes in a header)

function stream(path, onEvent) {
  const ctl = new AbortController();
  let lastId = null;
  let stopped = false;
  (async () => {
    while (!stopped) {
      try {
        const headers = api.headers({ Accept: "text/event-stream" });
        if (lastId) headers["Last-Event-ID"] = lastId;
        const res = await fetch(path, { headers, signal: ctl.signal });
        if (!res.ok) throw new Error(`${res.status}`);
        setLive(true);
        const reader = res.body.getReader();
        const decoder = new TextDecoder();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += decoder.decode(value, { stream: true });
          let cut;
          while ((cut = buf.indexOf("\n\n")) >= 0) {
            const block = buf.slice(0, cut);
            buf = buf.slice(cut + 2);
            const ev = { event: "message", data: "", id: null };
            for (const line of block.split("\n")) {
              if (line.startsWith(":")) continue;
              const i = line.indexOf(":");
              const field = i < 0 ? line : line.slice(0, i);
              const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
              if (field === "event") ev.event = val;
              else if (field === "data") ev.data += (ev.data ? "\n" : "") + val;
              else if (field === "id") ev.id = val;
            }
            if (ev.id) lastId = ev.id;
            let data = ev.data;
            try { data = JSON.parse(ev.data); } catch (_) { /* text */ }
            if (onEvent(ev.event, data) === false) { stopped = true; ctl.abort(); }
          }
        }
      } catch (e) {
        if (stopped || ctl.signal.aborted) return;
      }
      setLive(false);
      if (!stopped) await new Promise((r) => setTimeout(r, 1000));
    }
  })();
  return () => { stopped = true; ctl.abort(); setLive(false); };
}

function setLive(on) {
  $("#live").className = on ? "live" : "live off";
}

// What the current page set up and must tear down when it is left.
let cleanup = [];
function onLeave(fn) { cleanup.push(fn); }

// ---------------------------------------------------------------- router

async function route() {
  for (const fn of cleanup) { try { fn(); } catch (_) { /* gone */ } }
  cleanup = [];
  const hash = location.hash.replace(/^#\/?/, "") || "runs";
  const [page, ...rest] = hash.split("?")[0].split("/");
  const id = rest.map(decodeURIComponent).join("/");
  const params = new URLSearchParams(hash.split("?")[1] || "");
  for (const a of document.querySelectorAll("[data-nav]")) a.classList.toggle("active", a.dataset.nav === page);
  const main = $("#main");
  try {
    const view = {
      runs: () => (id ? runPage(id) : runsPage(params)),
      "dead-letters": () => (id ? letterPage(id) : lettersPage()),
      workers: workersPage,
      definitions: () => definitionsPage(id, params),
      charts: chartsPage,
    }[page];
    if (!view) { main.replaceChildren(h("p", {}, `No page ${page}.`)); return; }
    main.replaceChildren(await view());
  } catch (e) {
    main.replaceChildren(h("p", { class: "error" }, e.message));
  }
}

// ---------------------------------------------------------------- runs

async function runsPage(params) {
  const filter = {
    status: params.get("status") || "",
    workflow: params.get("workflow") || "",
    correlation_id: params.get("correlation_id") || "",
    started_after: params.get("started_after") || "",
    started_before: params.get("started_before") || "",
  };
  const cursors = [null]; // the cursor of each page seen, for Previous
  let page = 0;
  const root = h("div", { id: "runs-page" });
  const counts = h("div", { class: "counts", id: "counts" });
  const tbody = h("tbody", { id: "runs-body" });
  const pager = h("div", { class: "pager" });
  const defs = await api.get("/v1/definitions").catch(() => ({ definitions: [] }));

  const setHash = (f) => {
    const q = new URLSearchParams(Object.entries(f).filter(([, v]) => v));
    location.hash = `#/runs${q.toString() ? "?" + q : ""}`;
  };
  const local = (v) => (v ? new Date(Number(v)).toISOString().slice(0, 16) : "");
  const form = h("form", { class: "filters", id: "run-filters", onsubmit: (e) => {
    e.preventDefault();
    const fd = new FormData(form);
    const ms = (k) => (fd.get(k) ? String(new Date(fd.get(k)).getTime()) : "");
    setHash({ status: fd.get("status"), workflow: fd.get("workflow"), correlation_id: fd.get("correlation_id").trim(), started_after: ms("started_after"), started_before: ms("started_before") });
  } },
    h("label", {}, "Status", h("select", { name: "status" }, h("option", { value: "" }, "any"), STATUSES.map((s) => h("option", { value: s, selected: s === filter.status }, s)))),
    h("label", {}, "Workflow", h("select", { name: "workflow" }, h("option", { value: "" }, "any"), defs.definitions.map((d) => h("option", { value: d.name, selected: d.name === filter.workflow }, d.name)))),
    h("label", {}, "Correlation id", h("input", { name: "correlation_id", value: filter.correlation_id, size: 36, placeholder: "uuid" })),
    h("label", {}, "Started after", h("input", { name: "started_after", type: "datetime-local", value: local(filter.started_after) })),
    h("label", {}, "Started before", h("input", { name: "started_before", type: "datetime-local", value: local(filter.started_before) })),
    h("button", { type: "submit", class: "primary" }, "Filter"),
    h("button", { type: "button", onclick: () => setHash({}) }, "Clear"));

  const query = (extra) => {
    const q = new URLSearchParams(Object.entries({ ...filter, ...extra }).filter(([, v]) => v));
    return q.toString();
  };

  const row = (r, fresh) => h("tr", { "data-id": r.id, class: fresh ? "new" : "" },
    h("td", {}, h("a", { href: `#/runs/${r.id}`, class: "mono", title: r.id }, short(r.id))),
    h("td", {}, r.workflow, h("small", { class: "muted" }, r.version ? ` v${r.version}` : "")),
    h("td", {}, badge(r.status)),
    h("td", { title: when(r.started_at) }, ago(r.started_at)),
    h("td", {}, TERMINAL.has(r.status) ? duration(r.updated_at - r.started_at) : ""));

  let known = new Set();
  async function load(fresh = false) {
    const data = await api.get(`/v1/runs?${query({ cursor: cursors[page] || "", limit: 50 })}`);
    const rows = data.runs.map((r) => row(r, fresh && !known.has(r.id)));
    known = new Set(data.runs.map((r) => r.id));
    tbody.replaceChildren(...rows);
    if (!rows.length) tbody.append(h("tr", {}, h("td", { colspan: 5, class: "muted" }, "No runs match.")));
    cursors[page + 1] = data.next;
    pager.replaceChildren(
      h("button", { disabled: page === 0, onclick: () => { page--; load(); } }, "← Newer"),
      h("span", { class: "muted" }, `page ${page + 1}`),
      h("button", { disabled: !data.next, id: "next-page", onclick: () => { page++; load(); } }, "Older →"));
  }
  async function loadCounts() {
    const c = await api.get(`/v1/runs/counts?${query({ status: "" })}`);
    counts.replaceChildren(
      h("button", { class: filter.status ? "" : "on", onclick: () => setHash({ ...filter, status: "" }) }, h("b", { "data-count": "total" }, c.total), "all"),
      ...STATUSES.map((s) => h("button", { class: filter.status === s ? "on" : "", onclick: () => setHash({ ...filter, status: s }) },
        h("b", { "data-count": s }, c.by_status[s] || 0), s.replace("_", " "))));
  }

  // Live: a status change reloads the first page (new runs appear) and the
  // counts, at most a few times a second; on later pages rows change in place.
  // The service reuses a count for a second or more (counting a big store
  // is slow), so the counts are asked for again once things go quiet.
  let pending = null;
  let trailing = null;
  const refresh = () => {
    clearTimeout(trailing);
    trailing = setTimeout(() => loadCounts().catch(() => {}), 1500);
    if (pending) return;
    pending = setTimeout(async () => {
      pending = null;
      try {
        if (page === 0) await load(true);
        await loadCounts();
      } catch (_) { /* the next event tries again */ }
    }, 250);
  };
  const stop = stream(`/v1/events${filter.workflow ? "?workflow=" + encodeURIComponent(filter.workflow) : ""}`, (event, data) => {
    if (event === "status" && data && data.update) {
      const tr = tbody.querySelector(`tr[data-id="${data.transaction_id}"]`);
      const status = data.update.status || (data.update.event === "started" ? "running" : null);
      if (tr && status && page > 0) tr.children[2].replaceChildren(badge(status));
      refresh();
    } else if (event === "reset" || event === "gap") {
      refresh();
    }
  });
  onLeave(stop);
  onLeave(() => { clearTimeout(pending); clearTimeout(trailing); });

  // The list first; the counts when they come (on a big store they take longer).
  await load();
  loadCounts().catch((e) => counts.replaceChildren(h("span", { class: "error" }, e.message)));
  root.append(h("h1", {}, "Runs"), form, counts,
    h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Run"), h("th", {}, "Workflow"), h("th", {}, "Status"), h("th", {}, "Started"), h("th", {}, "Took"))), tbody),
    pager);
  return root;
}

// ---------------------------------------------------------------- one run

const BAR_TITLE = { attempt: "attempt", wait: "wait", workflow: "sub-workflow", compensation: "compensation", skipped: "skipped" };

function gantt(t, { nested = false } = {}) {
  const t0 = t.started_at;
  const lanes = t.lanes;
  let t1 = t.finished_at || t.now;
  for (const l of lanes) for (const b of l.bars) t1 = Math.max(t1, b.end || t.now, b.until && !b.end ? Math.min(b.until, t.now) : 0);
  const span = Math.max(1, t1 - t0);
  const pos = (ms) => `${(((ms - t0) / span) * 100).toFixed(3)}%`;
  const width = (a, b) => `${Math.max(0.25, ((b - a) / span) * 100).toFixed(3)}%`;
  const root = h("div", { class: "gantt", "data-run": t.id });
  root.append(h("div", { class: "axis" }, h("span", {}, "0"), h("span", {}, duration(span / 2)), h("span", {}, duration(span))));
  for (const lane of lanes) {
    const isBranch = !!lane.branch_of;
    const track = h("div", { class: "track" });
    for (const b of lane.bars) {
      const end = b.end || t.now;
      const cls = `bar ${b.kind} ${b.outcome}`;
      const tip = [
        `${BAR_TITLE[b.kind] || b.kind} ${b.attempt ? "#" + b.attempt : ""} — ${b.outcome.replace("_", " ")}`,
        `${duration(end - b.start)} from +${duration(b.start - t0)}`,
        b.instance ? `worker process ${b.instance}` : "",
        b.picked_up_at ? `queued ${duration(b.picked_up_at - b.start)}, ran ${duration(b.finished_at - b.started_at)}` : "",
        b.error ? `error: ${b.error}` : "",
        b.until && !b.end ? `until ${when(b.until)}` : "",
        b.redispatched ? `republished ${b.redispatched}×` : "",
      ].filter(Boolean).join("\n");
      track.append(h("div", {
        class: cls, title: tip, style: `left:${pos(b.start)};width:${width(b.start, end)}`,
        "data-kind": b.kind, "data-outcome": b.outcome, "data-step": lane.step, "data-attempt": b.attempt,
        onclick: () => { const d = document.getElementById(`step-${lane.step}`); if (d) { d.open = true; d.scrollIntoView({ behavior: "smooth" }); } },
      }));
    }
    const child = lane.bars.find((b) => b.child);
    const name = h("div", { class: "name", title: lane.step },
      lane.step, " ", h("small", {}, lane.group ? `∥ ${lane.group}` : lane.kind !== "task" ? lane.kind : ""), " ",
      lane.status ? badge(lane.status) : "");
    const row = h("div", { class: `lane${isBranch ? " branch" : ""}`, "data-lane": lane.step }, name, track);
    root.append(row);
    if (child && !nested) {
      const holder = h("div", { class: "child", hidden: true });
      const toggle = h("a", { href: "#", "data-expand": lane.step, onclick: async (e) => {
        e.preventDefault();
        if (holder.hidden) {
          const ct = await api.get(`/v1/runs/${child.child}/timeline`);
          holder.replaceChildren(h("div", { class: "muted" }, `sub-workflow `, h("a", { href: `#/runs/${ct.id}` }, `${ct.workflow} ${short(ct.id)}`), " ", badge(ct.status)), gantt(ct, { nested: true }));
          holder.hidden = false;
          toggle.textContent = "▾";
        } else {
          holder.hidden = true;
          toggle.textContent = "▸";
        }
      } }, "▸");
      name.prepend(toggle, " ");
      root.append(holder);
    }
  }
  // Where it went wrong: compensations come after this line.
  for (const m of t.markers) {
    if (!/failed|cancel|deadline|undo/.test(m.what)) continue;
    const mk = h("div", { class: "marker", style: `left:calc(13rem + (100% - 14rem) * ${((m.at - t0) / span).toFixed(4)})`, "data-marker": m.what }, h("span", {}, m.what));
    root.append(mk);
  }
  return root;
}

function legend() {
  const item = (cls, text) => h("span", {}, h("i", { class: `bar ${cls}`, style: "position:static;display:inline-block" }), text);
  return h("div", { class: "legend" }, item("attempt completed", "succeeded"), item("attempt failed", "failed attempt"), item("attempt in_flight", "in flight"),
    item("wait", "waiting (sleep, signal)"), item("workflow", "sub-workflow"), item("compensation completed", "compensation"), item("skipped", "skipped"));
}

function stepDetails(t) {
  return t.lanes.map((lane) => {
    const life = lane.bars.filter((b) => b.kind === "attempt" || b.kind === "compensation");
    return h("details", { id: `step-${lane.step}`, class: "card", "data-step-details": lane.step },
      h("summary", {}, h("b", {}, lane.step), " ", lane.status ? badge(lane.status) : "", " ",
        h("span", { class: "muted" }, `${lane.kind}${lane.worker ? " · worker " + lane.worker : ""} · ${lane.attempts} attempt(s)`),
        lane.usage && lane.usage.total_tokens !== undefined ? h("span", { class: "muted", "data-usage": lane.step }, ` · ${lane.usage.total_tokens} tokens (${lane.usage.prompt_tokens} in, ${lane.usage.completion_tokens} out)${lane.usage.cost_usd !== undefined ? ` · $${lane.usage.cost_usd.toFixed(4)}` : ""}`) : ""),
      h("div", { class: "grid2" },
        h("div", {}, h("h2", {}, "Input"), h("pre", {}, json(lane.input))),
        h("div", {}, h("h2", {}, "Output"), h("pre", {}, lane.output === null ? "—" : json(lane.output)))),
      life.length ? h("table", {}, h("thead", {}, h("tr", {}, ["Attempt", "Phase", "Dispatched", "Picked up", "Processing", "Outcome", "Worker process", "Error"].map((x) => h("th", {}, x)))),
        h("tbody", {}, life.map((b) => h("tr", {},
          h("td", {}, b.attempt), h("td", {}, b.phase),
          h("td", {}, `+${duration(b.start - t.started_at)}`),
          h("td", {}, b.picked_up_at ? `+${duration(b.picked_up_at - b.start)}` : ""),
          h("td", {}, b.started_at ? duration(b.finished_at - b.started_at) : ""),
          h("td", {}, badge(b.outcome)),
          h("td", { class: "mono" }, b.instance || ""),
          h("td", { class: "error" }, b.error || ""))))) : "",
      lane.last_error ? h("p", { class: "error" }, `last error: ${lane.last_error.message}`) : "");
  });
}

// An RFC 7386 merge patch that turns `a` into `b`.
function mergePatch(a, b) {
  const obj = (x) => x !== null && typeof x === "object" && !Array.isArray(x);
  if (!obj(a) || !obj(b)) return JSON.stringify(a) === JSON.stringify(b) ? undefined : b;
  const patch = {};
  for (const k of Object.keys(a)) if (!(k in b)) patch[k] = null;
  for (const k of Object.keys(b)) {
    if (!(k in a)) patch[k] = b[k];
    else {
      const p = mergePatch(a[k], b[k]);
      if (p !== undefined) patch[k] = obj(a[k]) && obj(b[k]) ? p : b[k];
    }
  }
  return Object.keys(patch).length ? patch : undefined;
}

// The changed lines of two JSON values, as a list of `+`/`-` lines.
function diffLines(a, b) {
  const x = json(a).split("\n"), y = json(b).split("\n");
  const n = x.length, m = y.length;
  const L = Array.from({ length: n + 1 }, () => new Array(m + 1).fill(0));
  for (let i = n - 1; i >= 0; i--) for (let j = m - 1; j >= 0; j--) L[i][j] = x[i] === y[j] ? L[i + 1][j + 1] + 1 : Math.max(L[i + 1][j], L[i][j + 1]);
  const out = [];
  let i = 0, j = 0;
  while (i < n || j < m) {
    if (i < n && j < m && x[i] === y[j]) { out.push(["  ", x[i]]); i++; j++; }
    else if (j < m && (i === n || L[i][j + 1] >= L[i + 1][j])) { out.push(["+ ", y[j]]); j++; }
    else { out.push(["- ", x[i]]); i++; }
  }
  return out;
}

async function runPage(id) {
  const [run, first] = await Promise.all([api.get(`/v1/runs/${id}`), api.get(`/v1/runs/${id}/timeline`)]);
  let t = first;
  const root = h("div", { id: "run-page", "data-status": t.status });
  const head = h("div");
  const chart = h("div");
  const details = h("div");
  const forms = h("div");

  function render() {
    root.dataset.status = t.status;
    const failure = t.failure ? (t.failure.cause === "step_failed" ? `step ${t.failure.step} failed: ${t.failure.error.message}` : t.failure.reason || t.failure.cause) : "";
    head.replaceChildren(
      h("h1", {}, `${t.workflow} `, h("small", { class: "muted" }, `v${t.version}`), " ", badge(t.status)),
      h("p", { class: "muted" }, h("span", { class: "mono" }, t.id), ` · started ${when(t.started_at)}`,
        t.finished_at ? ` · took ${duration(t.finished_at - t.started_at)}` : "",
        t.parent ? h("span", {}, " · sub-workflow of ", h("a", { href: `#/runs/${t.parent}` }, short(t.parent))) : "",
        t.retry_of ? h("span", {}, " · retries ", h("a", { href: `#/runs/${t.retry_of}` }, short(t.retry_of))) : "",
        t.retried_as ? h("span", {}, " · retried as ", h("a", { href: `#/runs/${t.retried_as}`, id: "retried-as" }, short(t.retried_as))) : ""),
      failure ? h("p", { class: "error", id: "failure" }, failure) : "",
      h("div", { class: "actions" },
        TERMINAL.has(t.status) ? "" : action("Cancel", "operate", cancel, "danger"),
        signalNames().length && !TERMINAL.has(t.status) ? action("Signal", "operate", showSignal) : "",
        ["failed", "compensated", "cancelled", "timed_out"].includes(t.status) && !t.retried_as && !t.parent ? action("Retry", "operate", showRetry, "primary") : ""));
    chart.replaceChildren(legend(), gantt(t));
    details.replaceChildren(h("h2", {}, "Steps"), ...stepDetails(t));
  }

  function signalNames() {
    return [...new Set(t.lanes.filter((l) => l.signal).map((l) => l.signal))];
  }

  async function cancel() {
    const reason = prompt("Why cancel this run?", "cancelled from the dashboard");
    if (reason === null) return;
    try {
      await api.post(`/v1/runs/${t.id}/cancel`, { reason });
      toast("Cancellation asked for");
    } catch (e) { toast(e.message, true); }
  }

  function showSignal() {
    const waiting = t.lanes.find((l) => l.signal && l.bars.some((b) => b.kind === "wait" && b.outcome === "in_flight"));
    const names = signalNames();
    const ta = h("textarea", { name: "data", id: "signal-data" }, "{}");
    const err = h("p", { class: "error" });
    const form = h("form", { class: "card", id: "signal-form", onsubmit: async (e) => {
      e.preventDefault();
      let data;
      try { data = JSON.parse(ta.value || "null"); } catch (x) { err.textContent = `The data is not JSON: ${x.message}`; return; }
      try {
        await api.post(`/v1/runs/${t.id}/signals/${encodeURIComponent(form.elements.name.value)}`, data);
        toast(`Signal ${form.elements.name.value} sent`);
        forms.replaceChildren();
      } catch (x) { err.textContent = x.message; }
    } },
      h("h2", {}, "Send a signal"),
      h("label", {}, "Signal", h("select", { name: "name" }, names.map((n) => h("option", { value: n, selected: waiting && waiting.signal === n }, n)))),
      h("label", {}, "Data (JSON)", ta), err,
      h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Send"), h("button", { type: "button", onclick: () => forms.replaceChildren() }, "Close")));
    forms.replaceChildren(form);
  }

  function showRetry() {
    const failed = t.failure && t.failure.step;
    const ta = h("textarea", { id: "retry-input", rows: 12 }, json(run.input));
    const diff = h("pre", { class: "diff", id: "retry-diff" });
    const err = h("p", { class: "error" });
    const showDiff = () => {
      let edited;
      try { edited = JSON.parse(ta.value); err.textContent = ""; } catch (x) { err.textContent = `Not JSON yet: ${x.message}`; return; }
      const lines = diffLines(run.input, edited);
      diff.replaceChildren(...(lines.some(([k]) => k !== "  ") ? lines.map(([k, l]) => h("div", { class: k === "+ " ? "add" : k === "- " ? "del" : "" }, k + l)) : [h("span", { class: "muted" }, "no change to the input")]));
    };
    ta.addEventListener("input", showDiff);
    const form = h("form", { class: "card", id: "retry-form", onsubmit: async (e) => {
      e.preventDefault();
      let edited;
      try { edited = JSON.parse(ta.value); } catch (x) { err.textContent = `The input is not JSON: ${x.message}`; return; }
      const body = { from_step: form.elements.from_step.value || undefined };
      const patch = mergePatch(run.input, edited);
      if (patch !== undefined) body.input = patch;
      try {
        const r = await api.post(`/v1/runs/${t.id}/retry`, body);
        toast("Retried as a new run");
        location.hash = `#/runs/${r.id}`;
      } catch (x) { err.textContent = x.message; }
    } },
      h("h2", {}, "Retry"),
      h("p", { class: "muted" }, "A new run keeps the steps that finished and still stand, and runs the rest again from the step chosen."),
      h("label", {}, "From step", h("select", { name: "from_step" }, t.lanes.filter((l) => !l.branch_of).map((l) => h("option", { value: l.step, selected: l.step === failed }, l.step)))),
      h("div", { class: "grid2" }, h("label", {}, "Input (JSON)", ta), h("div", {}, h("label", {}, "Change"), diff)), err,
      h("div", { class: "actions" }, h("button", { type: "submit", class: "primary", id: "retry-submit" }, "Retry"), h("button", { type: "button", onclick: () => forms.replaceChildren() }, "Close")));
    forms.replaceChildren(form);
    showDiff();
  }

  render();
  // Live: every history entry redraws the timeline.
  let pending = null;
  const stop = stream(`/v1/runs/${id}/events`, (event) => {
    if (event === "history" || event === "end") {
      if (event === "end") setTimeout(() => setLive(false), 0);
      if (!pending) pending = setTimeout(async () => {
        pending = null;
        try { t = await api.get(`/v1/runs/${id}/timeline`); render(); } catch (_) { /* next time */ }
      }, 150);
    }
    // The run has finished: nothing more will come.
    return event !== "end";
  });
  onLeave(stop);
  onLeave(() => clearTimeout(pending));
  const history = h("details", { class: "card" }, h("summary", {}, "History"), h("pre", {}, run.history.map((e) => `+${duration(e.at - run.started_at)}  ${e.step || ""}  ${e.event.event}${e.attempt ? " #" + e.attempt : ""}${e.event.error ? ": " + e.event.error : ""}`).join("\n")));
  root.append(head, forms, chart, details, history);
  return root;
}

// ---------------------------------------------------------------- dead letters

async function lettersPage() {
  const data = await api.get("/v1/dead-letters?limit=200");
  const root = h("div", { id: "letters-page" });
  const result = h("p", { id: "bulk-result" });
  const bulk = h("form", { class: "filters card", id: "bulk-form", onsubmit: (e) => e.preventDefault() },
    h("label", {}, "Topic", h("input", { name: "topic" })),
    h("label", {}, "Workflow", h("input", { name: "workflow" })),
    h("label", {}, "Step", h("input", { name: "step" })),
    h("label", {}, "Reason contains", h("input", { name: "reason" })),
    action("Count", "operate", () => bulkRedrive(true)),
    action("Redrive all that match", "operate", () => bulkRedrive(false), "primary"),
    result);
  async function bulkRedrive(dry) {
    const fd = new FormData(bulk);
    const body = { dry_run: true };
    for (const k of ["topic", "workflow", "step", "reason"]) if (fd.get(k)) body[k] = fd.get(k);
    try {
      const count = await api.post("/v1/dead-letters/redrive", body);
      if (dry) { result.textContent = `${count.matched} match`; return; }
      if (!confirm(`Redrive ${count.matched} dead letter(s)?`)) return;
      const done = await api.post("/v1/dead-letters/redrive", { ...body, dry_run: false });
      toast(`${done.redriven ?? done.matched} redriven`);
      route();
    } catch (x) { result.textContent = x.message; }
  }
  const rows = data.dead_letters.map((d) => h("tr", { "data-letter": d.id },
    h("td", {}, h("a", { href: `#/dead-letters/${encodeURIComponent(d.id)}`, class: "mono" }, d.id)),
    h("td", {}, d.reason),
    h("td", {}, d.origin && d.origin.workflow ? `${d.origin.workflow} · ${d.origin.step || ""}` : d.topic),
    h("td", {}, d.origin && d.origin.transaction_id ? h("a", { href: `#/runs/${d.origin.transaction_id}`, class: "mono" }, short(d.origin.transaction_id)) : ""),
    h("td", {}, duration(d.age_ms)), h("td", {}, d.delivery_count)));
  const audit = await api.get("/v1/dead-letters/audit?limit=50").catch(() => ({ audit: [] }));
  root.append(h("h1", {}, "Dead letters"), bulk,
    h("table", {}, h("thead", {}, h("tr", {}, ["Id", "Reason", "Origin", "Run", "Age", "Deliveries"].map((x) => h("th", {}, x)))),
      h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: 6, class: "muted" }, "No dead letters.")))),
    h("h2", {}, "Settled (audit log)"),
    h("table", {}, h("thead", {}, h("tr", {}, ["Id", "Action", "By", "Why", "When"].map((x) => h("th", {}, x)))),
      h("tbody", {}, audit.audit.map((a) => h("tr", { "data-audit": a.id }, h("td", { class: "mono" }, a.id), h("td", {}, a.settlement.action), h("td", {}, a.settlement.by), h("td", {}, a.settlement.note || ""), h("td", {}, when(a.settlement.at)))))));
  return root;
}

async function letterPage(id) {
  const d = await api.get(`/v1/dead-letters/${encodeURIComponent(id)}`);
  let event = null;
  try { event = JSON.parse(d.body); } catch (_) { /* not JSON */ }
  const payload = event && "payload" in event ? event.payload : null;
  // What can be edited: the event's payload, else the whole body (as JSON
  // when it is JSON).
  const original = payload !== null ? json(payload) : event ? json(event) : d.body;
  const ta = h("textarea", { id: "letter-payload", rows: 10 }, original);
  const err = h("p", { class: "error" });
  const root = h("div", { id: "letter-page" },
    h("h1", {}, "Dead letter ", h("span", { class: "mono" }, d.id)),
    h("p", {}, h("b", {}, "Reason: "), d.reason),
    h("p", { class: "muted" }, `topic ${d.topic} · ${d.delivery_count} deliveries · ${duration(d.age_ms)} old`,
      d.origin && d.origin.transaction_id ? h("span", {}, " · run ", h("a", { href: `#/runs/${d.origin.transaction_id}` }, d.origin.transaction_id)) : ""),
    h("h2", {}, payload !== null ? "Payload (edit to redrive it changed)" : "Body (edit to redrive it changed)"), ta, err,
    h("div", { class: "actions" },
      action("Redrive", "operate", async () => {
        const body = {};
        if (ta.value !== original) {
          const field = payload !== null ? "payload" : event ? "body" : null;
          if (field) {
            try { body[field] = JSON.parse(ta.value); } catch (x) { err.textContent = `The ${field} is not JSON: ${x.message}`; return; }
          } else body.body = ta.value;
        }
        try {
          await api.post(`/v1/dead-letters/${encodeURIComponent(d.id)}/redrive`, body);
          toast("Redriven");
          location.hash = "#/dead-letters";
        } catch (x) { err.textContent = x.message; }
      }, "primary"),
      action("Discard", "admin", async () => {
        const reason = prompt("Why discard it? (kept in the audit log)", "");
        if (reason === null) return;
        try {
          await api.del(`/v1/dead-letters/${encodeURIComponent(d.id)}`, { reason });
          toast("Discarded");
          location.hash = "#/dead-letters";
        } catch (x) { err.textContent = x.message; }
      }, "danger")),
    h("h2", {}, "The whole event"), h("pre", {}, event ? json(event) : d.body));
  return root;
}

// ---------------------------------------------------------------- workers

async function workersPage() {
  const data = await api.get("/v1/workers");
  const pct = (p) => (p ? `${p.p50.toFixed(1)} / ${p.p95.toFixed(1)} / ${p.p99.toFixed(1)}` : "");
  const root = h("div", { id: "workers-page" }, h("h1", {}, "Workers"));
  if (!data.workers.length) root.append(h("p", { class: "muted" }, "No worker has reported yet."));
  for (const w of data.workers) {
    root.append(h("div", { class: "card", "data-worker": w.worker },
      h("h2", {}, w.worker, " ", badge(w.health)),
      h("p", { class: "muted" }, `${w.succeeded} succeeded · ${w.failed} failed · ${w.in_flight} in flight · ${w.calls_per_second.toFixed(2)} calls/s · failure rate ${(w.failure_rate * 100).toFixed(1)}% · p50/p95/p99 ${pct(w.duration_ms)} ms`,
        ` · lag ${Object.entries(w.lag || {}).map(([k, v]) => `${k}: ${v ?? "?"}`).join(", ")}`),
      h("table", {}, h("thead", {}, h("tr", {}, ["Process", "Health", "Calls/s", "Failure rate", "p50/p95/p99 ms", "In flight", "Last heartbeat"].map((x) => h("th", {}, x)))),
        h("tbody", {}, w.instances.map((i) => h("tr", {}, h("td", { class: "mono" }, i.heartbeat.instance), h("td", {}, badge(i.health)), h("td", {}, i.calls_per_second.toFixed(2)),
          h("td", {}, `${(i.failure_rate * 100).toFixed(1)}%`), h("td", {}, pct(i.duration_ms)), h("td", {}, i.heartbeat.in_flight), h("td", {}, ago(i.heartbeat.at)))))),
      w.errors.length ? h("div", {}, h("h2", {}, "Latest errors"), h("table", {}, h("tbody", {}, w.errors.map((e) => h("tr", {}, h("td", {}, e.kind), h("td", {}, e.count), h("td", { class: "error" }, e.last_message), h("td", {}, ago(e.last_at))))))) : ""));
  }
  const timer = setInterval(() => { if (location.hash.startsWith("#/workers")) route(); }, 5000);
  onLeave(() => clearInterval(timer));
  return root;
}

// ---------------------------------------------------------------- definitions

let mermaidReady = null;
function loadMermaid() {
  if (!mermaidReady) mermaidReady = new Promise((resolve, reject) => {
    const s = h("script", { src: "/ui/vendor/mermaid.min.js" });
    s.onload = () => { window.mermaid.initialize({ startOnLoad: false, securityLevel: "strict" }); resolve(window.mermaid); };
    s.onerror = () => reject(new Error("Mermaid did not load"));
    document.head.append(s);
  });
  return mermaidReady;
}

async function definitionsPage(name, params) {
  const data = await api.get("/v1/definitions");
  const root = h("div", { id: "definitions-page" }, h("h1", {}, "Definitions"));
  const list = h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", {}, "Versions"))),
    h("tbody", {}, data.definitions.map((d) => h("tr", {}, h("td", {}, h("a", { href: `#/definitions/${encodeURIComponent(d.name)}` }, d.name)),
      h("td", {}, d.versions.map((v) => h("a", { href: `#/definitions/${encodeURIComponent(d.name)}?version=${v}`, style: "margin-right:.5rem" }, `v${v}`)))))));
  root.append(list);
  if (name) {
    const version = params.get("version");
    const q = version ? `?version=${version}` : "";
    const [def, text] = await Promise.all([api.get(`/v1/definitions/${encodeURIComponent(name)}${q}`), api.get(`/v1/definitions/${encodeURIComponent(name)}/diagram${q}`)]);
    const box = h("div", { class: "card mermaid", id: "diagram" }, h("span", { class: "muted" }, "drawing…"));
    root.append(h("h2", {}, `${name} v${def.version}`), box, h("details", { class: "card" }, h("summary", {}, "Mermaid source"), h("pre", {}, text)), h("details", { class: "card" }, h("summary", {}, "Definition"), h("pre", {}, json(def))));
    loadMermaid().then(async (m) => {
      const { svg } = await m.render(`d${Date.now()}`, text);
      box.innerHTML = svg;
      box.dataset.rendered = "true";
    }).catch((e) => { box.replaceChildren(h("p", { class: "error" }, e.message)); });
  }
  return root;
}

// ---------------------------------------------------------------- charts

function lineChart(title, points, series, unit) {
  const W = 800, H = 200, P = 36;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H + 30}`);
  const xs = points.map((p) => p.at);
  // The last hour at most; for a process younger than that, from its first
  // sample (a minute at least), so that its points use the width.
  const now = Date.now();
  const x0 = Math.max(now - 3600e3, Math.min(...xs, now - 60e3)), x1 = Math.max(...xs, now);
  let max = 0;
  for (const p of points) for (const s of series) max = Math.max(max, s.get(p) || 0);
  max = max || 1;
  const X = (t) => P + ((t - x0) / Math.max(1, x1 - x0)) * (W - P - 10);
  const Y = (v) => 10 + H - (v / max) * (H - 10);
  const el = (tag, attrs) => { const e = document.createElementNS("http://www.w3.org/2000/svg", tag); for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v); return e; };
  svg.append(el("line", { x1: P, y1: Y(0), x2: W - 10, y2: Y(0), stroke: "#ccc" }));
  for (const f of [0, 0.5, 1]) {
    // Grid lines above the axis (drawn above), labels from 0.
    if (f > 0) svg.append(el("line", { x1: P, y1: Y(max * f), x2: W - 10, y2: Y(max * f), stroke: "#eee" }));
    const t = el("text", { x: 2, y: Y(max * f) + 4, "font-size": 10, fill: "#6b7280" }); t.textContent = `${+(max * f).toPrecision(3)}`; svg.append(t);
  }
  const lbl = (x, text, end) => { const t = el("text", { x, y: H + 26, "font-size": 10, fill: "#6b7280", "data-axis": end }); t.textContent = text; svg.append(t); };
  const span = Math.round((now - x0) / 60e3);
  lbl(P, span >= 60 ? "1 h ago" : `${span} min ago`, "from"); lbl(W - 40, "now", "to");
  series.forEach((s, i) => {
    const known = points.filter((p) => s.get(p) !== null && s.get(p) !== undefined);
    const pts = known.map((p) => `${X(p.at).toFixed(1)},${Y(s.get(p)).toFixed(1)}`);
    if (pts.length > 1) svg.append(el("polyline", { points: pts.join(" "), fill: "none", stroke: s.color, "stroke-width": 1.6 }));
    // The latest value as a dot, so that a chart of one sample (a process
    // just started) shows it too, and its value in the legend.
    const last = known[known.length - 1];
    if (last) {
      svg.append(el("circle", { cx: X(last.at).toFixed(1), cy: Y(s.get(last)).toFixed(1), r: 3, fill: s.color, "data-series": s.name }));
    }
    const t = el("text", { x: P + 10 + i * 120, y: 12, "font-size": 11, fill: s.color });
    t.textContent = last ? `${s.name} ${+s.get(last).toPrecision(3)}` : s.name;
    svg.append(t);
  });
  return h("div", { class: "chart", "data-chart": title }, h("h2", {}, `${title} `, h("small", { class: "muted" }, unit)), svg);
}

async function chartsPage() {
  const data = await api.get("/v1/stats");
  const root = h("div", { id: "charts-page" }, h("h1", {}, "The last hour"));
  if (!data.metrics) root.append(h("p", { class: "muted" }, "This process records no metrics, so there is nothing to chart."));
  root.append(h("p", { class: "muted" }, `One point per ${data.interval_ms / 1000} s, from this process's own metrics; ${data.points.length} point(s) so far.`));
  root.append(lineChart("Workflows", data.points, [
    { name: "started / s", color: "#2563eb", get: (p) => p.started_per_second },
    { name: "finished / s", color: "#16a34a", get: (p) => p.finished_per_second },
  ], "per second"));
  root.append(lineChart("Step latency", data.points, [
    { name: "p50", color: "#16a34a", get: (p) => p.step_ms.p50 },
    { name: "p95", color: "#ea580c", get: (p) => p.step_ms.p95 },
    { name: "p99", color: "#dc2626", get: (p) => p.step_ms.p99 },
  ], "ms, dispatch → outcome"));
  const timer = setInterval(() => { if (location.hash.startsWith("#/charts")) route(); }, data.interval_ms);
  onLeave(() => clearInterval(timer));
  return root;
}

// ---------------------------------------------------------------- start

window.addEventListener("hashchange", route);
(async () => {
  try {
    await whoAmI();
  } catch (e) {
    $("#main").replaceChildren(h("p", { class: "error" }, e.message));
    return;
  }
  route();
})();
