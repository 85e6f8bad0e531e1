"""The status page: one self-contained HTML document (inline CSS and JS, no external assets) and
no data in it. Its script fetches `GET /v1/status` every few seconds and re-renders, and
`GET /v1/status/series` once per sample for the plots of the last hour.

- Everything shown is built with createElement and text nodes (`append(string)`, `textContent`):
  job names, errors and instance ids come from users and clouds, and never reach innerHTML.
  Their control characters (C0, DEL, C1, and the bidi overrides that make text read backwards)
  are shown as escapes (`\\x1b`, `\\u202e`), as cloudtaskctl shows them.
- The plots are inline SVG drawn by the page's own script (about a hundred lines, below): no
  charting library, no CDN, nothing fetched but the two JSON documents. Colours read on a light and
  a dark background alike; text takes the page's colour.
- A job shows what happened to it: succeeded, failed (some tasks dead), cancelled, or while it
  runs running / waiting / paused / cancelling, with its succeeded, dead and cancelled counts.
- On the TCP listener every /v1/* fetch needs the bearer token: the page takes it from the URL
  fragment (`/status#token=...`; fragments never reach a server or its logs), keeps it in
  sessionStorage, removes it from the address bar, and sends it as `Authorization: Bearer`.
  Without one (or on a 401) it says how to open it. Over the unix socket no token is needed.
  `cloudtaskctl status-page` serves the page on 127.0.0.1 with a token of its own in the same way.
- The Content-Security-Policy allows exactly this script and this style (by hash) and fetches
  to the page's own origin: an injected script would not run.
"""

from __future__ import annotations

import base64
import hashlib

POLL_MS = 3000

_STYLE = """
:root { color-scheme: light dark; --ok: #2e7d32; --bad: #c62828; --warn: #ef6c00; --run: #1565c0;
        --mute: #888; --grid: rgba(128, 128, 128, 0.3); }
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 84em; padding: 0 1em; }
header { display: flex; gap: 1em; align-items: baseline; flex-wrap: wrap; }
h1 { font-size: 1.4em; margin: 0; }
h2 { font-size: 1.1em; margin: 1.6em 0 0.4em; }
h3 { font-size: 0.95em; margin: 0 0 0.2em; font-weight: 600; }
.mute { color: var(--mute); }
#problem { display: none; padding: 0.8em 1em; border: 2px solid var(--bad); border-radius: 6px; margin: 1em 0;
           font-weight: 600; }
#problem.shown { display: block; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 0.3em 0.6em; border-bottom: 1px solid var(--grid); vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.name { max-width: 20em; overflow-wrap: anywhere; }
td.detail { max-width: 40em; overflow-wrap: anywhere; font-family: ui-monospace, monospace; font-size: 0.9em; }
td.bad { color: var(--bad); font-weight: 600; }
.bar { position: relative; width: 10em; height: 0.9em; background: var(--grid); border-radius: 3px;
       overflow: hidden; display: inline-block; vertical-align: middle; }
.bar > span { position: absolute; top: 0; bottom: 0; left: 0; }
.bar > .ok { background: var(--ok); }
.bar > .dead { background: var(--bad); }
.bar > .cancelled { background: var(--mute); }
.progress-text { display: block; font-variant-numeric: tabular-nums; font-size: 0.92em; }
.badge { display: inline-block; padding: 0.05em 0.55em; border-radius: 1em; font-size: 0.85em; font-weight: 600;
         color: #fff; background: var(--mute); white-space: nowrap; }
.badge.is-succeeded { background: var(--ok); }
.badge.is-failed { background: var(--bad); }
.badge.is-cancelled, .badge.is-cancelling { background: #6d6d6d; }
.badge.is-running, .badge.is-open { background: var(--run); }
.badge.is-paused { background: var(--warn); }
.reason { display: block; font-size: 0.85em; color: var(--mute); max-width: 16em; overflow-wrap: anywhere; }
.waiting { display: block; font-size: 0.85em; white-space: normal; }
.cost { display: flex; gap: 2em; flex-wrap: wrap; }
.cost div strong { font-size: 1.3em; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(34em, 1fr)); gap: 1em 1.5em; }
.chart svg { width: 100%; height: auto; display: block; overflow: visible; }
.chart svg text { fill: currentColor; font-size: 11px; font-family: system-ui, sans-serif; }
.chart .axis { stroke: var(--mute); stroke-width: 1; }
.chart .grid { stroke: var(--grid); stroke-width: 1; }
.chart .line { fill: none; stroke-width: 2; stroke-linejoin: round; stroke-linecap: round; }
.legend { display: flex; flex-wrap: wrap; gap: 0.2em 1em; font-size: 0.88em; margin-top: 0.2em; }
.legend .swatch { display: inline-block; width: 0.9em; height: 0.25em; border-radius: 2px; vertical-align: middle;
                  margin-right: 0.35em; }
.legend .value { font-variant-numeric: tabular-nums; font-weight: 600; }
"""

_SCRIPT = """
"use strict";
(() => {
  const TOKEN_KEY = "cloudtask.status.token";
  const POLL_MS = __POLL_MS__;
  const SVG = "http://www.w3.org/2000/svg";
  let token = takeToken();
  let timer = null;
  let seriesDueAt = 0;  // when the daemon will have taken its next sample

  // The token arrives in the fragment (never sent to a server); keep it for this tab only and
  // take it out of the address bar, the history and anything a screenshot shows.
  function takeToken() {
    const params = new URLSearchParams(location.hash.replace(/^#/, ""));
    if (params.has("token")) {
      sessionStorage.setItem(TOKEN_KEY, params.get("token"));
      history.replaceState(null, "", location.pathname + location.search);
    }
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }

  // As cloudtaskctl's printable(): a name or error must not reorder, hide or overwrite text.
  const CONTROLS = /[\\x00-\\x1f\\x7f-\\x9f\\u061c\\u200e\\u200f\\u2028\\u2029\\u202a-\\u202e\\u2066-\\u2069]/g;
  const visible = (text) => String(text).replace(CONTROLS, (ch) => {
    const code = ch.charCodeAt(0);
    return code < 0x100 ? "\\\\x" + code.toString(16).padStart(2, "0") : "\\\\u" + code.toString(16).padStart(4, "0");
  });

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key === "class") node.className = value;
      else if (key.startsWith("data-")) node.setAttribute(key, String(value));
      else node[key] = key === "title" ? visible(value) : value;
    }
    node.append(...children.map((c) => (c instanceof Node ? c : visible(c ?? "-"))));
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    if (text !== undefined) node.textContent = visible(text);
    return node;
  }

  function table(headers, rows, emptyText) {
    if (!rows.length) return el("p", {class: "mute"}, emptyText);
    const head = el("tr", {}, ...headers.map(([text, cls]) => el("th", {class: cls || ""}, text)));
    return el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows));
  }

  const usd = (n) => "$" + Number(n || 0).toFixed(4);
  const when = (ts) => (ts ? new Date(ts * 1000).toLocaleString() : "-");

  // ---- plots: inline SVG, drawn here ----

  // Colours that read on white and on near-black; the known lines keep theirs.
  const PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948", "#9c755f"];
  const FIXED = {succeeded: "#43a047", dead: "#e53935", queued: "#f28e2b", leased: "#4e79a7"};
  const W = 520, H = 190, L = 56, R = 12, T = 16, B = 26;

  // A round step for about `n` intervals up to max (1, 2, 2.5 or 5 times a power of ten).
  function niceStep(max, n, whole) {
    const raw = max / n, pow = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * pow).find((s) => s >= raw);
    return whole ? Math.max(1, Math.ceil(step)) : step;  // no quarter of an instance
  }

  // Time ticks: the smallest round step that gives at most six intervals.
  const TIME_STEPS = [5, 10, 15, 20, 30, 60, 120, 300, 600, 900, 1200, 1800, 3600, 7200];

  function number(v) {
    if (v === 0) return "0";
    const a = Math.abs(v);
    return a >= 1000 ? (v / 1000).toFixed(a >= 10000 ? 0 : 1).replace(/\\.0$/, "") + "k"
      : a >= 100 ? v.toFixed(0) : a >= 10 ? v.toFixed(1).replace(/\\.0$/, "") : String(+v.toPrecision(2));
  }

  const span = (s) => (s >= 3600 && s % 3600 === 0 ? s / 3600 + " h" : s >= 60 ? +(s / 60).toFixed(1) + " min"
                                                                       : +s.toFixed(1) + " s");

  function chart(id, title, unit, format, whole, t, lines, now, windowS) {
    const names = Object.keys(lines);
    let max = 0;
    for (const name of names) for (const v of lines[name]) if (v !== null && v > max) max = v;
    const step = max > 0 ? niceStep(max, 4, whole) : (whole ? 1 : 0.25);
    const top = max > 0 ? Math.ceil(max / step) * step : step * 4;
    const x = (ts) => L + ((ts - (now - windowS)) / windowS) * (W - L - R);
    const y = (v) => T + (1 - v / top) * (H - T - B);
    const root = svg("svg", {viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title + ", last " + span(windowS),
                             "data-chart": id, "data-points": t.length});
    root.append(svg("title", {}, title + " over the last " + span(windowS) + " (" + unit + ")"));
    for (let v = 0; v <= top + step / 2; v += step) {
      root.append(svg("line", {class: "grid", x1: L, x2: W - R, y1: y(v), y2: y(v)}));
      root.append(svg("text", {x: L - 6, y: y(v) + 4, "text-anchor": "end"}, format(v)));
    }
    const tick = TIME_STEPS.find((s) => windowS / s <= 6) || windowS / 6;
    for (let ago = Math.floor(windowS / tick) * tick; ago >= 0; ago -= tick) {
      const xs = x(now - ago);
      root.append(svg("line", {class: "axis", x1: xs, x2: xs, y1: H - B, y2: H - B + 4}));
      root.append(svg("text", {x: xs, y: H - 8, "text-anchor": ago === 0 ? "end" : "middle"},
                      ago === 0 ? "now" : "\\u2212" + (tick < 60 ? ago + " s" : ago / 60 + " min")));
    }
    root.append(svg("line", {class: "axis", x1: L, x2: L, y1: T - 4, y2: H - B}));
    root.append(svg("line", {class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B}));
    root.append(svg("text", {x: 4, y: 10}, unit));
    const legend = el("div", {class: "legend"});
    names.forEach((name, i) => {
      const colour = FIXED[name] || PALETTE[i % PALETTE.length];
      const values = lines[name];
      let d = "", pen = "M", drawn = 0, last = null;
      values.forEach((v, k) => {
        if (v === null || v === undefined) { pen = "M"; return; }
        d += pen + x(t[k]).toFixed(1) + "," + y(v).toFixed(1) + " ";
        pen = "L";
        drawn += 1;
        last = v;
      });
      root.append(svg("path", {class: "line", d: d.trim() || "M0,0", stroke: colour, "data-series": name,
                               "data-values": drawn}));
      if (last !== null) {
        const k = values.lastIndexOf(last);
        root.append(svg("circle", {cx: x(t[k]), cy: y(last), r: 2.5, fill: colour}));
      }
      const swatch = el("span", {class: "swatch"});
      swatch.style.background = colour;
      legend.append(el("span", {"data-series": name}, swatch, name + " ",
                       el("span", {class: "value"}, last === null ? "-" : format(last))));
    });
    if (!names.length) legend.append(el("span", {class: "mute"}, "none in the last hour"));
    return el("div", {class: "chart", "data-chart": id}, el("h3", {}, title), root, legend);
  }

  function renderSeries(s) {
    const box = document.getElementById("charts");
    if (!s.t.length) {
      box.replaceChildren(el("p", {class: "mute"}, "no samples yet: the daemon takes one every " + s.interval_s +
                                                   " s, from its start"));
      return;
    }
    const now = s.now, w = s.window_s;
    document.getElementById("charts-title").textContent = w === 3600 ? "Last hour" : "Last " + span(w);
    box.replaceChildren(
      chart("finished", "Tasks finished per second", "tasks/s", number, false, s.t, s.finished_per_s, now, w),
      chart("tasks", "Tasks queued and leased", "tasks", number, true, s.t, s.tasks, now, w),
      chart("instances", "Instances by provider and market", "instances", number, true, s.t, s.instances, now, w),
      chart("cost", "Cost per hour", "USD/h", (v) => "$" + (v >= 10 ? v.toFixed(0) : v.toFixed(2)), false, s.t,
            s.cost_per_hour, now, w));
    document.getElementById("charts-note").textContent =
      s.t.length + " samples, one every " + s.interval_s + " s (kept in the daemon's memory since it started)";
  }

  // ---- jobs ----

  // What a person should read: what happened, once it is over; else what it is doing.
  function jobState(job) {
    if (job.outcome) return job.outcome;  // succeeded, failed (some dead), cancelled
    if (job.state === "cancelled") return "cancelling";  // its last leases are ending
    if (job.state === "paused") return "paused";
    if (job.counts.leased) return "running";
    // A standing queue with nothing to do is not stuck: it waits for `cloudtaskctl enqueue`.
    if (job.open && !job.counts.queued && !job.counts.failed && !job.counts.staged) return "open";
    return "waiting";
  }

  function jobRow(job) {
    const c = job.counts;
    const state = jobState(job);
    const pct = (n) => (job.total ? (100 * n) / job.total : 0);
    const part = (cls, from, n) => {
      const span = el("span", {class: cls});
      span.style.left = pct(from) + "%";
      span.style.width = pct(n) + "%";
      return span;
    };
    const parts = [c.succeeded + " succeeded"];
    if (c.dead) parts.push(c.dead + " dead");
    if (c.cancelled) parts.push(c.cancelled + " cancelled");
    const progress = el("td", {},
      el("span", {class: "bar", title: pct(job.finished).toFixed(1) + "% finished"},
         part("ok", 0, c.succeeded), part("dead", c.succeeded, c.dead),
         part("cancelled", c.succeeded + c.dead, c.cancelled)),
      el("span", {class: "progress-text"},
         job.finished + " of " + job.total + " finished (" + parts.join(", ") + ")"),
      ...(job.waiting ? [el("div", {class: "waiting mute"}, job.waiting)] : []));
    const stateCell = el("td", {}, el("span", {class: "badge is-" + state}, state));
    if (job.state_reason) stateCell.append(el("span", {class: "reason"}, job.state_reason));
    return el("tr", {"data-job-id": job.id, "data-finished": job.finished, "data-total": job.total,
                     "data-state": state},
      el("td", {class: "num"}, job.id),
      el("td", {class: "name"}, job.name),
      stateCell,
      progress,
      el("td", {class: "num"}, c.succeeded),
      el("td", {class: "num" + (c.dead ? " bad" : "")}, c.dead),
      el("td", {class: "num"}, c.cancelled),
      el("td", {class: "num"}, c.queued + c.staged),
      el("td", {class: "num"}, c.leased),
      el("td", {class: "num"}, c.failed),
      el("td", {}, when(job.created_at)));
  }

  // An error's first line (a traceback's summary comes first); the whole of it on hover.
  function detail(text) {
    const lines = String(text ?? "-").split("\\n");
    return el("td", {class: "detail", title: text ?? ""}, lines[0] + (lines.length > 1 ? " …" : ""));
  }

  function render(s) {
    document.getElementById("daemon").textContent = visible(
      "daemon " + s.daemon_id + " · v" + s.version + " · " + s.database + " · " + s.agents_connected
      + (s.agents_connected === 1 ? " agent connected" : " agents connected"));
    document.getElementById("updated").textContent = "updated " + new Date(s.now * 1000).toLocaleTimeString();
    document.getElementById("jobs").replaceChildren(table(
      [["ID", "num"], ["Name"], ["State"], ["Progress"], ["Succeeded", "num"], ["Dead", "num"],
       ["Cancelled", "num"], ["Queued", "num"], ["Leased", "num"], ["Retrying", "num"], ["Created"]],
      s.jobs.map(jobRow), "no jobs yet"));
    document.getElementById("instances").replaceChildren(table(
      [["Provider"], ["Type"], ["State"], ["Instances", "num"], ["Slots", "num"], ["$/h", "num"]],
      s.instances.map((i) => el("tr", {"data-provider": i.provider, "data-state": i.state},
        el("td", {}, i.provider), el("td", {}, i.machine_type || "-"), el("td", {}, i.state),
        el("td", {class: "num"}, i.count), el("td", {class: "num"}, i.slots),
        el("td", {class: "num"}, usd(i.price_per_hour)))),
      "no live instances"));
    const providers = Object.entries(s.cost.providers || {}).sort();
    document.getElementById("cost").replaceChildren(
      el("div", {}, "now ", el("strong", {id: "rate"}, usd(s.cost.rate_per_hour) + "/h")),
      el("div", {}, "spent ", el("strong", {id: "spent"}, usd(s.cost.spent))),
      ...providers.map(([name, p]) => el("div", {class: "mute"},
        name + ": " + usd(p.rate_per_hour) + "/h, " + usd(p.spent) + " spent, " + p.instances + " instances")));
    document.getElementById("errors").replaceChildren(table(
      [["When"], ["Kind"], ["Job", "num"], ["Task"], ["Instance"], ["Detail"]],
      s.errors.map((e) => el("tr", {"data-event-id": e.id},
        el("td", {}, when(e.ts)), el("td", {}, e.kind), el("td", {class: "num"}, e.job_id),
        el("td", {}, e.task_key ?? e.task_id), el("td", {}, e.instance_id), detail(e.detail))),
      "no recent errors"));
  }

  function problem(text) {
    const box = document.getElementById("problem");
    box.textContent = visible(text);
    box.className = text ? "shown" : "";
  }

  async function get(path, headers) {
    return fetch(path, {headers, cache: "no-store", credentials: "omit"});
  }

  async function why(resp) {
    try {
      const body = await resp.json();
      if (body && body.error && body.error.message) return ": " + body.error.message;
    } catch (err) { /* not our JSON error: the status says enough */ }
    return "";
  }

  async function refresh() {
    clearTimeout(timer);
    const headers = token ? {"Authorization": "Bearer " + token} : {};
    let resp;
    try {
      resp = await get("/v1/status", headers);
    } catch (err) {
      problem("cannot reach cloudtaskd (" + err.message + "); retrying");
      timer = setTimeout(refresh, POLL_MS);
      return;
    }
    if (resp.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      token = "";
      // Polling again would not help: wait for a new fragment (hashchange).
      problem("Not authorised" + (headers.Authorization ? " (the token was refused)" : "") +
              ": open the address `cloudtaskctl status-page` printed, or " + location.origin + location.pathname +
              "#token=… with the daemon's api.token");
      document.body.setAttribute("data-auth", "refused");
      return;
    }
    if (!resp.ok) {
      problem("cloudtaskd answered " + resp.status + (await why(resp)) + "; retrying");
    } else {
      render(await resp.json());
      problem("");
      document.body.setAttribute("data-auth", "ok");
      if (Date.now() >= seriesDueAt) {
        try {
          const sr = await get("/v1/status/series", headers);
          if (sr.ok) {
            const s = await sr.json();
            renderSeries(s);
            seriesDueAt = Date.now() + Math.max(POLL_MS, s.interval_s * 1000 - POLL_MS / 2);
          }
        } catch (err) { /* the plots wait for the next round; the tables are current */ }
      }
    }
    timer = setTimeout(refresh, POLL_MS);
  }

  window.addEventListener("hashchange", () => { token = takeToken(); refresh(); });
  refresh();
})();
""".replace("__POLL_MS__", str(POLL_MS))

STATUS_HTML = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<link rel="icon" href="data:,">
<title>cloudtask status</title>
<style>{_STYLE}</style>
</head>
<body>
<header><h1>cloudtask</h1><span id="daemon" class="mute"></span><span id="updated" class="mute">loading…</span></header>
<div id="problem" role="alert"></div>
<h2>Jobs</h2><div id="jobs"></div>
<h2 id="charts-title">Last hour</h2><div id="charts" class="charts"><p class="mute">loading…</p></div>
<p id="charts-note" class="mute"></p>
<h2>Instances</h2><div id="instances"></div>
<h2>Cost</h2><div id="cost" class="cost"></div>
<h2>Recent errors</h2><div id="errors"></div>
<script>{_SCRIPT}</script>
</body>
</html>
"""


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


STATUS_HEADERS = {
    "Content-Security-Policy": (
        f"default-src 'none'; script-src {_sha256(_SCRIPT)}; style-src {_sha256(_STYLE)}; connect-src 'self';"
        " img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}

__all__ = ["STATUS_HEADERS", "STATUS_HTML"]
