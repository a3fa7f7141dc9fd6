"""The wire edge: the only module that touches generated protobuf classes.

`encode(msg)` turns any `torchloom.messages` dataclass into bytes; `decode_<name>(data)` turns bytes
back. Decoding malformed bytes raises `WireError` (a ValueError), never a protobuf exception.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from google.protobuf.message import DecodeError

from torchloom import messages as m
from torchloom.errors import TorchloomError
from torchloom.v1 import torchloom_pb2 as pb


class WireError(TorchloomError, ValueError):
    """Bytes that are not the expected protobuf message."""


_ACTION = {
    m.ActionKind.PAUSE: pb.ACTION_KIND_PAUSE,
    m.ActionKind.RESUME: pb.ACTION_KIND_RESUME,
    m.ActionKind.CHECKPOINT: pb.ACTION_KIND_CHECKPOINT,
    m.ActionKind.ROLLBACK: pb.ACTION_KIND_ROLLBACK,
    m.ActionKind.STOP: pb.ACTION_KIND_STOP,
    m.ActionKind.EVAL: pb.ACTION_KIND_EVAL,
    m.ActionKind.DATA_ADD: pb.ACTION_KIND_DATA_ADD,
    m.ActionKind.FAULT_INJECT: pb.ACTION_KIND_FAULT_INJECT,
}
_ACTION_BACK = {v: k for k, v in _ACTION.items()}
_ACK = {m.AckStatus.APPLIED: pb.ACK_STATUS_APPLIED, m.AckStatus.REJECTED: pb.ACK_STATUS_REJECTED}
_ACK_BACK = {v: k for k, v in _ACK.items()}
_OUTCOME = {
    m.OutcomeStatus.PENDING: pb.OUTCOME_STATUS_PENDING,
    m.OutcomeStatus.APPLIED: pb.OUTCOME_STATUS_APPLIED,
    m.OutcomeStatus.REJECTED: pb.OUTCOME_STATUS_REJECTED,
    m.OutcomeStatus.TIMEOUT: pb.OUTCOME_STATUS_TIMEOUT,
}
_OUTCOME_BACK = {v: k for k, v in _OUTCOME.items()}
_STATE = {
    m.RankState.RUNNING: pb.RANK_STATE_RUNNING,
    m.RankState.PAUSED: pb.RANK_STATE_PAUSED,
    m.RankState.FINISHED: pb.RANK_STATE_FINISHED,
}
_STATE_BACK = {v: k for k, v in _STATE.items()}
_KNOB_TYPE = {
    m.KnobType.FLOAT: pb.KNOB_TYPE_FLOAT,
    m.KnobType.INT: pb.KNOB_TYPE_INT,
    m.KnobType.BOOL: pb.KNOB_TYPE_BOOL,
    m.KnobType.STR: pb.KNOB_TYPE_STR,
    m.KnobType.FLOAT_LIST: pb.KNOB_TYPE_FLOAT_LIST,
}
_KNOB_TYPE_BACK = {v: k for k, v in _KNOB_TYPE.items()}


def _enum_back(table: Mapping[Any, Any], value: int, what: str) -> Any:
    try:
        return table[value]
    except KeyError:
        raise WireError(f"unknown {what} enum value {value}") from None


def _scalar_fields(cls: Any, *by_hand: str) -> tuple[str, ...]:
    """A dataclass's field names that copy as-is to and from the same-named protobuf field: all but
    `by_hand` (enums, maps, repeated and nested messages, converted explicitly)."""
    return tuple(name for name in cls.__dataclass_fields__ if name not in by_hand)


def _copy(src: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """`names` read off `src` (a dataclass or a protobuf message), as constructor keyword arguments."""
    return {name: getattr(src, name) for name in names}


def _set(out: Any, src: Any, names: tuple[str, ...]) -> None:
    for name in names:
        setattr(out, name, getattr(src, name))


_COMMAND_FIELDS = _scalar_fields(m.Command, "issuer", "body")
_ACK_FIELDS = _scalar_fields(m.Ack, "status", "detail")
_HEARTBEAT_FIELDS = _scalar_fields(m.Heartbeat, "state", "knobs", "device", "knob_values")
_METRICS_FIELDS = _scalar_fields(m.StepMetrics, "values")
_EVENT_FIELDS = _scalar_fields(m.JobEvent, "attrs")
_RESTART_FIELDS = _scalar_fields(m.RestartRequest, "exclude_ranks")
_RESULT_FIELDS = _scalar_fields(m.RankResult, "status", "detail")
_OUTCOME_FIELDS = _scalar_fields(m.Outcome, "status", "results", "command", "issuer", "attempted")
_RANK_STATUS_FIELDS = _scalar_fields(m.RankStatus, "state", "knobs", "device")
_JOB_STATUS_FIELDS = _scalar_fields(m.JobStatus, "ranks", "knobs", "checkpoints", "branches")
_CHECKPOINT_FIELDS = _scalar_fields(m.CheckpointInfo)
_BRANCH_FIELDS = _scalar_fields(m.BranchInfo)
_DEVICE_FIELDS = _scalar_fields(m.DeviceHealth, "xids")


# ---- values -------------------------------------------------------------------------------------


def _value_to_pb(value: m.KnobValue, out: pb.Value) -> None:
    # bool before int: bool is a subclass of int.
    if isinstance(value, bool):
        out.b = value
    elif isinstance(value, int):
        out.i = value
    elif isinstance(value, float):
        out.f = value
    elif isinstance(value, str):
        out.s = value
    elif isinstance(value, tuple | list):
        out.fl.values.extend(float(v) for v in value)
    else:
        raise WireError(f"cannot encode knob value of type {type(value).__name__}")


def _value_from_pb(value: pb.Value) -> m.KnobValue:
    kind = value.WhichOneof("kind")
    if kind == "f":
        return value.f
    if kind == "i":
        return value.i
    if kind == "b":
        return value.b
    if kind == "s":
        return value.s
    if kind == "fl":
        return tuple(value.fl.values)
    raise WireError("knob value has no kind set")


def _values_to_pb(values: Mapping[str, m.KnobValue], out: Any) -> None:
    for key, value in values.items():
        _value_to_pb(value, out[key])


def _values_from_pb(values: Any) -> dict[str, m.KnobValue]:
    return {key: _value_from_pb(values[key]) for key in sorted(values)}


# ---- bodies -------------------------------------------------------------------------------------


def _body_to_pb(body: m.Body, out: Any) -> None:
    if isinstance(body, m.SetConfig):
        out.set.SetInParent()
        _values_to_pb(body.values, out.set.values)
    else:
        out.action.kind = _ACTION[body.kind]
        for key, value in body.args.items():
            out.action.args[key] = value


def _body_from_pb(msg: Any) -> m.Body:
    which = msg.WhichOneof("body")
    if which == "set":
        return m.SetConfig(values=_values_from_pb(msg.set.values))
    if which == "action":
        return m.Action(
            kind=_enum_back(_ACTION_BACK, msg.action.kind, "action"),
            args=dict(sorted(msg.action.args.items())),
        )
    raise WireError("message has neither a config change nor an action")


def _issuer_to_pb(issuer: m.Issuer, out: pb.Issuer) -> None:
    out.kind = issuer.kind
    out.identity = issuer.identity
    out.claimed_identity = issuer.claimed_identity


def _issuer_from_pb(msg: pb.Issuer) -> m.Issuer:
    return m.Issuer(kind=msg.kind, identity=msg.identity, claimed_identity=msg.claimed_identity)


# ---- to protobuf --------------------------------------------------------------------------------


def _command_to_pb(cmd: m.Command, out: pb.Command) -> None:
    _set(out, cmd, _COMMAND_FIELDS)
    _issuer_to_pb(cmd.issuer, out.issuer)
    _body_to_pb(cmd.body, out)


def _knob_to_pb(spec: m.KnobSpec, out: pb.KnobSpec) -> None:
    out.name = spec.name
    out.type = _KNOB_TYPE[spec.type]
    if spec.min is not None:
        out.min = spec.min
    if spec.max is not None:
        out.max = spec.max
    out.min_exclusive = spec.min_exclusive
    out.max_exclusive = spec.max_exclusive
    out.description = spec.description
    if spec.value is not None:
        _value_to_pb(spec.value, out.value)
    out.groups.extend(spec.groups)
    out.choices.extend(spec.choices)


def _device_to_pb(dev: m.DeviceHealth, out: pb.DeviceHealth) -> None:
    _set(out, dev, _DEVICE_FIELDS)
    out.xids.extend(dev.xids)


def _device_from_pb(msg: pb.DeviceHealth) -> m.DeviceHealth:
    return m.DeviceHealth(xids=tuple(msg.xids), **_copy(msg, _DEVICE_FIELDS))


def _rank_result_to_pb(res: m.RankResult, out: pb.RankResult) -> None:
    _set(out, res, _RESULT_FIELDS)
    out.status = _ACK[res.status]
    out.detail.update(res.detail)


def _outcome_to_pb(o: m.Outcome, out: pb.Outcome) -> None:
    _set(out, o, _OUTCOME_FIELDS)
    out.status = _OUTCOME[o.status]
    for res in o.results:
        _rank_result_to_pb(res, out.results.add())
    if o.command is not None:
        _command_to_pb(o.command, out.command)
    if o.issuer is not None:
        _issuer_to_pb(o.issuer, out.issuer)
    if o.attempted is not None:
        _body_to_pb(o.attempted, out)


def _metrics_to_pb(sm: m.StepMetrics, out: pb.StepMetrics) -> None:
    _set(out, sm, _METRICS_FIELDS)
    out.values.update(sm.values)


def _event_to_pb(ev: m.JobEvent, out: pb.JobEvent) -> None:
    _set(out, ev, _EVENT_FIELDS)
    out.attrs.update(ev.attrs)


def _rank_status_to_pb(rs: m.RankStatus, out: pb.RankStatus) -> None:
    _set(out, rs, _RANK_STATUS_FIELDS)
    out.state = _STATE[rs.state]
    _values_to_pb(rs.knobs, out.knobs)
    if rs.device is not None:
        _device_to_pb(rs.device, out.device)


def to_pb(msg: Any) -> Any:
    """Convert a `torchloom.messages` dataclass to its protobuf message."""
    if isinstance(msg, m.Command):
        out_cmd = pb.Command()
        _command_to_pb(msg, out_cmd)
        return out_cmd
    if isinstance(msg, m.Ack):
        return pb.Ack(status=_ACK[msg.status], detail=dict(msg.detail), **_copy(msg, _ACK_FIELDS))
    if isinstance(msg, m.Heartbeat):
        hb = pb.Heartbeat(state=_STATE[msg.state], **_copy(msg, _HEARTBEAT_FIELDS))
        for spec in msg.knobs:
            _knob_to_pb(spec, hb.knobs.add())
        _values_to_pb(msg.knob_values, hb.knob_values)
        if msg.device is not None:
            _device_to_pb(msg.device, hb.device)
        return hb
    if isinstance(msg, m.StepMetrics):
        out_sm = pb.StepMetrics()
        _metrics_to_pb(msg, out_sm)
        return out_sm
    if isinstance(msg, m.JobEvent):
        out_ev = pb.JobEvent()
        _event_to_pb(msg, out_ev)
        return out_ev
    if isinstance(msg, m.RestartRequest):
        return pb.RestartRequest(exclude_ranks=msg.exclude_ranks, **_copy(msg, _RESTART_FIELDS))
    if isinstance(msg, m.Outcome):
        out_o = pb.Outcome()
        _outcome_to_pb(msg, out_o)
        return out_o
    if isinstance(msg, m.SubmitRequest):
        req = pb.SubmitRequest(
            job=msg.job, timeout_s=msg.timeout_s, command_id=msg.command_id, reason=msg.reason
        )
        _issuer_to_pb(msg.issuer, req.issuer)
        _body_to_pb(msg.body, req)
        return req
    if isinstance(msg, m.StatusRequest):
        return pb.StatusRequest(job=msg.job)
    if isinstance(msg, m.AgentRefusal):
        return pb.AgentRefusal(job=msg.job, reason=msg.reason, reply=msg.reply)
    if isinstance(msg, m.WatchRequest):
        return pb.WatchRequest(job=msg.job)
    if isinstance(msg, m.JournalRequest):
        return pb.JournalRequest(job=msg.job, follow=msg.follow, run_id=msg.run_id, command_id=msg.command_id)
    if isinstance(msg, m.KnobSpec):
        out_k = pb.KnobSpec()
        _knob_to_pb(msg, out_k)
        return out_k
    if isinstance(msg, m.DeviceHealth):
        out_d = pb.DeviceHealth()
        _device_to_pb(msg, out_d)
        return out_d
    if isinstance(msg, m.StatusReply):
        reply = pb.StatusReply()
        for js in msg.jobs:
            out_js = reply.jobs.add(**_copy(js, _JOB_STATUS_FIELDS))
            for ck in js.checkpoints:
                out_js.checkpoints.add(**_copy(ck, _CHECKPOINT_FIELDS))
            for br in js.branches:
                out_js.branches.add(**_copy(br, _BRANCH_FIELDS))
            for rs in js.ranks:
                _rank_status_to_pb(rs, out_js.ranks.add())
            for spec in js.knobs:
                _knob_to_pb(spec, out_js.knobs.add())
        return reply
    if isinstance(msg, m.PolicyRequest):
        return pb.PolicyRequest(job=msg.job, text=msg.text)
    if isinstance(msg, m.PolicyReply):
        out_p = pb.PolicyReply(job=msg.job, name=msg.name, text=msg.text)
        for ev in msg.proposals:
            _event_to_pb(ev, out_p.proposals.add())
        return out_p
    if isinstance(msg, m.ProposalDecision):
        return pb.ProposalDecision(job=msg.job, proposal_id=msg.proposal_id, approve=msg.approve)
    raise WireError(f"cannot encode {type(msg).__name__}")


def encode(msg: Any) -> bytes:
    """Serialize a `torchloom.messages` dataclass (or a WatchEvent) to protobuf bytes."""
    return bytes(to_pb(msg).SerializeToString())


# The largest command body (a config change's values, an action's arguments) the weaver sequences,
# and the largest refused one it journals: a command reaches every rank and every journal read.
BODY_MAX_BYTES = 16 * 1024


def body_size(body: m.Body) -> int:
    """The bytes `body` (a config change or an action) takes on the wire."""
    out = pb.SubmitRequest()
    _body_to_pb(body, out)
    return int(out.ByteSize())


def encode_watch_event(ev: m.WatchEvent) -> bytes:
    out = pb.WatchEvent()
    if isinstance(ev, m.StepMetrics):
        _metrics_to_pb(ev, out.metrics)
    elif isinstance(ev, m.JobEvent):
        _event_to_pb(ev, out.event)
    else:
        _outcome_to_pb(ev, out.outcome)
    return bytes(out.SerializeToString())


# ---- from protobuf ------------------------------------------------------------------------------


def _parse(cls: Any, data: bytes) -> Any:
    msg = cls()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise WireError(f"malformed {cls.DESCRIPTOR.name}: {exc}") from None
    return msg


def _command_from_pb(msg: pb.Command) -> m.Command:
    return m.Command(
        issuer=_issuer_from_pb(msg.issuer), body=_body_from_pb(msg), **_copy(msg, _COMMAND_FIELDS)
    )


def _knob_from_pb(msg: pb.KnobSpec) -> m.KnobSpec:
    return m.KnobSpec(
        name=msg.name,
        type=_enum_back(_KNOB_TYPE_BACK, msg.type, "knob type"),
        min=msg.min if msg.HasField("min") else None,
        max=msg.max if msg.HasField("max") else None,
        min_exclusive=msg.min_exclusive,
        max_exclusive=msg.max_exclusive,
        description=msg.description,
        value=_value_from_pb(msg.value) if msg.HasField("value") else None,
        groups=tuple(msg.groups),
        choices=tuple(msg.choices),
    )


def _metrics_from_pb(msg: pb.StepMetrics) -> m.StepMetrics:
    return m.StepMetrics(values=dict(sorted(msg.values.items())), **_copy(msg, _METRICS_FIELDS))


def _event_from_pb(msg: pb.JobEvent) -> m.JobEvent:
    return m.JobEvent(attrs=dict(sorted(msg.attrs.items())), **_copy(msg, _EVENT_FIELDS))


def _outcome_from_pb(msg: pb.Outcome) -> m.Outcome:
    return m.Outcome(
        status=_enum_back(_OUTCOME_BACK, msg.status, "outcome status"),
        results=tuple(
            m.RankResult(
                status=_enum_back(_ACK_BACK, r.status, "ack status"),
                detail=dict(sorted(r.detail.items())),
                **_copy(r, _RESULT_FIELDS),
            )
            for r in msg.results
        ),
        command=_command_from_pb(msg.command) if msg.HasField("command") else None,
        issuer=_issuer_from_pb(msg.issuer) if msg.HasField("issuer") else None,
        attempted=_body_from_pb(msg) if msg.WhichOneof("body") else None,
        **_copy(msg, _OUTCOME_FIELDS),
    )


def signing_bytes(cmd: m.Command) -> bytes:
    """The bytes a command's signature covers: the Command with `signature` empty, serialized
    deterministically (map entries in key order), so the weaver and every rank compute the same."""
    out = pb.Command()
    _command_to_pb(cmd, out)
    out.ClearField("signature")
    return bytes(out.SerializeToString(deterministic=True))


SIGNATURE_BYTES = 64  # an Ed25519 signature
# The record of Command.signature holding SIGNATURE_BYTES bytes: tag (field 7, wire type 2), length.
_SIGNATURE_RECORD_HEAD = bytes(((7 << 3) | 2, SIGNATURE_BYTES))
SIGNATURE_RECORD_LEN = len(_SIGNATURE_RECORD_HEAD) + SIGNATURE_BYTES


def append_signature(signed: bytes, signature: bytes) -> bytes:
    """The Command as the weaver publishes it: `signed` (`signing_bytes` of the command) followed by
    the record of its `signature` field. A protobuf parser accepts fields in any order, so these bytes
    parse as the command with its signature set, as `encode` of the signed command does.

    Raises:
        WireError: `signature` is not SIGNATURE_BYTES bytes long.
    """
    if len(signature) != SIGNATURE_BYTES:
        raise WireError(f"a command signature has {SIGNATURE_BYTES} bytes, not {len(signature)}")
    return signed + _SIGNATURE_RECORD_HEAD + signature


def split_signature(data: bytes) -> tuple[bytes, bytes] | None:
    """`(signed, signature)` when `data` ends with a SIGNATURE_BYTES record of field 7 as
    `append_signature` writes it, else None. The split says only where the bytes would be: the same
    bytes can end another field's payload, so only a signature that verifies over `signed` makes them
    the weaver's command (`torchloom.signing.Verifier.decode_command`)."""
    if len(data) <= SIGNATURE_RECORD_LEN:
        return None
    head_at = len(data) - SIGNATURE_RECORD_LEN
    if data[head_at : head_at + len(_SIGNATURE_RECORD_HEAD)] != _SIGNATURE_RECORD_HEAD:
        return None
    return data[:head_at], data[-SIGNATURE_BYTES:]


def decode_command(data: bytes) -> m.Command:
    return _command_from_pb(_parse(pb.Command, data))


def decode_signed_command(signed: bytes, signature: bytes) -> m.Command:
    """The command in `signed` (bytes a signature was verified over) with `signature` attached; a
    signature field inside `signed` is overwritten, so the command carries the one that was checked.

    Raises:
        WireError: `signed` is not a Command.
    """
    msg = _parse(pb.Command, signed)
    msg.signature = signature
    return _command_from_pb(msg)


def decode_ack(data: bytes) -> m.Ack:
    msg = _parse(pb.Ack, data)
    return m.Ack(
        status=_enum_back(_ACK_BACK, msg.status, "ack status"),
        detail=dict(sorted(msg.detail.items())),
        **_copy(msg, _ACK_FIELDS),
    )


def decode_heartbeat(data: bytes) -> m.Heartbeat:
    msg = _parse(pb.Heartbeat, data)
    return m.Heartbeat(
        state=_enum_back(_STATE_BACK, msg.state, "rank state"),
        knobs=tuple(_knob_from_pb(k) for k in msg.knobs),
        knob_values=_values_from_pb(msg.knob_values),
        device=_device_from_pb(msg.device) if msg.HasField("device") else None,
        **_copy(msg, _HEARTBEAT_FIELDS),
    )


# A heartbeat's fields that move from one heartbeat of a rank process to its next (its progress and
# the time); everything else (identity, schema hash, knob values, a full schema) rarely changes.
_HEARTBEAT_MOVING = ("step", "sent_at_s", "step_time_s", "last_seq", "tick")
_HEARTBEAT_STATIC = tuple(name for name in _HEARTBEAT_FIELDS if name not in _HEARTBEAT_MOVING)
# Cleared from a parsed heartbeat once read, so what is left compares with the sender's last in one go.
_HEARTBEAT_CLEARED = (*_HEARTBEAT_MOVING, "state", "device")

SchemaLookup = Callable[[str, int, str, int], tuple[m.KnobSpec, ...] | None]
"""(job, rank, incarnation, schema hash) -> the schema the receiver knows for a heartbeat that sent
only that hash, or None."""


def with_knob_values(
    specs: tuple[m.KnobSpec, ...], values: Mapping[str, m.KnobValue]
) -> tuple[m.KnobSpec, ...]:
    """`specs` with the values a hash-only heartbeat reported (a knob it did not report keeps its
    spec's value). A spec whose value is unchanged, its type included (1 == 1.0 == True, but a knob
    reports one of them), is reused; with none changed, `specs` itself is returned."""
    out = []
    changed = False
    for spec in specs:
        value = values.get(spec.name, spec.value)
        if type(value) is type(spec.value) and value == spec.value:
            out.append(spec)
        else:
            out.append(dataclasses.replace(spec, value=value))
            changed = True
    return tuple(out) if changed else specs


class _Sender:
    """What a `HeartbeatDecoder` keeps of a rank process's last heartbeat."""

    __slots__ = ("device", "device_msg", "incarnation", "rest", "schema_sent", "static")

    def __init__(
        self,
        rest: Any,
        static: dict[str, Any],
        schema_sent: bool,
        device_msg: Any,
        device: m.DeviceHealth | None,
    ) -> None:
        self.rest = rest  # the message without its _HEARTBEAT_CLEARED fields
        self.incarnation: str = rest.incarnation
        self.static = static  # the Heartbeat's other fields, decoded from `rest`
        self.schema_sent = schema_sent  # `rest` carried the schema in full
        self.device_msg = device_msg
        self.device = device


class HeartbeatDecoder:
    """`decode_heartbeat` for a receiver of many heartbeats (the weaver), decoding only what changed.

    Between two heartbeats a rank process changes its progress (step, tick, state, step time, last
    seq), the time and usually its device sample; its identity, schema hash, knob values and schema
    (when sent in full) stay. So these progress fields are read straight off the message, then
    cleared, and the rest is compared with the sender's previous heartbeat as protobuf (in C, about
    1 us): when equal, its decoded fields (the knob schema and values among them) serve again, else
    they are converted. The device, compared apart, is converted only when its sample moved.

    A heartbeat that carries only its schema's hash gets the schema `schema` knows for it (with the
    heartbeat's values), asked once per change of its hash or values, again while unknown. Without
    `schema` every heartbeat decodes equal to `decode_heartbeat`.

    Args:
        max_senders: rank processes remembered; the oldest is forgotten past it.
        schema: the receiver's knob schemas (see `SchemaLookup`).
    """

    def __init__(self, max_senders: int = 65_536, *, schema: SchemaLookup | None = None) -> None:
        self._max = max_senders
        self._schema = schema
        self._last: dict[tuple[str, int], _Sender] = {}  # (job, rank) -> its last heartbeat

    def decode(self, data: bytes) -> tuple[m.Heartbeat, bool]:
        """The heartbeat in `data`, and whether it carried its knob schema in full (rather than
        being given the schema known for its hash).

        Raises:
            WireError: `data` is not a Heartbeat, or names an unknown rank state.
        """
        msg = pb.Heartbeat()
        try:
            msg.ParseFromString(data)
        except DecodeError as exc:
            raise WireError(f"malformed Heartbeat: {exc}") from None
        state = _STATE_BACK.get(msg.state)
        if state is None:
            raise WireError(f"unknown rank state enum value {msg.state}")
        # The progress, read before it is cleared (_HEARTBEAT_MOVING).
        step, sent_at_s, step_time_s, last_seq, tick = (
            msg.step, msg.sent_at_s, msg.step_time_s, msg.last_seq, msg.tick
        )  # fmt: skip
        key = (msg.job, msg.rank)
        last = self._last.get(key)
        if last is not None and last.incarnation != msg.incarnation:
            last = None
        device_msg = msg.device if msg.HasField("device") else None
        device: m.DeviceHealth | None = None
        if device_msg is not None:
            if last is not None and last.device_msg is not None and device_msg == last.device_msg:
                device = last.device
            else:
                device = _device_from_pb(device_msg)
        for name in _HEARTBEAT_CLEARED:
            msg.ClearField(name)  # type: ignore[arg-type]  # Heartbeat field names, see their tuple
        if last is not None and msg == last.rest:
            static, sent = last.static, last.schema_sent
            if not sent and not static["knobs"] and static["knobs_hash"] and self._schema is not None:
                specs = self._schema(msg.job, msg.rank, msg.incarnation, msg.knobs_hash)
                if specs:  # its schema was not known before: it is now
                    static = last.static = {**static, "knobs": with_knob_values(specs, static["knob_values"])}
            last.rest, last.device_msg, last.device = msg, device_msg, device
        else:
            static, sent = self._static(msg, last), len(msg.knobs) > 0
            if key not in self._last and len(self._last) >= self._max:
                del self._last[next(iter(self._last))]
            self._last[key] = _Sender(msg, static, sent, device_msg, device)
        return m.Heartbeat(
            state=state,
            device=device,
            step=step,
            sent_at_s=sent_at_s,
            step_time_s=step_time_s,
            last_seq=last_seq,
            tick=tick,
            **static,
        ), sent

    def _static(self, rest: Any, last: _Sender | None) -> dict[str, Any]:
        """The fields of `rest` (a heartbeat without its progress) as Heartbeat arguments; the
        schema reused from `last` when it is the same."""
        static = _copy(rest, _HEARTBEAT_STATIC)
        values = _values_from_pb(rest.knob_values)
        static["knob_values"] = values
        if rest.knobs:
            if last is not None and last.schema_sent and rest.knobs == last.rest.knobs:
                static["knobs"] = last.static["knobs"]
            else:
                static["knobs"] = tuple(_knob_from_pb(k) for k in rest.knobs)
            return static
        specs = None
        if static["knobs_hash"] and self._schema is not None:
            specs = self._schema(static["job"], static["rank"], static["incarnation"], static["knobs_hash"])
        static["knobs"] = with_knob_values(specs, values) if specs else ()
        return static


def decode_metrics(data: bytes) -> m.StepMetrics:
    return _metrics_from_pb(_parse(pb.StepMetrics, data))


def decode_event(data: bytes) -> m.JobEvent:
    return _event_from_pb(_parse(pb.JobEvent, data))


def decode_restart_request(data: bytes) -> m.RestartRequest:
    msg = _parse(pb.RestartRequest, data)
    return m.RestartRequest(exclude_ranks=tuple(msg.exclude_ranks), **_copy(msg, _RESTART_FIELDS))


def decode_outcome(data: bytes) -> m.Outcome:
    return _outcome_from_pb(_parse(pb.Outcome, data))


def decode_submit_request(data: bytes) -> m.SubmitRequest:
    msg = _parse(pb.SubmitRequest, data)
    return m.SubmitRequest(
        job=msg.job,
        issuer=_issuer_from_pb(msg.issuer),
        timeout_s=msg.timeout_s,
        body=_body_from_pb(msg),
        command_id=msg.command_id,
        reason=msg.reason,
    )


def decode_status_request(data: bytes) -> m.StatusRequest:
    return m.StatusRequest(job=_parse(pb.StatusRequest, data).job)


def decode_watch_request(data: bytes) -> m.WatchRequest:
    return m.WatchRequest(job=_parse(pb.WatchRequest, data).job)


def decode_journal_request(data: bytes) -> m.JournalRequest:
    msg = _parse(pb.JournalRequest, data)
    return m.JournalRequest(job=msg.job, follow=msg.follow, run_id=msg.run_id, command_id=msg.command_id)


def decode_policy_request(data: bytes) -> m.PolicyRequest:
    msg = _parse(pb.PolicyRequest, data)
    return m.PolicyRequest(job=msg.job, text=msg.text)


def decode_policy_reply(data: bytes) -> m.PolicyReply:
    msg = _parse(pb.PolicyReply, data)
    return m.PolicyReply(
        job=msg.job, name=msg.name, text=msg.text, proposals=tuple(_event_from_pb(e) for e in msg.proposals)
    )


def decode_proposal_decision(data: bytes) -> m.ProposalDecision:
    msg = _parse(pb.ProposalDecision, data)
    return m.ProposalDecision(job=msg.job, proposal_id=msg.proposal_id, approve=msg.approve)


def decode_agent_refusal(data: bytes) -> m.AgentRefusal:
    msg = _parse(pb.AgentRefusal, data)
    return m.AgentRefusal(job=msg.job, reason=msg.reason, reply=msg.reply)


def decode_knob_spec(data: bytes) -> m.KnobSpec:
    return _knob_from_pb(_parse(pb.KnobSpec, data))


def decode_status_reply(data: bytes) -> m.StatusReply:
    msg = _parse(pb.StatusReply, data)
    jobs = []
    for js in msg.jobs:
        ranks = tuple(
            m.RankStatus(
                state=_enum_back(_STATE_BACK, rs.state, "rank state"),
                knobs=_values_from_pb(rs.knobs),
                device=_device_from_pb(rs.device) if rs.HasField("device") else None,
                **_copy(rs, _RANK_STATUS_FIELDS),
            )
            for rs in js.ranks
        )
        jobs.append(
            m.JobStatus(
                ranks=ranks,
                knobs=tuple(_knob_from_pb(k) for k in js.knobs),
                checkpoints=tuple(m.CheckpointInfo(**_copy(c, _CHECKPOINT_FIELDS)) for c in js.checkpoints),
                branches=tuple(m.BranchInfo(**_copy(b, _BRANCH_FIELDS)) for b in js.branches),
                **_copy(js, _JOB_STATUS_FIELDS),
            )
        )
    return m.StatusReply(jobs=tuple(jobs))


def decode_watch_event(data: bytes) -> m.WatchEvent:
    msg = _parse(pb.WatchEvent, data)
    which = msg.WhichOneof("body")
    if which == "metrics":
        return _metrics_from_pb(msg.metrics)
    if which == "event":
        return _event_from_pb(msg.event)
    if which == "outcome":
        return _outcome_from_pb(msg.outcome)
    raise WireError("watch event has no body")
