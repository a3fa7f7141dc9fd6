"""The weaver's request-reply API over NATS: `api.submit`, `api.status`, `api.decide` and the web
pages' journal feeds (`api.feeds.<role>`). Each handler checks that it got a request whose answer
goes to an inbox, then answers through the weaver's own operations, which the `Weaver` front hands
to its `BusApi` when it subscribes it."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from nats.aio.msg import Msg

from torchloom import subjects, wire
from torchloom.errors import JobNotFound, NatsUnavailable
from torchloom.messages import JobEvent, Outcome, OutcomeStatus, ProposalDecision, StatusReply, SubmitRequest
from weaver import ui_feeds
from weaver.admission import Refuse

log = logging.getLogger(__name__)

# The kind of api.decide's answer when no decision was made (unknown proposal or job, bad request).
DECIDE_FAILED = "proposal_not_decided"
# Who decides over api.decide on a bus whose role table the weaver was not told about.
NATS_ANONYMOUS = "nats:unauthenticated"

__all__ = ["DECIDE_FAILED", "NATS_ANONYMOUS", "BusApi"]


class BusApi:
    """The handlers of the weaver's NATS API subscriptions (queue group: one weaver answers).

    Args:
        feeds: the web pages' journal feeds.
        identity: the one role that may publish on api.submit and api.decide (the server's role
            table), journaled as the issuer or the decider; None when the weaver was not told it.
        submit: the weaver's submit.
        status: the weaver's status of a job ("" for all).
        decide: the weaver's decision on an autopilot proposal, by whom.
        refuse: count and announce a refused message.
        spawn: run a coroutine in the weaver's TaskGroup under a name.
    """

    def __init__(
        self,
        feeds: ui_feeds.UiFeeds,
        *,
        identity: str | None,
        submit: Callable[[SubmitRequest], Awaitable[Outcome]],
        status: Callable[[str], StatusReply],
        decide: Callable[[ProposalDecision, str], JobEvent],
        refuse: Refuse,
        spawn: Callable[[Coroutine[Any, Any, None], str], None],
    ) -> None:
        self._feeds = feeds
        self._identity = identity
        self._submit = submit
        self._status = status
        self._decide = decide
        self._refuse = refuse
        self._spawn = spawn

    def _not_a_request(self, kind: str, subject: str, msg: Msg) -> bool:
        """True (and counted) unless `msg` is a request on `subject` whose reply goes to an inbox:
        an answer is published with the weaver's rights, so it must not land on a subject of its
        requester's choice."""
        if msg.subject == subject and (msg.reply or "").startswith(f"{subjects.INBOX}."):
            return False
        self._refuse(
            kind,
            "",
            "",
            f"{kind} request on {msg.subject} with reply subject {msg.reply or '(none)'!r} dropped: "
            f"expected {subject} with a reply to an {subjects.INBOX}. subject",
            time.time(),
            key="reply",
        )
        return True

    async def on_submit(self, msg: Msg) -> None:
        if self._not_a_request("api", subjects.api_submit(), msg):
            return
        # A submit waits for every rank; run it apart so other requests are not queued behind it.
        self._spawn(self._serve_submit(msg), "weaver-api-submit")

    async def _serve_submit(self, msg: Msg) -> None:
        try:
            req = wire.decode_submit_request(msg.data)
        except ValueError as exc:
            outcome = Outcome(command_id="", job="", status=OutcomeStatus.REJECTED, reason=str(exc))
        else:
            identity = self._identity
            if identity is not None:
                # Only that role may publish on api.submit (the server's role table): it is the issuer.
                req = dataclasses.replace(req, issuer=dataclasses.replace(req.issuer, identity=identity))
            try:
                outcome = await self._submit(req)
            except NatsUnavailable as exc:
                # Not a rejection: the command may be stored. Not known yet; a repeat with the same
                # command id is answered with its decision.
                outcome = Outcome(
                    command_id=req.command_id,
                    job=req.job,
                    status=OutcomeStatus.TIMEOUT,
                    reason=f"not known yet: {exc}; send it again with the same command id",
                )
        with contextlib.suppress(Exception):  # the requester may be gone
            await msg.respond(wire.encode(outcome))

    async def on_status(self, msg: Msg) -> None:
        if self._not_a_request("api", subjects.api_status(), msg):
            return
        try:
            req = wire.decode_status_request(msg.data)
            reply = self._status(req.job)
        except (ValueError, JobNotFound) as exc:
            # The NATS API has no error channel: an unknown job answers an empty reply.
            log.debug("status request: %s", exc)
            reply = StatusReply()
        with contextlib.suppress(Exception):
            await msg.respond(wire.encode(reply))

    async def on_decide(self, msg: Msg) -> None:
        """The page's answer to a proposal: `Weaver.decide_proposal`, decided by the NATS api
        identity. A decision that cannot be made is answered with a `DECIDE_FAILED` event (not
        journaled), the reason in its message: the NATS API has no error channel."""
        if self._not_a_request("api", subjects.api_decide(), msg):
            return
        try:
            req = wire.decode_proposal_decision(msg.data)
        except ValueError as exc:
            answer = JobEvent(job="", kind=DECIDE_FAILED, message=str(exc), time_s=time.time())
        else:
            try:
                answer = self._decide(req, self._identity or NATS_ANONYMOUS)
            except (ValueError, JobNotFound, KeyError) as exc:
                answer = JobEvent(
                    job=req.job,
                    kind=DECIDE_FAILED,
                    message=str(exc.args[0]) if exc.args else str(exc),
                    time_s=time.time(),
                    attrs={"proposal": req.proposal_id},
                )
        with contextlib.suppress(Exception):  # the requester may be gone
            await msg.respond(wire.encode(answer))

    async def on_feed(self, msg: Msg) -> None:
        """A web page asks for its journal history: `ui_feeds` makes a feed that delivers to an inbox
        of the role named by the subject (only that role may publish there)."""
        owner = msg.subject.rpartition(".")[2]
        expected = subjects.api_feed(owner) if owner in ui_feeds.OWNERS else subjects.api_feeds_all()
        if self._not_a_request("api", expected, msg):
            return
        self._spawn(self._serve_feed(owner, msg), "weaver-api-feed")

    async def _serve_feed(self, owner: str, msg: Msg) -> None:
        reply = await self._feeds.answer(owner, msg.data)
        if reply.refused:
            self._refuse(
                "api", "", "", f"journal feed for {owner} refused: {reply.error}", time.time(), key="feed"
            )
        with contextlib.suppress(Exception):  # the requester may be gone
            await msg.respond(reply.encode())
