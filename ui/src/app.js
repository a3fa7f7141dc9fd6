// The torchloom dashboard: live charts per rank and branch, device health, checkpoints and the
// branch tree, an event timeline (with the journal's history), a control panel built from the
// job's knob schema, and the autopilot's proposals waiting for a person (approve / refuse buttons on
// the operator page only). Everything arrives over NATS WebSocket; drawing happens on
// requestAnimationFrame, a bounded amount per frame, so a busy bus never freezes the page.
import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";
import "./app.css";
import { Bus } from "./bus.js";
import {
  MAIN_BRANCH,
  MetricStore,
  Proposals,
  Timeline,
  branchRows,
  chartStyle,
  decisionResult,
  describeBody,
  describeBounds,
  downsample,
  formatBytes,
  formatValue,
  knobValueUpdates,
  newCommandId,
  orderMetrics,
  rankHealth,
  validateKnob,
} from "./logic.js";

const CHART_MIN_INTERVAL_MS = 250; // redraw a chart at most 4 times a second
// A chart whose redraw made the next frame slow waits this many times that frame before its next
// redraw, so a slow machine still spends most frames on nothing but the page.
const CHART_COST_BACKOFF = 10;
const PANEL_INTERVAL_MS = 400;
const STALE_S = 3.0;
const SUBMIT_TIMEOUT_S = 15;
const STATUS_POLL_MS = 1000; // checkpoints, branches and the weaver's health verdicts

const params = new URLSearchParams(location.search);
const state = {
  conn: { state: "connecting", detail: "" },
  job: params.get("job") || "",
  jobs: new Map(), // job -> {run_id, world_size, ranks: Map(rank -> {hb, seen_s})}
  knobs: [], // the selected job's schema, from the lowest rank's latest heartbeat
  knobSig: "",
  store: new MetricStore({ capacity: Number(params.get("window") || 2000) }),
  timeline: new Timeline(500),
  proposals: new Proposals(), // autopilot proposals from the events: pending until decided or expired
  proposalsDrawn: "", // what the proposal panel last showed (version, job, run, role)
  deciding: new Set(), // proposal ids whose decision is on its way
  charts: new Map(), // metric -> {el, plot, keys, dirty, lastDraw}
  frames: { count: 0, last: 0, deltas: new Float64Array(600), i: 0, max: 0 },
  received: { heartbeats: 0, metrics: 0, events: 0, outcomes: 0, acks: 0, history: 0 },
  // The selected job as api.status last reported it: {checkpoints, branches, branch, ranks: Map}.
  status: null,
  forks: new Map(), // branch -> {parent, fork_step}, from rollback acks and api.status
  seeded: new Set(), // "rank/branch" series already started at their fork step
  eventKeys: new Set(), // events already in the timeline (live and history overlap at page open)
  historyDone: false,
  // Until /config.json says "operator", the page cannot steer (a viewer page never can).
  readOnly: true,
  panelsDirty: true,
  lastPanelDraw: 0,
};
let bus = null;

const $ = (sel) => document.querySelector(sel);
const disabledAttr = () => (state.readOnly ? " disabled" : "");

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function nowS() {
  return Date.now() / 1000;
}

function color(key) {
  const m = /^r(\d+)(?:\/(.*))?$/.exec(key);
  const rank = m ? Number(m[1]) : 0;
  const branchShift = m && m[2] ? 40 : 0;
  return `hsl(${(rank * 137.5 + branchShift) % 360}, 65%, ${m && m[2] ? 35 : 45}%)`;
}

function formatTick(v) {
  if (v == null) return "";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-2 || a >= 1e6)) return v.toExponential(2);
  return String(Number(v.toPrecision(4)));
}

function compareKeys(a, b) {
  const ra = Number(/^r(\d+)/.exec(a)?.[1] ?? 0);
  const rb = Number(/^r(\d+)/.exec(b)?.[1] ?? 0);
  return ra - rb || a.localeCompare(b);
}

// ---- bus handlers ------------------------------------------------------------------------------

function setConn(s, detail) {
  state.conn = { state: s, detail };
  const el = $("#conn");
  el.className = `conn ${s}`;
  if (s === "connected") el.textContent = `connected: ${detail}`;
  else if (s === "connecting") el.textContent = `connecting to ${detail}...`;
  else el.textContent = "NATS unreachable: retrying...";
  el.title = detail;
}

function jobEntry(job) {
  let j = state.jobs.get(job);
  if (j === undefined) {
    j = { run_id: "", world_size: 0, ranks: new Map() };
    state.jobs.set(job, j);
    renderJobSelect();
  }
  return j;
}

function onHeartbeat(hb) {
  state.received.heartbeats += 1;
  const j = jobEntry(hb.job);
  if (!state.job) selectJob(hb.job);
  if (hb.run_id !== j.run_id) j.run_id = hb.run_id;
  j.world_size = hb.world_size;
  j.ranks.set(hb.rank, { hb, seen_s: nowS() });
  if (hb.job === state.job) {
    const lowest = Math.min(...j.ranks.keys());
    if (hb.rank === lowest && hb.knobs.length > 0) setKnobs(hb.knobs);
    else if (hb.rank === lowest) showKnobValues(knobValueUpdates(state.knobs, hb.knob_values));
    state.panelsDirty = true;
  }
}

function onMetrics(m) {
  state.received.metrics += 1;
  if (!state.job) selectJob(m.job);
  if (m.job !== state.job) return;
  const v = m.values;
  // Threadlets report tokens per step; samples per second is what a person compares across ranks.
  if (v.throughput === undefined && v.tokens !== undefined && v.step_time_s > 0) {
    v.throughput = v.tokens / v.step_time_s;
  }
  if (m.branch && m.branch !== MAIN_BRANCH) seedBranch(m.rank, m.branch, Object.keys(v));
  for (const name of state.store.add(m.rank, m.branch, m.step, m.values)) {
    const chart = state.charts.get(name);
    if (chart) chart.dirty = true;
    else state.charts.set(name, { el: null, plot: null, keys: "", nkeys: 0, dirty: true, lastDraw: 0, cost: 0 });
  }
}

function markDirty(names) {
  for (const name of names) {
    const chart = state.charts.get(name);
    if (chart) chart.dirty = true;
  }
}

/** A rollback's branch starts at its fork step, from the parent's value there (once per rank). */
function seedBranch(rank, branch, names) {
  const key = `${rank}/${branch}`;
  if (state.seeded.has(key)) return;
  const fork = state.forks.get(branch);
  if (!fork) return;
  state.seeded.add(key);
  markDirty(state.store.seedBranch(rank, branch, fork.parent || MAIN_BRANCH, fork.fork_step, names));
}

function noteFork(branch, parent, forkStep) {
  if (!branch || branch === MAIN_BRANCH || state.forks.has(branch) || !Number.isFinite(forkStep)) return;
  state.forks.set(branch, { parent: parent || MAIN_BRANCH, fork_step: forkStep });
}

function onEvent(e) {
  state.received.events += 1;
  addEvent(e);
}

function addEvent(e) {
  // Commands are merged by command id; other events by content (history and live overlap).
  if (!e.command_id) {
    const key = `${e.job}|${e.kind}|${e.time_s}|${e.message}`;
    if (state.eventKeys.has(key)) return;
    state.eventKeys.add(key);
  }
  const entry = {
    job: e.job,
    kind: e.kind,
    time_s: e.time_s || nowS(),
    message: e.message,
    attrs: e.attrs,
  };
  if (e.command_id) entry.command_id = e.command_id;
  state.timeline.add(entry);
  state.proposals.note(e);
  state.panelsDirty = true;
}

function outcomeEntry(o) {
  const ranks = {};
  for (const r of o.results) {
    ranks[r.rank] = { status: r.status, step: r.step, reason: r.reason };
    if (r.detail?.fork_step !== undefined) noteFork(r.detail.branch, r.detail.parent_branch, Number(r.detail.fork_step));
  }
  const detail = detailText(o);
  return {
    job: o.job,
    kind: "command",
    command_id: o.command_id,
    time_s: o.completed_at_s || o.submitted_at_s || nowS(),
    status: o.status,
    reason: o.reason,
    seq: o.command?.seq,
    issuer: issuerText(o.command ? o.command.issuer : o.issuer),
    body: describeBody(o.command ? o.command.body : o.attempted),
    ranks: Object.keys(ranks).length ? ranks : undefined,
    detail: detail || undefined,
  };
}

function issuerText(issuer) {
  if (!issuer) return "";
  return `${issuer.kind}${issuer.identity ? `:${issuer.identity}` : ""}`;
}

function onOutcome(o) {
  state.received.outcomes += 1;
  state.timeline.add(outcomeEntry(o));
  state.panelsDirty = true;
}

function onAck(a) {
  state.received.acks += 1;
  let entry = state.timeline.byCommand.get(a.command_id);
  if (entry === undefined) {
    entry = state.timeline.add({
      job: a.job,
      kind: "command",
      command_id: a.command_id,
      time_s: nowS(),
      status: "pending",
      seq: a.seq,
    });
  }
  entry.ranks = entry.ranks || {};
  entry.ranks[a.rank] = { status: a.status, step: a.step, reason: a.reason };
  if (a.detail.fork_step !== undefined) noteFork(a.detail.branch, a.detail.parent_branch, Number(a.detail.fork_step));
  state.timeline.version += 1;
  state.panelsDirty = true;
}

function onHistory(items, done) {
  state.received.history += items.length;
  for (const it of items) {
    if (it.event) addEvent(it.event);
    else if (it.outcome) state.timeline.add(outcomeEntry(it.outcome));
  }
  if (done) state.historyDone = true;
  state.panelsDirty = true;
}

async function onConnected() {
  // Knobs may be known before the next heartbeat: ask the weaver (if one is up).
  await pollStatus();
}

/** Ask the weaver for the jobs (api.status): checkpoints, branches, per-rank health. */
async function pollStatus() {
  if (!bus || !bus.nc) return;
  let reply;
  try {
    reply = await bus.status("");
  } catch {
    return; // No weaver (yet): heartbeats still bring the schema and device state.
  }
  for (const j of reply.jobs) {
    const e = jobEntry(j.job);
    e.run_id = e.run_id || j.run_id;
    e.world_size = e.world_size || j.world_size;
    if (!state.job) selectJob(j.job);
    if (j.job !== state.job) continue;
    if (j.knobs.length > 0 && state.knobs.length === 0) setKnobs(j.knobs);
    for (const b of j.branches) noteFork(b.id, b.parent, b.fork_step);
    state.status = {
      checkpoints: j.checkpoints,
      branches: j.branches,
      branch: j.branch,
      ranks: new Map(j.ranks.map((r) => [r.rank, r])),
    };
    state.statusVersion = (state.statusVersion || 0) + 1;
  }
}

function startStatusPoll() {
  let busy = false;
  setInterval(async () => {
    if (busy) return;
    busy = true;
    try {
      await pollStatus();
    } finally {
      busy = false;
    }
  }, STATUS_POLL_MS);
}

// ---- job selection -----------------------------------------------------------------------------

function selectJob(job) {
  if (job === state.job) return;
  state.job = job;
  state.store.clear();
  for (const c of state.charts.values()) c.plot?.destroy();
  state.charts.clear();
  $("#charts").innerHTML = "";
  state.knobs = [];
  state.knobSig = "";
  state.status = null;
  state.seeded.clear();
  renderControls();
  renderJobSelect();
  state.panelsDirty = true;
}

function renderJobSelect() {
  const sel = $("#job");
  const jobs = [...state.jobs.keys()].sort();
  if (state.job && !jobs.includes(state.job)) jobs.unshift(state.job);
  const html = jobs.map((j) => `<option value="${esc(j)}"${j === state.job ? " selected" : ""}>${esc(j)}</option>`);
  sel.innerHTML = html.join("") || '<option value="">(no job yet)</option>';
}

// ---- control panel -----------------------------------------------------------------------------

function setKnobs(knobs) {
  const sig = JSON.stringify(knobs.map((k) => [k.name, k.type, k.min, k.max, k.minExclusive, k.maxExclusive, k.groups, k.choices]));
  state.knobs = knobs;
  if (sig !== state.knobSig) {
    state.knobSig = sig;
    renderControls();
  } else {
    showKnobValues(knobs.map((k) => [k, k.value]));
  }
}

// Only current values changed: update text in place so typing in an input is never disturbed.
function showKnobValues(updates) {
  for (const [k, value] of updates) {
    k.value = value;
    const cur = document.querySelector(`[data-current="${CSS.escape(k.name)}"]`);
    if (cur) {
      cur.textContent = formatValue(value);
      cur.title = cur.textContent;
    }
  }
}

function renderControls() {
  const box = $("#knobs");
  if (state.knobs.length === 0) {
    box.innerHTML = '<p class="muted">waiting for the job\'s knob schema (heartbeats)...</p>';
    return;
  }
  box.innerHTML = state.knobs
    .map((k) => {
      const groups = k.groups.length
        ? `<select data-group="${esc(k.name)}"><option value="">all groups</option>${k.groups
            .map((g) => `<option value="${esc(g)}">${esc(g)}</option>`)
            .join("")}</select>`
        : "";
      const hint = knobHint(k);
      return `<div class="knob" title="${esc(k.description)}">
        <label for="knob-${esc(k.name)}">${esc(k.name)}</label>
        <span class="current" data-current="${esc(k.name)}" title="${esc(formatValue(k.value))}">${esc(formatValue(k.value))}</span>
        <span class="hint" title="${esc(k.type)} ${esc(hint)}">${esc(k.type)} ${esc(hint)}</span>
        ${groups}
        <input id="knob-${esc(k.name)}" data-knob="${esc(k.name)}" size="10" autocomplete="off"${disabledAttr()}>
        <button data-set="${esc(k.name)}"${disabledAttr()}>set</button>
      </div>`;
    })
    .join("");
}

function knobHint(k) {
  if (k.type === "float" || k.type === "int") return describeBounds(k);
  if (k.type === "float_list") return `${k.name === "betas" ? "2 in " : ""}${describeBounds(k)}`;
  if (k.type === "str" && k.name === "mix") return "NAME:WEIGHT,...";
  if (k.type === "bool") return "true|false";
  return k.choices.join("|");
}

function showControlMsg(text, kind) {
  const el = $("#control-msg");
  el.textContent = text;
  el.className = `msg ${kind}`;
}

function outcomeText(what, o) {
  const ranks = o.results
    .slice()
    .sort((a, b) => a.rank - b.rank)
    .map((r) => `rank ${r.rank}: ${r.status} at step ${r.step}${r.reason ? ` (${r.reason})` : ""}`)
    .join("; ");
  const reason = o.reason ? `: ${o.reason}` : "";
  const detail = detailText(o);
  return `${what}: ${o.status}${reason}${ranks ? ` [${ranks}]` : ""}${detail ? ` ${detail}` : ""}`;
}

/** What an action produced (Ack.detail): the checkpoint id, the new branch, eval metrics per rank. */
function detailText(o) {
  const results = (o.results || []).slice().sort((a, b) => a.rank - b.rank);
  const first = results.find((r) => r.detail && Object.keys(r.detail).length);
  if (!first) return "";
  const d = first.detail;
  const parts = [];
  if (d.checkpoint_id) parts.push(`checkpoint ${d.checkpoint_id}${d.checkpoint_tag ? ` (${d.checkpoint_tag})` : ""} at step ${d.checkpoint_step}`);
  if (d.fork_step !== undefined) parts.push(`branch ${d.branch} from ${d.from_checkpoint} at step ${d.fork_step}`);
  const evals = results
    .map((r) => {
      const kv = Object.entries(r.detail || {})
        .filter(([k]) => k.startsWith("eval."))
        .map(([k, v]) => `${k}=${formatValue(Number(v))}`);
      return kv.length ? `rank ${r.rank}: ${kv.join(" ")}` : "";
    })
    .filter((x) => x);
  if (evals.length) parts.push(evals.join("; "));
  return parts.join("; ");
}

async function send(what, req) {
  if (!bus) return;
  if (state.readOnly) {
    showControlMsg(`${what}: not sent: this page is read-only (opened with the viewer token)`, "error");
    return;
  }
  showControlMsg(`${what}: sent, waiting for every rank...`, "pending");
  // One id per click: the bus retries with it, and the weaver decides it once.
  const commandId = newCommandId();
  try {
    const o = await bus.submit(
      { ...req, job: state.job, identity: `ui@${location.host}`, timeout_s: SUBMIT_TIMEOUT_S, command_id: commandId },
      (SUBMIT_TIMEOUT_S + 5) * 1000,
    );
    state.timeline.add(outcomeEntry(o));
    state.panelsDirty = true;
    showControlMsg(outcomeText(what, o), o.status === "applied" ? "ok" : o.status === "rejected" ? "error" : "pending");
  } catch (err) {
    const text = String(err?.message || err);
    if (err?.failure === "unknown") {
      showControlMsg(`${what}: no answer yet: it may still apply (command ${commandId}, see the journal)`, "pending");
      return;
    }
    const hint = /no responders|503/i.test(text) ? "no weaver is answering on api.submit" : text;
    showControlMsg(`${what}: not sent: ${hint}`, "error");
  }
}

function onSetClicked(name) {
  const spec = state.knobs.find((k) => k.name === name);
  if (!spec) return;
  const input = document.querySelector(`[data-knob="${CSS.escape(name)}"]`);
  const groupSel = document.querySelector(`[data-group="${CSS.escape(name)}"]`);
  const key = groupSel && groupSel.value ? `${name}@${groupSel.value}` : name;
  const check = validateKnob(key, spec, input.value);
  if (!check.ok) {
    showControlMsg(check.error, "error");
    input.classList.add("invalid");
    return;
  }
  input.classList.remove("invalid");
  send(`set ${key}=${formatValue(check.value)}`, { set: { [key]: { value: check.value, type: spec.type } } });
}

function onActionClicked(kind, target) {
  const args = {};
  if (kind === "rollback" && target) {
    send(`rollback to ${target}`, { action: { kind, args: { checkpoint: target } } });
    return;
  }
  if (kind === "checkpoint") {
    const tag = $("#ckpt-tag").value.trim();
    if (tag) args.tag = tag;
  }
  if (kind === "rollback") {
    const ckpt = $("#rollback-to").value.trim();
    if (!ckpt) {
      showControlMsg("rollback: enter the checkpoint to roll back to (e.g. ckpt-3)", "error");
      return;
    }
    args.checkpoint = ckpt;
  }
  send(kind, { action: { kind, args } });
}

// ---- proposals -----------------------------------------------------------------------------------

function showProposalMsg(text, kind) {
  const el = $("#proposal-msg");
  el.textContent = text;
  el.className = `msg ${kind}`;
}

function renderProposals() {
  const run = state.jobs.get(state.job)?.run_id || "";
  const sig = `${state.proposals.version}|${state.job}|${run}|${state.readOnly}|${[...state.deciding].join(",")}`;
  if (sig === state.proposalsDrawn) return;
  state.proposalsDrawn = sig;
  const pending = state.proposals.pending(state.job, run);
  $("#proposal-list").innerHTML = pending.length
    ? pending
        .map((p) => {
          const busy = state.deciding.has(p.id) ? " disabled" : "";
          // A read-only page lists the proposals without the buttons: it cannot decide them.
          const buttons = state.readOnly
            ? ""
            : `<div><button data-approve="${esc(p.id)}"${busy}>approve</button><button data-refuse="${esc(p.id)}"${busy}>refuse</button></div>`;
          return `<div class="proposal" data-proposal="${esc(p.id)}" data-source="${esc(p.source)}">
          <div><b>${esc(p.source)} ${esc(p.who)}</b> <span class="muted">proposal ${esc(p.id)} at ${clock(p.time_s)}</span></div>
          <div class="commands">${p.commands.map(esc).join("; ")}</div>
          <div class="reason">${esc(p.reason)}</div>${buttons}</div>`;
        })
        .join("")
    : '<p class="muted">no proposal waits for a decision</p>';
}

async function decide(id, approve) {
  const verb = approve ? "approve" : "refuse";
  if (!bus || state.readOnly) {
    showProposalMsg(`${verb} ${id}: not sent: this page is read-only (opened with the viewer token)`, "error");
    return;
  }
  const p = state.proposals.byId.get(id);
  state.deciding.add(id);
  renderProposals();
  showProposalMsg(`${verb} ${id}: sent...`, "pending");
  try {
    const answer = await bus.decide(p ? p.job : state.job, id, approve);
    const result = decisionResult(verb, id, answer);
    if (result.ok) addEvent(answer);
    else state.proposals.expire(id, answer.message);
    showProposalMsg(result.text, result.ok ? "ok" : "error");
  } catch (err) {
    // The decision's event, if it was made, still comes on the events subject and closes the entry.
    showProposalMsg(`${verb} ${id}: no answer (${String(err?.message || err)}); the timeline shows whether it was decided`, "error");
  } finally {
    state.deciding.delete(id);
    state.panelsDirty = true;
    renderProposals();
  }
}

// ---- panels ------------------------------------------------------------------------------------

function renderDevices() {
  const j = state.jobs.get(state.job);
  const body = $("#devices tbody");
  if (!j) {
    body.innerHTML = "";
    return;
  }
  const now = nowS();
  const statusRanks = state.status ? state.status.ranks : new Map();
  // Ranks the weaver knows (a dead one may never have sent a heartbeat to this page) and ranks heard.
  const ranks = [...new Set([...j.ranks.keys(), ...statusRanks.keys()])];
  const rows = ranks.map((rank) => {
    const heard = j.ranks.get(rank);
    const st = statusRanks.get(rank);
    const device = (heard && heard.hb.device) || (st && st.device) || null;
    return { rank, heard, st, device, health: rankHealth(st, device) };
  });
  // Unhealthy devices first, so a fault is visible without scrolling through 64 ranks.
  const bad = (r) => (["healthy", "unknown"].includes(r.health.state) ? 1 : 0);
  rows.sort((a, b) => bad(a) - bad(b) || a.rank - b.rank);
  $("#job-info").textContent = `run ${j.run_id || "?"} · world size ${j.world_size} · ${j.ranks.size} ranks reporting`;
  body.innerHTML = rows
    .map(({ rank, heard, st, device: d, health }) => {
      const hb = heard ? heard.hb : null;
      const stale = heard ? now - heard.seen_s > STALE_S : true;
      const cls = [health.state === "healthy" || health.state === "unknown" ? "" : health.state, stale ? "stale" : ""]
        .join(" ")
        .trim();
      const mem = d ? (d.memory_total_bytes ? `${formatBytes(d.memory_used_bytes)} / ${formatBytes(d.memory_total_bytes)}` : formatBytes(d.rss_bytes)) : "";
      const util = d ? `${(d.kind === "cpu" ? d.cpu_load_pct || d.utilization_pct : d.utilization_pct).toFixed(0)}%` : "";
      const healthText = health.state === "healthy" || health.state === "unknown" ? health.state : `${health.state.toUpperCase()}${health.reason ? `: ${health.reason}` : ""}`;
      const branch = (hb && hb.branch) || (st && st.branch) || "";
      const stateText = hb ? hb.state : st ? st.state : "";
      const step = hb ? hb.step : st ? st.step : "";
      const stepTime = hb ? hb.step_time_s : st ? st.step_time_s : 0;
      return `<tr class="${cls}" data-rank="${rank}" data-health="${esc(health.state)}">
        <td>${rank}${branch && branch !== MAIN_BRANCH ? `/${esc(branch)}` : ""}</td><td>${esc(stateText)}${stale ? " (silent)" : ""}</td>
        <td>${step}</td><td class="health" title="${esc(health.reason)}">${esc(healthText)}</td><td>${(stepTime * 1000).toFixed(1)} ms</td>
        <td>${d ? `${esc(d.kind)}:${d.index}` : ""}</td><td>${util}</td><td>${mem}</td>
        <td>${d && d.temperature_c ? `${d.temperature_c.toFixed(0)} °C` : ""}</td>
        <td>${d && d.power_w ? `${d.power_w.toFixed(0)} W` : ""}</td>
        <td>${d && d.xids.length ? esc(d.xids.join(",")) : ""}</td></tr>`;
    })
    .join("");
}

function renderCheckpoints() {
  const st = state.status;
  const cks = st ? st.checkpoints.slice().sort((a, b) => b.seq - a.seq) : [];
  $("#checkpoints tbody").innerHTML = cks.length
    ? cks
        .map(
          (c) => `<tr data-checkpoint="${esc(c.id)}"><td>${esc(c.id)}</td><td>${esc(c.tag)}</td><td>${c.step}</td>
          <td>${esc(c.branch)}</td><td>${clock(c.created_at_s)}</td>
          <td><button data-rollback="${esc(c.id)}" title="roll every rank back to ${esc(c.id)}"${disabledAttr()}>roll back</button></td></tr>`,
        )
        .join("")
    : '<tr><td colspan="6" class="muted">no checkpoint yet</td></tr>';
  const rows = st ? branchRows(st.branches, st.branch) : [];
  $("#branches").innerHTML = rows.length
    ? rows
        .map(
          (b) => `<li class="branch${b.current ? " current" : ""}" data-branch="${esc(b.id)}" style="padding-left:${b.depth * 18}px">
          ${b.depth ? "└ " : ""}<b>${esc(b.id)}</b>${b.parent ? ` <span class="muted">from ${esc(b.from_checkpoint)} at step ${b.fork_step}</span>` : ""}${b.current ? ' <span class="here">● current</span>' : ""}</li>`,
        )
        .join("")
    : '<li class="muted">main (no rollback yet)</li>';
}

function clock(t) {
  return new Date(t * 1000).toLocaleTimeString([], { hour12: false });
}

function renderTimeline() {
  const entries = state.timeline.entries.filter((e) => !state.job || !e.job || e.job === state.job);
  $("#timeline").innerHTML = entries
    .slice(0, 200)
    .map((e) => {
      let text;
      if (e.kind === "command") {
        const ranks = e.ranks
          ? Object.entries(e.ranks)
              .sort((a, b) => Number(a[0]) - Number(b[0]))
              .map(([r, x]) => `rank ${r}: ${x.status} @ step ${x.step}${x.reason ? ` (${esc(x.reason)})` : ""}`)
              .join("; ")
          : "";
        text = `${e.seq ? `#${e.seq} ` : ""}<b>${esc(e.body || e.message || e.command_id)}</b>
          ${e.issuer ? `by ${esc(e.issuer)}` : ""} → <span class="status ${esc(e.status || "")}">${esc(e.status || "")}</span>
          ${e.reason ? `: ${esc(e.reason)}` : ""}<div class="ranks">${ranks}</div>${e.detail ? `<div class="detail">${esc(e.detail)}</div>` : ""}`;
      } else {
        const attrs = Object.entries(e.attrs || {})
          .map(([k, v]) => `${esc(k)}=${esc(v)}`)
          .join(" ");
        text = `${esc(e.message)} <span class="attrs">${attrs}</span>`;
      }
      const kindCls = /dead|fail|hung|unhealthy|straggler/.test(e.kind)
        ? "bad"
        : /waiting|stopping/.test(e.kind)
          ? "wait"
          : /reconfigure|resumed|rollback|recovered/.test(e.kind)
            ? "info"
            : "";
      return `<div class="entry ${esc(e.kind)}" data-command="${esc(e.command_id || "")}">
        <span class="time">${clock(e.time_s)}</span><span class="kind ${kindCls}">${esc(e.kind)}</span>
        <span class="text">${text}</span></div>`;
    })
    .join("");
}

// ---- charts ------------------------------------------------------------------------------------

function ensureChartEl(name, chart) {
  if (chart.el) return;
  const el = document.createElement("div");
  el.className = "chart";
  el.dataset.metric = name;
  chart.el = el;
  // Keep well-known metrics first.
  const names = orderMetrics([...state.charts.keys()].filter((n) => state.charts.get(n).el || n === name));
  const idx = names.indexOf(name);
  const next = names.slice(idx + 1).map((n) => state.charts.get(n).el).find((e) => e && e.parentNode);
  $("#charts").insertBefore(el, next || null);
}

function drawChart(name, chart) {
  const byKey = state.store.metrics.get(name);
  if (!byKey) return;
  ensureChartEl(name, chart);
  const keys = [...byKey.keys()].sort(compareKeys);
  // Fewer points per series and hairlines when there are many series: the drawing cost stays
  // roughly constant whatever the rank count and however noisy the lines.
  const pxRatio = window.devicePixelRatio || 1;
  const { buckets, width: stroke } = chartStyle(keys.length, pxRatio);
  const { x, ys } = downsample(
    keys.map((k) => byKey.get(k)),
    buckets,
  );
  const data = [x, ...ys];
  const sig = keys.join(",");
  const width = Math.max(280, chart.el.clientWidth - 8);
  const knobNames = state.knobs.map((k) => k.name);
  const stepped = knobNames.includes(name.split("@")[0]);
  if (!chart.plot || chart.keys !== sig || chart.pxRatio !== pxRatio) {
    chart.plot?.destroy();
    chart.el.innerHTML = "";
    chart.keys = sig;
    chart.nkeys = keys.length;
    chart.pxRatio = pxRatio;
    chart.plot = new uPlot(
      {
        title: name,
        width,
        height: 200,
        scales: { x: { time: false } },
        legend: { show: keys.length <= 16 },
        cursor: { drag: { x: true, y: false } },
        axes: [{ label: "step", size: 36 }, { size: 64, values: (_u, splits) => splits.map(formatTick) }],
        series: [
          { label: "step" },
          // Knob values change in steps: draw them stepped so the change sits at its step.
          ...keys.map((k) => ({
            label: k,
            stroke: color(k),
            width: stroke,
            spanGaps: true,
            points: { show: false },
            ...(stepped ? { paths: uPlot.paths.stepped({ align: 1 }) } : {}),
          })),
        ],
      },
      data,
      chart.el,
    );
  } else {
    if (Math.abs(chart.plot.width - width) > 4) chart.plot.setSize({ width, height: 200 });
    chart.plot.setData(data);
  }
}

function frame(t) {
  const f = state.frames;
  let d = 0;
  if (f.last) {
    d = t - f.last;
    f.deltas[f.i % f.deltas.length] = d;
    f.i += 1;
    if (d > f.max) f.max = d;
  }
  f.last = t;
  f.count += 1;
  const now = performance.now();
  // uPlot draws in a microtask and the canvas is rasterized when the frame is painted, so the chart
  // drawn last frame is charged with this frame's delta: a smoothed estimate of its real cost.
  if (state.drawnLast) {
    const c = state.drawnLast;
    state.drawnLast = null;
    if (d > 0) c.cost = c.cost ? 0.7 * c.cost + 0.3 * d : d;
  }
  // At most one chart redraw per frame, the stalest dirty one first: the cost per frame stays
  // bounded however many metrics and ranks there are.
  let pick = null;
  for (const [name, c] of state.charts) {
    const base = c.nkeys > 32 ? 2 * CHART_MIN_INTERVAL_MS : CHART_MIN_INTERVAL_MS;
    const minInterval = Math.max(base, CHART_COST_BACKOFF * c.cost);
    if (!c.dirty || now - c.lastDraw < minInterval) continue;
    if (pick === null || c.lastDraw < pick[1].lastDraw) pick = [name, c];
  }
  if (pick) {
    pick[1].dirty = false;
    pick[1].lastDraw = now;
    state.drawnLast = pick[1];
    drawChart(pick[0], pick[1]);
  } else if (now - state.lastPanelDraw > PANEL_INTERVAL_MS) {
    state.lastPanelDraw = now;
    // Redraw panels regularly even without news, so silent ranks are marked.
    renderDevices();
    if (state.statusVersion !== state.statusDrawn) {
      state.statusDrawn = state.statusVersion;
      renderCheckpoints();
    }
    renderProposals(); // redraws only when the list, the job, its run or the role changed
    if (state.panelsDirty) renderTimeline();
    state.panelsDirty = false;
  }
  requestAnimationFrame(frame);
}

// ---- debug hook (tests and benchmarks read it) -------------------------------------------------

window.__torchloom = {
  state,
  series(metric, key) {
    const s = state.store.metrics.get(metric)?.get(key);
    return s ? s.toArrays() : { steps: [], values: [] };
  },
  metrics() {
    return [...state.store.metrics.keys()];
  },
  seriesKeys(metric) {
    return [...(state.store.metrics.get(metric)?.keys() || [])];
  },
  timeline() {
    return state.timeline.entries.map((e) => ({ ...e }));
  },
  frameStats() {
    const f = state.frames;
    const n = Math.min(f.i, f.deltas.length);
    const d = Array.from(f.deltas.slice(0, n)).sort((a, b) => a - b);
    const q = (p) => (n ? d[Math.min(n - 1, Math.floor(p * n))] : 0);
    return { frames: f.count, p50_ms: q(0.5), p95_ms: q(0.95), p99_ms: q(0.99), max_ms: f.max, window: n };
  },
  resetFrameStats() {
    state.frames.i = 0;
    state.frames.max = 0;
  },
  knobs() {
    return state.knobs;
  },
  status() {
    const st = state.status;
    return st ? { checkpoints: st.checkpoints, branches: st.branches, branch: st.branch, ranks: [...st.ranks.values()] } : null;
  },
  historyDone() {
    return state.historyDone;
  },
  proposals() {
    const run = state.jobs.get(state.job)?.run_id || "";
    return state.proposals.pending(state.job, run).map((p) => ({ ...p }));
  },
};

// ---- start -------------------------------------------------------------------------------------

async function loadConfig() {
  // A page opened with ?nats=URL (development) connects anonymously and never steers.
  if (params.get("nats")) return { nats_ws_url: params.get("nats"), role: "viewer" };
  for (;;) {
    let why = "config.json not served";
    try {
      const r = await fetch("config.json", { cache: "no-store", credentials: "same-origin" });
      if (r.ok) return await r.json();
      if (r.status === 403) why = "not authorized: open the URL with the token that `torchloom ui` printed";
    } catch {
      // fall through to retry
    }
    setConn("unreachable", why);
    await new Promise((res) => setTimeout(res, 1000));
  }
}

/** Enable the controls only for an operator page; a viewer page says why they are disabled. */
function applyRole(role) {
  state.readOnly = role !== "operator";
  $("#control").classList.toggle("read-only", state.readOnly);
  for (const el of document.querySelectorAll("#actions button, #actions input")) el.disabled = state.readOnly;
  const note = $("#control-note");
  note.hidden = !state.readOnly;
  note.textContent = state.readOnly
    ? "Read-only: this page was opened with the viewer token. Open the operator URL that `torchloom ui` printed to steer the job."
    : "";
  renderControls();
  renderCheckpoints();
  renderProposals();
}

async function main() {
  // The token has done its work (the session cookie came with this page): keep it out of history.
  if (params.has("token")) {
    params.delete("token");
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + (rest ? `?${rest}` : "") + location.hash);
  }
  applyRole("viewer");
  renderControls();
  renderJobSelect();
  $("#knobs").addEventListener("click", (ev) => {
    const name = ev.target?.dataset?.set;
    if (name) onSetClicked(name);
  });
  $("#knobs").addEventListener("keydown", (ev) => {
    const name = ev.target?.dataset?.knob;
    if (name && ev.key === "Enter") onSetClicked(name);
  });
  $("#actions").addEventListener("click", (ev) => {
    const kind = ev.target?.dataset?.action;
    if (kind) onActionClicked(kind);
  });
  $("#proposal-list").addEventListener("click", (ev) => {
    const d = ev.target?.dataset || {};
    if (d.approve) decide(d.approve, true);
    else if (d.refuse) decide(d.refuse, false);
  });
  $("#checkpoints").addEventListener("click", (ev) => {
    const id = ev.target?.dataset?.rollback;
    if (id) onActionClicked("rollback", id);
  });
  renderCheckpoints();
  startStatusPoll();
  $("#job").addEventListener("change", (ev) => selectJob(ev.target.value));
  requestAnimationFrame(frame);
  const cfg = await loadConfig();
  applyRole(cfg.role);
  const auth = {
    user: cfg.nats_user,
    pass: cfg.nats_password,
    inboxPrefix: cfg.inbox_prefix,
    readOnly: state.readOnly,
  };
  bus = new Bus(cfg.nats_ws_url, {
    onStatus: setConn,
    onHeartbeat,
    onMetrics,
    onEvent,
    onOutcome,
    onAck,
    onConnected,
    onHistory,
  }, auth);
  window.__torchloom.bus = bus;
  await bus.run();
}

main();
