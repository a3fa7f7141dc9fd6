"""Autopilot policies: rules read from a TOML file, each a condition over the job's model health
signals (`weaver.signals`) and the commands it sends, with the guardrails that bound them.

Pure: `parse(text, source=...)` validates a policy and names the field and its expected form when
something is wrong; `load(spec)` reads a file, or the shipped default for "default". The form:

    name = "my-policy"
    dry_run = false          # journal what would have been sent, send nothing
    approval = false         # every firing waits for `torchloom policy approve ID`
    allow = []               # actions automated issuers may take although forbidden by default:
                             # "stop", "data_add", "fault_inject"
    start = [{action = "checkpoint"}]  # commands for step 0, before the first optimizer step: a
                             # run this policy is launched with (`torchloom run --policy`) holds
                             # there until the weaver sent them, its [knobs] and a resume
    [bounds]                 # how far a rule may move a knob, as factors of its start value
    lr = [0.01, 10.0]        # (every numeric knob not named here: DEFAULT_BOUNDS)
    [knobs]                  # knob settings the rules need, sent once per run at its first report
    report_update_ratio = 25 # (issuer rule:<policy name>; a knob the run does not report waits)

    [[rule]]
    name = "spike"
    when = "loss_spike"      # nonfinite | loss_spike | divergence | plateau | throughput_drop |
                             # every_steps | update_ratio
    factor = 3.0             # loss_spike, divergence, throughput_drop
    steps = 200              # plateau, every_steps
    above = 1e-2             # update_ratio: a newly measured ratio over this fires (the ranks
                             # measure it only while the report_update_ratio knob is N > 0)
    consecutive = 2          # update_ratio: ... when the latest N measurements are all over it
    loss_rose = false        # update_ratio: ... and a loss reported since the latest is over the
                             # loss of its step (once per measurement; a helpful big step is not)
    cooldown_s = 60.0        # no second firing sooner
    cooldown_steps = 0       # nor within this many training steps of the last (on its branch)
    max_per_hour = 10        # and at most this many in any hour
    do = [{set = {lr = "x0.5"}}, {action = "rollback", checkpoint = "last_good"}, {alert = "text"}]
                             # "xT/value" multiplies by T over the value that fired the rule (an
                             # update ratio: T is the ratio aimed at), kept within [bounds]

    [agent]                  # the guardrails of agents' proposals (`torchloom agent`, the Submit of an
                             # agent token); dry_run, approval, allow and bounds default to the ones
                             # above ([agent.bounds] overrides them knob by knob)
    cooldown_s = 10.0        # per agent: no second proposal sooner
    max_per_hour = 60        # and at most this many in any hour
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from torchloom import knobs
from torchloom.messages import ActionKind, KnobValue
from weaver.signals import MAX_CONSECUTIVE, Condition, Signal

DEFAULT = "default"
DEFAULT_BOUNDS = (0.01, 10.0)
LAST_GOOD = "last_good"  # a rollback's checkpoint: the newest taken before the trouble began
# Actions an automated issuer may not take unless the policy's `allow` lists them.
FORBIDDEN: frozenset[ActionKind] = frozenset({ActionKind.STOP, ActionKind.DATA_ADD, ActionKind.FAULT_INJECT})

_RULE_KEYS = frozenset(
    {
        "name",
        "when",
        "factor",
        "steps",
        "above",
        "consecutive",
        "loss_rose",
        "cooldown_s",
        "cooldown_steps",
        "max_per_hour",
        "do",
    }
)
_TOP_KEYS = frozenset({"name", "dry_run", "approval", "allow", "bounds", "knobs", "start", "rule", "agent"})
_GUARD_KEYS = ("dry_run", "approval", "allow", "bounds")
_AGENT_KEYS = frozenset({*_GUARD_KEYS, "cooldown_s", "max_per_hour"})
_FACTOR_SIGNALS = {Signal.LOSS_SPIKE: 3.0, Signal.DIVERGENCE: 10.0, Signal.THROUGHPUT_DROP: 2.0}
_STEPS_SIGNALS = {Signal.PLATEAU: 500, Signal.EVERY_STEPS: 100}
_ABOVE_SIGNALS = {Signal.UPDATE_RATIO: 1e-2}


class PolicyError(ValueError):
    """A policy file that does not fit the form; the message names the field and what is expected."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SetStep:
    """Knob assignments: a number sets the value; "xF" multiplies the value in effect by F; "xT/value"
    multiplies it by T over the value of the signal that fired the rule (see `factor_of`)."""

    values: Mapping[str, float | str]


OVER_VALUE = "/value"


def factor_of(raw: str) -> tuple[float, bool]:
    """The factor of an "xF" or "xT/value" assignment, and whether it is divided by the signal's
    value (F or T; NaN when malformed)."""
    over = raw.endswith(OVER_VALUE)
    text = raw[1 : -len(OVER_VALUE)] if over else raw[1:]
    try:
        return float(text), over
    except ValueError:
        return math.nan, over


@dataclass(frozen=True, slots=True, kw_only=True)
class ActionStep:
    kind: ActionKind
    args: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class AlertStep:
    """A journaled alert (no command)."""

    message: str


Step = SetStep | ActionStep | AlertStep


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    name: str
    condition: Condition
    do: tuple[Step, ...]
    cooldown_s: float = 60.0
    cooldown_steps: int = 0
    max_per_hour: int = 10


@dataclass(frozen=True, slots=True, kw_only=True)
class Guards:
    """The guardrails of a policy (see `weaver.guardrails`)."""

    dry_run: bool = False
    approval: bool = False
    allow: frozenset[ActionKind] = frozenset()
    bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    def bounds_of(self, knob: str) -> tuple[float, float]:
        """(low, high) factors of the start value for `knob` (a `name@group` uses `name`'s)."""
        return self.bounds.get(knob) or self.bounds.get(knob.split("@", 1)[0]) or DEFAULT_BOUNDS


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentGuards:
    """The guardrails of agents' proposals (a policy's `[agent]` table): the guards they pass, and a
    rate limit per agent."""

    guards: Guards = field(default_factory=Guards)
    cooldown_s: float = 10.0
    max_per_hour: int = 60


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    name: str
    rules: tuple[Rule, ...]
    guards: Guards = field(default_factory=Guards)
    agent: AgentGuards = field(default_factory=AgentGuards)
    # Knob settings the rules need (`[knobs]`), sent once per run by the weaver (`weaver.autopilot`).
    knobs: Mapping[str, KnobValue] = field(default_factory=dict)
    start: tuple[Step, ...] = ()  # commands for step 0, before the first optimizer step (`start`)
    text: str = ""  # the TOML it was read from, as `torchloom policy show` prints it

    @property
    def holds_at_start(self) -> bool:
        """Whether a run launched under this policy should hold at step 0 for its start commands and
        [knobs] (`TORCHLOOM_START_HOLD_S`): only when they are sent (not a dry run, no approval)."""
        return bool(self.start or self.knobs) and not self.guards.dry_run and not self.guards.approval


def _fail(where: str, what: str) -> PolicyError:
    return PolicyError(f"{where}: {what}")


def _number(where: str, raw: Any, *, low: float, high: float) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        raise _fail(where, f"{raw!r} rejected: expected a number in [{low:g}, {high:g}]")
    if not low <= raw <= high:
        raise _fail(where, f"{raw!r} rejected: expected a number in [{low:g}, {high:g}]")
    return float(raw)


def _int(where: str, raw: Any, *, low: int, high: int) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not low <= raw <= high:
        raise _fail(where, f"{raw!r} rejected: expected an integer in [{low}, {high}]")
    return raw


def _step(where: str, raw: Any) -> Step:
    form = '{set = {KNOB = NUMBER | "xFACTOR"}}, {action = "KIND", ARG = "VALUE"...} or {alert = "TEXT"}'
    if not isinstance(raw, dict) or len({"set", "action", "alert"} & raw.keys()) != 1:
        raise _fail(where, f"{raw!r} rejected: expected one of {form}")
    if "set" in raw:
        values = raw["set"]
        if len(raw) != 1 or not isinstance(values, dict) or not values:
            raise _fail(f"{where}.set", f'{values!r} rejected: expected {{KNOB = NUMBER | "xFACTOR"}}')
        out: dict[str, float | str] = {}
        for knob, value in values.items():
            try:
                knobs.split_key(knob)
            except ValueError as exc:
                raise _fail(f"{where}.set.{knob}", str(exc)) from None
            if isinstance(value, str):
                form = 'expected a number, "xFACTOR" or "xTARGET/value"'
                if not value.startswith("x"):
                    raise _fail(f"{where}.set.{knob}", f"{value!r} rejected: {form}")
                factor, _ = factor_of(value)
                if not math.isfinite(factor):
                    raise _fail(f"{where}.set.{knob}", f"{value!r} rejected: {form}")
                _number(f"{where}.set.{knob}", factor, low=1e-12, high=1e6)
                out[knob] = value
            else:
                out[knob] = _number(f"{where}.set.{knob}", value, low=-1e12, high=1e12)
        return SetStep(values=out)
    if "alert" in raw:
        if len(raw) != 1 or not isinstance(raw["alert"], str) or not raw["alert"]:
            raise _fail(f"{where}.alert", f"{raw['alert']!r} rejected: expected a non-empty string")
        return AlertStep(message=raw["alert"])
    try:
        kind = ActionKind(raw["action"])
    except ValueError:
        choices = ", ".join(k.value for k in ActionKind)
        raise _fail(f"{where}.action", f"{raw['action']!r} rejected: expected one of {choices}") from None
    args = {k: v for k, v in raw.items() if k != "action"}
    if not all(isinstance(v, str) for v in args.values()):
        raise _fail(where, f"arguments {args!r} rejected: every argument must be a string")
    if kind is ActionKind.ROLLBACK and "checkpoint" not in args:
        raise _fail(where, f'rollback needs checkpoint = "{LAST_GOOD}" (or a checkpoint id or tag)')
    return ActionStep(kind=kind, args=args)


def _rule(where: str, raw: Any, names: set[str]) -> Rule:
    if not isinstance(raw, dict):
        raise _fail(where, f"{raw!r} rejected: expected a table ([[rule]])")
    unknown = sorted(raw.keys() - _RULE_KEYS)
    if unknown:
        raise _fail(where, f"unknown field(s) {', '.join(unknown)}: expected {', '.join(sorted(_RULE_KEYS))}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise _fail(f"{where}.name", f"{name!r} rejected: expected a non-empty string")
    if not all(c.isalnum() or c in "-_." for c in name) or len(name) > 64:
        raise _fail(f"{where}.name", f"{name!r} rejected: expected [A-Za-z0-9_.-]{{1,64}}")
    if name in names:
        raise _fail(f"{where}.name", f"{name!r} rejected: another rule has that name")
    names.add(name)
    where = f"rule {name!r}"
    try:
        signal = Signal(str(raw.get("when")))
    except ValueError:
        choices = ", ".join(s.value for s in Signal)
        raise _fail(f"{where}.when", f"{raw.get('when')!r} rejected: expected one of {choices}") from None
    factor = 0.0
    steps = 0
    if signal in _FACTOR_SIGNALS:
        factor = _number(f"{where}.factor", raw.get("factor", _FACTOR_SIGNALS[signal]), low=1.0, high=1e6)
    elif "factor" in raw:
        raise _fail(f"{where}.factor", f"not used by when = {signal.value!r}")
    if signal in _STEPS_SIGNALS:
        steps = _int(f"{where}.steps", raw.get("steps", _STEPS_SIGNALS[signal]), low=1, high=10**9)
    elif "steps" in raw:
        raise _fail(f"{where}.steps", f"not used by when = {signal.value!r}")
    above = 0.0
    if signal in _ABOVE_SIGNALS:
        above = _number(f"{where}.above", raw.get("above", _ABOVE_SIGNALS[signal]), low=0.0, high=1e6)
    elif "above" in raw:
        raise _fail(f"{where}.above", f"not used by when = {signal.value!r}")
    consecutive = 1
    loss_rose = False
    if signal is Signal.UPDATE_RATIO:
        consecutive = _int(f"{where}.consecutive", raw.get("consecutive", 1), low=1, high=MAX_CONSECUTIVE)
        loss_rose = raw.get("loss_rose", False)
        if not isinstance(loss_rose, bool):
            raise _fail(f"{where}.loss_rose", f"{loss_rose!r} rejected: expected true or false")
    else:
        for key in ("consecutive", "loss_rose"):
            if key in raw:
                raise _fail(f"{where}.{key}", f"not used by when = {signal.value!r}")
    do = raw.get("do")
    if not isinstance(do, list) or not do:
        raise _fail(f"{where}.do", f"{do!r} rejected: expected a non-empty list of steps")
    return Rule(
        name=name,
        condition=Condition(
            signal=signal,
            factor=factor,
            steps=steps,
            above=above,
            consecutive=consecutive,
            loss_rose=loss_rose,
        ),
        do=tuple(_step(f"{where}.do[{i}]", s) for i, s in enumerate(do)),
        cooldown_s=_number(f"{where}.cooldown_s", raw.get("cooldown_s", 60.0), low=0.0, high=7 * 86400.0),
        cooldown_steps=_int(f"{where}.cooldown_steps", raw.get("cooldown_steps", 0), low=0, high=10**9),
        max_per_hour=_int(f"{where}.max_per_hour", raw.get("max_per_hour", 10), low=1, high=100_000),
    )


def _guards(raw: Mapping[str, Any]) -> Guards:
    flags = {}
    for key in ("dry_run", "approval"):
        value = raw.get(key, False)
        if not isinstance(value, bool):
            raise _fail(key, f"{value!r} rejected: expected true or false")
        flags[key] = value
    allow_raw = raw.get("allow", [])
    choices = ", ".join(sorted(k.value for k in FORBIDDEN))
    if not isinstance(allow_raw, list):
        raise _fail("allow", f"{allow_raw!r} rejected: expected a list of {choices}")
    allow: set[ActionKind] = set()
    for item in allow_raw:
        if item not in {k.value for k in FORBIDDEN}:
            raise _fail("allow", f"{item!r} rejected: expected some of {choices}")
        allow.add(ActionKind(item))
    bounds_raw = raw.get("bounds", {})
    if not isinstance(bounds_raw, dict):
        raise _fail("bounds", f"{bounds_raw!r} rejected: expected a table KNOB = [LOW, HIGH]")
    bounds: dict[str, tuple[float, float]] = {}
    for knob, pair in bounds_raw.items():
        where = f"bounds.{knob}"
        if not isinstance(pair, list) or len(pair) != 2:
            raise _fail(where, f"{pair!r} rejected: expected [LOW, HIGH], factors of the start value")
        low = _number(where, pair[0], low=0.0, high=1e6)
        high = _number(where, pair[1], low=low, high=1e6)
        if low > 1.0 or high < 1.0:
            raise _fail(where, f"{pair!r} rejected: LOW <= 1 <= HIGH (the start value is allowed)")
        bounds[knob] = (low, high)
    return Guards(dry_run=flags["dry_run"], approval=flags["approval"], allow=frozenset(allow), bounds=bounds)


def _knobs(raw: Any) -> dict[str, KnobValue]:
    """The `[knobs]` table: KNOB = NUMBER | true | false | "TEXT" (each checked against the run's knob
    schema when it is sent, like any set)."""
    if not isinstance(raw, dict):
        raise _fail("knobs", f"{raw!r} rejected: expected a table KNOB = VALUE ([knobs])")
    out: dict[str, KnobValue] = {}
    for knob, value in raw.items():
        where = f"knobs.{knob}"
        try:
            knobs.split_key(knob)
        except ValueError as exc:
            raise _fail(where, str(exc)) from None
        finite = isinstance(value, int | float) and math.isfinite(value)
        if not (isinstance(value, bool | str) or finite):
            raise _fail(where, f'{value!r} rejected: expected a finite number, true, false or "TEXT"')
        out[knob] = value
    return out


def _agent(raw: Mapping[str, Any]) -> AgentGuards:
    """The `[agent]` table: its guards default to the policy's own, knob bounds merged."""
    table = raw.get("agent", {})
    if not isinstance(table, dict):
        raise _fail("agent", f"{table!r} rejected: expected a table [agent]")
    unknown = sorted(table.keys() - _AGENT_KEYS)
    if unknown:
        raise _fail(
            "agent", f"unknown field(s) {', '.join(unknown)}: expected {', '.join(sorted(_AGENT_KEYS))}"
        )
    merged = {k: raw[k] for k in _GUARD_KEYS if k in raw} | {k: table[k] for k in _GUARD_KEYS if k in table}
    if isinstance(raw.get("bounds"), dict) and isinstance(table.get("bounds"), dict):
        merged["bounds"] = {**raw["bounds"], **table["bounds"]}
    try:
        guards = _guards(merged)
    except PolicyError as exc:
        raise _fail("agent", str(exc)) from None
    return AgentGuards(
        guards=guards,
        cooldown_s=_number("agent.cooldown_s", table.get("cooldown_s", 10.0), low=0.0, high=7 * 86400.0),
        max_per_hour=_int("agent.max_per_hour", table.get("max_per_hour", 60), low=1, high=100_000),
    )


def parse(text: str, *, source: str = "policy") -> Policy:
    """Read and check a policy.

    Raises:
        PolicyError: `<source>: <field>: <value> rejected: expected <form>`.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(
            f"{source}: not TOML ({exc}); expected the form in `torchloom policy show`"
        ) from None
    try:
        unknown = sorted(raw.keys() - _TOP_KEYS)
        if unknown:
            raise _fail(
                "top level", f"unknown field(s) {', '.join(unknown)}: expected {', '.join(sorted(_TOP_KEYS))}"
            )
        name = raw.get("name", Path(source).stem)
        if not isinstance(name, str) or not name:
            raise _fail("name", f"{name!r} rejected: expected a non-empty string")
        rules_raw = raw.get("rule", [])
        if not isinstance(rules_raw, list):
            raise _fail("rule", "expected [[rule]] tables")
        names: set[str] = set()
        rules = tuple(_rule(f"rule[{i}]", r, names) for i, r in enumerate(rules_raw))
        guards = _guards(raw)
        agent = _agent(raw)
        knob_settings = _knobs(raw.get("knobs", {}))
        start = _start(raw.get("start", []))
    except PolicyError as exc:
        raise PolicyError(f"{source}: {exc}") from None
    steps = [(f"rule {rule.name!r}", step) for rule in rules for step in rule.do]
    for where, step in [*steps, *(("start", step) for step in start)]:
        if isinstance(step, ActionStep) and step.kind in FORBIDDEN and step.kind not in guards.allow:
            raise PolicyError(
                f"{source}: {where}: action {step.kind.value!r} is forbidden to rules; "
                f'add it to allow = ["{step.kind.value}"] to permit it'
            )
    return Policy(
        name=name, rules=rules, guards=guards, agent=agent, knobs=knob_settings, start=start, text=text
    )


def _start(raw: Any) -> tuple[Step, ...]:
    """The `start` list: steps as in a rule's `do`, but with nothing a signal or an earlier
    checkpoint would have to give (no "xT/value", no rollback: there is nothing to roll back to)."""
    if not isinstance(raw, list):
        raise _fail("start", f"{raw!r} rejected: expected a list of steps, as a rule's do")
    out = tuple(_step(f"start[{i}]", s) for i, s in enumerate(raw))
    for i, step in enumerate(out):
        if isinstance(step, ActionStep) and step.kind is ActionKind.ROLLBACK:
            raise _fail(f"start[{i}]", "a rollback at step 0 has nothing to go back to")
        if isinstance(step, SetStep) and any(
            isinstance(v, str) and factor_of(v)[1] for v in step.values.values()
        ):
            raise _fail(f"start[{i}]", '"xTARGET/value" needs the value of a signal; start has none')
    return out


def default_text() -> str:
    """The shipped default policy (weaver/policies/default.toml)."""
    return resources.files("weaver").joinpath("policies", "default.toml").read_text(encoding="utf-8")


def read_text(spec: str) -> str:
    """The TOML of `--policy SPEC`: the shipped default for "default", else the file at SPEC.

    Raises:
        PolicyError: the file cannot be read.
    """
    if spec == DEFAULT:
        return default_text()
    try:
        return Path(spec).read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(
            f"policy file {spec}: cannot read it ({exc.strerror}); expected a TOML file or 'default'"
        ) from None


def load(spec: str) -> Policy:
    """Read and check `--policy SPEC` (a file, or "default")."""
    return parse(read_text(spec), source=spec)
