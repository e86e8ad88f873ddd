"""A roadside speed sensor in Python, built with componentize-py against
wit/sensor.wit, the same contract the built-in Rust sensor implements.

It keeps what the contract asks of a sensor: numbered readings in a resend
buffer until a server acks them, the stream of averages it applied (only
those that continue its hash chain), and the advisory limit its segment's
averages give. Its snapshot is JSON, the format the JavaScript sensor
(sensors/js) shares, so either can take over the other's sensors in a hot
swap; it refuses anything else (a built-in sensor's binary snapshot) with a
reason, and the host then keeps the old component running.
"""

import json

from componentize_py_types import Err
from wit_world import WitWorld
from wit_world.imports import environment
from wit_world.imports.types import Cursor, Reading, Status, TickResult

FORMAT = "fog-sensor-json/1"
MASK = (1 << 64) - 1
# The advisory limit: steps, the mean speeds that move it, and a band
# around each so that a mean hovering at a threshold does not flap.
LIMIT_STEPS = [130, 120, 100, 80, 60]
THRESHOLDS = [100.0, 90.0, 75.0, 55.0]
HYSTERESIS = 3.0


def mix64(x):
    """splitmix64's finalizer, as wit/sensor.wit spells it."""
    z = (x + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def link(chain, a):
    """The chain value after average `a`, from the one before it."""
    for field in (a.seq, a.epoch, a.segment, a.window_end_ms, a.count, a.sum_kmh, a.revision):
        chain = mix64(chain ^ field)
    return chain


class Sensor:
    def __init__(self, config, seed, now):
        self.sensor_id = config.sensor_id
        self.segment = config.segment
        # Fresh for every start of the host: a sensor started afresh never
        # reuses a reading id. Never 0.
        self.incarnation = mix64(seed ^ mix64(config.sensor_id)) or 1
        self.next_seq = 0
        self.generated = 0
        self.sum_kmh = 0
        self.acked = 0
        self.resent = 0
        self.overflowed = 0
        self.pending = []  # [seq, speed, timestamp, last_sent], in seq order
        self.last = None  # (seq, epoch, chain) of the last average applied
        self.applied = 0
        self.missed = 0
        self.superseded = 0
        self.newest_own = None  # (window_end_ms, revision) of this segment
        self.limit_step = 0
        # `--set raise-at=N`: raise an exception when making reading N (to
        # show how a Python error reaches the host's log).
        self.raise_at = next((int(v) for k, v in config.settings if k == "raise-at"), None)
        self.policy(config)

    def policy(self, config):
        """Resend timeout and bound are host flags: always the current ones."""
        self.resend_after = config.resend_after_ms
        self.max_buffered = config.max_buffered
        self.trim()

    def speed(self, seq):
        return 70 + mix64(self.incarnation ^ seq) % 61

    def tick(self, now, make, every_ms):
        """The readings due again, then `make` new ones: the last stamped
        `now`, each earlier one `every_ms` before the next."""
        out = []
        for p in self.pending:
            if now - p[3] >= self.resend_after:
                p[3] = now
                self.resent += 1
                out.append(Reading(p[0], p[1], p[2]))
        for k in reversed(range(make)):
            seq = self.next_seq
            if seq == self.raise_at:
                raise RuntimeError(f"raise-at={seq}: sensor {self.sensor_id} fails on purpose")
            speed = self.speed(seq)
            stamp = max(now - k * every_ms, 0)
            self.next_seq += 1
            self.generated += 1
            self.sum_kmh += speed
            self.pending.append([seq, speed, stamp, now])
            out.append(Reading(seq, speed, stamp))
        self.trim()
        return out

    def trim(self):
        """Past the bound the oldest unacked reading goes, counted."""
        while len(self.pending) > self.max_buffered:
            self.pending.pop(0)
            self.overflowed += 1

    def ack(self, incarnation, next_seq, also):
        if incarnation != self.incarnation:
            return
        extra = set(also)
        before = len(self.pending)
        self.pending = [p for p in self.pending if p[0] >= next_seq and p[0] not in extra]
        self.acked += before - len(self.pending)

    def apply(self, averages):
        for a in averages:
            if self.last is not None:
                if a.seq <= self.last[0]:
                    continue
                if a.seq != self.last[0] + 1 or link(self.last[2], a) != a.chain:
                    break
            self.last = (a.seq, a.epoch, a.chain)
            self.applied += 1
            if a.segment == self.segment and (self.newest_own is None or (a.window_end_ms, a.revision) > self.newest_own):
                self.newest_own = (a.window_end_ms, a.revision)
                if a.count > 0:
                    self.update_limit(a.sum_kmh / a.count)
        return self.cursor()

    def update_limit(self, mean):
        while self.limit_step < len(THRESHOLDS) and mean < THRESHOLDS[self.limit_step] - HYSTERESIS:
            self.limit_step += 1
        while self.limit_step > 0 and mean >= THRESHOLDS[self.limit_step - 1] + HYSTERESIS:
            self.limit_step -= 1

    def reposition(self, rewind_to, to):
        target = (to.seq, to.epoch, to.chain)
        if self.last is None:
            self.last = target
            return self.cursor()
        if rewind_to is not None and rewind_to < self.last[0]:
            self.superseded += self.last[0] - rewind_to
            self.newest_own = None
            base = rewind_to
        elif to.seq <= self.last[0]:
            return self.cursor()
        else:
            base = self.last[0]
        self.missed += max(to.seq - base, 0)
        self.last = target
        return self.cursor()

    def cursor(self):
        return None if self.last is None else Cursor(*self.last)

    def status(self):
        return Status(
            incarnation=self.incarnation,
            generated=self.generated,
            acked=self.acked,
            buffered=len(self.pending),
            resent=self.resent,
            overflowed=self.overflowed,
            sum_kmh=self.sum_kmh,
            averages_applied=self.applied,
            last_average=self.cursor(),
            averages_missed=self.missed,
            averages_superseded=self.superseded,
            averages_digest=0 if self.last is None else self.last[2],
            limit_kmh=LIMIT_STEPS[self.limit_step],
        )

    def snapshot(self):
        # u64s as strings: JSON numbers (and JavaScript's) stop at 2^53.
        state = {
            "format": FORMAT,
            "sensor_id": self.sensor_id,
            "segment": self.segment,
            "incarnation": str(self.incarnation),
            "counters": [str(v) for v in (self.next_seq, self.generated, self.sum_kmh, self.acked, self.resent, self.overflowed, self.applied, self.missed, self.superseded)],
            "pending": [[str(v) for v in p] for p in self.pending],
            "last": None if self.last is None else [str(v) for v in self.last],
            "newest_own": None if self.newest_own is None else [str(v) for v in self.newest_own],
            "limit_step": self.limit_step,
        }
        return json.dumps(state, separators=(",", ":")).encode()

    def adopt(self, since, now):
        """The readings that left after the snapshot: those at or above
        next_seq are this sensor's own, made after it (see wit/sensor.wit)."""
        for r in since:
            if r.seq < self.next_seq:
                continue
            self.next_seq = r.seq + 1
            self.generated += 1
            self.sum_kmh += r.speed_kmh
            self.pending.append([r.seq, r.speed_kmh, r.timestamp_ms, now])
        self.trim()

    @staticmethod
    def restore(data, config):
        try:
            state = json.loads(bytes(data).decode())
        except Exception:
            raise Err("not a fog-sensor-json/1 snapshot (the built-in sensor's state is binary: swap through a fresh start)")
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise Err("not a fog-sensor-json/1 snapshot")
        if state["sensor_id"] != config.sensor_id:
            raise Err(f"sensor snapshot is of sensor {state['sensor_id']}, this is sensor {config.sensor_id}")
        s = Sensor(config, 0, 0)
        s.incarnation = int(state["incarnation"])
        (s.next_seq, s.generated, s.sum_kmh, s.acked, s.resent, s.overflowed, s.applied, s.missed, s.superseded) = (int(v) for v in state["counters"])
        s.pending = [[int(v) for v in p] for p in state["pending"]]
        s.last = None if state["last"] is None else tuple(int(v) for v in state["last"])
        s.newest_own = None if state["newest_own"] is None else tuple(int(v) for v in state["newest_own"])
        s.limit_step = int(state["limit_step"])
        s.policy(config)
        return s


SENSOR = None


def sensor():
    """The sensor, started on the first call (as the built-in one does, so a
    host that forgets `init` still gets a working sensor)."""
    global SENSOR
    if SENSOR is None:
        SENSOR = Sensor(environment.sensor_config(), environment.seed(), environment.now_ms())
    return SENSOR


class WitWorld(WitWorld):
    def init(self):
        # Idempotent, and after `restore` the restored incarnation.
        return sensor().incarnation

    def tick(self, visit):
        # The news first (the ack, then the averages), then the readings.
        s = sensor()
        if visit.ack is not None:
            s.ack(visit.ack.incarnation, visit.ack.next_seq, visit.ack.also or [])
        if visit.averages:
            s.apply(visit.averages)
        readings = s.tick(environment.now_ms(), visit.make, visit.every_ms)
        return TickResult(readings, s.status())

    def on_reposition(self, rewind_to, to):
        return sensor().reposition(rewind_to, to)

    def status(self):
        return sensor().status()

    def snapshot(self):
        return sensor().snapshot()

    def restore(self, state, since):
        global SENSOR
        restored = Sensor.restore(state, environment.sensor_config())
        restored.adopt(since, environment.now_ms())
        SENSOR = restored
