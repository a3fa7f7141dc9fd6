// The UI's wire edge round-trips the messages it sends and reads (generated code from proto/).
import assert from "node:assert/strict";
import { test } from "node:test";
import { torchloom } from "../src/gen/torchloom.js";
import { decodeHeartbeat, decodeJobEvent, decodeOutcome, encodeProposalDecision, encodeSubmit } from "../src/proto.js";

const pb = torchloom.v1;

test("a SubmitRequest from the UI carries issuer kind ui and typed values", () => {
  const bytes = encodeSubmit({ job: "j", identity: "ui@x", timeout_s: 5, set: { lr: { value: 0.01, type: "float" }, n: { value: 3, type: "int" } } });
  const req = pb.SubmitRequest.decode(bytes);
  assert.equal(req.issuer.kind, "ui");
  assert.equal(req.job, "j");
  assert.equal(req.set.values.lr.f, 0.01);
  assert.equal(Number(req.set.values.n.i), 3);
  const act = pb.SubmitRequest.decode(encodeSubmit({ job: "", action: { kind: "pause" } }));
  assert.equal(act.action.kind, pb.ActionKind.ACTION_KIND_PAUSE);
  assert.throws(() => encodeSubmit({ action: { kind: "explode" } }), /unknown action 'explode'/);
});

test("a SubmitRequest carries the action's command id, so the weaver decides a retry once", () => {
  const id = "0123456789abcdef0123456789abcdef";
  const req = pb.SubmitRequest.decode(encodeSubmit({ job: "j", command_id: id, action: { kind: "eval" } }));
  assert.equal(req.command_id, id);
  assert.equal(pb.SubmitRequest.decode(encodeSubmit({ job: "j", action: { kind: "eval" } })).command_id, "");
});

test("heartbeat knobs keep unset bounds as null and enums as names", () => {
  const hb = pb.Heartbeat.encode(
    pb.Heartbeat.create({
      job: "j",
      rank: 1,
      step: 42,
      state: pb.RankState.RANK_STATE_PAUSED,
      knobs: [pb.KnobSpec.create({ name: "lr", type: pb.KnobType.KNOB_TYPE_FLOAT, min: 0, min_exclusive: true, value: pb.Value.create({ f: 0.1 }) })],
      device: pb.DeviceHealth.create({ healthy: false, unhealthy_reason: "xid 79", xids: [79] }),
    }),
  ).finish();
  const d = decodeHeartbeat(hb);
  assert.equal(d.step, 42);
  assert.equal(d.state, "paused");
  assert.deepEqual([d.knobs[0].min, d.knobs[0].max, d.knobs[0].minExclusive, d.knobs[0].type, d.knobs[0].value], [0, null, true, "float", 0.1]);
  assert.equal(d.device.healthy, false);
  assert.deepEqual(d.device.xids, [79]);
});

test("outcome results decode per rank", () => {
  const o = pb.Outcome.encode(
    pb.Outcome.create({
      command_id: "c",
      status: pb.OutcomeStatus.OUTCOME_STATUS_REJECTED,
      reason: "rank 1: nope",
      results: [pb.RankResult.create({ rank: 1, status: pb.AckStatus.ACK_STATUS_REJECTED, step: 7, reason: "nope" })],
      command: pb.Command.create({ seq: 3, issuer: pb.Issuer.create({ kind: "ui" }), set: pb.SetConfig.create({ values: { lr: pb.Value.create({ f: 1 }) } }) }),
    }),
  ).finish();
  const d = decodeOutcome(o);
  assert.equal(d.status, "rejected");
  assert.deepEqual(d.results[0], { rank: 1, status: "rejected", step: 7, reason: "nope", detail: {}, branch: "" });
  assert.equal(d.command.seq, 3);
  assert.deepEqual(d.command.body, { set: { lr: 1 } });
});

test("a refused attempt's outcome carries who asked and what, with no command", () => {
  const o = pb.Outcome.encode(
    pb.Outcome.create({
      command_id: "c9",
      job: "j",
      status: pb.OutcomeStatus.OUTCOME_STATUS_REJECTED,
      reason: "lr=-1 rejected",
      issuer: pb.Issuer.create({ kind: "cli", identity: "ann@host" }),
      set: pb.SetConfig.create({ values: { lr: pb.Value.create({ f: -1 }) } }),
    }),
  ).finish();
  const d = decodeOutcome(o);
  assert.equal(d.command, null);
  assert.deepEqual(d.issuer, { kind: "cli", identity: "ann@host" });
  assert.deepEqual(d.attempted, { set: { lr: -1 } });
});

test("a ProposalDecision carries the job, the proposal and the answer; its reply is a JobEvent", () => {
  const d = pb.ProposalDecision.decode(encodeProposalDecision({ job: "j", proposal_id: "abc", approve: true }));
  assert.deepEqual([d.job, d.proposal_id, d.approve], ["j", "abc", true]);
  assert.equal(pb.ProposalDecision.decode(encodeProposalDecision({ proposal_id: "abc" })).approve, false);
  assert.throws(() => encodeProposalDecision({ job: "j" }), /needs the proposal's id/);
  const ev = pb.JobEvent.encode(pb.JobEvent.create({ job: "j", kind: "rule_approved", attrs: { decided_by: "ui-operator" } })).finish();
  assert.deepEqual(decodeJobEvent(ev).attrs, { decided_by: "ui-operator" });
});

test("a heartbeat between two full knob lists carries the current values alone", () => {
  const hb = pb.Heartbeat.encode(
    pb.Heartbeat.create({ job: "j", rank: 0, knobs_hash: 7, knob_values: { lr: pb.Value.create({ f: 0.02 }), n: pb.Value.create({ i: 3 }) } }),
  ).finish();
  const d = decodeHeartbeat(hb);
  assert.deepEqual(d.knobs, []);
  assert.deepEqual(d.knob_values, { lr: 0.02, n: 3 });
});
