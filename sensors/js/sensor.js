// A roadside speed sensor in JavaScript, built with jco (componentize-js)
// against wit/sensor.wit, the contract the built-in Rust sensor implements.
//
// Like the Python sensor (sensors/python), whose JSON snapshot format it
// shares so either can take over the other's sensors in a hot swap, it
// keeps numbered readings in a resend buffer until a server acks them, the
// averages it applied (only those continuing its hash chain), and the
// advisory limit its segment's averages give. Every u64 of the contract is
// a BigInt here.

import { nowMs, seed, sensorConfig } from "fog:sensor/environment@0.4.0";

const FORMAT = "fog-sensor-json/1";
const MASK = (1n << 64n) - 1n;
const LIMIT_STEPS = [130, 120, 100, 80, 60];
const THRESHOLDS = [100.0, 90.0, 75.0, 55.0];
const HYSTERESIS = 3.0;

// splitmix64's finalizer, as wit/sensor.wit spells it.
function mix64(x) {
  let z = (x + 0x9e3779b97f4a7c15n) & MASK;
  z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK;
  z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & MASK;
  return z ^ (z >> 31n);
}

// The chain value after average `a`, from the one before it.
function link(chain, a) {
  for (const field of [a.seq, a.epoch, BigInt(a.segment), a.windowEndMs, BigInt(a.count), a.sumKmh, BigInt(a.revision)]) {
    chain = mix64(chain ^ field);
  }
  return chain;
}

class Sensor {
  constructor(config, seed) {
    this.sensorId = config.sensorId;
    this.segment = config.segment;
    // Fresh for every start of the host; never 0.
    this.incarnation = mix64(seed ^ mix64(BigInt(config.sensorId))) || 1n;
    this.nextSeq = 0n;
    this.generated = 0n;
    this.sumKmh = 0n;
    this.acked = 0n;
    this.resent = 0n;
    this.overflowed = 0n;
    this.pending = []; // [seq, speed, timestamp, lastSent] as BigInts, in seq order
    this.last = null; // [seq, epoch, chain] of the last average applied
    this.applied = 0n;
    this.missed = 0n;
    this.superseded = 0n;
    this.newestOwn = null; // [windowEndMs, revision] of this segment
    this.limitStep = 0;
    this.policy(config);
  }

  // Resend timeout and bound are host flags: always the current ones.
  policy(config) {
    this.resendAfter = config.resendAfterMs;
    this.maxBuffered = config.maxBuffered;
    this.trim();
  }

  // Past the bound the oldest unacked reading goes, counted.
  trim() {
    while (this.pending.length > this.maxBuffered) {
      this.pending.shift();
      this.overflowed += 1n;
    }
  }

  speed(seq) {
    return 70n + (mix64(this.incarnation ^ seq) % 61n);
  }

  // The readings due again, then `make` new ones: the last stamped `now`,
  // each earlier one `everyMs` before the next.
  tick(now, make, everyMs) {
    const out = [];
    for (const p of this.pending) {
      if (now - p[3] >= this.resendAfter) {
        p[3] = now;
        this.resent += 1n;
        out.push({ seq: p[0], speedKmh: Number(p[1]), timestampMs: p[2] });
      }
    }
    for (let k = make - 1; k >= 0; k--) {
      const seq = this.nextSeq;
      const speed = this.speed(seq);
      const back = BigInt(k) * BigInt(everyMs);
      const stamp = now > back ? now - back : 0n;
      this.nextSeq += 1n;
      this.generated += 1n;
      this.sumKmh += speed;
      this.pending.push([seq, speed, stamp, now]);
      out.push({ seq, speedKmh: Number(speed), timestampMs: stamp });
    }
    this.trim();
    return out;
  }

  ack(incarnation, nextSeq, also) {
    if (incarnation !== this.incarnation) return;
    const extra = new Set(Array.from(also, (s) => BigInt(s)));
    const before = this.pending.length;
    this.pending = this.pending.filter((p) => p[0] >= nextSeq && !extra.has(p[0]));
    this.acked += BigInt(before - this.pending.length);
  }

  apply(averages) {
    for (const a of averages) {
      if (this.last !== null) {
        if (a.seq <= this.last[0]) continue;
        if (a.seq !== this.last[0] + 1n || link(this.last[2], a) !== a.chain) break;
      }
      this.last = [a.seq, a.epoch, a.chain];
      this.applied += 1n;
      const version = [a.windowEndMs, BigInt(a.revision)];
      const newer = this.newestOwn === null || version[0] > this.newestOwn[0] || (version[0] === this.newestOwn[0] && version[1] > this.newestOwn[1]);
      if (a.segment === this.segment && newer) {
        this.newestOwn = version;
        if (a.count > 0) this.updateLimit(Number(a.sumKmh) / a.count);
      }
    }
    return this.cursor();
  }

  updateLimit(mean) {
    while (this.limitStep < THRESHOLDS.length && mean < THRESHOLDS[this.limitStep] - HYSTERESIS) this.limitStep += 1;
    while (this.limitStep > 0 && mean >= THRESHOLDS[this.limitStep - 1] + HYSTERESIS) this.limitStep -= 1;
  }

  reposition(rewindTo, to) {
    const target = [to.seq, to.epoch, to.chain];
    if (this.last === null) {
      this.last = target;
      return this.cursor();
    }
    let base;
    if (rewindTo !== undefined && rewindTo !== null && rewindTo < this.last[0]) {
      this.superseded += this.last[0] - rewindTo;
      this.newestOwn = null;
      base = rewindTo;
    } else if (to.seq <= this.last[0]) {
      return this.cursor();
    } else {
      base = this.last[0];
    }
    if (to.seq > base) this.missed += to.seq - base;
    this.last = target;
    return this.cursor();
  }

  cursor() {
    return this.last === null ? undefined : { seq: this.last[0], epoch: this.last[1], chain: this.last[2] };
  }

  status() {
    return {
      incarnation: this.incarnation,
      generated: this.generated,
      acked: this.acked,
      buffered: this.pending.length,
      resent: this.resent,
      overflowed: this.overflowed,
      sumKmh: this.sumKmh,
      averagesApplied: this.applied,
      lastAverage: this.cursor(),
      averagesMissed: this.missed,
      averagesSuperseded: this.superseded,
      averagesDigest: this.last === null ? 0n : this.last[2],
      limitKmh: LIMIT_STEPS[this.limitStep],
    };
  }

  // u64s as strings: JSON numbers stop at 2^53.
  snapshot() {
    const str = (v) => v.toString();
    const state = {
      format: FORMAT,
      sensor_id: this.sensorId,
      segment: this.segment,
      incarnation: str(this.incarnation),
      counters: [this.nextSeq, this.generated, this.sumKmh, this.acked, this.resent, this.overflowed, this.applied, this.missed, this.superseded].map(str),
      pending: this.pending.map((p) => p.map(str)),
      last: this.last === null ? null : this.last.map(str),
      newest_own: this.newestOwn === null ? null : this.newestOwn.map(str),
      limit_step: this.limitStep,
    };
    return new TextEncoder().encode(JSON.stringify(state));
  }

  // The readings that left after the snapshot: those at or above nextSeq
  // are this sensor's own, made after it (see wit/sensor.wit).
  adopt(since, now) {
    for (const r of since) {
      if (r.seq < this.nextSeq) continue;
      this.nextSeq = r.seq + 1n;
      this.generated += 1n;
      this.sumKmh += BigInt(r.speedKmh);
      this.pending.push([r.seq, BigInt(r.speedKmh), r.timestampMs, now]);
    }
    this.trim();
  }

  static restore(bytes, config) {
    let state;
    try {
      state = JSON.parse(new TextDecoder().decode(bytes));
    } catch (e) {
      throw "not a fog-sensor-json/1 snapshot (the built-in sensor's state is binary: swap through a fresh start)";
    }
    if (state === null || typeof state !== "object" || state.format !== FORMAT) throw "not a fog-sensor-json/1 snapshot";
    if (state.sensor_id !== config.sensorId) throw `sensor snapshot is of sensor ${state.sensor_id}, this is sensor ${config.sensorId}`;
    const s = new Sensor(config, 0n);
    s.incarnation = BigInt(state.incarnation);
    [s.nextSeq, s.generated, s.sumKmh, s.acked, s.resent, s.overflowed, s.applied, s.missed, s.superseded] = state.counters.map(BigInt);
    s.pending = state.pending.map((p) => p.map(BigInt));
    s.last = state.last === null ? null : state.last.map(BigInt);
    s.newestOwn = state.newest_own === null ? null : state.newest_own.map(BigInt);
    s.limitStep = state.limit_step;
    s.policy(config);
    return s;
  }
}

let SENSOR = null;

// Started on the first call, as the built-in sensor is.
function sensor() {
  if (SENSOR === null) SENSOR = new Sensor(sensorConfig(), seed());
  return SENSOR;
}

// Idempotent, and after `restore` the restored incarnation.
export function init() {
  return sensor().incarnation;
}

// The news first (the ack, then the averages), then the readings.
export function tick(visit) {
  const s = sensor();
  if (visit.ack !== undefined && visit.ack !== null) s.ack(visit.ack.incarnation, visit.ack.nextSeq, visit.ack.also ?? []);
  if (visit.averages) s.apply(visit.averages);
  const readings = s.tick(nowMs(), visit.make, visit.everyMs);
  return { readings, status: s.status() };
}

export function onReposition(rewindTo, to) {
  return sensor().reposition(rewindTo, to);
}

export function status() {
  return sensor().status();
}

export function snapshot() {
  return sensor().snapshot();
}

export function restore(state, since) {
  const restored = Sensor.restore(state, sensorConfig());
  restored.adopt(since, nowMs());
  SENSOR = restored;
}
