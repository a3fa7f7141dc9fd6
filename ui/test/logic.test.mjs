// Unit tests of the dashboard's pure logic (run by `node --test ui/test`, and from pytest).
import assert from "node:assert/strict";
import { test } from "node:test";
import {
  DECIDE_FAILED,
  MAX_PENDING_PROPOSALS,
  MetricStore,
  Proposals,
  Series,
  Timeline,
  CHART_POINT_BUDGET,
  branchRows,
  decisionResult,
  describeProposedCommand,
  chartStyle,
  rankHealth,
  seriesKey,
  describeBody,
  describeBounds,
  downsample,
  feedDelivery,
  feedOwner,
  feedRequest,
  knobValueUpdates,
  newCommandId,
  parseFeedReply,
  submitFailure,
  validateKnob,
} from "../src/logic.js";

const LR = { name: "lr", type: "float", min: 0, max: 10, minExclusive: true, maxExclusive: false, groups: ["head"] };

test("series keeps only the newest points, in order", () => {
  const s = new Series(3);
  for (let i = 1; i <= 5; i++) s.push(i, i * 10);
  assert.deepEqual(s.toArrays(), { steps: [3, 4, 5], values: [30, 40, 50] });
  assert.deepEqual(s.last(), [5, 50]);
  assert.throws(() => new Series(1), /capacity=1 rejected: must be an integer >= 2/);
});

test("downsample aligns series on shared buckets and bounds the point count", () => {
  const a = new Series(10000);
  const b = new Series(10000);
  for (let i = 0; i < 5000; i++) a.push(i, 1);
  for (let i = 0; i < 5000; i += 7) b.push(i, 2);
  const { x, ys } = downsample([a, b], 100);
  assert.equal(x.length, 100);
  assert.equal(ys.length, 2);
  assert.ok(ys[0].every((v) => v === 1));
  assert.ok(ys[1].filter((v) => v !== null).every((v) => v === 2));
  assert.equal(x[0], 0);
  assert.equal(x[99], 4999);
});

test("downsample keeps a step change visible", () => {
  const s = new Series(1000);
  for (let i = 0; i < 1000; i++) s.push(i, i < 500 ? 0.1 : 0.05);
  const { ys } = downsample([s], 50);
  assert.ok(Math.abs(ys[0][0] - 0.1) < 1e-12);
  assert.ok(Math.abs(ys[0][49] - 0.05) < 1e-12);
});

test("a chart's drawn points and stroke stay bounded however many ranks and steps", () => {
  // 64 ranks, a full 2000-point window each, late in a run (steps far from zero), noisy values.
  const series = [];
  for (let r = 0; r < 64; r++) {
    const s = new Series(2000);
    for (let i = 0; i < 3000; i++) s.push(500000 + 3 * i, 0.05 * Math.sin(i * 3 / 7 + r));
    series.push(s);
  }
  const { buckets, width } = chartStyle(series.length, 1);
  const { x, ys } = downsample(series, buckets);
  const drawn = ys.reduce((n, y) => n + y.filter((v) => v !== null).length, 0);
  assert.ok(drawn <= CHART_POINT_BUDGET, `${drawn} points drawn for 64 series, budget ${CHART_POINT_BUDGET}`);
  assert.equal(x.length, buckets);
  assert.equal(x[0], 500000 + 3 * 1000);
  assert.equal(x[x.length - 1], 500000 + 3 * 2999);
  // Many noisy lines: a one-device-pixel stroke (the cheap hairline path of a software canvas).
  assert.ok(width * 1 <= 1 && chartStyle(64, 2).width * 2 <= 1);
  // A few lines keep the thicker, easier to read stroke and the full resolution.
  assert.deepEqual(chartStyle(2, 1), { buckets: 400, width: 1.25 });
  assert.equal(chartStyle(1000, 1).buckets, 50);
  assert.equal(chartStyle(64, Number.NaN).width, 1);
});

test("downsample of nothing is empty", () => {
  assert.deepEqual(downsample([new Series(4)], 10), { x: [], ys: [[]] });
});

test("metric store bounds series and metrics", () => {
  const st = new MetricStore({ capacity: 4, maxSeriesPerMetric: 2, maxMetrics: 1 });
  assert.deepEqual(st.add(0, "", 1, { loss: 1, lr: 0.1 }), ["loss"]);
  st.add(1, "b", 1, { loss: 2 });
  st.add(2, "", 1, { loss: 3 });
  assert.deepEqual([...st.metrics.get("loss").keys()], ["r0", "r1/b"]);
  assert.equal(st.dropped, 2);
});

test("knob bounds read like the weaver's", () => {
  assert.equal(describeBounds(LR), "(0, 10]");
  assert.equal(describeBounds({ min: null, max: 1, maxExclusive: true }), "(-inf, 1)");
});

test("out-of-range and wrong-type values are refused with the bound named", () => {
  assert.deepEqual(validateKnob("lr", LR, "-1"), { ok: false, error: "lr=-1 rejected: must be in (0, 10]" });
  assert.deepEqual(validateKnob("lr", LR, "0"), { ok: false, error: "lr=0 rejected: must be in (0, 10]" });
  assert.equal(validateKnob("lr", LR, "abc").error, "lr='abc' rejected: expected a float (e.g. 0.001)");
  assert.equal(validateKnob("lr", LR, "nan").error, "lr=nan rejected: must be a finite number");
  assert.match(validateKnob("lr@tail", LR, "1").error, /names no parameter group of knob 'lr': its groups are head/);
  assert.deepEqual(validateKnob("lr", LR, "1e-3"), { ok: true, value: 0.001 });
  assert.deepEqual(validateKnob("lr@head", LR, "10"), { ok: true, value: 10 });
});

test("int, bool, str and float-list knobs", () => {
  const n = { name: "accum", type: "int", min: 1, max: 64 };
  assert.deepEqual(validateKnob("accum", n, "4"), { ok: true, value: 4 });
  assert.match(validateKnob("accum", n, "4.5").error, /expected an integer/);
  assert.match(validateKnob("accum", n, "0").error, /must be in \[1, 64\]/);
  assert.deepEqual(validateKnob("ema", { name: "ema", type: "bool" }, "on"), { ok: true, value: true });
  assert.match(validateKnob("ema", { name: "ema", type: "bool" }, "maybe").error, /expected true or false/);
  const mode = { name: "mode", type: "str", choices: ["a", "b"] };
  assert.match(validateKnob("mode", mode, "c").error, /must be one of a, b/);
  const betas = { name: "betas", type: "float_list", min: 0, max: 1, maxExclusive: true };
  assert.deepEqual(validateKnob("betas", betas, "0.9, 0.999"), { ok: true, value: [0.9, 0.999] });
  assert.match(validateKnob("betas", betas, "0.9,1").error, /must be in \[0, 1\)/);
});

test("timeline merges a command's event, acks and outcome into one entry, newest first", () => {
  const t = new Timeline(3);
  t.add({ kind: "rank_joined", time_s: 1 });
  t.add({ kind: "command", command_id: "c1", status: "pending", time_s: 2 });
  t.add({ kind: "command", command_id: "c1", status: "applied", body: "set lr=0.1", time_s: 3 });
  t.add({ kind: "command", command_id: "c1", status: "pending", time_s: 4 });
  assert.equal(t.entries.length, 2);
  assert.equal(t.entries[0].status, "applied");
  assert.equal(t.entries[0].body, "set lr=0.1");
  for (let i = 0; i < 5; i++) t.add({ kind: "rank_dead", time_s: 10 + i });
  assert.equal(t.entries.length, 3);
  assert.equal(t.byCommand.size, 0);
});

test("command bodies read plainly", () => {
  assert.equal(describeBody({ set: { lr: 0.01, "lr@head": 0.5 } }), "set lr=0.01 lr@head=0.5");
  assert.equal(describeBody({ action: { kind: "rollback", args: { checkpoint: "ckpt-3" } } }), "rollback checkpoint=ckpt-3");
});

test("a rolled-back branch's series starts at the fork step with the parent's value there", () => {
  const store = new MetricStore({ capacity: 100 });
  for (let step = 0; step < 10; step++) store.add(0, "main", step, { loss: 10 - step });
  assert.equal(seriesKey(0, "main"), "r0");
  assert.deepEqual(store.seedBranch(0, "b4", "main", 5, ["loss", "missing"]), ["loss"]);
  store.add(0, "b4", 6, { loss: 1 });
  assert.deepEqual(store.metrics.get("loss").get("r0/b4").toArrays(), { steps: [5, 6], values: [5, 1] });
  assert.deepEqual(store.seedBranch(0, "b4", "main", 5, ["loss"]), []); // once
});

test("branch rows nest by parent and mark the current branch", () => {
  const rows = branchRows(
    [
      { id: "b9", parent: "main", fork_step: 30, seq: 9, from_checkpoint: "ckpt-2" },
      { id: "main", parent: "", fork_step: 0, seq: 0 },
      { id: "b12", parent: "b9", fork_step: 40, seq: 12, from_checkpoint: "ckpt-10" },
      { id: "b5", parent: "main", fork_step: 10, seq: 5, from_checkpoint: "ckpt-1" },
    ],
    "b12",
  );
  assert.deepEqual(rows.map((r) => [r.id, r.depth, r.current]), [["main", 0, false], ["b5", 1, false], ["b9", 1, false], ["b12", 2, true]]);
});

test("rank health prefers the weaver's verdict and keeps a device's own reason", () => {
  const sick = { healthy: false, unhealthy_reason: "XID 79: GPU fell off the bus" };
  assert.deepEqual(rankHealth(null, sick), { state: "unhealthy", reason: "XID 79: GPU fell off the bus" });
  assert.deepEqual(rankHealth({ health: "healthy", health_reason: "" }, sick).state, "unhealthy");
  assert.deepEqual(rankHealth({ health: "dead", health_reason: "no heartbeat for 5 s" }, { healthy: true }), { state: "dead", reason: "no heartbeat for 5 s" });
  assert.deepEqual(rankHealth(null, { healthy: true }), { state: "healthy", reason: "" });
});

test("a command id is a fresh uuid4 in hex, with or without crypto.randomUUID", () => {
  const uuid4Hex = /^[0-9a-f]{12}4[0-9a-f]{3}[89ab][0-9a-f]{15}$/;
  const a = newCommandId();
  assert.match(a, uuid4Hex);
  assert.notEqual(newCommandId(), a);
  const noRandomUUID = { getRandomValues: (b) => globalThis.crypto.getRandomValues(b) };
  const b = newCommandId(noRandomUUID);
  assert.match(b, uuid4Hex);
  assert.notEqual(newCommandId(noRandomUUID), b);
});

test("a submit is retried only when no weaver answered, saying whether it may have been taken", () => {
  assert.equal(submitFailure(new Error("503 no responders: 'torchloom.v1.api.submit'")), "unsent");
  assert.equal(submitFailure(new Error("NATS unreachable: cannot send the command now")), "unsent");
  assert.equal(submitFailure(new Error("TimeoutError: timeout")), "unknown");
  assert.equal(submitFailure(new Error("connection closed")), "unknown");
  assert.equal(submitFailure(new Error("read-only page: it cannot steer the job")), null);
  assert.equal(submitFailure(new RangeError("unknown action 'explode'")), null);
});

// ---- autopilot proposals -------------------------------------------------------------------------

function proposed(id, { job = "j", run = "r1", t = 10, source = "rule", extra = {} } = {}) {
  const who = source === "agent" ? { agent: "agent:bot", policy: "p" } : { rule: "spike", signal: "loss_spike", step: "40", value: "5", threshold: "3" };
  return {
    job,
    run_id: run,
    kind: `${source}_proposed`,
    message: "m",
    time_s: t,
    command_id: `c-${id}`,
    attrs: { proposal: id, commands: JSON.stringify([{ set: { lr: 0.005 } }, { action: "rollback", checkpoint: "ckpt-3" }]), alerts: "[]", ...who, ...extra },
  };
}

test("a proposal is pending from its event until approved or refused, with who decided", () => {
  const p = new Proposals();
  assert.equal(p.note(proposed("a")), true);
  assert.equal(p.note(proposed("b", { t: 11, source: "agent" })), true);
  assert.equal(p.note(proposed("a")), false); // history and live overlap
  const [b, a] = p.pending("j");
  assert.deepEqual([a.id, a.source, a.who, a.commands], ["a", "rule", "spike", ["set lr=0.005", "rollback checkpoint=ckpt-3"]]);
  assert.equal(a.reason, "loss_spike at step 40: 5 (threshold 3)");
  assert.deepEqual([b.source, b.who, b.reason], ["agent", "agent:bot", "agent proposal held for approval by policy p"]);
  p.note({ job: "j", kind: "rule_approved", time_s: 12, attrs: { proposal: "a", decided_by: "ui-operator" } });
  p.note({ job: "j", kind: "agent_refused_by_operator", time_s: 13, attrs: { proposal: "b" } });
  assert.deepEqual(p.pending("j"), []);
  assert.equal(p.byId.get("a").status, "approved");
  assert.equal(p.byId.get("a").decided_by, "ui-operator");
  assert.equal(p.byId.get("b").status, "refused");
  // A decision read before its proposal (history in any order) keeps the proposal closed.
  p.note({ job: "j", kind: "rule_refused_by_operator", time_s: 20, attrs: { proposal: "c", rule: "r" } });
  assert.equal(p.note(proposed("c", { t: 19 })), false);
  assert.deepEqual(p.pending("j"), []);
});

test("a proposal expires with a new policy, a new run, the weaver's bound, or the weaver's answer", () => {
  const p = new Proposals();
  p.note(proposed("a", { t: 10 }));
  p.note(proposed("other-job", { job: "k", t: 10 }));
  p.note({ job: "j", kind: "policy_set", time_s: 11, attrs: { policy: "x", text: "" } });
  assert.deepEqual(p.pending("j"), []);
  assert.equal(p.byId.get("a").note, "the job's policy was set again");
  assert.equal(p.pending("k").length, 1); // another job's policy is not this one's
  p.note(proposed("old-run", { t: 12, run: "r0" }));
  assert.deepEqual(p.pending("j", "r1"), []);
  p.note(proposed("b", { t: 13 }));
  assert.equal(p.expire("b", "job j has no pending proposal 'b'"), true);
  assert.equal(p.expire("b", "again"), false);
  assert.equal(p.byId.get("b").status, "expired");
  for (let i = 0; i <= MAX_PENDING_PROPOSALS; i++) p.note(proposed(`n${i}`, { job: "m", t: 100 + i }));
  const left = p.pending("m");
  assert.equal(left.length, MAX_PENDING_PROPOSALS);
  assert.equal(left.at(-1).id, "n1"); // the oldest went, as in the weaver
  assert.equal(p.byId.get("n0").status, "expired");
});

test("a proposal a restarted weaver dropped is no longer pending, in either order", () => {
  const p = new Proposals();
  p.note(proposed("a", { t: 10 }));
  const dropped = (id, t) => ({
    job: "j", kind: "proposal_dropped", time_s: t, attrs: { proposal: id, source: "rule", rule: "r" },
  });
  assert.equal(p.note(dropped("a", 20)), true);
  assert.deepEqual(p.pending("j"), []);
  assert.equal(p.byId.get("a").status, "expired");
  assert.match(p.byId.get("a").note, /weaver restarted/);
  assert.equal(p.note(dropped("a", 21)), false); // once
  // Read before its proposal (the journal's history): the proposal never shows as pending.
  p.note(dropped("b", 30));
  assert.equal(p.note(proposed("b", { t: 29 })), false);
  assert.deepEqual(p.pending("j"), []);
});

test("proposed commands and decision answers read as a person says them", () => {
  assert.equal(describeProposedCommand({ set: { lr: 0.005, "lr@head": 0.1 } }), "set lr=0.005 lr@head=0.1");
  assert.equal(describeProposedCommand({ action: "checkpoint" }), "checkpoint");
  const p = new Proposals();
  p.note(proposed("x", { extra: { commands: "not json", alerts: '["look"]' } }));
  assert.deepEqual(p.pending("j")[0].commands, ["not json"]);
  assert.match(p.pending("j")[0].reason, /; alert: look$/);
  assert.deepEqual(decisionResult("approve", "x", { kind: "rule_approved", attrs: { decided_by: "ui-operator" } }), {
    ok: true,
    text: "approve x: approved: its commands were sent by ui-operator",
  });
  assert.deepEqual(decisionResult("refuse", "x", { kind: "rule_refused_by_operator", attrs: {} }), {
    ok: true,
    text: "refuse x: refused: nothing sent",
  });
  assert.deepEqual(decisionResult("approve", "x", { kind: DECIDE_FAILED, message: "job j has no pending proposal 'x'" }), {
    ok: false,
    text: "approve x: not decided: job j has no pending proposal 'x'",
  });
});

test("a feed delivery's stream sequence and pending count come from its JetStream reply subject", () => {
  assert.deepEqual(feedDelivery("$JS.ACK.TORCHLOOM_JOURNAL.ui-feed-1.1.3.1.1796166772980136402.7"), {
    streamSeq: 3,
    pending: 7,
  });
  // The form with a domain and an account hash (and the optional trailing token).
  assert.deepEqual(feedDelivery("$JS.ACK._.ACC.TORCHLOOM_JOURNAL.ui-feed-1.1.42.9.17.0"), { streamSeq: 42, pending: 0 });
  assert.deepEqual(feedDelivery("$JS.ACK._.ACC.TORCHLOOM_JOURNAL.ui-feed-1.1.42.9.17.0.xyz"), { streamSeq: 42, pending: 0 });
  for (const other of ["", undefined, "_INBOX.ui-viewer.x", "$JS.ACK.S.C.1.x.1.1.1", "$JS.ACK.S.C.1.2"]) {
    assert.equal(feedDelivery(other), null, String(other));
  }
});

test("a feed request names the role's inbox and the weaver's refusal becomes an error", () => {
  assert.equal(feedOwner(true), "ui-viewer");
  assert.equal(feedOwner(false), "ui-operator");
  assert.deepEqual(JSON.parse(new TextDecoder().decode(feedRequest("_INBOX.ui-viewer.feed.a", 2000))), {
    deliver: "_INBOX.ui-viewer.feed.a",
    max_entries: 2000,
  });
  const enc = (o) => new TextEncoder().encode(JSON.stringify(o));
  assert.deepEqual(parseFeedReply(enc({ consumer: "ui-feed-x", first_seq: 5, last_seq: 9, error: "" })), {
    consumer: "ui-feed-x",
    firstSeq: 5,
    lastSeq: 9,
  });
  assert.equal(parseFeedReply(enc({ consumer: "", first_seq: 0, last_seq: 0, error: "" })).lastSeq, 0);
  assert.throws(() => parseFeedReply(enc({ error: "ui-viewer already holds 16 journal feeds" })), /holds 16/);
});

test("a values-only heartbeat updates the knobs the page holds, and only those", () => {
  const lr = { ...LR, value: 0.001 };
  const wd = { name: "weight_decay", type: "float", value: 0.1 };
  const updates = knobValueUpdates([lr, wd], { lr: 0.02, unknown: 5 });
  assert.deepEqual(updates, [[lr, 0.02]]);
  assert.deepEqual(knobValueUpdates([lr], {}), []);
  assert.deepEqual(knobValueUpdates([lr], undefined), []);
});
