// The coordinator's live dashboard. Polls /overview (and the selected job's tasks) every
// POLL_MS and redraws. Every value from the server goes into the page as text nodes, never
// as HTML: job names come from submitters.
"use strict";

const POLL_MS = 2000;
const MAX_SAMPLES = 180; // 6 minutes of chart at POLL_MS
const TASK_ROWS = 200;

const samples = []; // {t, coord, peer}
let selected = null; // job id whose tasks are shown
let userSelected = false;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k === "title") e.title = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) {
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function td(value, cls) {
  return el("td", cls ? { class: cls } : {}, value);
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return (i === 0 ? String(n) : n.toFixed(1)) + " " + units[i];
}

function ago(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return Math.round(s / 3600) + " h ago";
  return Math.round(s / 86400) + " d ago";
}

function badge(text, cls) {
  return el("span", { class: "badge " + cls }, text);
}

function progress(j) {
  const total = Math.max(1, j.tasks_total);
  const pct = (n) => (100 * n) / total + "%";
  const done = el("span", { class: "done" });
  done.style.width = pct(j.tasks_done);
  const failed = el("span", { class: "failed" });
  failed.style.left = pct(j.tasks_done);
  failed.style.width = pct(j.tasks_failed);
  const bar = el("span", {
    class: "bar",
    role: "progressbar",
    "aria-valuemin": "0",
    "aria-valuemax": String(j.tasks_total),
    "aria-valuenow": String(j.tasks_done + j.tasks_failed),
    title: `${j.tasks_done} accepted, ${j.tasks_failed} failed of ${j.tasks_total}`,
  }, done, failed);
  const ended = j.tasks_total === 0 ? 100 : Math.floor((100 * (j.tasks_done + j.tasks_failed)) / j.tasks_total);
  return el("td", { class: "l" }, bar, el("span", { class: "pct" }, ended + "%"));
}

function renderJobs(o) {
  const body = document.getElementById("jobs");
  body.replaceChildren();
  // Newest first.
  const jobs = [...o.jobs].sort((a, b) => b.id - a.id);
  document.getElementById("jobs-empty").hidden = jobs.length > 0;
  const running = jobs.filter((j) => j.state === "running").length;
  document.getElementById("jobs-summary").textContent =
    jobs.length ? `${jobs.length} total, ${running} running` : "";
  if (!userSelected || !jobs.some((j) => j.id === selected)) {
    const pick = jobs.find((j) => j.state === "running") || jobs[0];
    selected = pick ? pick.id : null;
  }
  for (const j of jobs) {
    const tr = el("tr", { class: "job" + (j.id === selected ? " sel" : ""), "data-job": String(j.id) },
      td(j.id),
      td(j.name, "l name"),
      el("td", { class: "l" }, badge(j.state, "s-" + j.state)),
      progress(j),
      td(`${j.tasks_done} / ${j.tasks_total}`),
      td(j.tasks_failed),
      td(j.tasks_pending),
      td(j.replicas_in_flight),
      td(j.tasks_contested, j.tasks_contested ? "contested" : ""));
    tr.title = j.name;
    tr.addEventListener("click", () => {
      selected = j.id;
      userSelected = true;
      refresh();
    });
    body.append(tr);
  }
}

function standingOf(w) {
  return badge(w.standing, "w-" + w.standing);
}

function renderWorkers(o) {
  const body = document.getElementById("workers");
  body.replaceChildren();
  document.getElementById("workers-empty").hidden = o.workers.length > 0;
  const connected = o.workers.filter((w) => w.connected).length;
  document.getElementById("workers-summary").textContent = o.workers.length
    ? `${connected} connected of ${o.workers.length} known · ${o.verdicts_valid} valid, ${o.verdicts_invalid} invalid results`
    : "";
  const workers = [...o.workers].sort((a, b) => (b.connected - a.connected) || (b.credit - a.credit));
  for (const w of workers) {
    body.append(el("tr", { "data-worker": w.node_id },
      el("td", { class: "l" }, el("code", { title: w.node_id }, w.node_id.slice(0, 16) + "…")),
      td(w.connected ? "yes" : "no", "l" + (w.connected ? "" : " off")),
      el("td", { class: "l" }, standingOf(w)),
      td(w.credit.toFixed(3)),
      td(w.valid),
      td(w.invalid, w.invalid ? "contested" : ""),
      td(`${w.in_flight} / ${w.slots}`),
      td(w.last_seen_ms ? ago(o.now_ms - w.last_seen_ms) : "never"),
      td(bytes(w.blob_bytes_from_coordinator)),
      td(bytes(w.blob_bytes_from_peers_estimate))));
  }
}

// Why a task did not end ok: its outcome and the last line of the stderr a worker sent (the
// whole tail on hover). Text only, never HTML.
function failureCell(t) {
  if (!t.failure) return td("", "l");
  const lines = (t.stderr || "").trim().split("\n");
  const last = lines[lines.length - 1];
  const cell = el("td", { class: "l failure", title: t.stderr || t.failure },
    el("span", { class: "contested" }, t.failure));
  if (last) cell.append(el("div", { class: "stderr" }, last));
  return cell;
}

function renderTasks(page) {
  const body = document.getElementById("tasks");
  body.replaceChildren();
  const more = document.getElementById("tasks-more");
  if (!page) {
    document.getElementById("tasks-title").textContent = "select a job";
    more.hidden = true;
    return;
  }
  document.getElementById("tasks-title").textContent = `job ${page.job} · ${page.name}`;
  for (const t of page.tasks) {
    body.append(el("tr", { "data-task": String(t.index) },
      td(t.index),
      el("td", { class: "l" }, badge(t.state, "st-" + t.state)),
      td(t.replicas),
      // A running task whose guest reports progress: how far its furthest replica is.
      td(t.progress == null ? t.in_flight : `${t.in_flight} (${Math.floor(t.progress * 100)}%)`),
      td(`${t.agreeing} / ${t.quorum}`, t.contested ? "contested" : ""),
      td(t.disagreeing),
      td(t.lost),
      td(t.fuel_used == null ? "–" : t.fuel_used.toLocaleString("en-US")),
      failureCell(t)));
  }
  const shown = page.tasks.length;
  more.hidden = shown >= page.tasks_total;
  more.textContent = `first ${shown} of ${page.tasks_total} tasks (all of them: /jobs/${page.job}/tasks?offset=N&limit=1000)`;
}

function renderChart() {
  const svg = document.getElementById("chart");
  // TOP leaves room for the scale label above the highest point.
  const W = 400, H = 170, PAD = 4, TOP = 20;
  svg.replaceChildren();
  const ns = "http://www.w3.org/2000/svg";
  const line = (y, cls) => {
    const l = document.createElementNS(ns, "line");
    l.setAttribute("x1", 0); l.setAttribute("x2", W);
    l.setAttribute("y1", y); l.setAttribute("y2", y);
    l.setAttribute("stroke", "#e4e7ec");
    return l;
  };
  for (const f of [0, 0.5, 1]) svg.append(line(TOP + (H - TOP - PAD) * f));
  if (samples.length === 0) return;
  const max = Math.max(1, ...samples.map((s) => Math.max(s.coord, s.peer)));
  const t0 = samples[0].t, t1 = Math.max(samples[samples.length - 1].t, t0 + 1);
  const x = (t) => ((t - t0) / (t1 - t0)) * W;
  const y = (v) => H - PAD - (v / max) * (H - TOP - PAD);
  for (const [key, color] of [["coord", "#3b6fd8"], ["peer", "#2e9e5b"]]) {
    const pts = samples.map((s) => `${x(s.t).toFixed(1)},${y(s[key]).toFixed(1)}`);
    if (pts.length === 1) pts.push(`${W},${y(samples[0][key]).toFixed(1)}`);
    const p = document.createElementNS(ns, "polyline");
    p.setAttribute("points", pts.join(" "));
    p.setAttribute("fill", "none");
    p.setAttribute("stroke", color);
    // Peers dashed and thinner: equal totals still show both lines.
    p.setAttribute("stroke-width", key === "coord" ? "3" : "2");
    if (key === "peer") p.setAttribute("stroke-dasharray", "6 4");
    p.setAttribute("vector-effect", "non-scaling-stroke");
    p.setAttribute("data-series", key);
    svg.append(p);
  }
  const label = document.createElementNS(ns, "text");
  label.setAttribute("x", 4); label.setAttribute("y", 14);
  label.setAttribute("font-size", "11"); label.setAttribute("fill", "#667085");
  const span = Math.round((t1 - t0) / 1000);
  label.textContent = `${bytes(max)} · last ${span} s`;
  svg.append(label);
}

async function getJSON(path) {
  const r = await fetch(path, { cache: "no-store" });
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.json();
}

let busy = false;
async function refresh() {
  if (busy) return;
  busy = true;
  const live = document.getElementById("live");
  try {
    const o = await getJSON("/overview");
    samples.push({ t: o.now_ms, coord: o.coordinator_bytes_sent, peer: o.peer_bytes_estimate });
    while (samples.length > MAX_SAMPLES) samples.shift();
    renderJobs(o);
    renderWorkers(o);
    document.getElementById("bytes-coord").textContent = bytes(o.coordinator_bytes_sent);
    document.getElementById("bytes-peer").textContent = bytes(o.peer_bytes_estimate);
    document.getElementById("queue").textContent =
      `${o.engine.queue_depth} / ${o.engine.queue_capacity}`;
    renderChart();
    renderTasks(selected == null ? null : await getJSON(`/jobs/${selected}/tasks?limit=${TASK_ROWS}`));
    live.textContent = "live · updated " + new Date(o.now_ms).toLocaleTimeString();
    live.classList.remove("down");
  } catch (e) {
    live.textContent = "not reachable (" + e.message + "); retrying";
    live.classList.add("down");
  } finally {
    busy = false;
  }
}

refresh();
setInterval(refresh, POLL_MS);
