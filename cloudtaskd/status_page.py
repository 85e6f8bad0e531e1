"""The status page: one self-contained HTML document (inline CSS and JS, no external assets) and
no data in it. Its script fetches `GET /v1/status` every few seconds and re-renders.

- Everything shown is built with createElement and text nodes (`append(string)`, `textContent`):
  job names, errors and instance ids come from users and clouds, and never reach innerHTML.
  Their control characters (C0, DEL, C1, and the bidi overrides that make text read backwards)
  are shown as escapes (`\\x1b`, `\\u202e`), as cloudtaskctl shows them.
- On the TCP listener every /v1/* fetch needs the bearer token: the page takes it from the URL
  fragment (`/status#token=...`; fragments never reach a server or its logs), keeps it in
  sessionStorage, removes it from the address bar, and sends it as `Authorization: Bearer`.
  Without one (or on a 401) it says how to open it. Over the unix socket no token is needed.
- The Content-Security-Policy allows exactly this script and this style (by hash) and fetches
  to the page's own origin: an injected script would not run.
"""

from __future__ import annotations

import base64
import hashlib

POLL_MS = 3000

_STYLE = """
:root { color-scheme: light dark; --ok: #2e7d32; --bad: #c62828; --warn: #ef6c00; --mute: #888; }
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 72em; padding: 0 1em; }
header { display: flex; gap: 1em; align-items: baseline; flex-wrap: wrap; }
h1 { font-size: 1.4em; margin: 0; }
h2 { font-size: 1.1em; margin: 1.6em 0 0.4em; }
.mute { color: var(--mute); }
#problem { display: none; padding: 0.8em 1em; border: 2px solid var(--bad); border-radius: 6px; margin: 1em 0;
           font-weight: 600; }
#problem.shown { display: block; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 0.3em 0.6em; border-bottom: 1px solid rgba(128, 128, 128, 0.3);
         vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.name { max-width: 24em; overflow-wrap: anywhere; }
td.detail { max-width: 40em; overflow-wrap: anywhere; font-family: ui-monospace, monospace; font-size: 0.9em; }
.bar { position: relative; width: 14em; height: 0.9em; background: rgba(128, 128, 128, 0.25); border-radius: 3px;
       overflow: hidden; display: inline-block; vertical-align: middle; }
.bar > span { position: absolute; top: 0; bottom: 0; left: 0; }
.bar > .ok { background: var(--ok); }
.bar > .dead { background: var(--bad); }
.progress-text { margin-left: 0.6em; font-variant-numeric: tabular-nums; }
.waiting { font-size: 0.85em; white-space: normal; }
.state-paused, .state-cancelled { color: var(--warn); }
.state-done { color: var(--ok); }
.cost { display: flex; gap: 2em; flex-wrap: wrap; }
.cost div strong { font-size: 1.3em; }
"""

_SCRIPT = """
"use strict";
(() => {
  const TOKEN_KEY = "cloudtask.status.token";
  const POLL_MS = __POLL_MS__;
  let token = takeToken();
  let timer = null;

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

  function table(headers, rows, emptyText) {
    if (!rows.length) return el("p", {class: "mute"}, emptyText);
    const head = el("tr", {}, ...headers.map(([text, cls]) => el("th", {class: cls || ""}, text)));
    return el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows));
  }

  const usd = (n) => "$" + Number(n || 0).toFixed(4);
  const when = (ts) => (ts ? new Date(ts * 1000).toLocaleString() : "-");

  function jobRow(job) {
    const c = job.counts;
    const state = job.done && job.state === "active" ? "done" : job.state;
    const pct = (n) => (job.total ? (100 * n) / job.total : 0);
    const ok = el("span", {class: "ok"});
    ok.style.width = pct(c.succeeded) + "%";
    const dead = el("span", {class: "dead"});
    dead.style.left = pct(c.succeeded) + "%";
    dead.style.width = pct(c.dead + c.cancelled) + "%";
    const progress = el("td", {},
      el("span", {class: "bar", title: pct(job.finished).toFixed(1) + "%"}, ok, dead),
      el("span", {class: "progress-text"}, job.finished + " / " + job.total + " done"),
      ...(job.waiting ? [el("div", {class: "waiting mute"}, job.waiting)] : []));
    return el("tr", {"data-job-id": job.id, "data-finished": job.finished, "data-total": job.total,
                     "data-state": state},
      el("td", {class: "num"}, job.id),
      el("td", {class: "name"}, job.name),
      el("td", {class: "state-" + state, title: job.state_reason || ""}, state),
      progress,
      el("td", {class: "num"}, c.queued + c.staged),
      el("td", {class: "num"}, c.leased),
      el("td", {class: "num"}, c.failed),
      el("td", {class: "num"}, c.dead),
      el("td", {}, when(job.created_at)));
  }

  function render(s) {
    document.getElementById("daemon").textContent = visible(
      "daemon " + s.daemon_id + " · v" + s.version + " · " + s.agents_connected + " agents connected");
    document.getElementById("updated").textContent = "updated " + new Date(s.now * 1000).toLocaleTimeString();
    document.getElementById("jobs").replaceChildren(table(
      [["ID", "num"], ["Name"], ["State"], ["Progress"], ["Queued", "num"], ["Running", "num"],
       ["Retrying", "num"], ["Dead", "num"], ["Created"]],
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
      [["When"], ["Kind"], ["Job", "num"], ["Task", "num"], ["Instance"], ["Detail"]],
      s.errors.map((e) => el("tr", {"data-event-id": e.id},
        el("td", {}, when(e.ts)), el("td", {}, e.kind), el("td", {class: "num"}, e.job_id),
        el("td", {class: "num"}, e.task_id), el("td", {}, e.instance_id), el("td", {class: "detail"}, e.detail))),
      "no recent errors"));
  }

  function problem(text) {
    const box = document.getElementById("problem");
    box.textContent = text;
    box.className = text ? "shown" : "";
  }

  async function refresh() {
    clearTimeout(timer);
    const headers = token ? {"Authorization": "Bearer " + token} : {};
    let resp;
    try {
      resp = await fetch("/v1/status", {headers, cache: "no-store", credentials: "omit"});
    } catch (err) {
      problem("cannot reach cloudtaskd (" + err.message + "); retrying");
      timer = setTimeout(refresh, POLL_MS);
      return;
    }
    if (resp.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      token = "";
      // Polling again would not help: wait for a new fragment (hashchange).
      problem("Not authorised" + (headers.Authorization ? " (the token was refused)" : "") + ": open " +
              location.origin + location.pathname + "#token=… with the daemon's api.token");
      document.body.setAttribute("data-auth", "refused");
      return;
    }
    if (!resp.ok) {
      problem("cloudtaskd answered " + resp.status + "; retrying");
    } else {
      render(await resp.json());
      problem("");
      document.body.setAttribute("data-auth", "ok");
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
