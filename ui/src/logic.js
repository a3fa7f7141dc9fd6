// Pure dashboard logic (no DOM, no NATS): bounded series, downsampling, knob validation, timeline
// entries. Kept pure so `node --test ui/test` covers it without a browser.

/** A fixed-capacity ring buffer of (step, value) points: the retained window of one series. */
export class Series {
  /** @param {number} capacity how many points to keep; older ones are overwritten. */
  constructor(capacity) {
    if (!Number.isInteger(capacity) || capacity < 2) {
      throw new RangeError(`capacity=${capacity} rejected: must be an integer >= 2`);
    }
    this.capacity = capacity;
    this.steps = new Float64Array(capacity);
    this.values = new Float64Array(capacity);
    this.start = 0;
    this.length = 0;
    this.version = 0;
  }

  /** Append a point; a step not after the last one (a restart, a rollback) is still kept in order. */
  push(step, value) {
    const end = (this.start + this.length) % this.capacity;
    this.steps[end] = step;
    this.values[end] = value;
    if (this.length < this.capacity) {
      this.length += 1;
    } else {
      this.start = (this.start + 1) % this.capacity;
    }
    this.version += 1;
  }

  /** Point i (0 = oldest retained). */
  at(i) {
    const j = (this.start + i) % this.capacity;
    return [this.steps[j], this.values[j]];
  }

  last() {
    return this.length === 0 ? null : this.at(this.length - 1);
  }

  /** The value at the latest retained step <= `step`, or null. */
  valueAtOrBefore(step) {
    for (let i = this.length - 1; i >= 0; i--) {
      const [s, v] = this.at(i);
      if (s <= step) return v;
    }
    return null;
  }

  /** Copy out as plain arrays (for the debug hook and tests). */
  toArrays() {
    const steps = new Array(this.length);
    const values = new Array(this.length);
    for (let i = 0; i < this.length; i++) {
      const j = (this.start + i) % this.capacity;
      steps[i] = this.steps[j];
      values[i] = this.values[j];
    }
    return { steps, values };
  }
}

/**
 * Downsample many series onto one shared x axis of at most `buckets` points, as uPlot needs.
 * Each bucket holds the mean of a series' points falling in it, or null (drawn as a gap-spanning
 * line). Cost is linear in the retained points, independent of how many arrived per second.
 *
 * @param {Series[]} seriesList
 * @param {number} buckets
 * @returns {{x: number[], ys: (number|null)[][]}}
 */
export function downsample(seriesList, buckets) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const s of seriesList) {
    if (s.length === 0) continue;
    const first = s.at(0)[0];
    const last = s.at(s.length - 1)[0];
    lo = Math.min(lo, first, last);
    hi = Math.max(hi, first, last);
  }
  if (!Number.isFinite(lo)) return { x: [], ys: seriesList.map(() => []) };
  const span = hi - lo;
  const n = span <= 0 ? 1 : Math.max(1, Math.min(buckets, Math.floor(span) + 1));
  const width = span <= 0 ? 1 : span / n;
  const x = new Array(n);
  for (let b = 0; b < n; b++) x[b] = n === 1 ? lo : lo + (b + 0.5) * width;
  if (n > 1) {
    x[0] = lo;
    x[n - 1] = hi;
  }
  const ys = [];
  const sum = new Float64Array(n);
  const count = new Uint32Array(n);
  for (const s of seriesList) {
    sum.fill(0);
    count.fill(0);
    for (let i = 0; i < s.length; i++) {
      const j = (s.start + i) % s.capacity;
      const v = s.values[j];
      if (!Number.isFinite(v)) continue;
      let b = n === 1 ? 0 : Math.floor((s.steps[j] - lo) / width);
      if (b >= n) b = n - 1;
      if (b < 0) b = 0;
      sum[b] += v;
      count[b] += 1;
    }
    const y = new Array(n);
    for (let b = 0; b < n; b++) y[b] = count[b] === 0 ? null : sum[b] / count[b];
    ys.push(y);
  }
  return { x, ys };
}

// Points a chart draws in all, over all its series: the canvas cost of a redraw grows with drawn
// segments times their height, so the budget is shared rather than per series.
export const CHART_POINT_BUDGET = 8000;
export const CHART_MAX_BUCKETS = 400;
export const CHART_MIN_BUCKETS = 50;
// Above this many series a chart draws hairlines (see chartStyle).
export const HAIRLINE_ABOVE_SERIES = 16;

/**
 * How a chart of `nSeries` lines is drawn: {buckets, width}. Buckets per series shrink as series
 * grow, so a redraw costs about the same for 2 ranks or 64. With many series the stroke is one device
 * pixel: in software rasterization (no GPU) a wider anti-aliased stroke is tessellated and filled,
 * 5-15 times the cost of a hairline, and a noisy late-run loss line (zig-zags spanning the whole plot
 * once the y range narrows) made every redraw take hundreds of ms.
 *
 * @param {number} nSeries
 * @param {number} pxRatio device pixels per CSS pixel (window.devicePixelRatio)
 * @returns {{buckets: number, width: number}} width in CSS pixels, as uPlot takes it
 */
export function chartStyle(nSeries, pxRatio = 1) {
  const n = Math.max(1, nSeries);
  const buckets = Math.max(CHART_MIN_BUCKETS, Math.min(CHART_MAX_BUCKETS, Math.floor(CHART_POINT_BUDGET / n)));
  const ratio = Number.isFinite(pxRatio) && pxRatio > 0 ? pxRatio : 1;
  const width = n > HAIRLINE_ABOVE_SERIES ? 1 / ratio : 1.25;
  return { buckets, width };
}

/** A bounded map of metric name -> series key ("r0" or "r0/branch") -> Series. */
export class MetricStore {
  /**
   * @param {{capacity?: number, maxSeriesPerMetric?: number, maxMetrics?: number}} opts
   */
  constructor({ capacity = 2000, maxSeriesPerMetric = 256, maxMetrics = 32 } = {}) {
    this.capacity = capacity;
    this.maxSeriesPerMetric = maxSeriesPerMetric;
    this.maxMetrics = maxMetrics;
    /** @type {Map<string, Map<string, Series>>} */
    this.metrics = new Map();
    this.dropped = 0;
  }

  /** Record one StepMetrics-like point set; returns the metric names touched. */
  add(rank, branch, step, values) {
    const key = seriesKey(rank, branch);
    const touched = [];
    for (const [name, value] of Object.entries(values)) {
      let byKey = this.metrics.get(name);
      if (byKey === undefined) {
        if (this.metrics.size >= this.maxMetrics) {
          this.dropped += 1;
          continue;
        }
        byKey = new Map();
        this.metrics.set(name, byKey);
      }
      let series = byKey.get(key);
      if (series === undefined) {
        if (byKey.size >= this.maxSeriesPerMetric) {
          this.dropped += 1;
          continue;
        }
        series = new Series(this.capacity);
        byKey.set(key, series);
      }
      series.push(step, value);
      touched.push(name);
    }
    return touched;
  }

  /**
   * Start `branch`'s series of `rank` at its fork step with the parent branch's value there, so a
   * rolled-back line visibly leaves its parent at the fork. Returns the metric names touched.
   */
  seedBranch(rank, branch, parent, forkStep, names) {
    const touched = [];
    const key = seriesKey(rank, branch);
    const parentKey = seriesKey(rank, parent);
    for (const name of names) {
      const byKey = this.metrics.get(name);
      if (!byKey || byKey.has(key) || byKey.size >= this.maxSeriesPerMetric) continue;
      const from = byKey.get(parentKey);
      const v = from ? from.valueAtOrBefore(forkStep) : null;
      if (v === null) continue;
      const series = new Series(this.capacity);
      series.push(forkStep, v);
      byKey.set(key, series);
      touched.push(name);
    }
    return touched;
  }

  clear() {
    this.metrics.clear();
  }
}

/** The first branch of every run; its series are keyed by rank alone ("r0"). */
export const MAIN_BRANCH = "main";

/** "r0" on the main branch, "r0/b7" on the branch a rollback decided as command 7 started. */
export function seriesKey(rank, branch) {
  return branch && branch !== MAIN_BRANCH ? `r${rank}/${branch}` : `r${rank}`;
}

/** Order metric names: the well-known ones first, then the rest alphabetically. */
export function orderMetrics(names) {
  const known = ["loss", "lr", "throughput", "step_time_s"];
  const head = known.filter((n) => names.includes(n));
  const tail = names.filter((n) => !known.includes(n)).sort();
  return [...head, ...tail];
}

// ---- knobs -------------------------------------------------------------------------------------

/** Python's "%g": 6 significant digits, exponent form below 1e-4 and from 1e6 ("1e+06"). */
export function fmtNum(x) {
  if (x === 0) return "0";
  if (!Number.isFinite(x)) return Number.isNaN(x) ? "nan" : x > 0 ? "inf" : "-inf";
  const [mant, ex] = x.toExponential(5).split("e");
  const exp = Number(ex);
  if (exp < -4 || exp >= 6) {
    const m = mant.includes(".") ? mant.replace(/0+$/, "").replace(/\.$/, "") : mant;
    return `${m}e${exp < 0 ? "-" : "+"}${String(Math.abs(exp)).padStart(2, "0")}`;
  }
  return String(Number(x.toPrecision(6)));
}

/** "(0, 10]" for a knob spec, matching torchloom.knobs._describe_bounds. */
export function describeBounds(spec) {
  const lo = spec.min == null ? "-inf" : fmtNum(spec.min);
  const hi = spec.max == null ? "inf" : fmtNum(spec.max);
  const left = spec.min == null || spec.minExclusive ? "(" : "[";
  const right = spec.max == null || spec.maxExclusive ? ")" : "]";
  return `${left}${lo}, ${hi}${right}`;
}

function checkBounds(key, spec, number, shown) {
  if (!Number.isFinite(number)) return `${key}=${shown} rejected: must be a finite number`;
  const tooLow = spec.min != null && (spec.minExclusive ? number <= spec.min : number < spec.min);
  const tooHigh = spec.max != null && (spec.maxExclusive ? number >= spec.max : number > spec.max);
  if (tooLow || tooHigh) return `${key}=${shown} rejected: must be in ${describeBounds(spec)}`;
  return null;
}

/** Python's repr() of a str, as the weaver's messages show typed text ('abc'). */
export function pyRepr(text) {
  const t = String(text);
  const quote = t.includes("'") && !t.includes('"') ? '"' : "'";
  const body = t.replace(/\\/g, "\\\\").replace(quote === "'" ? /'/g : /"/g, `\\${quote}`);
  return `${quote}${body}${quote}`;
}

// Fixed list lengths, as torchloom.knobs.LIST_LENGTHS.
export const LIST_LENGTHS = { betas: 2 };

/**
 * The rank's structural check of a `mix` value (threadlet.data.parse_mix), with its wording, so a
 * malformed mixture is refused before it is sent. `known` are the sources the current value names.
 */
export function checkMix(text, known) {
  const names = known.join(", ");
  const example = known.slice(0, 2).map((n) => `${n}:${fmtNum(1 / Math.min(known.length, 2))}`).join(",") || "code:0.5,math:0.5";
  const form = `expected NAME:WEIGHT,... with weights >= 0, e.g. ${example}; known sources: ${names}`;
  const bad = (why = "") => `mix=${pyRepr(text)} rejected: ${why}${form}`;
  const seen = new Set();
  let total = 0;
  for (const part of text.split(",")) {
    const p = part.trim();
    const i = p.indexOf(":");
    const name = i < 0 ? "" : p.slice(0, i).trim();
    if (i < 0 || !name) return bad();
    const w = parseFloatStrict(p.slice(i + 1));
    if (w === null) return bad();
    if (!Number.isFinite(w) || w < 0) return bad(`weight of ${pyRepr(name)} must be a finite number >= 0; `);
    if (known.length > 0 && !known.includes(name)) return bad(`unknown source ${pyRepr(name)}; `);
    if (seen.has(name)) return bad(`source ${pyRepr(name)} appears twice; `);
    seen.add(name);
    total += w;
  }
  if (total <= 0) return bad("at least one weight must be > 0; ");
  return null;
}

/** Source names of a mix value as a rank reports it ("code:0.5,math:0.5" -> ["code", "math"]). */
export function mixSources(value) {
  if (typeof value !== "string") return [];
  return value
    .split(",")
    .map((p) => p.split(":")[0].trim())
    .filter((n) => n);
}

const FLOAT_RE = /^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^[+-]?(inf|infinity|nan)$/i;

function parseFloatStrict(text) {
  const t = text.trim();
  if (!FLOAT_RE.test(t)) return null;
  const low = t.toLowerCase().replace(/^\+/, "");
  if (low === "nan" || low === "-nan") return Number.NaN;
  if (low.endsWith("inf") || low.endsWith("infinity")) return low.startsWith("-") ? -Infinity : Infinity;
  return Number(t);
}

/**
 * Validate what a person typed for one knob, before sending, with the weaver's wording.
 *
 * @param {string} key "lr" or "lr@head"
 * @param {{name: string, type: string, min?: number|null, max?: number|null, minExclusive?: boolean,
 *          maxExclusive?: boolean, groups?: string[], choices?: string[]}} spec
 * @param {string} raw the text typed
 * @returns {{ok: true, value: number|boolean|string|number[]} | {ok: false, error: string}}
 */
export function validateKnob(key, spec, raw) {
  const text = String(raw).trim();
  const group = key.includes("@") ? key.slice(key.indexOf("@") + 1) : null;
  if (group !== null && !(spec.groups || []).includes(group)) {
    const groups = (spec.groups || []).join(", ") || "(none: the knob is not per group)";
    return { ok: false, error: `'${key}' names no parameter group of knob '${spec.name}': its groups are ${groups}` };
  }
  if (text === "") return { ok: false, error: `${key}: enter a value` };
  switch (spec.type) {
    case "float": {
      const n = parseFloatStrict(text);
      if (n === null) return { ok: false, error: `${key}=${pyRepr(text)} rejected: expected a float (e.g. 0.001)` };
      const err = checkBounds(key, spec, n, text);
      return err ? { ok: false, error: err } : { ok: true, value: n };
    }
    case "int": {
      if (!/^[+-]?\d+$/.test(text)) {
        return { ok: false, error: `${key}=${pyRepr(text)} rejected: expected an integer (e.g. 4)` };
      }
      const n = Number.parseInt(text, 10);
      const err = checkBounds(key, spec, n, text);
      return err ? { ok: false, error: err } : { ok: true, value: n };
    }
    case "bool": {
      const low = text.toLowerCase();
      if (["true", "1", "yes", "on"].includes(low)) return { ok: true, value: true };
      if (["false", "0", "no", "off"].includes(low)) return { ok: true, value: false };
      return { ok: false, error: `${key}=${pyRepr(text)} rejected: expected true or false` };
    }
    case "str": {
      const choices = spec.choices || [];
      if (choices.length > 0 && !choices.includes(text)) {
        return { ok: false, error: `${key}=${pyRepr(text)} rejected: must be one of ${choices.join(", ")}` };
      }
      if (spec.name === "mix") {
        const err = checkMix(text, mixSources(spec.value));
        if (err) return { ok: false, error: err };
      }
      return { ok: true, value: text };
    }
    case "float_list": {
      const parts = text.replace(/[()]/g, "").split(",").map((p) => p.trim()).filter((p) => p);
      if (parts.length === 0) {
        return { ok: false, error: `${key}=${pyRepr(text)} rejected: expected comma-separated floats (e.g. 0.9,0.999)` };
      }
      const out = [];
      for (const p of parts) {
        const n = parseFloatStrict(p);
        if (n === null) return { ok: false, error: `${key}=${pyRepr(p)} rejected: expected a float (e.g. 0.001)` };
        out.push(n);
      }
      const length = LIST_LENGTHS[spec.name];
      if (length !== undefined && out.length !== length) {
        const example = spec.name === "betas" ? "0.9,0.999" : Array(length).fill("0.5").join(",");
        return {
          ok: false,
          error: `${key}=${pyRepr(text)} rejected: expected exactly ${length} comma-separated floats (e.g. ${example})`,
        };
      }
      for (const n of out) {
        const err = checkBounds(key, spec, n, text);
        if (err) return { ok: false, error: err };
      }
      return { ok: true, value: out };
    }
    default:
      return { ok: false, error: `${key}: knob type '${spec.type}' cannot be set from the UI` };
  }
}

/**
 * What a values-only heartbeat (`knob_values`: name -> value, sent between two full knob lists)
 * changes in the schema the page holds: [knob, value] for each knob of `knobs` it names. Names the
 * schema lacks are left out: a schema the page has not seen comes with the next full list.
 */
export function knobValueUpdates(knobs, values) {
  const out = [];
  if (!values) return out;
  for (const k of knobs) {
    if (Object.prototype.hasOwnProperty.call(values, k.name)) out.push([k, values[k.name]]);
  }
  return out;
}

/** Human text for a knob's current value. */
export function formatValue(v) {
  if (v == null) return "";
  if (Array.isArray(v)) return v.map(formatValue).join(",");
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : String(Number(v.toPrecision(6)));
  return String(v);
}

// ---- timeline ----------------------------------------------------------------------------------

/** A short text for a command body: "set lr=0.01" or "pause {tag: x}". */
export function describeBody(body) {
  if (!body) return "";
  if (body.set) {
    const parts = Object.entries(body.set).map(([k, v]) => `${k}=${formatValue(v)}`);
    return `set ${parts.join(" ")}`;
  }
  if (body.action) {
    // The weaver adds the resolved checkpoint path to a rollback: too long for a one-line summary.
    const args = Object.entries(body.action.args || {}).filter(([k]) => k !== "checkpoint_path");
    const tail = args.length ? ` ${args.map(([k, v]) => `${k}=${v}`).join(" ")}` : "";
    return `${body.action.kind}${tail}`;
  }
  return "";
}

/**
 * Timeline entries, newest first, merged by command id (an Outcome and its "command" JobEvent are
 * one entry), bounded to `limit` entries.
 */
export class Timeline {
  constructor(limit = 500) {
    this.limit = limit;
    /** @type {Array<object>} */
    this.entries = [];
    this.byCommand = new Map();
    this.version = 0;
  }

  /** Add or merge an entry {kind, time_s, command_id?, ...}; returns the stored entry. */
  add(entry) {
    this.version += 1;
    if (entry.command_id) {
      const prev = this.byCommand.get(entry.command_id);
      if (prev !== undefined) {
        // Keep the richest fields: a final outcome beats pending; rank results accumulate.
        for (const [k, v] of Object.entries(entry)) {
          if (v === undefined || v === "" || (Array.isArray(v) && v.length === 0)) continue;
          if (k === "status" && prev.status && isFinal(prev.status) && !isFinal(v)) continue;
          prev[k] = v;
        }
        return prev;
      }
    }
    const stored = { ...entry };
    this.entries.unshift(stored);
    if (entry.command_id) this.byCommand.set(entry.command_id, stored);
    while (this.entries.length > this.limit) {
      const old = this.entries.pop();
      if (old.command_id && this.byCommand.get(old.command_id) === old) this.byCommand.delete(old.command_id);
    }
    return stored;
  }
}

function isFinal(status) {
  return status === "applied" || status === "rejected" || status === "timeout";
}

/** Classify a device for display: "ok", "unhealthy". */
export function deviceState(device) {
  if (!device) return "unknown";
  return device.healthy ? "ok" : "unhealthy";
}

/**
 * One rank's health for the device panel, from the weaver's verdict (RankStatus.health) when known,
 * else from the rank's own heartbeat: {state, reason}, state one of healthy, unhealthy, dead, hung,
 * waiting (stalled on a dead or hung peer, not at fault), straggler, unknown. A device a heartbeat reports unhealthy stays so even if the weaver lags.
 */
export function rankHealth(status, device) {
  const dev = deviceState(device);
  let state = status && status.health ? status.health : dev === "ok" ? "healthy" : dev;
  let reason = status && status.health_reason ? status.health_reason : "";
  if (state === "healthy" && dev === "unhealthy") state = "unhealthy";
  if (!reason && dev === "unhealthy") reason = device.unhealthy_reason || "";
  if (state === "unhealthy" && device && device.unhealthy_reason && !reason.includes(device.unhealthy_reason)) {
    reason = reason ? `${reason}; ${device.unhealthy_reason}` : device.unhealthy_reason;
  }
  return { state, reason };
}

/**
 * The branch tree as rows in display order (depth-first, children by fork step), each
 * {id, depth, parent, fork_step, from_checkpoint, current}. Branches whose parent is unknown are roots.
 */
export function branchRows(branches, current) {
  const byParent = new Map();
  const ids = new Set(branches.map((b) => b.id));
  for (const b of branches) {
    const parent = b.parent && ids.has(b.parent) ? b.parent : "";
    if (!byParent.has(parent)) byParent.set(parent, []);
    byParent.get(parent).push(b);
  }
  const rows = [];
  const walk = (parent, depth) => {
    const kids = (byParent.get(parent) || []).slice().sort((a, b) => a.fork_step - b.fork_step || a.seq - b.seq);
    for (const b of kids) {
      rows.push({ ...b, depth, current: b.id === current });
      walk(b.id, depth + 1);
    }
  };
  walk("", 0);
  return rows;
}

/** "1.2 GiB" */
export function formatBytes(n) {
  if (!n) return "0";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let x = n;
  while (x >= 1024 && i < units.length - 1) {
    x /= 1024;
    i += 1;
  }
  return `${x < 10 && i > 0 ? x.toFixed(1) : Math.round(x)} ${units[i]}`;
}

/**
 * A fresh command id for one user action: a uuid4 in hex, as the CLI's. The weaver decides a
 * command id once, so a retry of the action with the same id never becomes a second command.
 * `crypto.randomUUID` exists only in a secure context; getRandomValues everywhere.
 */
export function newCommandId(cryptoApi = globalThis.crypto) {
  if (typeof cryptoApi.randomUUID === "function") return cryptoApi.randomUUID().replaceAll("-", "");
  const b = cryptoApi.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40; // version 4
  b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

/**
 * Why an api.submit request got no answer, as far as retrying it goes: "unsent" when no weaver took
 * it (nobody answering on the subject, NATS unreachable: it is safe to say nothing was sent),
 * "unknown" when it may have been taken (a timeout, a connection lost on the way), null when a retry
 * cannot help (a weaver's refusal comes back as an Outcome, never as an error). Both retryable kinds
 * are sent again with the same command id.
 */
export function submitFailure(err) {
  const text = String(err?.message || err || "");
  if (/no responders|503|unreachable/i.test(text)) return "unsent";
  if (/timeout|timed out|disconnect|closed|reconnect/i.test(text)) return "unknown";
  return null;
}

// ---- journal history feed ----------------------------------------------------------------------

/**
 * The NATS role whose journal feed a page asks for (weaver/ui_feeds.py): the operator page's
 * ui-operator, every other page's (a viewer, a development page) ui-viewer. Only that role may
 * publish on its api.feed subject and read the inbox the feed delivers to.
 */
export function feedOwner(readOnly) {
  return readOnly ? "ui-viewer" : "ui-operator";
}

/** The JSON request for a feed of the newest `maxEntries` journal entries, delivered to `deliver`. */
export function feedRequest(deliver, maxEntries) {
  return new TextEncoder().encode(JSON.stringify({ deliver, max_entries: maxEntries }));
}

/**
 * The weaver's answer to a feed request: {consumer, firstSeq, lastSeq}; lastSeq 0 means an empty
 * journal (nothing will be delivered). Throws the weaver's reason when it made no feed.
 */
export function parseFeedReply(bytes) {
  const body = JSON.parse(new TextDecoder().decode(bytes));
  if (body.error) throw new Error(`journal feed refused: ${body.error}`);
  return { consumer: body.consumer || "", firstSeq: body.first_seq || 0, lastSeq: body.last_seq || 0 };
}

/**
 * Stream sequence and count still pending of one feed delivery, from its JetStream reply subject:
 * `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending>`, or the form with a domain
 * and account hash after `$JS.ACK` (11 or 12 tokens). null for any other subject.
 */
export function feedDelivery(reply) {
  const t = String(reply || "").split(".");
  if (t[0] !== "$JS" || t[1] !== "ACK") return null;
  const at = t.length === 9 ? 2 : t.length >= 11 ? 4 : -1;
  if (at < 0) return null;
  const streamSeq = Number(t[at + 3]);
  const pending = Number(t[at + 6]);
  if (!Number.isInteger(streamSeq) || !Number.isInteger(pending)) return null;
  return { streamSeq, pending };
}

// ---- autopilot proposals -----------------------------------------------------------------------

// The weaver's events about proposals held in approval mode (weaver/autopilot.py, weaver/agents.py):
// "<source>_proposed", then "<source>_approved" or "<source>_refused_by_operator", source rule|agent.
const PROPOSED_RE = /^(rule|agent)_proposed$/;
const DECIDED_RE = /^(rule|agent)_(approved|refused_by_operator)$/;
/** The kind of api.decide's answer when nothing was decided (weaver.service.DECIDE_FAILED). */
export const DECIDE_FAILED = "proposal_not_decided";
/** Pending proposals a weaver keeps per job (weaver.autopilot.MAX_PROPOSALS): older ones are gone. */
export const MAX_PENDING_PROPOSALS = 64;

/** One proposed command as the journal's `commands` attribute shows it: "set lr=0.005", "rollback checkpoint=ckpt-3". */
export function describeProposedCommand(c) {
  if (c && c.set) return `set ${Object.entries(c.set).map(([k, v]) => `${k}=${formatValue(v)}`).join(" ")}`;
  if (c && c.action) {
    const args = Object.entries(c)
      .filter(([k]) => k !== "action")
      .map(([k, v]) => ` ${k}=${v}`)
      .join("");
    return `${c.action}${args}`;
  }
  return JSON.stringify(c);
}

function proposedCommands(attrs) {
  try {
    const list = JSON.parse(attrs.commands || "[]");
    return Array.isArray(list) ? list.map(describeProposedCommand) : [String(attrs.commands)];
  } catch {
    return [String(attrs.commands)];
  }
}

/** Why a proposal was made: the rule's signal at its step, or the agent's policy; and its alerts. */
function proposalReason(source, a) {
  let reason;
  if (source === "agent") {
    reason = `agent proposal held for approval${a.policy ? ` by policy ${a.policy}` : ""}`;
  } else {
    reason = `${a.signal || "signal"} at step ${a.step ?? "?"}: ${a.value ?? "?"} (threshold ${a.threshold ?? "?"})`;
  }
  let alerts = [];
  try {
    alerts = JSON.parse(a.alerts || "[]");
  } catch {
    alerts = [];
  }
  return alerts.length ? `${reason}; alert: ${alerts.join("; ")}` : reason;
}

/**
 * The autopilot proposals a page knows of, folded from the job events (live and the journal's
 * history, in any order and overlapping): proposed, then approved, refused, or expired. A proposal
 * expires when its job's policy is set again or more than MAX_PENDING_PROPOSALS are pending (the
 * weaver drops them then), when a new weaver dropped it (`proposal_dropped`), when its run is no longer the job's (`pending` takes the current run),
 * or when the weaver answers a decision with DECIDE_FAILED (`expire`).
 */
export class Proposals {
  constructor() {
    /** @type {Map<string, object>} id -> {id, job, run_id, source, who, commands, reason, time_s, status, decided_by, note} */
    this.byId = new Map();
    this.version = 0;
  }

  /** Fold one JobEvent ({job, run_id, kind, message, time_s, attrs}) in; true when the list changed. */
  note(e) {
    const a = e.attrs || {};
    const proposed = PROPOSED_RE.exec(e.kind);
    if (proposed && a.proposal) {
      if (this.byId.has(a.proposal)) return false; // already known, maybe decided already
      const source = proposed[1];
      this.byId.set(a.proposal, {
        id: a.proposal,
        job: e.job,
        run_id: e.run_id,
        source,
        who: source === "agent" ? a.agent || "" : a.rule || "",
        commands: proposedCommands(a),
        reason: proposalReason(source, a),
        time_s: e.time_s,
        status: "pending",
        decided_by: "",
        note: "",
      });
      this._bound(e.job);
      this.version += 1;
      return true;
    }
    const decided = DECIDED_RE.exec(e.kind);
    if (decided && a.proposal) {
      const status = decided[2] === "approved" ? "approved" : "refused";
      const known = this.byId.get(a.proposal);
      if (known && known.status === status) return false;
      // A decision without its proposal (the history window began after it) still closes the id.
      this.byId.set(a.proposal, {
        ...(known || { id: a.proposal, job: e.job, run_id: e.run_id, source: decided[1], who: a.rule || a.agent || "" }),
        commands: known ? known.commands : proposedCommands(a),
        reason: known ? known.reason : proposalReason(decided[1], a),
        time_s: known ? known.time_s : e.time_s,
        status,
        decided_by: a.decided_by || "",
        note: "",
      });
      this.version += 1;
      return true;
    }
    if (e.kind === "proposal_dropped" && a.proposal) {
      // A new weaver (restart, standby) does not hold its predecessor's pending proposals.
      const why = "the weaver restarted: this proposal was dropped, nothing of it was sent";
      if (this.byId.has(a.proposal)) return this.expire(a.proposal, why);
      // Read before its proposal (history in any order): the id stays closed.
      this.byId.set(a.proposal, {
        id: a.proposal,
        job: e.job,
        run_id: e.run_id,
        source: a.source || "",
        who: a.rule || a.agent || "",
        commands: proposedCommands(a),
        reason: "",
        time_s: e.time_s,
        status: "expired",
        decided_by: "",
        note: why,
      });
      this.version += 1;
      return true;
    }
    if (e.kind === "policy_set") {
      let changed = false;
      for (const p of this.byId.values()) {
        if (p.job === e.job && p.status === "pending" && p.time_s <= e.time_s) {
          p.status = "expired";
          p.note = "the job's policy was set again";
          changed = true;
        }
      }
      if (changed) this.version += 1;
      return changed;
    }
    return false;
  }

  /** The weaver no longer holds `id` (its answer to a decision said why): it is no longer pending. */
  expire(id, why) {
    const p = this.byId.get(id);
    if (!p || p.status !== "pending") return false;
    p.status = "expired";
    p.note = why;
    this.version += 1;
    return true;
  }

  _bound(job) {
    const pending = [...this.byId.values()].filter((p) => p.job === job && p.status === "pending");
    pending.sort((x, y) => x.time_s - y.time_s);
    for (const p of pending.slice(0, Math.max(0, pending.length - MAX_PENDING_PROPOSALS))) {
      p.status = "expired";
      p.note = `more than ${MAX_PENDING_PROPOSALS} proposals were pending`;
    }
  }

  /** The proposals of `job` waiting for a decision, newest first (of run `runId` when given). */
  pending(job, runId = "") {
    return [...this.byId.values()]
      .filter((p) => p.job === job && p.status === "pending" && (!runId || !p.run_id || p.run_id === runId))
      .sort((x, y) => y.time_s - x.time_s);
  }
}

/**
 * What the page says about the weaver's answer to a decision (a JobEvent): {ok, text}. A
 * DECIDE_FAILED answer means the weaver holds no such proposal (or job): nothing was decided.
 */
export function decisionResult(verb, id, answer) {
  if (answer.kind === DECIDE_FAILED) return { ok: false, text: `${verb} ${id}: not decided: ${answer.message}` };
  const by = answer.attrs?.decided_by ? ` by ${answer.attrs.decided_by}` : "";
  const what = DECIDED_RE.exec(answer.kind)?.[2] === "approved" ? "approved: its commands were sent" : "refused: nothing sent";
  return { ok: true, text: `${verb} ${id}: ${what}${by}` };
}
