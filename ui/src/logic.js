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

  clear() {
    this.metrics.clear();
  }
}

export function seriesKey(rank, branch) {
  return branch ? `r${rank}/${branch}` : `r${rank}`;
}

/** Order metric names: the well-known ones first, then the rest alphabetically. */
export function orderMetrics(names) {
  const known = ["loss", "lr", "throughput", "step_time_s"];
  const head = known.filter((n) => names.includes(n));
  const tail = names.filter((n) => !known.includes(n)).sort();
  return [...head, ...tail];
}

// ---- knobs -------------------------------------------------------------------------------------

function fmtNum(x) {
  // Same rendering as Python's "%g" for the common cases the bounds use.
  if (Number.isInteger(x)) return String(x);
  const s = x.toPrecision(6);
  return String(Number(s));
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
      if (n === null) return { ok: false, error: `${key}='${text}' rejected: expected a float (e.g. 0.001)` };
      const err = checkBounds(key, spec, n, text);
      return err ? { ok: false, error: err } : { ok: true, value: n };
    }
    case "int": {
      if (!/^[+-]?\d+$/.test(text)) {
        return { ok: false, error: `${key}='${text}' rejected: expected an integer (e.g. 4)` };
      }
      const n = Number.parseInt(text, 10);
      const err = checkBounds(key, spec, n, text);
      return err ? { ok: false, error: err } : { ok: true, value: n };
    }
    case "bool": {
      const low = text.toLowerCase();
      if (["true", "1", "yes", "on"].includes(low)) return { ok: true, value: true };
      if (["false", "0", "no", "off"].includes(low)) return { ok: true, value: false };
      return { ok: false, error: `${key}='${text}' rejected: expected true or false` };
    }
    case "str": {
      const choices = spec.choices || [];
      if (choices.length > 0 && !choices.includes(text)) {
        return { ok: false, error: `${key}='${text}' rejected: must be one of ${choices.join(", ")}` };
      }
      return { ok: true, value: text };
    }
    case "float_list": {
      const parts = text.replace(/[()[\]]/g, "").split(",").map((p) => p.trim()).filter((p) => p);
      if (parts.length === 0) {
        return { ok: false, error: `${key}='${text}' rejected: expected comma-separated floats (e.g. 0.9,0.999)` };
      }
      const out = [];
      for (const p of parts) {
        const n = parseFloatStrict(p);
        if (n === null) return { ok: false, error: `${key}='${p}' rejected: expected a float (e.g. 0.001)` };
        const err = checkBounds(key, spec, n, text);
        if (err) return { ok: false, error: err };
        out.push(n);
      }
      return { ok: true, value: out };
    }
    default:
      return { ok: false, error: `${key}: knob type '${spec.type}' cannot be set from the UI` };
  }
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
    const args = Object.entries(body.action.args || {});
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
