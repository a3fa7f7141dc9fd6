"""Blame the cause: a stalled rank is dead or hung, the peers stalled with it are waiting on it.

Scripted heartbeats of lockstep jobs go through the weaver's liveness and health planning; status
and `torchloom devices` read one classification, so they agree on every rank.
"""

from __future__ import annotations

from collections.abc import Mapping

from hypothesis import given
from hypothesis import strategies as st

from tests.unit.factories import heartbeat
from torchloom.app import format as cli_format
from torchloom.messages import DeviceHealth, JobEvent, RankState
from torchloom.policy import PolicyMode
from weaver import health_plan, liveness
from weaver.health_policy import (
    STALLING,
    HealthKind,
    HealthPolicy,
    RankHealth,
    RankView,
    _waits_on,
    classify,
    is_stalled,
)
from weaver.model import WeaverState

NOW = 1000.0
STEP_S = 0.05
POLICY = HealthPolicy(mode=PolicyMode.ALERT, dead_after_s=0.8, hung_after_s=3.0, hung_restart_after_s=60.0)
WAITING, DEAD, HUNG = HealthKind.WAITING, HealthKind.DEAD, HealthKind.HUNG


def view(
    rank: int, *, step: int = 20, silent_s: float = 0.1, stuck_s: float = 0.02, **kw: object
) -> RankView:
    return RankView(
        rank=rank,
        last_heartbeat_at=NOW - silent_s,
        step=step,
        last_step_change_at=NOW - stuck_s,
        step_time_s=kw.pop("step_time_s", STEP_S),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


def kinds(health: Mapping[int, RankHealth]) -> list[HealthKind]:
    return [h.kind for _, h in sorted(health.items())]


# ---- classify ---------------------------------------------------------------------------------------


def test_a_frozen_rank_is_the_cause_and_its_peers_wait_on_it() -> None:
    # Rank 1 was SIGSTOPped 2 s ago: no heartbeat since; ranks 0, 2, 3 block in the next collective.
    ranks = [
        view(0, stuck_s=1.9),
        view(1, silent_s=2.0, stuck_s=2.0),
        view(2, step=21, stuck_s=1.9),
        view(3, stuck_s=1.8),
    ]
    health = classify(ranks, NOW, dead_after_s=0.8, hung_after_s=3.0)
    assert kinds(health) == [WAITING, DEAD, WAITING, WAITING]
    assert health[1].waiters == (0, 2, 3) and not health[1].alive
    assert health[1].reason == "no heartbeat for 2.0 s (limit 0.8 s); ranks 0,2,3 waiting on it"
    assert health[0].waiting_on == (1,) and health[0].alive
    assert health[0].reason == "step 20 waiting 1.9 s on rank 1 (dead)"


def test_a_frozen_ranks_last_step_is_stale_by_up_to_a_heartbeat() -> None:
    # Rank 1 stepped on for 0.2 s after its last heartbeat (at step 12) before it froze; rank 0
    # stopped at 15, 0.15 s after that heartbeat. A rank that stopped long after it did not wait on it.
    frozen = view(1, step=12, silent_s=5.0, stuck_s=5.0)
    assert kinds(
        classify([view(0, step=15, stuck_s=4.85), frozen], NOW, dead_after_s=0.8, hung_after_s=3.0)
    ) == [
        WAITING,
        DEAD,
    ]
    late = view(0, step=400, stuck_s=3.5)  # kept stepping for 1.5 s without rank 1: not blocked by it
    assert kinds(classify([late, frozen], NOW, dead_after_s=0.8, hung_after_s=3.0)) == [HUNG, DEAD]
    behind = view(0, step=9, stuck_s=4.9)  # stopped before rank 1's last step: not waiting on it
    assert kinds(classify([behind, frozen], NOW, dead_after_s=0.8, hung_after_s=3.0)) == [HUNG, DEAD]


def test_waiting_is_never_hung_however_long_it_lasts() -> None:
    ranks = [view(0, stuck_s=60.0), view(1, silent_s=60.0, stuck_s=60.0)]
    assert kinds(classify(ranks, NOW, dead_after_s=0.8, hung_after_s=3.0)) == [WAITING, DEAD]


def test_a_rank_whose_step_stops_under_live_heartbeats_is_hung_and_its_peers_wait() -> None:
    # Rank 1 stopped before counting step 21; ranks 0 and 2 counted it and block in step 22's collective.
    ranks = [view(0, step=21, stuck_s=3.4), view(1, step=20, stuck_s=3.5), view(2, step=21, stuck_s=3.4)]
    health = classify(ranks, NOW, dead_after_s=0.8, hung_after_s=3.0)
    assert kinds(health) == [WAITING, HUNG, WAITING]
    assert health[1].waiters == (0, 2)
    assert health[1].reason == "step 20 unchanged for 3.5 s (limit 3 s); ranks 0,2 waiting on it"
    assert health[2].reason == "step 21 waiting 3.4 s on rank 1 (hung)"


def test_peers_wait_before_they_would_be_hung() -> None:
    # The cause just passed hung_after_s; its peers, stalled a step later, have not yet.
    ranks = [view(0, step=21, stuck_s=2.97), view(1, step=20, stuck_s=3.02)]
    assert kinds(classify(ranks, NOW, dead_after_s=0.8, hung_after_s=3.0)) == [WAITING, HUNG]


def test_ranks_stuck_alike_at_one_step_are_all_hung_the_cause_unknown() -> None:
    ranks = [view(0, stuck_s=3.5), view(1, stuck_s=3.5)]
    health = classify(ranks, NOW, dead_after_s=0.8, hung_after_s=3.0)
    assert kinds(health) == [HUNG, HUNG]
    assert health[0].waiters == () and health[1].waiting_on == ()


def test_an_unhealthy_stuck_rank_is_blamed_and_stays_unhealthy() -> None:
    sick = DeviceHealth(kind="cuda", device="GPU-1", healthy=False, unhealthy_reason="XID 79")
    ranks = [view(0, step=21, stuck_s=3.4), view(1, step=20, stuck_s=3.5, device=sick)]
    health = classify(ranks, NOW, dead_after_s=0.8, hung_after_s=3.0)
    assert kinds(health) == [WAITING, HealthKind.UNHEALTHY]
    assert health[1].reason == "GPU-1: XID 79; rank 0 waiting on it"


def test_peers_that_keep_stepping_are_not_waiting() -> None:
    ranks = [
        view(0, step=200, stuck_s=0.01),  # far ahead: it never needed rank 1
        view(1, silent_s=2.0, stuck_s=2.0),
        view(2, step=21, stuck_s=0.05),  # at the next step, but not for longer than its step time
        view(3, stuck_s=5.0, state=RankState.PAUSED),  # paused on purpose
    ]
    health = classify(ranks, NOW, dead_after_s=0.8, hung_after_s=3.0)
    assert kinds(health) == [HealthKind.HEALTHY, DEAD, HealthKind.HEALTHY, HealthKind.HEALTHY]
    assert health[1].waiters == ()


def test_waiting_and_recently_stalled_ranks_are_no_stragglers() -> None:
    # While rank 1 is frozen, rank 0's step time (0.4 s) is 8x rank 1's last one: it waited, it is not slow.
    stalled = [view(0, step_time_s=0.4, stuck_s=1.6), view(1, silent_s=2.0, stuck_s=2.0)]
    assert kinds(classify(stalled, NOW, dead_after_s=0.8, hung_after_s=3.0)) == [WAITING, DEAD]
    # Right after the stall, rank 0's step-time mean includes the wait and rank 1's heartbeat lags.
    after = [view(0, step_time_s=1.32, stalled_at=NOW - 0.3), view(1, stalled_at=NOW - 0.3)]
    assert kinds(classify(after, NOW, dead_after_s=0.8, hung_after_s=3.0)) == [HealthKind.HEALTHY] * 2
    # Once the stall is hung_after_s behind, step times are evidence again.
    later = [view(0, step_time_s=1.32, stalled_at=NOW - 3.5), view(1, stalled_at=NOW - 3.5)]
    assert kinds(classify(later, NOW, dead_after_s=0.8, hung_after_s=3.0))[0] is HealthKind.STRAGGLER


def test_a_dead_ranks_stale_step_time_is_no_sample() -> None:
    ranks = [view(0, step=900, step_time_s=0.3), view(1, silent_s=30.0, step_time_s=0.01), view(2, step=901)]
    health = classify(ranks, NOW, dead_after_s=0.8, hung_after_s=3.0, straggler_factor=10.0)
    assert kinds(health) == [HealthKind.HEALTHY, DEAD, HealthKind.HEALTHY]


# ---- events over scripted heartbeats ---------------------------------------------------------------


class Lockstep:
    """A job whose ranks step together every `STEP_S`; a frozen rank stops everything, heartbeats
    included, and its peers finish the step in hand and block in the next collective."""

    def __init__(self, world: int) -> None:
        self.state = WeaverState()
        self.world = world
        self.step = {r: 0 for r in range(world)}
        self.step_time = {r: STEP_S for r in range(world)}
        self.frozen: set[int] = set()
        self.t = 0.0
        self.events: list[JobEvent] = []

    def run(self, until_s: float, *, tick_s: float = 0.1, stepping: bool = True) -> None:
        """Advance time, heartbeating every tick and running the weaver's health check."""
        while self.t < until_s:
            self.t = round(self.t + tick_s, 6)
            blocked = bool(self.frozen) or not stepping
            for r in range(self.world):
                if r in self.frozen:
                    continue
                if not blocked:
                    self.step[r] += 2  # two steps per tick
                hb = heartbeat(
                    r, world=self.world, step=self.step[r], tick=self.step[r], step_time_s=self.step_time[r]
                )
                liveness.observe_heartbeat(self.state, hb, self.t)
            self.events += health_plan.check_health(self.state, self.t, POLICY).events

    def health_events(self) -> list[JobEvent]:
        return [e for e in self.events if e.kind != "health_action"]


def test_sigstop_gives_one_event_naming_the_cause_and_its_waiting_peers() -> None:
    job = Lockstep(4)
    job.run(1.0)
    job.frozen.add(2)
    job.run(5.0)  # longer than hung_after_s: waiting is never hung
    events = job.health_events()
    assert [(e.kind, e.attrs.get("rank"), e.attrs.get("waiting")) for e in events] == [
        ("rank_dead", "2", "0,1,3")
    ]
    assert events[0].message.startswith("rank 2 dead: no heartbeat for ")
    assert events[0].message.endswith("; ranks 0,1,3 waiting on it")
    status = liveness.job_status(job.state.jobs["j"], job.t, POLICY)
    assert [(r.health, r.alive) for r in status.ranks] == [
        ("waiting", True),
        ("waiting", True),
        ("dead", False),
        ("waiting", True),
    ]
    rows = cli_format.devices_json(liveness.status(job.state, "", job.t, POLICY))["devices"]
    assert [d["state"] for d in rows] == [r.health for r in status.ranks]
    assert rows[0]["reason"] == status.ranks[0].health_reason and "waiting" in rows[0]["reason"]

    # SIGCONT: heartbeats and steps resume; the waits had inflated the peers' step-time means.
    job.frozen.clear()
    job.step_time[0] = 1.32  # 26x the others': a straggler, were it not the wait
    job.run(5.3, stepping=False)  # heartbeats are back before the first step: stood still, not hung
    job.run(6.5)
    resumed = job.health_events()[1:]
    assert [(e.kind, e.attrs.get("rank"), e.attrs.get("resumed")) for e in resumed] == [
        ("rank_recovered", "2", "0,1,3")
    ]
    assert resumed[0].message == "rank 2 healthy; ranks 0,1,3 no longer waiting"
    assert not any(e.kind in ("rank_hung", "rank_straggler") for e in job.events)


def test_peers_that_start_waiting_later_share_one_event() -> None:
    job = Lockstep(3)
    job.run(0.5)
    for r in (0, 2):
        job.step_time[r] = 0.6  # slow steps: stalled only after 0.9 s, later than rank 1's death
    job.frozen.add(1)
    job.run(2.0)
    events = job.health_events()
    assert [(e.kind, e.attrs.get("rank"), e.attrs.get("waiting")) for e in events[:1]] == [
        ("rank_dead", "1", None)
    ]
    assert [(e.kind, e.attrs["ranks"], e.attrs["waiting_on"]) for e in events[1:]] == [
        ("ranks_waiting", "0,2", "1")
    ]


def test_health_alert_of_the_cause_names_the_waiters_once() -> None:
    job = Lockstep(2)
    job.run(1.0)
    job.frozen.add(1)
    job.run(3.0)
    alerts = [e for e in job.events if e.kind == "health_action"]
    assert [(e.attrs["key"], e.attrs["ranks"]) for e in alerts] == [("dead:1", "1")]
    assert alerts[0].message.endswith("; rank 0 waiting on it")


# ---- one verdict for status and devices ---------------------------------------------------------------


@given(
    st.lists(
        st.tuples(
            st.floats(0, 5),  # silence
            st.floats(0, 8),  # time since step change
            st.integers(18, 22),  # step
            st.sampled_from(list(RankState)),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_status_and_devices_agree_on_every_rank(rows: list[tuple[float, float, int, RankState]]) -> None:
    s = WeaverState()
    for rank, (silence, stuck, step, state) in enumerate(rows):
        hb = heartbeat(rank, world=len(rows), step=step, tick=step, state=state, step_time_s=STEP_S)
        liveness.observe_heartbeat(s, hb, NOW - stuck)
        s.jobs["j"].ranks[rank].last_seen_s = NOW - silence
    reply = liveness.status(s, "", NOW, POLICY)
    devices = cli_format.devices_json(reply)["devices"]
    health = liveness.rank_health(s.jobs["j"], NOW, POLICY)
    for r, d in zip(reply.jobs[0].ranks, devices, strict=True):
        assert (d["rank"], d["state"]) == (r.rank, r.health) == (r.rank, health[r.rank].kind.value)
        assert r.alive == (r.health != "dead" and r.state is not RankState.FINISHED)
        assert r.alive == liveness.is_alive(s.jobs["j"].ranks[r.rank], NOW, POLICY.dead_after_s)
        if r.health == "waiting":
            assert health[r.rank].waiting_on and all(health[c].waiters for c in health[r.rank].waiting_on)


# ---- the stall bound and the blame's index ------------------------------------------------------------


def test_a_rank_is_not_stalled_before_a_heartbeat_shows_its_step_still() -> None:
    """0.1 s steps and 0.2 s heartbeats: the weaver sees each step change only when a heartbeat
    brings it, so just before a healthy rank's next heartbeat its step has looked still for 0.2 s,
    over WAIT_FACTOR x its step time. It is not stalled (nor waiting on a dead peer) until a
    heartbeat shows the step standing still; then it is, at once."""
    state = WeaverState()
    t = 0.0
    for k in range(10):  # both ranks step on; rank 1 then dies (its heartbeats stop)
        t = k * 0.2
        for r in (0, 1):
            liveness.observe_heartbeat(
                state, heartbeat(r, world=2, step=2 * k, tick=2 * k, step_time_s=0.1), t
            )
    dead_at = t
    for k in range(10, 20):  # rank 0 keeps stepping: two steps per heartbeat
        t = k * 0.2
        liveness.observe_heartbeat(state, heartbeat(0, world=2, step=2 * k, tick=2 * k, step_time_s=0.1), t)
        for between in (0.05, 0.1, 0.19):  # every health check until its next heartbeat
            health = liveness.rank_health(state.jobs["j"], t + between, POLICY)
            assert health[0].kind is HealthKind.HEALTHY, (t, between, health[0].reason)
            assert not health[1].waiters
    assert t + 0.19 - dead_at > POLICY.dead_after_s
    # A heartbeat that shows the step still makes the rank stalled at once, waiting on a dead peer
    # it may be blocked by; the same rank whose last heartbeat brought the step is not.
    frozen = view(1, step=20, silent_s=0.9, stuck_s=0.9)
    seen = view(0, step=21, silent_s=0.01, stuck_s=0.19, step_time_s=0.1)
    unseen = view(0, step=21, silent_s=0.19, stuck_s=0.19, step_time_s=0.1)
    assert kinds(classify([seen, frozen], NOW, dead_after_s=0.8, hung_after_s=3.0)) == [WAITING, DEAD]
    assert kinds(classify([unseen, frozen], NOW, dead_after_s=0.8, hung_after_s=3.0)) == [
        HealthKind.HEALTHY,
        DEAD,
    ]


def _pairwise(ranks: list[RankView], dead_after_s: float, hung_after_s: float) -> dict[int, RankHealth]:
    """The blame by its definition, every stalled rank tested against every cause (`_waits_on`):
    what the indexed `classify` must agree with. Returns only the stalled ranks' and causes' parts."""
    silent = [
        v for v in ranks if v.state is not RankState.FINISHED and NOW - v.last_heartbeat_at > dead_after_s
    ]
    live = [v for v in ranks if v.state is RankState.RUNNING and NOW - v.last_heartbeat_at <= dead_after_s]
    stalled = [v for v in live if is_stalled(v, NOW)]
    causes = {v.rank: v for v in silent}
    for v in stalled:
        if v.hung_s(NOW) <= hung_after_s or any(_waits_on(v, d, True, dead_after_s) for d in silent):
            continue
        if any(w.step == v.step + 1 for w in stalled):
            causes[v.rank] = v
    out: dict[int, RankHealth] = {}
    for w in stalled:
        if w.rank not in causes:
            on = tuple(sorted(c for c, cv in causes.items() if _waits_on(w, cv, cv in silent, dead_after_s)))
            out[w.rank] = RankHealth(rank=w.rank, kind=WAITING, waiting_on=on)
    for c in causes:
        waiters = tuple(sorted(w for w, h in out.items() if c in h.waiting_on))
        out[c] = RankHealth(rank=c, kind=DEAD, waiters=waiters)
    return out


@given(
    st.lists(
        st.tuples(
            st.sampled_from([0.1, 0.5, 0.9, 1.5, 4.0]),  # silence
            st.sampled_from([0.0, 0.1, 0.3, 1.0, 2.5, 3.5, 6.0]),  # time since the step changed
            st.integers(18, 22),  # step
            st.sampled_from([0.05, 0.4]),  # step time
            st.sampled_from([RankState.RUNNING, RankState.RUNNING, RankState.PAUSED, RankState.FINISHED]),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_the_indexed_blame_is_the_pairwise_one(
    rows: list[tuple[float, float, int, float, RankState]],
) -> None:
    ranks = [
        view(r, silent_s=silence, stuck_s=max(stuck, silence), step=step, step_time_s=step_s, state=state)
        for r, (silence, stuck, step, step_s, state) in enumerate(rows)
    ]
    health = classify(ranks, NOW, dead_after_s=0.8, hung_after_s=3.0)
    want = _pairwise(ranks, 0.8, 3.0)
    for r, h in health.items():
        expected = want.get(r)
        assert h.waiting_on == (expected.waiting_on if expected is not None else ()), r
        assert h.waiters == (expected.waiters if expected is not None and h.kind in STALLING else ()), r
        assert (h.kind is WAITING) == bool(h.waiting_on)


def test_many_ranks_quiet_at_once_share_their_blame() -> None:
    """Half of 2,000 lockstep ranks go silent (a switch, a starved weaver), the other half block:
    each waiting rank waits on the same 1,000 ranks, and each silent rank has the same waiters,
    so they share one tuple (and one text) rather than a million pairs of ranks."""
    silent = [view(r, step=20, silent_s=2.0 + r / 1e4, stuck_s=2.0 + r / 1e4) for r in range(0, 2000, 2)]
    waiting = [view(r, step=21 - r % 4 // 2, stuck_s=1.9) for r in range(1, 2000, 2)]
    health = classify([*silent, *waiting], NOW, dead_after_s=0.8, hung_after_s=3.0)
    waits = [health[v.rank] for v in waiting]
    deads = [health[v.rank] for v in silent]
    assert {h.kind for h in waits} == {WAITING} and {h.kind for h in deads} == {DEAD}
    assert len({id(h.waiting_on) for h in waits}) == 1 and waits[0].waiting_on == tuple(range(0, 2000, 2))
    assert len({id(h.waiters) for h in deads}) == 1 and deads[0].waiters == tuple(range(1, 2000, 2))
