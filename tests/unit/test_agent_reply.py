"""`torchloom agent`'s pure parts: a model reply checked against the action schema and the job's knobs
(malformed JSON, wrong schema, unknown knob or action, out of bounds are refused with what was
expected), the chat response's shape, the prompt (downsampled history, knob schema with bounds,
recent interventions) and the agent's config checks."""

from __future__ import annotations

import dataclasses
import json

import pytest

from torchloom import knobs
from torchloom.app.agent import (
    AgentConfig,
    ReplyRefused,
    build_messages,
    completion_text,
    downsample,
    intervention_line,
    parse_reply,
)
from torchloom.messages import (
    Action,
    ActionKind,
    CheckpointInfo,
    Command,
    Issuer,
    JobEvent,
    JobStatus,
    KnobSpec,
    KnobType,
    Outcome,
    OutcomeStatus,
    RankStatus,
    SetConfig,
)

SCHEMA = knobs.schema_of(
    (
        knobs.BUILTIN_SPECS["lr"],
        KnobSpec(name="warmup", type=KnobType.INT, min=0, max=1000, value=10),
        KnobSpec(name="mode", type=KnobType.STR, choices=("fast", "slow"), value="fast"),
    )
)
CONFIG = AgentConfig(endpoint="http://127.0.0.1:9/v1", model="m", history_points=4, interventions=2)


def reply(actions: object, reason: str = "the loss oscillates") -> str:
    return json.dumps({"actions": actions, "reason": reason})


def test_a_good_reply_becomes_commands_in_order() -> None:
    plan = parse_reply(
        reply([{"set": {"lr": 0.001, "warmup": 5}}, {"action": "rollback", "checkpoint": "ckpt-3"}]), SCHEMA
    )
    assert plan.bodies == (
        SetConfig(values={"lr": 0.001, "warmup": 5}),
        Action(kind=ActionKind.ROLLBACK, args={"checkpoint": "ckpt-3"}),
    )
    assert plan.reason == "the loss oscillates"
    assert parse_reply(reply([]), SCHEMA).bodies == ()
    fenced = "```json\n" + reply([{"action": "checkpoint"}]) + "\n```"
    assert parse_reply(fenced, SCHEMA).bodies == (Action(kind=ActionKind.CHECKPOINT),)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("set lr to 0.001 please", "not JSON"),
        ('{"actions": [', "not JSON"),
        ('{"actions": [{"set": {"lr": NaN}}], "reason": "x"}', "NaN is not a JSON number"),
        ("[1, 2]", "a JSON list"),
        (json.dumps({"actions": [], "reason": "x", "confidence": 0.9}), "unknown field(s) confidence"),
        (json.dumps({"actions": {"set": {"lr": 0.1}}, "reason": "x"}), "expected a list"),
        (json.dumps({"actions": []}), "reason must be a non-empty string"),
        (reply([{"action": "checkpoint"}] * 5), "at most 4 per reply"),
        (reply(["checkpoint"]), "actions[0]='checkpoint'"),
        (reply([{"set": {"lr": 0.1}, "action": "pause"}]), "actions[0]"),
        (reply([{"set": {}}]), 'expected {"set"'),
        (reply([{"set": {"lr": None}}]), "actions[0].set.lr=None"),
        (reply([{"set": {"lr": {"value": 1}}}]), "expected a value"),
        (reply([{"action": "explode"}]), "actions[0].action='explode': expected one of pause"),
        (reply([{"action": "rollback"}]), 'rollback needs "checkpoint"'),
        (reply([{"action": "checkpoint", "tag": 3}]), "must all be strings"),
    ],
)
def test_a_malformed_or_wrong_schema_reply_is_refused(text: str, needle: str) -> None:
    with pytest.raises(ReplyRefused) as err:
        parse_reply(text, SCHEMA)
    assert needle in str(err.value)
    assert str(err.value).startswith("reply refused: ")


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"momentum": 0.9}, "momentum"),  # the job has no such knob
        ({"lr": 50.0}, "lr"),  # out of the knob's bounds (0, 10]
        ({"lr": 0.0}, "lr"),
        ({"warmup": 2.5}, "warmup"),  # wrong type
        ({"warmup": 5000}, "warmup"),
        ({"mode": "turbo"}, "mode"),
        ({"lr@head": 0.1}, "head"),  # no such group
    ],
)
def test_an_unknown_knob_or_out_of_bounds_value_is_refused(values: dict[str, object], needle: str) -> None:
    with pytest.raises(ReplyRefused) as err:
        parse_reply(reply([{"set": values}]), SCHEMA)
    message = str(err.value)
    assert "actions[0]" in message and needle in message


def test_the_completion_text_is_taken_from_the_chat_response_shape() -> None:
    assert completion_text({"choices": [{"message": {"role": "assistant", "content": "hi"}}]}) == "hi"
    for bad in (
        {},
        {"choices": []},
        {"choices": [{"text": "hi"}]},
        [],
        {"choices": [{"message": {"content": 3}}]},
    ):
        with pytest.raises(ReplyRefused):
            completion_text(bad)


def test_downsample_keeps_the_ends_and_at_most_n_points() -> None:
    points = [(s, float(s)) for s in range(100)]
    kept = downsample(points, 5)
    assert len(kept) == 5 and kept[0] == (0, 0.0) and kept[-1] == (99, 99.0)
    assert downsample(points[:3], 5) == points[:3]


def _outcome(
    seq: int, body: SetConfig | Action, who: str, status: OutcomeStatus, reason: str = ""
) -> Outcome:
    cmd = Command(
        command_id=f"c{seq}",
        job="j",
        run_id="r",
        seq=seq,
        issuer=Issuer(kind=who.split(":")[0] if ":" in who else "cli", identity=who),
        issued_at_s=0.0,
        body=body,
    )
    return Outcome(command_id=f"c{seq}", job="j", status=status, reason=reason, command=cmd)


def test_the_prompt_holds_history_knobs_checkpoints_and_recent_interventions() -> None:
    status = JobStatus(
        job="j",
        run_id="r",
        ranks=(RankStatus(rank=0, step=120), RankStatus(rank=1, step=121)),
        knobs=(dataclass_value(knobs.BUILTIN_SPECS["lr"], 0.05),),
        checkpoints=(CheckpointInfo(id="ckpt-2", step=100, branch="main"),),
        branch="main",
    )
    lines = [
        intervention_line(_outcome(1, SetConfig(values={"lr": 0.1}), "me", OutcomeStatus.APPLIED)),
        intervention_line(
            _outcome(2, Action(kind=ActionKind.CHECKPOINT), "rule:periodic", OutcomeStatus.APPLIED)
        ),
        intervention_line(
            JobEvent(job="j", kind="agent_refused", message="agent agent:bob refused: lr=5 refused")
        ),
    ]
    assert intervention_line(JobEvent(job="j", kind="rank_joined", message="rank 0 joined")) is None
    assert lines[0] == "#1 set lr=0.1 by cli:me: applied"
    history = {"loss": [(s, 1.0 / (s + 1)) for s in range(50)], "lr": [(0, 0.05)], "grad_norm": []}
    system, user = build_messages(status, history, [line for line in lines if line], CONFIG)
    assert system["role"] == "system" and '"actions"' in system["content"]
    state = json.loads(user["content"])
    assert state["step"] == 120 and state["branch"] == "main"
    assert state["knobs"] == [
        {"name": "lr", "type": "float", "value": 0.05, "min": 0.0, "max": 10.0, "min_exclusive": True,
         "description": knobs.BUILTIN_SPECS["lr"].description}
    ]  # fmt: skip
    assert len(state["metrics"]["loss"]) == 4 and state["metrics"]["loss"][-1][0] == 49
    assert "grad_norm" not in state["metrics"]
    assert state["checkpoints"] == [{"id": "ckpt-2", "step": 100, "branch": "main"}]
    assert state["recent_interventions"] == [
        "#2 checkpoint by rule:periodic: applied",
        "agent agent:bob refused: lr=5 refused",
    ]


def dataclass_value(spec: KnobSpec, value: float) -> KnobSpec:
    return dataclasses.replace(spec, value=value)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"endpoint": "ftp://x/v1"}, "--endpoint"),
        ({"endpoint": "http:///v1"}, "--endpoint"),
        ({"model": ""}, "--model"),
        ({"interval_s": 0.0}, "interval_s"),
        ({"max_actions": 0}, "max_actions"),
        ({"rounds": -1}, "rounds"),
    ],
)
def test_a_bad_agent_config_is_refused(kwargs: dict[str, object], needle: str) -> None:
    base: dict[str, object] = {"endpoint": "http://127.0.0.1:8000/v1", "model": "m"}
    with pytest.raises(ValueError, match=needle):
        AgentConfig(**{**base, **kwargs})  # type: ignore[arg-type]
