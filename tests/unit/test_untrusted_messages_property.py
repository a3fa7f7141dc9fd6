"""Property tests: mutated valid messages (not only random bytes) on every subject the weaver and the
threadlet read. Every decoder raises only WireError; a rank files no command whose decoded form differs
from what the weaver signed; the weaver, fed mutated heartbeats and acks through its admission checks,
never raises, stays within its limits, keeps the real run and ranks, and counts no ack that is not the
real rank's answer."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.factories import JOB, RUN, ack, heartbeat, running, set_config
from threadlet.config import ThreadletConfig
from threadlet.link import Link
from torchloom import messages as m
from torchloom import signing, subjects, wire
from weaver import admission, liveness, outcomes
from weaver.model import Pending, WeaverState

NOW = 100.0
DEAD = 1.0
LIMITS = admission.Limits(max_jobs=4, max_ranks_per_job=16, max_ranks_total=24)
SIGNER = signing.Signer.generate()

_VALID: dict[str, tuple[Callable[[bytes], Any], bytes]] = {
    "command": (wire.decode_command, wire.encode(SIGNER.sign(set_config(1, lr=0.1, betas=(0.9, 0.99))))),
    "ack": (wire.decode_ack, wire.encode(ack(1, 0, detail={"checkpoint_id": "ckpt-1"}))),
    "heartbeat": (
        wire.decode_heartbeat,
        wire.encode(
            heartbeat(
                0,
                last_seq=3,
                knobs=(m.KnobSpec(name="lr", type=m.KnobType.FLOAT, min=0.0, value=0.1),),
                device=m.DeviceHealth(xids=(79,)),
            )
        ),
    ),
    "metrics": (
        wire.decode_metrics,
        wire.encode(m.StepMetrics(job=JOB, run_id=RUN, rank=0, step=3, values={"loss": 1.0})),
    ),
    "event": (wire.decode_event, wire.encode(m.JobEvent(job=JOB, kind="rank_joined", attrs={"rank": "0"}))),
    "restart": (
        wire.decode_restart_request,
        wire.encode(m.RestartRequest(job=JOB, run_id=RUN, world_size=2, exclude_ranks=(1,))),
    ),
    "submit": (
        wire.decode_submit_request,
        wire.encode(m.SubmitRequest(job=JOB, body=m.SetConfig(values={"lr": "1e-3"}))),
    ),
    "status_request": (wire.decode_status_request, wire.encode(m.StatusRequest(job=JOB))),
    "journal_request": (wire.decode_journal_request, wire.encode(m.JournalRequest(job=JOB, follow=True))),
    "outcome": (
        wire.decode_outcome,
        wire.encode(
            m.Outcome(command_id="c", job=JOB, status=m.OutcomeStatus.APPLIED, command=set_config(1, lr=0.1))
        ),
    ),
}

_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("cut"), st.integers(0, 10_000), st.integers(0, 64)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.binary(max_size=16)),
)


def _mutate(data: bytes, mutations: list[tuple[Any, ...]]) -> bytes:
    out = bytearray(data)
    for kind, at, what in mutations:
        i = at % (len(out) + 1)
        if kind == "flip" and out:
            out[min(i, len(out) - 1)] = what
        elif kind == "cut":
            del out[i : i + what]
        elif kind == "insert":
            out[i:i] = what
    return bytes(out)


@settings(max_examples=300, deadline=None)
@given(which=st.sampled_from(sorted(_VALID)), mutations=st.lists(_mutation, min_size=1, max_size=4))
def test_decoders_raise_only_wire_errors(which: str, mutations: list[tuple[Any, ...]]) -> None:
    decode, valid = _VALID[which]
    with contextlib.suppress(wire.WireError):  # anything else escapes and fails the test
        decode(_mutate(valid, mutations))


def _link(**kw: Any) -> Link:
    cfg = ThreadletConfig(nats_url="nats://127.0.0.1:1", job=JOB, run_id=RUN, **kw)
    return Link(cfg, rank=0, on_command=lambda cmd, t: None)


@settings(max_examples=150, deadline=None)
@given(mutations=st.lists(_mutation, min_size=1, max_size=4))
def test_a_rank_files_no_command_that_differs_from_what_the_weaver_signed(
    mutations: list[tuple[Any, ...]],
) -> None:
    _, valid = _VALID["command"]
    original = wire.decode_command(valid)
    link = _link(weaver_pubkey=SIGNER.public_key)
    try:
        try:
            cmd = wire.decode_command(_mutate(valid, mutations))
        except wire.WireError:
            return
        same = dataclasses.replace(cmd, signature=b"") == dataclasses.replace(original, signature=b"")
        if link._refusal(cmd) is None:
            assert same, "a changed command passed the signature check"
    finally:
        link.close()


def test_a_rank_without_a_key_files_nothing_unless_told_so() -> None:
    signed = wire.decode_command(_VALID["command"][1])
    strict, lax = _link(), _link(verify_commands=False)
    try:
        assert strict._refusal(signed) is not None and "TORCHLOOM_WEAVER_PUBKEY" in (
            strict._refusal(signed) or ""
        )
        assert lax._refusal(dataclasses.replace(signed, signature=b"")) is None
    finally:
        strict.close()
        lax.close()


# ---- the weaver -----------------------------------------------------------------------------------

_text = st.one_of(st.just(JOB), st.just(RUN), st.just(f"{RUN}-a1"), st.text(max_size=12))
_heartbeat_change = st.fixed_dictionaries(
    {},
    optional={
        "job": _text,
        "run_id": _text,
        "rank": st.integers(-(2**31), 2**31 - 1),
        "world_size": st.integers(-(2**31), 2**31 - 1),
        "incarnation": st.one_of(st.just("inc0"), st.just("inc1"), st.text(max_size=8)),
        "last_seq": st.integers(0, 2**64 - 1),
        "step": st.integers(-(2**63), 2**63 - 1),
    },
)
_ack_change = st.fixed_dictionaries(
    {},
    optional={
        "job": _text,
        "run_id": _text,
        "rank": st.integers(-(2**31), 2**31 - 1),
        "seq": st.integers(0, 2**64 - 1),
        "incarnation": st.one_of(st.just("inc0"), st.just("inc1"), st.text(max_size=8)),
        "command_id": st.one_of(st.just(f"{RUN}-c1"), st.text(max_size=8)),
        "status": st.sampled_from(list(m.AckStatus)),
        "unverified": st.booleans(),
    },
)
_subject_rank = st.one_of(st.none(), st.integers(-10, 10))


def _feed_heartbeat(state: WeaverState, data: bytes, subject: str) -> None:
    """What `Telemetry.on_heartbeat` does with one message, minus the I/O."""
    try:
        hb = wire.decode_heartbeat(data)
    except wire.WireError:
        return
    if admission.check_heartbeat(state, hb, subject, NOW, DEAD, LIMITS) is not None:
        return
    hb, _ = admission.clamp_last_seq(state, hb)
    liveness.observe_heartbeat(state, hb, NOW)


def _feed_ack(state: WeaverState, data: bytes, subject: str) -> m.Outcome | None:
    """What `AckIntake.take_ack` does with one message, minus the I/O."""
    try:
        a = wire.decode_ack(data)
    except wire.WireError:
        return None
    if admission.check_ack(state, a, subject) is not None or a.unverified:
        return None
    return outcomes.record_ack(state, a, NOW)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    beats=st.lists(st.tuples(_heartbeat_change, _subject_rank, st.lists(_mutation, max_size=2)), max_size=30),
    acks=st.lists(st.tuples(_ack_change, st.booleans(), st.lists(_mutation, max_size=2)), max_size=30),
)
def test_the_weaver_believes_only_what_fits(
    beats: list[tuple[dict[str, Any], int | None, list[tuple[Any, ...]]]],
    acks: list[tuple[dict[str, Any], bool, list[tuple[Any, ...]]]],
) -> None:
    state = running()
    job = state.jobs[JOB]
    job.last_seq = 1
    cmd = set_config(1, lr=0.1)
    job.pending[1] = Pending(command=cmd, world_size=2, submitted_at_s=NOW)
    for change, subject_rank, mutations in beats:
        hb = dataclasses.replace(heartbeat(0), **change)
        subject = f"{subjects.PREFIX}.hb.{hb.job}.{hb.rank if subject_rank is None else subject_rank}"
        _feed_heartbeat(state, _mutate(wire.encode(hb), mutations), subject)
    counted: list[m.Outcome] = []
    for change, own_subject, mutations in acks:
        a = dataclasses.replace(ack(1, 0, command_id=cmd.command_id), **change)
        subject = f"{subjects.PREFIX}.ack.{a.job if own_subject else 'other'}"
        outcome = _feed_ack(state, _mutate(wire.encode(a), mutations), subject)
        if outcome is not None:
            counted.append(outcome)
    # Bounded, and the real run and ranks are still the weaver's truth.
    assert len(state.jobs) <= LIMITS.max_jobs
    assert sum(len(j.ranks) for j in state.jobs.values()) <= LIMITS.max_ranks_total
    job = state.jobs[JOB]
    assert job.run_id in (RUN, f"{RUN}-a1") and job.last_seq <= 1
    if job.run_id == RUN:
        assert set(job.ranks) <= {0, 1} and all(0 <= r < job.world_size for r in job.ranks)
    # An outcome is only ever made of the real ranks' answers to the real command.
    for outcome in counted:
        assert outcome.command == cmd and {r.rank for r in outcome.results} == {0, 1}
