// The UI's NATS link: a WebSocket connection to nats-server that retries forever, subscribes to the
// job's subjects (torchloom/subjects.py), does api.submit / api.decide / api.status request-reply,
// and reads the history of the TORCHLOOM_JOURNAL stream once per connection through a feed the
// weaver makes (api.feed.<role>, weaver/ui_feeds.py): the page makes no JetStream request itself.
import { nuid, wsconnect } from "@nats-io/nats-core";
import {
  decodeAck,
  decodeHeartbeat,
  decodeJobEvent,
  decodeJournalMessage,
  decodeMetrics,
  decodeOutcome,
  decodeStatusReply,
  encodeProposalDecision,
  encodeStatusRequest,
  encodeSubmit,
} from "./proto.js";
import { feedDelivery, feedOwner, feedRequest, newCommandId, parseFeedReply, submitFailure } from "./logic.js";

const PREFIX = "torchloom.v1";
export const SUBJECTS = {
  heartbeats: `${PREFIX}.hb.*.*`,
  metrics: `${PREFIX}.metrics.*.*`,
  events: `${PREFIX}.events.*`,
  journal: `${PREFIX}.journal.*`,
  acks: `${PREFIX}.ack.*`,
  submit: `${PREFIX}.api.submit`,
  decide: `${PREFIX}.api.decide`,
  status: `${PREFIX}.api.status`,
  feed: (owner) => `${PREFIX}.api.feed.${owner}`,
};

const RETRY_MS = 1000;
// One api.submit request waits for its reply as long as the weaver waits for the ranks (its
// timeout_s) plus this, so a weaver's own "timeout" outcome arrives; past it the request is sent
// again (same command id: a repeat joins the weaver's pending decision, so it costs nothing).
const SUBMIT_REPLY_GRACE_MS = 2000;
// How much journal history a page loads when it opens: the newest entries, not 90 days of them.
const HISTORY_MAX = 2000;
// How long the weaver may take to make the feed, and a feed may go silent before it is asked again.
const FEED_REQUEST_MS = 5000;
const FEED_IDLE_MS = 10000;

/**
 * Keeps one connection alive and feeds decoded messages to `handlers`.
 *
 * handlers: {onStatus(state, detail), onHeartbeat(hb), onMetrics(m), onEvent(e), onOutcome(o),
 * onAck(a), onConnected(), onHistory(items, done)}; state is "connecting" | "connected" |
 * "unreachable". onHistory gets journal entries ({event} or {outcome}) written before the page
 * connected, oldest first, in batches; `done` is true on the last call.
 */
export class Bus {
  /**
   * auth: {user, pass, inboxPrefix, readOnly} from the UI server's config.json: the NATS credential
   * of the page's role (ui-viewer or ui-operator) and its inbox prefix; a readOnly bus never submits.
   */
  constructor(url, handlers, auth = {}) {
    this.url = url;
    this.h = handlers;
    this.auth = auth;
    this.nc = null;
    this.stopped = false;
    this.decodeErrors = 0;
  }

  async run() {
    this.h.onStatus("connecting", this.url);
    while (!this.stopped) {
      let nc;
      try {
        const creds = this.auth.user ? { user: this.auth.user, pass: this.auth.pass } : {};
        const inbox = this.auth.inboxPrefix ? { inboxPrefix: this.auth.inboxPrefix } : {};
        nc = await wsconnect({
          servers: this.url,
          name: "torchloom-ui",
          ...creds,
          ...inbox,
          maxReconnectAttempts: -1,
          reconnectTimeWait: RETRY_MS,
          pingInterval: 5000,
          maxPingOut: 2,
        });
      } catch (err) {
        this.h.onStatus("unreachable", String(err?.message || err));
        await new Promise((r) => setTimeout(r, RETRY_MS));
        continue;
      }
      this.nc = nc;
      this.h.onStatus("connected", this.url);
      this._subscribe(nc);
      this._watchStatus(nc);
      this._loadHistory(nc);
      this.h.onConnected?.();
      // closed() resolves only when reconnects gave up or close() was called: then start over.
      await nc.closed();
      this.nc = null;
      if (!this.stopped) this.h.onStatus("unreachable", "connection closed");
    }
  }

  async _watchStatus(nc) {
    for await (const s of nc.status()) {
      if (s.type === "disconnect" || s.type === "reconnecting") {
        this.h.onStatus("unreachable", s.type);
      } else if (s.type === "reconnect") {
        this.h.onStatus("connected", this.url);
        this.h.onConnected?.();
      }
    }
  }

  _sub(nc, subject, decode, handler) {
    nc.subscribe(subject, {
      callback: (err, msg) => {
        if (err) return;
        let decoded;
        try {
          decoded = decode(msg.data);
        } catch {
          // A malformed message from some other publisher must not stop the dashboard.
          this.decodeErrors += 1;
          return;
        }
        handler(decoded);
      },
    });
  }

  _subscribe(nc) {
    this._sub(nc, SUBJECTS.heartbeats, decodeHeartbeat, (x) => this.h.onHeartbeat(x));
    this._sub(nc, SUBJECTS.metrics, decodeMetrics, (x) => this.h.onMetrics(x));
    this._sub(nc, SUBJECTS.events, decodeJobEvent, (x) => this.h.onEvent(x));
    this._sub(nc, SUBJECTS.journal, decodeOutcome, (x) => this.h.onOutcome(x));
    this._sub(nc, SUBJECTS.acks, decodeAck, (x) => this.h.onAck(x));
  }

  /**
   * Read the journal stream up to its last message at the weaver's answer (live entries keep
   * arriving on the core subscriptions). Asks again while there is no weaver to make the feed, or a
   * feed stops delivering before its end.
   */
  async _loadHistory(nc) {
    if (!this.h.onHistory) return;
    while (!nc.isClosed()) {
      try {
        await this._readFeed(nc);
        return;
      } catch (err) {
        if (nc.isClosed()) return;
        this.historyError = String(err?.message || err);
        await new Promise((r) => setTimeout(r, RETRY_MS));
      }
    }
  }

  /**
   * One feed: subscribe to a fresh inbox of the page's role, ask the weaver to deliver the newest
   * HISTORY_MAX entries there, and hand them to onHistory in batches until the last one.
   */
  async _readFeed(nc) {
    const owner = feedOwner(this.auth.readOnly);
    const deliver = `_INBOX.${owner}.feed.${nuid.next()}`;
    const sub = nc.subscribe(deliver); // before the request: the feed delivers only while someone listens
    try {
      const reply = await nc.request(SUBJECTS.feed(owner), feedRequest(deliver, HISTORY_MAX), {
        timeout: FEED_REQUEST_MS,
      });
      const feed = parseFeedReply(reply.data);
      if (feed.lastSeq === 0) {
        this.h.onHistory([], true);
        return;
      }
      const msgs = sub[Symbol.asyncIterator]();
      let batch = [];
      for (;;) {
        const { value: m, done: closed } = await nextWithin(msgs, FEED_IDLE_MS);
        if (closed) throw new Error("journal feed closed before its last entry");
        const at = feedDelivery(m.reply);
        if (!at) continue; // not a delivery of the feed
        try {
          const item = decodeJournalMessage(m.subject, m.data);
          if (item) batch.push(item);
        } catch {
          this.decodeErrors += 1;
        }
        const done = at.streamSeq >= feed.lastSeq || at.pending === 0;
        if (batch.length >= 200 || done) {
          this.h.onHistory(batch, done);
          batch = [];
        }
        if (done) return;
      }
    } finally {
      // Nobody listens any more: nats-server deletes the feed shortly (its inactive threshold).
      sub.unsubscribe();
    }
  }

  /**
   * Submit a command through the weaver (api.submit); resolves to the decoded Outcome. `req.command_id`
   * names the command (one per user action; a call without one is an action of its own and gets
   * a fresh one): a request left unanswered (no weaver answering yet, a timeout, a lost
   * connection: `submitFailure`) is sent again with the same id until `timeoutMs` has passed, and the
   * weaver decides that id once. The error thrown at the end carries `failure` ("unsent"/"unknown").
   */
  async submit(req, timeoutMs = 30000) {
    if (this.auth.readOnly) throw new Error("read-only page: it cannot steer the job");
    const payload = encodeSubmit(req.command_id ? req : { ...req, command_id: newCommandId() });
    const end = Date.now() + timeoutMs;
    const attemptMs = req.timeout_s ? req.timeout_s * 1000 + SUBMIT_REPLY_GRACE_MS : timeoutMs;
    let failure = "unsent";
    for (;;) {
      try {
        const nc = this.nc;
        if (!nc || nc.isClosed()) throw new Error("NATS unreachable: cannot send the command now");
        const left = Math.max(end - Date.now(), 1);
        const reply = await nc.request(SUBJECTS.submit, payload, { timeout: Math.min(left, attemptMs) });
        return decodeOutcome(reply.data);
      } catch (err) {
        const kind = submitFailure(err);
        if (kind === "unknown") failure = "unknown"; // once it may have been taken, it stays so
        if (kind === null || end - Date.now() < RETRY_MS) {
          if (kind !== null) err.failure = failure;
          throw err;
        }
        await new Promise((r) => setTimeout(r, RETRY_MS));
      }
    }
  }

  /**
   * Approve or refuse an autopilot proposal (api.decide); resolves to the weaver's answer, a decoded
   * JobEvent: the decision's journal event, or one of kind DECIDE_FAILED saying why nothing was
   * decided. Sent once: a lost answer is not retried, since the decision's event reaches the page
   * on the events subject anyway, and a repeat would only be told the proposal is gone.
   */
  async decide(job, proposalId, approve, timeoutMs = 10000) {
    if (this.auth.readOnly) throw new Error("read-only page: it cannot decide proposals");
    const nc = this.nc;
    if (!nc || nc.isClosed()) throw new Error("NATS unreachable: cannot send the decision now");
    const payload = encodeProposalDecision({ job, proposal_id: proposalId, approve });
    const reply = await nc.request(SUBJECTS.decide, payload, { timeout: timeoutMs });
    return decodeJobEvent(reply.data);
  }

  /** Ask the weaver for job status (api.status). */
  async status(job, timeoutMs = 5000) {
    const nc = this.nc;
    if (!nc || nc.isClosed()) throw new Error("NATS unreachable");
    const reply = await nc.request(SUBJECTS.status, encodeStatusRequest(job), { timeout: timeoutMs });
    return decodeStatusReply(reply.data);
  }
}

/** The iterator's next message, or a rejection once `ms` pass without one. */
function nextWithin(it, ms) {
  let timer;
  const late = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`journal feed: nothing delivered for ${ms / 1000} s`)), ms);
  });
  return Promise.race([it.next(), late]).finally(() => clearTimeout(timer));
}
