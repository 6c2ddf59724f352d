"""The dashboard's single self-contained page: inline CSS, inline JS, inline SVG charts.

It loads nothing from anywhere but its own ``stats.json`` (relative URL, so the app can be
mounted under any prefix); the server also sends a Content-Security-Policy that forbids any
other origin.  Kept as a Python string so it ships inside the package with no package data.

Test hooks: ``<body data-status data-refreshes data-points>``, each chart ``<svg
data-points>`` with one ``<path data-series=... data-n=...>`` per series, and the tiles'
``id="v-..."`` elements hold the latest values as text.
"""

from __future__ import annotations

import json

from pgwarden.core.catalog import CATALOG, Shape

__all__ = ["COUNTER_ROWS", "PAGE"]

#: The counter table's rows, from the catalog entries with a dashboard title: the title, the
#: path in ``stats()`` and whether the value is a ``{label: count}`` mapping.
COUNTER_ROWS: list[dict[str, object]] = [
    {
        "title": spec.dashboard,
        "path": list(spec.path),
        "keyed": spec.shape in (Shape.KEYS, Shape.PAIRS),
    }
    for spec in CATALOG
    if spec.dashboard is not None
]

_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>pgwarden dashboard</title>
<style>
:root {
  --bg: #0b1220; --panel: #121b2e; --edge: #1f2b44; --text: #e5ecf6; --muted: #8fa0bb;
  --grid: #1c2740; --blue: #4f9cf9; --green: #34d399; --amber: #fbbf24; --red: #f87171;
  --violet: #a78bfa; --cyan: #22d3ee; --pink: #f472b6;
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--text);
  font: 13px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
header { display: flex; align-items: center; gap: 12px; padding: 12px 20px;
  border-bottom: 1px solid var(--edge); background: #0e1627; flex-wrap: wrap; }
header h1 { font-size: 17px; margin: 0; letter-spacing: .3px; }
header h1 span { color: var(--blue); }
#v-name { color: var(--muted); font-family: ui-monospace, "DejaVu Sans Mono", monospace; }
.pill { padding: 2px 9px; border-radius: 999px; font-size: 12px; font-weight: 600;
  background: #1b263d; color: var(--muted); border: 1px solid var(--edge); }
.pill.ok { background: #0f2f26; color: var(--green); border-color: #175c47; }
.pill.warn { background: #36290c; color: var(--amber); border-color: #6b5113; }
.pill.bad { background: #3a1518; color: var(--red); border-color: #7a2a30; }
#status { margin-left: auto; color: var(--muted); font-size: 12px; }
#status::before { content: ""; display: inline-block; width: 8px; height: 8px;
  border-radius: 50%; background: var(--muted); margin-right: 6px; vertical-align: 0; }
body[data-status="live"] #status::before { background: var(--green);
  box-shadow: 0 0 6px var(--green); }
body[data-status="error"] #status::before { background: var(--red); }
main { padding: 16px 20px 24px; }
.tiles { display: grid; grid-template-columns: repeat(8, 1fr); gap: 10px; margin-bottom: 14px; }
.tile { background: var(--panel); border: 1px solid var(--edge); border-radius: 8px;
  padding: 9px 12px; min-width: 0; }
.tile .k { color: var(--muted); font-size: 11px; text-transform: uppercase;
  letter-spacing: .5px; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.tile .v { font-size: 21px; font-weight: 650; margin-top: 2px; white-space: nowrap;
  font-variant-numeric: tabular-nums; }
.tile .s { color: var(--muted); font-size: 11px; white-space: nowrap; overflow: hidden;
  text-overflow: ellipsis; }
.charts { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
.card { background: var(--panel); border: 1px solid var(--edge); border-radius: 8px;
  padding: 10px 12px 8px; min-width: 0; }
.card h2 { font-size: 13px; margin: 0 0 4px; font-weight: 600; }
.card h2 small { color: var(--muted); font-weight: 400; margin-left: 6px; }
svg.chart { width: 100%; height: 165px; display: block; }
svg.chart text { fill: var(--muted); font-size: 10px;
  font-family: ui-monospace, "DejaVu Sans Mono", monospace; }
svg.chart .gridline { stroke: var(--grid); stroke-width: 1; }
svg.chart path.series { fill: none; stroke-width: 1.8; stroke-linejoin: round; }
svg.chart path.area { stroke: none; opacity: .16; }
svg.chart .empty { font-size: 12px; }
.legend { display: flex; gap: 14px; flex-wrap: wrap; color: var(--muted); font-size: 12px;
  margin-top: 2px; }
.legend i { display: inline-block; width: 10px; height: 3px; border-radius: 2px;
  margin-right: 5px; vertical-align: middle; }
.legend b { color: var(--text); font-weight: 600; margin-left: 4px;
  font-variant-numeric: tabular-nums; }
.lower { display: grid; grid-template-columns: 3fr 2fr; gap: 12px; margin-top: 12px; }
table { width: 100%; border-collapse: collapse; font-size: 12px; }
th { text-align: left; color: var(--muted); font-weight: 500; padding: 3px 6px;
  border-bottom: 1px solid var(--edge); }
td { padding: 3px 6px; border-bottom: 1px solid #172238; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.msg { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 11px;
  word-break: break-word; }
.lvl { font-size: 10px; font-weight: 700; padding: 1px 5px; border-radius: 4px; }
.lvl.INFO { background: #13294a; color: var(--blue); }
.lvl.WARNING { background: #36290c; color: var(--amber); }
.lvl.ERROR, .lvl.CRITICAL { background: #3a1518; color: var(--red); }
.scroll { max-height: 260px; overflow: auto; }
.muted { color: var(--muted); }
footer { color: var(--muted); font-size: 11px; padding: 0 20px 14px; }
</style>
</head>
<body data-status="loading" data-refreshes="0" data-points="0">
<header>
  <h1><span>pg</span>warden</h1>
  <span id="v-name">&nbsp;</span>
  <span class="pill" id="v-state" title="lifecycle state">state ?</span>
  <span class="pill" id="v-breaker" title="circuit breaker">breaker ?</span>
  <span class="pill" id="v-pgbouncer" title="PgBouncer detected">pgbouncer ?</span>
  <span id="status">connecting&hellip;</span>
</header>
<main>
  <section class="tiles">
    <div class="tile"><div class="k">In use / max</div>
      <div class="v" id="v-in-use">&ndash;</div><div class="s" id="v-in-use-sub">&nbsp;</div></div>
    <div class="tile"><div class="k">Waiting</div>
      <div class="v" id="v-waiting">&ndash;</div><div class="s">callers queued</div></div>
    <div class="tile"><div class="k">Utilization</div>
      <div class="v" id="v-util">&ndash;</div><div class="s" id="v-limit">&nbsp;</div></div>
    <div class="tile"><div class="k">Queries / s</div>
      <div class="v" id="v-qps">&ndash;</div><div class="s" id="v-queries">&nbsp;</div></div>
    <div class="tile"><div class="k">Query p99</div>
      <div class="v" id="v-p99">&ndash;</div><div class="s" id="v-p50">&nbsp;</div></div>
    <div class="tile"><div class="k">Acquire wait p99</div>
      <div class="v" id="v-ap99">&ndash;</div><div class="s" id="v-ap50">&nbsp;</div></div>
    <div class="tile"><div class="k">Errors / s</div>
      <div class="v" id="v-eps">&ndash;</div><div class="s" id="v-errors">&nbsp;</div></div>
    <div class="tile"><div class="k">Retries / s</div>
      <div class="v" id="v-rps">&ndash;</div><div class="s" id="v-retries">&nbsp;</div></div>
  </section>
  <section class="charts">
    <div class="card"><h2>Pool connections<small>in use, idle, waiting, max</small></h2>
      <svg class="chart" id="chart-pool" data-points="0" viewBox="0 0 600 165"
        preserveAspectRatio="none"></svg><div class="legend" id="legend-pool"></div></div>
    <div class="card"><h2>Latency<small>percentiles over the last 10 s</small></h2>
      <svg class="chart" id="chart-latency" data-points="0" viewBox="0 0 600 165"
        preserveAspectRatio="none"></svg><div class="legend" id="legend-latency"></div></div>
    <div class="card"><h2>Throughput<small>successful operations per second</small></h2>
      <svg class="chart" id="chart-throughput" data-points="0" viewBox="0 0 600 165"
        preserveAspectRatio="none"></svg><div class="legend" id="legend-throughput"></div></div>
    <div class="card"><h2>Errors and retries<small>per second</small></h2>
      <svg class="chart" id="chart-errors" data-points="0" viewBox="0 0 600 165"
        preserveAspectRatio="none"></svg><div class="legend" id="legend-errors"></div></div>
  </section>
  <section class="lower">
    <div class="card"><h2>Recent events<small id="v-event-count">none yet</small></h2>
      <div class="scroll"><table><thead><tr><th>time</th><th>level</th><th>event</th>
      <th>message</th></tr></thead><tbody id="events-body"></tbody></table></div></div>
    <div class="card"><h2>Counters<small>since start</small></h2>
      <div class="scroll"><table><tbody id="counters-body"></tbody></table></div></div>
  </section>
</main>
<footer id="footer">pgwarden dashboard &middot; refreshes every second from
  <code>stats.json</code></footer>
<script>
"use strict";
const HISTORY = 300;      // points kept per series (5 minutes at one per second)
const WINDOW = 10;        // seconds of bucket deltas behind the latency percentiles
const MAX_EVENTS = 100;
const COUNTER_ROWS = __COUNTER_ROWS__;
const S = { points: [], snaps: [], events: [], lastSeq: 0, refreshes: 0, prev: null };
const $ = (id) => document.getElementById(id);

function num(v) { const n = Number(v); return Number.isFinite(n) ? n : 0; }
function total(o) {
  let t = 0;
  if (o && typeof o === "object") { for (const k in o) t += num(o[k]); }
  return t;
}
function fmtDur(s) {
  if (s === null || s === undefined || !Number.isFinite(s)) return "\\u2013";
  if (s === 0) return "0";
  const ms = s * 1000;
  if (ms < 1) return String(Number(ms.toPrecision(2))) + " ms";
  if (ms < 10) return ms.toFixed(2) + " ms";
  if (ms < 1000) return ms.toFixed(1) + " ms";
  return s.toFixed(2) + " s";
}
// A percentile read from buckets is only known to lie inside its bucket; one that falls
// in the first bucket is shown as "< bound" rather than as an interpolated guess.
function fmtQ(s) {
  if (S.firstBound && s !== null && s !== undefined && s > 0 && s <= S.firstBound) {
    return "< " + fmtDur(S.firstBound);
  }
  return fmtDur(s);
}
function fmtRate(r) {
  if (r === null || !Number.isFinite(r)) return "\\u2013";
  return r >= 100 ? r.toFixed(0) : r >= 10 ? r.toFixed(1) : r.toFixed(2);
}
function fmtInt(n) { return Math.round(num(n)).toLocaleString("en-US"); }

// Prometheus-style quantile over cumulative [le, count] pairs (linear inside a bucket).
function quantile(q, buckets) {
  if (!buckets || !buckets.length) return null;
  const all = buckets[buckets.length - 1][1];
  if (!(all > 0)) return null;
  const rank = q * all;
  let prevLe = 0, prevC = 0;
  for (const [leRaw, c] of buckets) {
    const le = leRaw === "+Inf" ? Infinity : Number(leRaw);
    if (c >= rank) {
      if (le === Infinity) return prevLe;
      if (c === prevC) return le;
      return prevLe + (le - prevLe) * (rank - prevC) / (c - prevC);
    }
    prevLe = le; prevC = c;
  }
  return prevLe;
}
function windowed(key, q, stats) {
  const now = S.snaps[S.snaps.length - 1];
  if (!now || !now.buckets || !now.buckets[key]) {
    const h = (stats.histograms || {})[key];       // no buckets: cumulative percentiles
    return h && h.count ? num(h["p" + Math.round(q * 100)]) : null;
  }
  let base = null;
  for (const s of S.snaps) {
    if (s.ts >= now.ts - WINDOW - 0.5 && s !== now && s.buckets && s.buckets[key]) {
      base = s; break;
    }
  }
  const cur = now.buckets[key];
  const delta = cur.map(([le, c], i) => [le, c - (base ? base.buckets[key][i][1] : 0)]);
  return quantile(q, delta);
}

// Fold one sample into the history.  A point is added only when at least 0.9 s passed
// since the previous one, so fast or repeated polls cannot make the rates noisy.
function record(payload) {
  const st = payload.stats || {};
  const ts = num(payload.ts || st.ts) || Date.now() / 1000;
  const lastP = S.points[S.points.length - 1];
  if (lastP && ts - lastP.ts < 0.9) return st;
  const c = st.counters || {};
  const pool = st.pool || {};
  S.snaps.push({ ts: ts, buckets: st.buckets || null });
  if (st.buckets && !S.firstBound) {
    for (const key in st.buckets) {
      const b = st.buckets[key];
      if (Array.isArray(b) && b.length) { S.firstBound = Number(b[0][0]); break; }
    }
  }
  while (S.snaps.length && S.snaps[0].ts < ts - WINDOW - 5) S.snaps.shift();
  const cur = {
    queries: num(c.queries), errors: total(c.errors),
    retries: total((c.retries || {}).by_reason), overloads: num(c.overload_events),
  };
  const p = { ts: ts, in_use: num(pool.in_use), idle: num(pool.idle),
    waiting: num(pool.waiting), max: num(pool.max_size), qps: null, eps: null, rps: null,
    ops: null };
  const prev = S.prev;
  if (prev && ts > prev.ts && ts - prev.ts < 30) {
    const dt = ts - prev.ts;
    p.qps = Math.max(0, (cur.queries - prev.queries) / dt);
    p.eps = Math.max(0, (cur.errors - prev.errors) / dt);
    p.rps = Math.max(0, (cur.retries - prev.retries) / dt);
    p.ops = Math.max(0, (cur.overloads - prev.overloads) / dt);
  }
  S.prev = Object.assign({ ts: ts }, cur);
  for (const [k, h] of [["q", "query_duration_seconds"], ["a", "acquire_wait_seconds"]]) {
    p[k + "50"] = windowed(h, 0.5, st);
    p[k + "95"] = windowed(h, 0.95, st);
    p[k + "99"] = windowed(h, 0.99, st);
  }
  S.points.push(p);
  while (S.points.length && S.points[0].ts < ts - HISTORY) S.points.shift();
  return st;
}

function esc(text) {
  return String(text).replace(/[&<>"']/g, (ch) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;",
    '"': "&quot;", "'": "&#39;" })[ch]);
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) {
    if (v <= m * p + 1e-12) return m * p;
  }
  return 10 * p;
}

// One chart: an SVG path per series, x by sample time (the newest at the right edge),
// spanning the history held, at least 60 s and at most HISTORY seconds.
function chart(id, series, fmt, minMax, legendFmt) {
  const svg = $(id);
  const W = 600, H = 165, L = 58, R = 8, T = 8, B = 20;
  const pts = S.points;
  let top = minMax || 0;
  for (const s of series) {
    for (const p of pts) { const v = p[s.key]; if (v !== null && v > top) top = v; }
  }
  top = niceMax(top * 1.05);
  const newest = pts.length ? pts[pts.length - 1].ts : 0;
  const oldest = pts.length ? pts[0].ts : 0;
  const span = Math.min(HISTORY, Math.max(60, Math.ceil((newest - oldest) / 30) * 30));
  const x = (p) => L + (1 - (newest - p.ts) / span) * (W - L - R);
  const y = (v) => T + (1 - v / top) * (H - T - B);
  let out = "";
  for (let g = 0; g <= 4; g++) {
    const v = (top * g) / 4, yy = y(v).toFixed(1);
    out += '<line class="gridline" x1="' + L + '" x2="' + (W - R) + '" y1="' + yy +
      '" y2="' + yy + '"/><text x="' + (L - 6) + '" y="' + (Number(yy) + 3) +
      '" text-anchor="end">' + esc(fmt(v)) + "</text>";
  }
  for (const [frac, label] of [[0, "-" + span + "s"], [0.5, "-" + span / 2 + "s"],
                               [1, "now"]]) {
    out += '<text x="' + (L + frac * (W - L - R)) + '" y="' + (H - 5) + '" text-anchor="' +
      (frac === 0 ? "start" : frac === 1 ? "end" : "middle") + '">' + label + "</text>";
  }
  for (const s of series) {
    let d = "", n = 0, pen = false, first = null, last = null;
    for (const p of pts) {
      const v = p[s.key];
      if (v === null || v === undefined || !Number.isFinite(v)) { pen = false; continue; }
      const px = x(p).toFixed(1), py = y(v).toFixed(1);
      d += (pen ? "L" : "M") + px + " " + py + " ";
      if (first === null) first = px;
      last = px; pen = true; n++;
    }
    if (s.area && n > 1) {
      out += '<path class="area" fill="' + s.color + '" d="' + d + "L" + last + " " +
        y(0).toFixed(1) + " L" + first + " " + y(0).toFixed(1) + ' Z"/>';
    }
    out += '<path class="series" data-series="' + s.key + '" data-n="' + n +
      '" stroke="' + s.color + '"' + (s.dash ? ' stroke-dasharray="4 3"' : "") +
      ' d="' + d.trim() + '"/>';
  }
  if (!pts.length) {
    out += '<text class="empty" x="' + W / 2 + '" y="' + H / 2 +
      '" text-anchor="middle">waiting for data</text>';
  }
  svg.innerHTML = out;
  svg.setAttribute("data-points", String(pts.length));
  const lastP = pts[pts.length - 1] || {};
  $(id.replace("chart-", "legend-")).innerHTML = series.map((s) =>
    '<span><i style="background:' + s.color + '"></i>' + esc(s.label) + "<b>" +
    esc((legendFmt || fmt)(lastP[s.key] === undefined ? null : lastP[s.key])) +
    "</b></span>").join("");
}

function pill(id, text, cls) {
  const el = $(id);
  el.textContent = text;
  el.className = "pill " + cls;
}

// The counter table: one row per catalog entry (COUNTER_ROWS, generated from
// pgwarden.core.catalog), one per key for labelled counters.
function counters(st) {
  const rows = [];
  for (const row of COUNTER_ROWS) {
    let v = st;
    for (const k of row.path) v = v && typeof v === "object" ? v[k] : undefined;
    if (!row.keyed) { rows.push([row.title, v]); continue; }
    for (const [k, n] of Object.entries(v || {})) rows.push([row.title + ": " + k, n]);
  }
  $("counters-body").innerHTML = rows.filter((row) => row[1] !== undefined)
    .map(([k, v]) => "<tr><td>" + esc(k) + '</td><td class="num">' + fmtInt(v) + "</td></tr>")
    .join("");
}

function events(list) {
  if (!Array.isArray(list)) return;
  const maxSeq = list.reduce((m, e) => Math.max(m, num(e.seq)), 0);
  if (maxSeq && maxSeq < S.lastSeq) { S.events = []; S.lastSeq = 0; }   // source restarted
  for (const e of list) {
    if (num(e.seq) > S.lastSeq) { S.events.push(e); S.lastSeq = num(e.seq); }
  }
  while (S.events.length > MAX_EVENTS) S.events.shift();
  $("events-body").innerHTML = S.events.slice().reverse().map((e) => {
    const t = String(e.ts || "").replace(/^.*T/, "").replace(/Z$/, "");
    const lvl = esc(e.level || "");
    return '<tr class="ev"><td class="muted">' + esc(t) + '</td><td><span class="lvl ' + lvl +
      '">' + lvl + "</span></td><td>" + esc(e.event || "") + '</td><td class="msg">' +
      esc(e.message || "") + "</td></tr>";
  }).join("");
  $("v-event-count").textContent = S.events.length ? S.events.length + " shown" : "none yet";
}

function render(payload) {
  if (Array.isArray(payload.history)) {
    for (const h of payload.history) record(h);
  }
  const st = record(payload);
  const pool = st.pool || {};
  const last = S.points[S.points.length - 1] || {};
  $("v-name").textContent = payload.name || st.name || "";
  const state = String(st.state || "unknown");
  pill("v-state", state, state === "ready" ? "ok" :
    (state === "degraded" || state === "warming" || state === "new") ? "warn" : "bad");
  const br = String(st.breaker || "unknown");
  pill("v-breaker", "breaker " + br, br === "closed" ? "ok" : br === "half_open" ? "warn" : "bad");
  pill("v-pgbouncer", st.pgbouncer ? "via PgBouncer" : "direct", "");
  $("v-in-use").textContent = fmtInt(pool.in_use) + " / " + fmtInt(pool.max_size);
  $("v-in-use-sub").textContent = fmtInt(pool.idle) + " idle, " + fmtInt(pool.size) + " open";
  $("v-waiting").textContent = fmtInt(pool.waiting);
  $("v-util").textContent = (num(pool.utilization) * 100).toFixed(0) + "%";
  $("v-limit").textContent = "limit " + fmtInt(pool.limit === undefined ? pool.max_size :
    pool.limit) + " of " + fmtInt(pool.configured_max === undefined ? pool.max_size :
    pool.configured_max);
  const c = st.counters || {};
  $("v-qps").textContent = fmtRate(last.qps);
  $("v-queries").textContent = fmtInt(c.queries) + " total";
  $("v-p99").textContent = fmtQ(last.q99);
  $("v-p50").textContent = "p50 " + fmtQ(last.q50) + ", p95 " + fmtQ(last.q95);
  $("v-ap99").textContent = fmtQ(last.a99);
  $("v-ap50").textContent = "p50 " + fmtQ(last.a50);
  $("v-eps").textContent = fmtRate(last.eps);
  $("v-errors").textContent = fmtInt(total(c.errors)) + " total";
  $("v-rps").textContent = fmtRate(last.rps);
  $("v-retries").textContent = fmtInt(total((c.retries || {}).by_reason)) + " total";
  const cnt = (v) => fmtInt(v);
  chart("chart-pool", [
    { key: "in_use", label: "in use", color: "var(--blue)", area: true },
    { key: "idle", label: "idle", color: "var(--green)" },
    { key: "waiting", label: "waiting", color: "var(--red)" },
    { key: "max", label: "max", color: "var(--muted)", dash: true },
  ], cnt, 1);
  chart("chart-latency", [
    { key: "q50", label: "query p50", color: "var(--green)" },
    { key: "q95", label: "query p95", color: "var(--amber)" },
    { key: "q99", label: "query p99", color: "var(--red)" },
    { key: "a99", label: "acquire p99", color: "var(--violet)", dash: true },
  ], fmtDur, 0.001, fmtQ);
  chart("chart-throughput", [
    { key: "qps", label: "queries/s", color: "var(--cyan)", area: true },
  ], fmtRate, 1);
  chart("chart-errors", [
    { key: "eps", label: "errors/s", color: "var(--red)", area: true },
    { key: "rps", label: "retries/s", color: "var(--amber)" },
    { key: "ops", label: "overloads/s", color: "var(--pink)", dash: true },
  ], fmtRate, 1);
  counters(st);
  events(payload.events);
  document.body.setAttribute("data-points", String(S.points.length));
}

async function refresh() {
  try {
    const res = await fetch(S.refreshes ? "stats.json" : "stats.json?history=1",
      { cache: "no-store" });
    if (!res.ok) throw new Error("HTTP " + res.status);
    const payload = await res.json();
    if (payload.error) throw new Error(payload.error);
    render(payload);
    S.refreshes++;
    document.body.setAttribute("data-refreshes", String(S.refreshes));
    document.body.setAttribute("data-status", "live");
    $("status").textContent = "live \\u00b7 updated " + new Date().toLocaleTimeString("en-GB");
  } catch (err) {
    document.body.setAttribute("data-status", "error");
    $("status").textContent = "stats unavailable: " + String(err.message || err);
  }
  setTimeout(refresh, 1000);
}
refresh();
</script>
</body>
</html>
"""

PAGE = _TEMPLATE.replace("__COUNTER_ROWS__", json.dumps(COUNTER_ROWS, separators=(",", ":")))
