"""`torchloom agent`: an LLM agent that steers a job through the weaver's agent API, and
`torchloom token add-agent|remove-agent`, which give an agent its own bearer token.

Each round the agent sends an OpenAI-compatible chat endpoint (`POST {endpoint}/chat/completions`)
the job's downsampled metric history (loss, grad norm, lr, step time), its knob schema with bounds,
its checkpoints and the recent interventions; it parses the reply against a strict JSON action
schema (`parse_reply`) and proposes each action as a Submit with its agent token, which the weaver
puts through the guardrails of the job's policy and then validates and journals like any command. A
reply that is malformed, outside the schema or out of the knobs' bounds is refused here and
journaled (ReportAgentRefusal); nothing of it is sent. Nothing is called unless `--endpoint` names
it; the API key comes from TORCHLOOM_AGENT_API_KEY (else OPENAI_API_KEY), never from argv.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchloom import env, knobs, private_files, tokens
from torchloom.app.lookup import weaver_address
from torchloom.client import ControlClient, new_command_id
from torchloom.errors import CommandRejected, TorchloomError
from torchloom.messages import (
    Action,
    ActionKind,
    Body,
    Issuer,
    JobEvent,
    JobStatus,
    KnobSpec,
    Outcome,
    OutcomeStatus,
    SetConfig,
    StepMetrics,
    SubmitRequest,
)

SERIES = ("loss", "grad_norm", "lr", "step_time_s")  # the metric history the prompt shows
MAX_ACTIONS_PER_REPLY = 4
MAX_REASON_CHARS = 2000
_ITEM_FORMS = '{"set": {"KNOB": VALUE, ...}} or {"action": "KIND", "ARG": "VALUE", ...}'
REPLY_FORM = (
    '{"actions": [' + _ITEM_FORMS + ', ...], "reason": "why, in one or two sentences"}'
    " (an empty actions list does nothing)"
)


class ReplyRefused(TorchloomError, ValueError):
    """A model reply that does not fit the action schema or the job's knobs; nothing is proposed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """A reply that fits the schema: the commands to propose, in order, and the model's reason."""

    bodies: tuple[Body, ...]
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    """What `torchloom agent` runs with.

    Args:
        endpoint: base URL of an OpenAI-compatible API (`{endpoint}/chat/completions` is posted to).
        model: the model name sent with each request.
        interval_s: seconds between rounds.
        max_actions: proposals sent in all; the agent stops once it has sent this many.
        rounds: rounds to run; 0 runs until the job is gone or `max_actions` is reached.
        history_points: points per metric series in the prompt (downsampled).
        interventions: recent journal entries in the prompt.
        request_timeout_s: deadline of one chat request.
    """

    endpoint: str
    model: str
    interval_s: float = 30.0
    max_actions: int = 10
    rounds: int = 0
    history_points: int = 32
    interventions: int = 10
    request_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        url = urllib.parse.urlsplit(self.endpoint)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise ValueError(
                f"--endpoint {self.endpoint!r} rejected: expected http(s)://HOST[:PORT][/PATH] of an "
                "OpenAI-compatible API (e.g. http://127.0.0.1:8000/v1)"
            )
        if not self.model:
            raise ValueError("--model rejected: empty; name the model the endpoint serves")
        for what, value in (("interval_s", self.interval_s), ("request_timeout_s", self.request_timeout_s)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{what}={value!r} rejected: must be a positive number of seconds")
        for what, count, low in (
            ("max_actions", self.max_actions, 1),
            ("rounds", self.rounds, 0),
            ("history_points", self.history_points, 2),
            ("interventions", self.interventions, 0),
        ):
            if count < low:
                raise ValueError(f"{what}={count} rejected: must be an integer >= {low}")


# ---- the reply (pure) ------------------------------------------------------------------------------


def _no_constant(name: str) -> Any:
    raise ReplyRefused(f"reply refused: {name} is not a JSON number; expected {REPLY_FORM}")


def _decode(text: str) -> Any:
    body = text.strip()
    if body.startswith("```") and body.endswith("```"):  # one fenced block, as chat models write it
        body = body.strip("`").removeprefix("json").strip()
    try:
        return json.loads(body, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise ReplyRefused(
            f"reply refused: not JSON ({exc.msg} at char {exc.pos}); expected {REPLY_FORM}"
        ) from None


def _item(i: int, raw: Any, schema: Mapping[str, KnobSpec]) -> Body:
    where = f"actions[{i}]"
    if not isinstance(raw, dict) or len({"set", "action"} & raw.keys()) != 1:
        raise ReplyRefused(f"reply refused: {where}={raw!r}: expected {_ITEM_FORMS}")
    if "set" in raw:
        values = raw["set"]
        if len(raw) != 1 or not isinstance(values, dict) or not values:
            raise ReplyRefused(f'reply refused: {where}: expected {{"set": {{"KNOB": VALUE, ...}}}} alone')
        for key, value in values.items():
            if isinstance(value, dict) or value is None:
                raise ReplyRefused(f"reply refused: {where}.set.{key}={value!r}: expected a value")
        try:
            typed = knobs.validate_set(schema, values)
        except CommandRejected as exc:
            raise ReplyRefused(f"reply refused: {where}: {exc.reason}") from None
        return SetConfig(values=typed)
    try:
        kind = ActionKind(raw["action"])
    except (ValueError, TypeError):
        kinds = ", ".join(k.value for k in ActionKind)
        raise ReplyRefused(
            f"reply refused: {where}.action={raw['action']!r}: expected one of {kinds}"
        ) from None
    args = {k: v for k, v in raw.items() if k != "action"}
    if not all(isinstance(v, str) for v in args.values()):
        raise ReplyRefused(f"reply refused: {where}: arguments {args!r} must all be strings")
    if kind is ActionKind.ROLLBACK and not args.get("checkpoint"):
        raise ReplyRefused(f'reply refused: {where}: rollback needs "checkpoint": ID (one of the job\'s)')
    return Action(kind=kind, args=args)


def parse_reply(text: str, schema: Mapping[str, KnobSpec]) -> Plan:
    """Check a model reply against the action schema and the job's knob schema.

    Raises:
        ReplyRefused: not JSON, not of the form `REPLY_FORM`, an unknown knob or action, a value of
            the wrong type or out of the knob's bounds; the message says what and what is expected.
    """
    data = _decode(text)
    if not isinstance(data, dict):
        raise ReplyRefused(f"reply refused: a JSON {type(data).__name__}; expected the object {REPLY_FORM}")
    unknown = sorted(data.keys() - {"actions", "reason"})
    if unknown:
        raise ReplyRefused(f"reply refused: unknown field(s) {', '.join(unknown)}; expected {REPLY_FORM}")
    actions, reason = data.get("actions"), data.get("reason")
    if not isinstance(actions, list):
        raise ReplyRefused(f"reply refused: actions={actions!r}; expected a list, in {REPLY_FORM}")
    if len(actions) > MAX_ACTIONS_PER_REPLY:
        raise ReplyRefused(
            f"reply refused: {len(actions)} actions; at most {MAX_ACTIONS_PER_REPLY} per reply"
        )
    if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON_CHARS:
        raise ReplyRefused(f"reply refused: reason must be a non-empty string of at most {MAX_REASON_CHARS}")
    return Plan(bodies=tuple(_item(i, a, schema) for i, a in enumerate(actions)), reason=reason.strip())


def completion_text(response: Any) -> str:
    """The assistant message of a chat completion response (`choices[0].message.content`).

    Raises:
        ReplyRefused: the response is not of that form.
    """
    try:
        content = response["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ReplyRefused("reply refused: the endpoint's answer has no choices[0].message.content") from None
    if not isinstance(content, str):
        raise ReplyRefused("reply refused: choices[0].message.content is not a string")
    return content


# ---- the prompt (pure) -----------------------------------------------------------------------------


def downsample(points: Sequence[tuple[int, float]], n: int) -> list[tuple[int, float]]:
    """At most `n` points of a series, evenly spaced, always with its first and last."""
    if len(points) <= n:
        return list(points)
    idx = {round(i * (len(points) - 1) / (n - 1)) for i in range(n)}
    return [points[i] for i in sorted(idx)]


def _knob_json(spec: KnobSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"name": spec.name, "type": spec.type.value, "value": spec.value}
    for key in ("min", "max"):
        if getattr(spec, key) is not None:  # 0.0 is a bound too
            out[key] = getattr(spec, key)
    for key in ("min_exclusive", "max_exclusive", "description"):
        if getattr(spec, key):
            out[key] = getattr(spec, key)
    if spec.choices:
        out["choices"] = list(spec.choices)
    return out


def intervention_line(entry: Outcome | JobEvent) -> str | None:
    """One journal entry as the prompt shows it, or None for entries that are no intervention."""
    if isinstance(entry, Outcome):
        cmd = entry.command
        issuer = cmd.issuer if cmd is not None else entry.issuer
        who = "?"
        if issuer is not None:  # "rule:NAME" and "agent:NAME" already say their kind
            prefixed = issuer.identity.startswith(f"{issuer.kind}:")
            who = issuer.identity if prefixed else f"{issuer.kind}:{issuer.identity}"
        if cmd is None:
            return f"refused from {who}: {entry.reason}"
        if isinstance(cmd.body, SetConfig):
            what = "set " + ", ".join(f"{k}={v}" for k, v in sorted(cmd.body.values.items()))
        else:
            what = cmd.body.kind.value + "".join(f" {k}={v}" for k, v in sorted(cmd.body.args.items()))
        steps = sorted({r.step for r in entry.results})
        at = f" at step {steps[0]}" if steps else ""
        return f"#{cmd.seq} {what} by {who}: {entry.status.value}{at}" + (
            f" ({entry.reason})" if entry.reason else ""
        )
    if entry.kind.startswith(("rule_", "agent_", "signal")):
        return entry.message
    return None


def build_messages(
    status: JobStatus,
    history: Mapping[str, Sequence[tuple[int, float]]],
    interventions: Sequence[str],
    config: AgentConfig,
) -> list[dict[str, str]]:
    """The chat messages of one round: the instructions, then the job's state as JSON."""
    system = (
        "You watch a PyTorch training run and may steer it. Reply with one JSON object and nothing "
        f"else: {REPLY_FORM}. Set only knobs listed under knobs, within their bounds. Actions: "
        'checkpoint, rollback (with "checkpoint": one of the checkpoint ids), pause, resume, eval; '
        "stop, data_add and fault_inject are refused unless the job's policy allows them. Every "
        "proposal passes the job's guardrails (bounds from each knob's start value, a cool-down) and "
        "may be held for a person's approval. Do nothing unless the metrics call for it."
    )
    steps = [r.step for r in status.ranks]
    state = {
        "job": status.job,
        "step": min(steps) if steps else 0,
        "branch": status.branch,
        "knobs": [_knob_json(k) for k in status.knobs],
        "metrics": {
            name: [[s, v if math.isfinite(v) else None] for s, v in downsample(points, config.history_points)]
            for name, points in history.items()
            if points
        },
        "checkpoints": [{"id": c.id, "step": c.step, "branch": c.branch} for c in status.checkpoints[-10:]],
        "recent_interventions": list(interventions[-config.interventions :]) if config.interventions else [],
    }
    return [{"role": "system", "content": system}, {"role": "user", "content": json.dumps(state)}]


# ---- the endpoint ----------------------------------------------------------------------------------


def api_key() -> str | None:
    """The endpoint's key: TORCHLOOM_AGENT_API_KEY, then OPENAI_API_KEY; None: send none."""
    return env.get(env.AGENT_API_KEY) or env.get(env.OPENAI_API_KEY)


def post_chat(config: AgentConfig, messages: list[dict[str, str]], key: str | None) -> Any:
    """POST one chat completion request; return the decoded JSON answer.

    Raises:
        ReplyRefused: the answer is not JSON.
        OSError: the endpoint cannot be reached, or answered with an HTTP error.
    """
    url = config.endpoint.rstrip("/") + "/chat/completions"
    payload = {"model": config.model, "messages": messages, "temperature": 0}
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=config.request_timeout_s) as answer:  # http(s) only
        raw = answer.read(4 * 1024 * 1024)
    try:
        return json.loads(raw)
    except ValueError:
        raise ReplyRefused(f"reply refused: the endpoint's answer is not JSON ({raw[:200]!r})") from None


# ---- the loop --------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Seen:
    """What the agent's Watch stream brought: metric history (rank 0's) and recent interventions."""

    points: int
    history: dict[str, collections.deque[tuple[int, float]]] = field(default_factory=dict)
    interventions: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=50))

    def add(self, ev: StepMetrics | JobEvent | Outcome) -> None:
        if isinstance(ev, StepMetrics):
            if ev.rank != 0:
                return
            for name in SERIES:
                if name in ev.values:
                    series = self.history.setdefault(name, collections.deque(maxlen=self.points * 16))
                    series.append((ev.step, ev.values[name]))
            return
        line = intervention_line(ev)
        if line is not None:
            self.interventions.append(line)


class LlmAgent:
    """The rounds of `torchloom agent` against one job.

    Args:
        config: endpoint, model and pacing.
        client: an open `ControlClient` carrying the agent's token.
        job: the job to steer ("": the only running one).
        chat: the endpoint call (`post_chat`), run in a worker thread.
        say: where progress lines go.
    """

    def __init__(
        self,
        config: AgentConfig,
        client: ControlClient,
        job: str,
        *,
        chat: Callable[[AgentConfig, list[dict[str, str]], str | None], Any] = post_chat,
        say: Callable[[str], None] = print,
    ) -> None:
        self.config = config
        self.client = client
        self.job = job
        self._chat = chat
        self._say = say
        self._seen = _Seen(config.history_points)
        self.sent = 0

    async def _watch(self) -> None:
        async for ev in self.client.watch(self.job):
            self._seen.add(ev)

    async def _backfill(self, run_id: str) -> None:
        """The run's earlier interventions, from the journal."""
        async with asyncio.timeout(self.config.request_timeout_s):
            async for entry in self.client.journal(self.job, run_id=run_id):
                if not isinstance(entry, StepMetrics):
                    self._seen.add(entry)

    async def run(self) -> int:
        """Run rounds until `rounds`, `max_actions`, or the job is gone; return the exit status."""
        status = (await self.client.status(self.job)).jobs[0]
        self.job = status.job
        await self._backfill(status.run_id)
        watcher = asyncio.ensure_future(self._watch())
        try:
            done = 0
            while not self.config.rounds or done < self.config.rounds:
                if done:
                    await asyncio.sleep(self.config.interval_s)
                done += 1
                status = (await self.client.status(self.job)).jobs[0]
                await self.round(status)
                if self.sent >= self.config.max_actions:
                    self._say(f"agent: sent {self.sent} proposal(s), --max-actions reached; stopping")
                    break
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, TorchloomError):
                await watcher
        return 0

    async def round(self, status: JobStatus) -> None:
        """One round: ask the model, check its reply, propose what it asks (or journal the refusal)."""
        history = {name: list(points) for name, points in self._seen.history.items()}
        messages = build_messages(status, history, list(self._seen.interventions), self.config)
        reply = ""
        try:
            answer = await asyncio.to_thread(self._chat, self.config, messages, api_key())
            reply = completion_text(answer)
            plan = parse_reply(reply, knobs.schema_of(status.knobs))
        except ReplyRefused as exc:
            self._say(f"agent: {exc}")
            await self.client.report_agent_refusal(str(exc), reply=reply, job=self.job)
            return
        except (OSError, urllib.error.URLError) as exc:  # the endpoint is down: try again next round
            self._say(f"agent: the endpoint failed: {exc}")
            return
        self._say(f"agent: model says: {plan.reason}")
        for body in plan.bodies[: self.config.max_actions - self.sent]:
            req = SubmitRequest(
                body=body,
                job=self.job,
                issuer=Issuer(kind="agent"),  # the weaver names the agent by its token
                command_id=new_command_id(),
                reason=plan.reason,  # journaled with the proposal
            )
            outcome = await self.client.submit(req)
            self.sent += 1
            self._say(
                f"agent: proposed {_describe(body)}: {outcome.status.value}"
                + (f" ({outcome.reason})" if outcome.reason else "")
            )
            if outcome.status is not OutcomeStatus.APPLIED:
                break  # the rest of the plan assumed this one applied


def _describe(body: Body) -> str:
    if isinstance(body, SetConfig):
        return "set " + " ".join(f"{k}={v}" for k, v in sorted(body.values.items()))
    return body.kind.value + "".join(f" {k}={v}" for k, v in sorted(body.args.items()))


# ---- the CLI ---------------------------------------------------------------------------------------


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], client: Callable[[], argparse.ArgumentParser]
) -> None:
    """Add `agent` and `token add-agent|remove-agent` to the CLI; `client` makes the --grpc/--job parent."""
    agent = sub.add_parser(
        "agent",
        parents=[client()],
        help="steer the job with an LLM (an OpenAI-compatible endpoint) through the agent API",
    )
    agent.add_argument(
        "--endpoint", required=True, metavar="URL", help="base URL, e.g. http://127.0.0.1:8000/v1"
    )
    agent.add_argument("--model", required=True, metavar="NAME", help="the model the endpoint serves")
    agent.add_argument(
        "--interval", type=float, default=30.0, metavar="S", help="seconds between rounds (30)"
    )
    agent.add_argument("--max-actions", type=int, default=10, metavar="N", help="stop after N proposals (10)")
    agent.add_argument("--rounds", type=int, default=0, metavar="N", help="stop after N rounds (0: no limit)")
    token = sub.add_parser("token", help="bearer tokens of the weaver's gRPC service")
    verbs = token.add_subparsers(dest="token_command", required=True, metavar="{add-agent,remove-agent}")
    add = verbs.add_parser("add-agent", help="give agent NAME a new token (identity agent:NAME)")
    add.add_argument("name", metavar="NAME")
    add.add_argument(
        "--out", metavar="FILE", help="write the token to FILE (mode 0600) instead of printing it"
    )
    remove = verbs.add_parser("remove-agent", help="revoke agent NAME's token")
    remove.add_argument("name", metavar="NAME")
    for p in (add, remove):
        p.add_argument("--tokens-file", metavar="FILE", help="the token table (default: the control plane's)")


def _token_command(args: argparse.Namespace) -> int:
    table = Path(args.tokens_file) if args.tokens_file else None
    if args.token_command == "remove-agent":
        removed = tokens.remove_agent(args.name, table)
        print(f"agent:{args.name} {'revoked' if removed else 'had no token'}")
        return 0
    identity, token = tokens.add_agent(args.name, table)
    if args.out:
        private_files.write_private(Path(args.out), token + "\n")
        print(f"{identity}: token written to {args.out}", file=sys.stderr)
    else:
        print(token)
    return 0


async def _run_agent(args: argparse.Namespace) -> int:
    config = AgentConfig(
        endpoint=args.endpoint,
        model=args.model,
        interval_s=args.interval,
        max_actions=args.max_actions,
        rounds=args.rounds,
    )
    async with ControlClient(weaver_address(args.grpc)) as client:
        return await LlmAgent(config, client, args.job, say=lambda line: print(line, flush=True)).run()


def command(args: argparse.Namespace) -> int:
    """Run a parsed `torchloom agent` or `torchloom token ...`; errors propagate to the CLI's handlers."""
    if args.command == "token":
        return _token_command(args)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_run_agent(args))
    return 0
