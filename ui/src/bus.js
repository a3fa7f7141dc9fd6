// The UI's NATS link: a WebSocket connection to nats-server that retries forever, subscribes to the
// job's subjects (torchloom/subjects.py) and does api.submit / api.status request-reply.
import { wsconnect } from "@nats-io/nats-core";
import {
  decodeAck,
  decodeHeartbeat,
  decodeJobEvent,
  decodeMetrics,
  decodeOutcome,
  decodeStatusReply,
  encodeStatusRequest,
  encodeSubmit,
} from "./proto.js";

const PREFIX = "torchloom.v1";
export const SUBJECTS = {
  heartbeats: `${PREFIX}.hb.*.*`,
  metrics: `${PREFIX}.metrics.*.*`,
  events: `${PREFIX}.events.*`,
  journal: `${PREFIX}.journal.*`,
  acks: `${PREFIX}.ack.*`,
  submit: `${PREFIX}.api.submit`,
  status: `${PREFIX}.api.status`,
};

const RETRY_MS = 1000;

/**
 * Keeps one connection alive and feeds decoded messages to `handlers`.
 *
 * handlers: {onStatus(state, detail), onHeartbeat(hb), onMetrics(m), onEvent(e), onOutcome(o),
 * onAck(a), onConnected()}; state is "connecting" | "connected" | "unreachable".
 */
export class Bus {
  constructor(url, handlers) {
    this.url = url;
    this.h = handlers;
    this.nc = null;
    this.stopped = false;
    this.decodeErrors = 0;
  }

  async run() {
    this.h.onStatus("connecting", this.url);
    while (!this.stopped) {
      let nc;
      try {
        nc = await wsconnect({
          servers: this.url,
          name: "torchloom-ui",
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

  /** Submit a command through the weaver (api.submit); resolves to the decoded Outcome. */
  async submit(req, timeoutMs = 30000) {
    const nc = this.nc;
    if (!nc || nc.isClosed()) throw new Error("NATS unreachable: cannot send the command now");
    const reply = await nc.request(SUBJECTS.submit, encodeSubmit(req), { timeout: timeoutMs });
    return decodeOutcome(reply.data);
  }

  /** Ask the weaver for job status (api.status). */
  async status(job, timeoutMs = 5000) {
    const nc = this.nc;
    if (!nc || nc.isClosed()) throw new Error("NATS unreachable");
    const reply = await nc.request(SUBJECTS.status, encodeStatusRequest(job), { timeout: timeoutMs });
    return decodeStatusReply(reply.data);
  }
}
