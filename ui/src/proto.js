// The UI's wire edge: the only module touching generated protobuf classes. It decodes bytes into
// plain objects (snake_case, enums as the lowercase names torchloom.messages uses) and encodes
// SubmitRequest and ProposalDecision, as torchloom/wire.py does for Python.
import { torchloom } from "./gen/torchloom.js";

const pb = torchloom.v1;

/** int64/uint64 may decode as a Long (when the `long` package is present) or a number. */
export function num(v) {
  if (v == null) return 0;
  if (typeof v === "number") return v;
  if (typeof v === "bigint") return Number(v);
  if (typeof v.toNumber === "function") return v.toNumber();
  return Number(v);
}

function enumName(enumObj, prefix, value) {
  for (const [name, n] of Object.entries(enumObj)) {
    if (n === value && name.startsWith(prefix)) return name.slice(prefix.length).toLowerCase();
  }
  return "unspecified";
}

const actionKind = (v) => enumName(pb.ActionKind, "ACTION_KIND_", v);
const ackStatus = (v) => enumName(pb.AckStatus, "ACK_STATUS_", v);
const outcomeStatus = (v) => enumName(pb.OutcomeStatus, "OUTCOME_STATUS_", v);
const rankState = (v) => enumName(pb.RankState, "RANK_STATE_", v);
const knobType = (v) => enumName(pb.KnobType, "KNOB_TYPE_", v);

function value(v) {
  if (!v) return null;
  switch (v.kind) {
    case "f":
      return v.f;
    case "i":
      return num(v.i);
    case "b":
      return v.b;
    case "s":
      return v.s;
    case "fl":
      return [...(v.fl?.values || [])];
    default:
      return null;
  }
}

function valueMap(m) {
  const out = {};
  for (const [k, v] of Object.entries(m || {})) out[k] = value(v);
  return out;
}

function body(msg) {
  if (msg.body === "set" && msg.set) return { set: valueMap(msg.set.values) };
  if (msg.body === "action" && msg.action) {
    return { action: { kind: actionKind(msg.action.kind), args: { ...(msg.action.args || {}) } } };
  }
  return null;
}

function device(d) {
  if (!d) return null;
  return {
    kind: d.kind,
    device: d.device,
    index: d.index,
    nvml_available: d.nvml_available,
    utilization_pct: d.utilization_pct,
    memory_used_bytes: num(d.memory_used_bytes),
    memory_total_bytes: num(d.memory_total_bytes),
    temperature_c: d.temperature_c,
    power_w: d.power_w,
    ecc_volatile_uncorrected: num(d.ecc_volatile_uncorrected),
    remapped_rows_pending: num(d.remapped_rows_pending),
    xids: [...(d.xids || [])],
    healthy: d.healthy,
    unhealthy_reason: d.unhealthy_reason,
    cpu_load_pct: d.cpu_load_pct,
    rss_bytes: num(d.rss_bytes),
  };
}

function knobSpec(k) {
  return {
    name: k.name,
    type: knobType(k.type),
    min: k.min == null ? null : k.min,
    max: k.max == null ? null : k.max,
    minExclusive: k.min_exclusive,
    maxExclusive: k.max_exclusive,
    description: k.description,
    value: value(k.value),
    groups: [...(k.groups || [])],
    choices: [...(k.choices || [])],
  };
}

function hasField(msg, name) {
  return Object.prototype.hasOwnProperty.call(msg, name);
}

export function decodeHeartbeat(bytes) {
  const h = pb.Heartbeat.decode(bytes);
  return {
    job: h.job,
    run_id: h.run_id,
    rank: h.rank,
    world_size: h.world_size,
    local_rank: h.local_rank,
    incarnation: h.incarnation,
    host: h.host,
    pid: h.pid,
    step: num(h.step),
    state: rankState(h.state),
    sent_at_s: h.sent_at_s,
    step_time_s: h.step_time_s,
    last_seq: num(h.last_seq),
    // proto3 `optional` bounds: present only when set.
    knobs: knobSpecs(h.knobs),
    // A heartbeat between two full knob lists carries only the current values (name -> value).
    knob_values: valueMap(h.knob_values),
    device: device(h.device),
    branch: h.branch,
    tick: num(h.tick),
    fault_injection_allowed: !!h.fault_injection_allowed,
  };
}

export function decodeMetrics(bytes) {
  const m = pb.StepMetrics.decode(bytes);
  return {
    job: m.job,
    run_id: m.run_id,
    rank: m.rank,
    step: num(m.step),
    branch: m.branch,
    time_s: m.time_s,
    values: { ...(m.values || {}) },
  };
}

export function decodeJobEvent(bytes) {
  const e = pb.JobEvent.decode(bytes);
  return {
    job: e.job,
    run_id: e.run_id,
    kind: e.kind,
    message: e.message,
    time_s: e.time_s,
    command_id: e.command_id,
    attrs: { ...(e.attrs || {}) },
  };
}

function command(c) {
  if (!c) return null;
  return {
    command_id: c.command_id,
    job: c.job,
    run_id: c.run_id,
    seq: num(c.seq),
    issuer: { kind: c.issuer?.kind || "", identity: c.issuer?.identity || "" },
    issued_at_s: c.issued_at_s,
    body: body(c),
  };
}

export function decodeOutcome(bytes) {
  const o = pb.Outcome.decode(bytes);
  return {
    command_id: o.command_id,
    job: o.job,
    status: outcomeStatus(o.status),
    reason: o.reason,
    results: (o.results || []).map((r) => ({
      rank: r.rank,
      status: ackStatus(r.status),
      step: num(r.step),
      reason: r.reason,
      detail: { ...(r.detail || {}) },
      branch: r.branch || "",
    })),
    command: command(o.command),
    // A refused attempt (no command): who asked and what, as the weaver journaled it.
    issuer: o.issuer ? { kind: o.issuer.kind || "", identity: o.issuer.identity || "" } : null,
    attempted: body(o),
    submitted_at_s: o.submitted_at_s,
    completed_at_s: o.completed_at_s,
  };
}

export function decodeAck(bytes) {
  const a = pb.Ack.decode(bytes);
  return {
    command_id: a.command_id,
    job: a.job,
    seq: num(a.seq),
    rank: a.rank,
    status: ackStatus(a.status),
    reason: a.reason,
    step: num(a.step),
    detail: { ...(a.detail || {}) },
    branch: a.branch || "",
  };
}

// proto3 `optional` bounds: present only when set.
function knobSpecs(list) {
  return (list || []).map((k) => {
    const spec = knobSpec(k);
    if (!hasField(k, "min")) spec.min = null;
    if (!hasField(k, "max")) spec.max = null;
    return spec;
  });
}

function rankStatus(r) {
  return {
    rank: r.rank,
    step: num(r.step),
    state: rankState(r.state),
    last_heartbeat_s: r.last_heartbeat_s,
    host: r.host,
    pid: r.pid,
    alive: !!r.alive,
    local_rank: r.local_rank,
    device: device(r.device),
    step_time_s: r.step_time_s,
    health: r.health || "",
    health_reason: r.health_reason || "",
    branch: r.branch || "",
  };
}

export function decodeStatusReply(bytes) {
  const r = pb.StatusReply.decode(bytes);
  return {
    jobs: (r.jobs || []).map((j) => ({
      job: j.job,
      run_id: j.run_id,
      world_size: j.world_size,
      last_seq: num(j.last_seq),
      knobs: knobSpecs(j.knobs),
      ranks: (j.ranks || []).map(rankStatus),
      checkpoints: (j.checkpoints || []).map((c) => ({
        id: c.id,
        tag: c.tag,
        step: num(c.step),
        branch: c.branch,
        path: c.path,
        created_at_s: c.created_at_s,
        seq: num(c.seq),
      })),
      branches: (j.branches || []).map((b) => ({
        id: b.id,
        parent: b.parent,
        from_checkpoint: b.from_checkpoint,
        fork_step: num(b.fork_step),
        created_at_s: b.created_at_s,
        seq: num(b.seq),
      })),
      branch: j.branch || "",
    })),
  };
}

/** Decode one TORCHLOOM_JOURNAL stream message by its subject: a JobEvent or a final Outcome. */
export function decodeJournalMessage(subject, bytes) {
  if (subject.includes(".events.")) return { event: decodeJobEvent(bytes) };
  if (subject.includes(".journal.")) return { outcome: decodeOutcome(bytes) };
  return null;
}

function toValue(v, type) {
  if (Array.isArray(v)) return pb.Value.create({ fl: pb.FloatList.create({ values: v }) });
  if (typeof v === "boolean") return pb.Value.create({ b: v });
  if (typeof v === "string") return pb.Value.create({ s: v });
  if (type === "int") return pb.Value.create({ i: v });
  return pb.Value.create({ f: v });
}

/**
 * Encode a SubmitRequest.
 *
 * @param {{job: string, identity: string, timeout_s?: number, command_id?: string,
 *          set?: Record<string, {value: any, type: string}>,
 *          action?: {kind: string, args?: Record<string, string>}}} req
 * @returns {Uint8Array}
 */
export function encodeSubmit(req) {
  const fields = {
    job: req.job || "",
    issuer: pb.Issuer.create({ kind: "ui", identity: req.identity || "" }),
    timeout_s: req.timeout_s || 0,
    command_id: req.command_id || "",
  };
  if (req.set) {
    const values = {};
    for (const [k, { value: v, type }] of Object.entries(req.set)) values[k] = toValue(v, type);
    fields.set = pb.SetConfig.create({ values });
  } else if (req.action) {
    const kind = pb.ActionKind[`ACTION_KIND_${req.action.kind.toUpperCase()}`];
    if (kind === undefined) throw new RangeError(`unknown action '${req.action.kind}'`);
    fields.action = pb.Action.create({ kind, args: req.action.args || {} });
  } else {
    throw new RangeError("a submit needs a set or an action");
  }
  return pb.SubmitRequest.encode(pb.SubmitRequest.create(fields)).finish();
}

export function encodeStatusRequest(job) {
  return pb.StatusRequest.encode(pb.StatusRequest.create({ job: job || "" })).finish();
}

/** A person's answer to an autopilot proposal (api.decide): {job, proposal_id, approve}. */
export function encodeProposalDecision(d) {
  if (!d.proposal_id) throw new RangeError("a decision needs the proposal's id");
  const fields = { job: d.job || "", proposal_id: d.proposal_id, approve: Boolean(d.approve) };
  return pb.ProposalDecision.encode(pb.ProposalDecision.create(fields)).finish();
}
