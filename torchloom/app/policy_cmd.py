"""`torchloom policy set|show|approve|refuse` and the policy half of `torchloom run --policy`: a job's
autopilot rules (weaver/rules.py), set and read through the weaver's Control service, and a person's
answer to the proposals of a policy in approval mode."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable

from torchloom.app.lookup import weaver_address
from torchloom.client import ControlClient
from torchloom.messages import JobEvent, PolicyReply
from weaver import rules

POLICY_TIMEOUT_S = 10.0
NONE = "none"  # `torchloom policy set none`: the job runs without rules


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], client: Callable[[], argparse.ArgumentParser]
) -> None:
    """Add `policy set|show|approve|refuse` to the CLI; `client` makes the --grpc/--job parent."""
    policy = sub.add_parser("policy", help="the job's autopilot rules and their proposals")
    verbs = policy.add_subparsers(dest="policy_command", required=True, metavar="{set,show,approve,refuse}")
    set_p = verbs.add_parser("set", parents=[client()], help="run the job under the rules of FILE")
    set_p.add_argument(
        "file",
        metavar="FILE",
        help=f"a TOML policy, '{rules.DEFAULT}' (the shipped one) or '{NONE}' (no rules)",
    )
    show = verbs.add_parser("show", parents=[client()], help="print the job's policy and pending proposals")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    for verb, text in (("approve", "send a proposal's commands now"), ("refuse", "drop a proposal")):
        p = verbs.add_parser(verb, parents=[client()], help=text)
        p.add_argument("proposal", metavar="ID", help="the proposal id (torchloom policy show)")


def policy_text(spec: str) -> str:
    """The TOML to send for `spec` (a file, "default", or "none" for ""), checked here first so a bad
    file is refused before anything is sent.

    Raises:
        rules.PolicyError: naming the file, field and expected form.
    """
    if spec == NONE:
        return ""
    text = rules.read_text(spec)
    rules.parse(text, source=spec)
    return text


async def set_job_policy(grpc: str, job: str, text: str) -> PolicyReply:
    """Run `job` (it need not have started yet) under the policy `text` ("" for no rules)."""
    async with ControlClient(grpc) as client, asyncio.timeout(POLICY_TIMEOUT_S):
        return await client.set_policy(job, text)


def _reply_json(reply: PolicyReply) -> dict[str, object]:
    return {
        "job": reply.job,
        "policy": reply.name or None,
        "text": reply.text,
        "proposals": [
            {"id": e.attrs.get("proposal", ""), "message": e.message, **e.attrs} for e in reply.proposals
        ],
    }


def _print_reply(reply: PolicyReply, as_json: bool) -> None:
    if as_json:
        print(json.dumps(_reply_json(reply)), flush=True)
        return
    if not reply.name:
        print(f"job {reply.job}: no autopilot policy")
    else:
        print(f"job {reply.job}: autopilot policy {reply.name}\n{reply.text.rstrip()}")
    for ev in reply.proposals:
        print(f"proposal {ev.attrs.get('proposal', '')}: {ev.message}")


def _print_event(ev: JobEvent) -> None:
    print(ev.message, flush=True)


async def _run(args: argparse.Namespace) -> int:
    address = weaver_address(args.grpc)
    async with ControlClient(address) as client, asyncio.timeout(POLICY_TIMEOUT_S):
        verb = args.policy_command
        if verb == "set":
            reply = await client.set_policy(args.job, policy_text(args.file))
            _print_reply(reply, False)
        elif verb == "show":
            _print_reply(await client.get_policy(args.job), args.json)
        else:
            _print_event(await client.decide_proposal(args.proposal, approve=verb == "approve", job=args.job))
    return 0


def command(args: argparse.Namespace) -> int:
    """Run a parsed `torchloom policy ...` command; its errors propagate to the CLI's handlers
    (a bad policy is a ValueError, exit 2; an unknown job or proposal, exit 2 as JobNotFound)."""
    return asyncio.run(_run(args))
