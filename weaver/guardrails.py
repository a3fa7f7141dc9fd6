"""Guardrails for automated issuers (autopilot rules, agents): per-rule and per-agent rate limits and
cool-downs,
bounds on how far a knob may move from its start value, and actions forbidden unless allowed.

Pure: each check returns None when the proposal may go ahead, else the refusal in words (what was
refused, the bound, and what would be allowed). Times are unix seconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torchloom.messages import Action, Body, KnobValue, SetConfig
from weaver.rules import FORBIDDEN, AgentGuards, Guards, Rule

HOUR_S = 3600.0


def _rate(
    who: str, verb: str, cooldown_s: float, max_per_hour: int, times: list[float], now: float
) -> str | None:
    if times and now - times[-1] < cooldown_s:
        wait = cooldown_s - (now - times[-1])
        return (
            f"{who} is cooling down: {verb} {now - times[-1]:.1f} s ago, "
            f"cooldown_s={cooldown_s:g} ({wait:.1f} s left)"
        )
    recent = [t for t in times if now - t < HOUR_S]
    if len(recent) >= max_per_hour:
        return f"{who} {verb} {len(recent)} times in the last hour: max_per_hour={max_per_hour}"
    return None


def rate_refusal(
    rule: Rule, fired_at: Iterable[float], now: float, *, fired_step: int | None = None, step: int = 0
) -> str | None:
    """Refuse a firing within the rule's cool-down of its last one (`cooldown_s` seconds, and
    `cooldown_steps` training steps after `fired_step`, the step it last fired at on this branch),
    or past `max_per_hour`."""
    if fired_step is not None and step - fired_step < rule.cooldown_steps:
        return (
            f"rule {rule.name!r} is cooling down: fired at step {fired_step}, now step {step}, "
            f"cooldown_steps={rule.cooldown_steps} ({fired_step + rule.cooldown_steps - step} steps left)"
        )
    return _rate(f"rule {rule.name!r}", "fired", rule.cooldown_s, rule.max_per_hour, sorted(fired_at), now)


def agent_rate_refusal(
    identity: str, agent: AgentGuards, proposed_at: Iterable[float], now: float
) -> str | None:
    """Refuse an agent's proposal within the policy's agent cool-down of its last accepted one, or
    past the agent `max_per_hour`."""
    times = sorted(proposed_at)
    return _rate(f"agent {identity!r}", "proposed", agent.cooldown_s, agent.max_per_hour, times, now)


def action_refusal(body: Action, guards: Guards) -> str | None:
    """Refuse an action automated issuers may not take unless the policy allows it."""
    if body.kind in FORBIDDEN and body.kind not in guards.allow:
        return (
            f"action {body.kind.value!r} is forbidden to automated issuers: "
            f'the policy must list it in allow = ["{body.kind.value}"]'
        )
    return None


def bound_refusal(key: str, value: KnobValue, start: KnobValue | None, guards: Guards) -> str | None:
    """Refuse moving a numeric knob outside [low x start, high x start] (the policy's bounds)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None  # bounds are factors of a number; other knobs are checked by their schema
    if isinstance(start, bool) or not isinstance(start, int | float):
        return f"{key}={value:g} refused: the start value of {key} is not known, so its bounds are not either"
    low, high = guards.bounds_of(key)
    lo, hi = sorted((low * start, high * start))
    if not lo <= value <= hi:
        return (
            f"{key}={value:g} refused: automated issuers keep {key} within [{lo:g}, {hi:g}] "
            f"({low:g} to {high:g} x its start value {start:g})"
        )
    return None


def clamp(key: str, value: float, start: KnobValue | None, guards: Guards) -> float:
    """`value` moved into the bounds of `key` (a factor a rule derived from a signal, not one a person
    chose, so it is kept within them rather than refused); unchanged when the start is not known."""
    if isinstance(start, bool) or not isinstance(start, int | float):
        return value
    low, high = guards.bounds_of(key)
    lo, hi = sorted((low * start, high * start))
    return min(max(value, lo), hi)


def body_refusal(body: Body, starts: Mapping[str, KnobValue], guards: Guards) -> str | None:
    """The first refusal of a command body by the action and bound guardrails, else None."""
    if isinstance(body, Action):
        return action_refusal(body, guards)
    assert isinstance(body, SetConfig)
    for key, value in body.values.items():
        start = starts.get(key, starts.get(key.split("@", 1)[0]))
        why = bound_refusal(key, value, start, guards)
        if why is not None:
            return why
    return None
