"""One stress worker process: ``python -m pgwarden.stress.worker CONFIG.json``.

Theory of operation
-------------------
The harness starts every worker of a run, waits until each has printed ``ready``, then
writes ``go`` to every worker's stdin at once: that is the barrier. Until ``go`` the worker
has imported only the standard library, so what follows is a real cold start: import the
client library, build the client (pgwarden, psycopg_pool, SQLAlchemy or naive), and serve
the workload from ``threads`` threads.

The workload is a list of phases; in each, every thread issues requests paced at one per
``interval`` (never catching up after a slow one), until the phase's request count or
duration is reached. Each request is a read or, with probability ``write_ratio``, a write of
a fresh uuid; with ``orm_share`` that share of the writes are ORM units of work (op ``o``)
for a client that has ``orm_write`` (the SQLAlchemy ones), plain writes for the others (the
random draws are the same for every client, so every client sees the same mix). A request
is recorded as ``[start, latency, op, kind]`` (start in ``time.monotonic()`` seconds, which
on Linux and macOS is one clock for every process), and every write's id goes into
``acked`` (the call returned) or ``unacked`` (it raised); a unit of work's id also goes into
``orm_acked`` or ``orm_unacked``.

stdout carries ``ready``, then ``p <ok> <failed>`` every half second (live progress), then
``done``. With ``stats_interval`` set (``pgwarden stress --dashboard``) and a client that has
``live_stats()`` (pgwarden), it also carries ``s <json>``: a compact snapshot of the client's
``stats()`` every ``stats_interval`` seconds and once more when the requests are done (see
:mod:`pgwarden.stress.live`). Another stdin line, or end of input (the harness is gone), stops
the threads.

With ``start_delay`` (the ``fleet`` scenario's waves) the worker waits that long after ``go``
before it builds its client: that is its arrival, and its phases count from there. The
result file also carries ``t_ready`` (when it printed ``ready``), from which the harness
tells how long the interpreter took to start.

Bounds: each thread stops after ``max_requests``, and ``hard_limit`` seconds after ``go`` a
timer writes whatever was recorded (requests still running become ``hung``) and exits the
process with ``os._exit``, whatever the client library is doing.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

# Cheap: clients.py imports only the standard library; the client libraries themselves are
# imported by make_client, after the start signal.
from pgwarden.stress.clients import classify, describe, make_client
from pgwarden.stress.live import MAX_STATS_LINE

__all__ = ["Phase", "WorkerConfig", "main"]


@dataclass(frozen=True)
class Phase:
    start: float  # seconds after go
    interval: float  # pacing per thread
    requests: int | None = None  # per thread
    duration: float | None = None


@dataclass(frozen=True)
class WorkerConfig:
    client: str
    url: str
    worker: int
    run: str
    out: str
    threads: int
    pool_size: int
    deadline: float
    write_ratio: float
    read_work: float
    phases: tuple[Phase, ...]
    max_requests: int
    hard_limit: float
    seed: int
    application_name: str
    stats_interval: float = 0.0  # > 0: send the client's live stats this often (pgwarden)
    orm_share: float = 0.0  # of the writes: ORM units of work (clients with orm_write)
    #: Seconds after ``go`` before the worker builds its client and starts its phases: its
    #: arrival (the ``fleet`` scenario's waves). Its phases start from there.
    start_delay: float = 0.0
    #: The pgwarden clients' ``Settings.fleet_budget`` (None: pgwarden's default, off).
    fleet_budget: int | str | None = None
    #: ``Settings.fleet_tag`` with a budget ("" : pgwarden's default).
    fleet_tag: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkerConfig:
        values = dict(data)
        values["phases"] = tuple(Phase(**p) for p in data["phases"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["phases"] = [p.__dict__ for p in self.phases]
        return out


@dataclass
class _Recorder:
    records: list[list[Any]] = field(default_factory=list)
    acked: list[str] = field(default_factory=list)
    unacked: list[str] = field(default_factory=list)
    orm_acked: list[str] = field(default_factory=list)
    orm_unacked: list[str] = field(default_factory=list)
    samples: dict[str, str] = field(default_factory=dict)
    ok: int = 0
    failed: int = 0
    first_ok: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Worker:
    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.rec = _Recorder()
        self.stop = threading.Event()
        self.inflight: list[tuple[float, str, str] | None] = [None] * cfg.threads
        self.t_ready = 0.0
        self.t_go = 0.0
        self.t_client: float | None = None
        self.client_error: str | None = None
        self.client: Any = None
        self.orm = False  # the client runs units of work (set once it is built)
        # Held while the results file is written: a second caller (the hard stop racing the
        # main thread's end) waits for the file rather than exiting the process under it.
        self.dump_lock = threading.Lock()
        self.dumped = False
        self.stats: dict[str, Any] = {}

    # -- requests ------------------------------------------------------------------------
    def thread_main(self, index: int) -> None:
        cfg = self.cfg
        rng = random.Random(cfg.seed * 1_000_003 + cfg.worker * 1009 + index)
        hard_end = self.t_go + cfg.hard_limit
        done = 0
        for phase in cfg.phases:
            start_at = self.t_go + cfg.start_delay + phase.start
            if not self._sleep_until(start_at):
                return
            end_at = hard_end if phase.duration is None else start_at + phase.duration
            limit = phase.requests if phase.requests is not None else cfg.max_requests
            next_at = time.monotonic()
            n = 0
            while n < limit and done < cfg.max_requests and not self.stop.is_set():
                if not self._sleep_until(next_at):
                    return
                if time.monotonic() >= end_at:
                    break
                self.one_request(index, rng)
                n += 1
                done += 1
                next_at = max(next_at + phase.interval, time.monotonic())

    def _sleep_until(self, when: float) -> bool:
        left = when - time.monotonic()
        if left > 0:
            self.stop.wait(left)
        return not self.stop.is_set()

    def one_request(self, index: int, rng: random.Random) -> None:
        cfg = self.cfg
        is_write = rng.random() < cfg.write_ratio
        rid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        # Drawn whatever the client, so that every client gets the same requests.
        unit = is_write and cfg.orm_share > 0 and rng.random() < cfg.orm_share
        op = ("o" if unit and self.orm else "w") if is_write else "r"
        started = time.monotonic()
        self.inflight[index] = (started, op, rid)
        kind = "ok"
        try:
            if op == "o":
                self.client.orm_write(cfg.run, rid, cfg.worker)
            elif is_write:
                self.client.write(cfg.run, rid, cfg.worker)
            else:
                self.client.read(rid, cfg.read_work)
            latency = time.monotonic() - started
        except Exception as exc:
            # Before classifying: the first error imports the classifier, not the request's.
            latency = time.monotonic() - started
            kind = classify(exc)
            rec = self.rec
            if kind not in rec.samples:
                with rec.lock:
                    rec.samples.setdefault(kind, describe(exc))
        if kind == "ok" and latency > cfg.deadline:
            kind = "late"
        rec = self.rec
        with rec.lock:
            self.inflight[index] = None
            rec.records.append([round(started, 6), round(latency, 6), op, kind])
            if kind in ("ok", "late"):
                rec.ok += 1
                if kind == "ok" and rec.first_ok is None:
                    rec.first_ok = started + latency
                if is_write:
                    rec.acked.append(rid)
                if op == "o":
                    rec.orm_acked.append(rid)
            else:
                rec.failed += 1
                if is_write:
                    rec.unacked.append(rid)
                if op == "o":
                    rec.orm_unacked.append(rid)

    # -- output --------------------------------------------------------------------------
    def dump(self, reason: str) -> None:
        """Write the results file once: the first caller writes it, a later one waits for it."""
        with self.dump_lock:
            if not self.dumped:
                self._write_results(reason)
                self.dumped = True

    def _write_results(self, reason: str) -> None:
        now = time.monotonic()
        rec = self.rec
        with rec.lock:
            records = list(rec.records)
            unacked = list(rec.unacked)
            orm_unacked = list(rec.orm_unacked)
            for slot in self.inflight:
                if slot is not None:
                    started, op, rid = slot
                    records.append([round(started, 6), round(now - started, 6), op, "hung"])
                    if op in ("w", "o"):
                        unacked.append(rid)
                    if op == "o":
                        orm_unacked.append(rid)
            data = {
                "worker": self.cfg.worker,
                "client": self.cfg.client,
                "reason": reason,
                "t_ready": self.t_ready,
                "t_go": self.t_go,
                "start_delay": self.cfg.start_delay,
                "t_client": self.t_client,
                "t_first_ok": rec.first_ok,
                "t_end": now,
                "client_error": self.client_error,
                "records": records,
                "acked": list(rec.acked),
                "unacked": unacked,
                "orm_acked": list(rec.orm_acked),
                "orm_unacked": orm_unacked,
                "samples": dict(rec.samples),
                "stats": self.stats,
            }
        tmp = self.cfg.out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, separators=(",", ":"), default=str)
        os.replace(tmp, self.cfg.out)

    def progress(self) -> None:
        next_stats = time.monotonic()
        while not self.stop.wait(0.5):
            rec = self.rec
            _say(f"p {rec.ok} {rec.failed}")
            if self.cfg.stats_interval > 0 and time.monotonic() >= next_stats:
                self.send_stats()
                next_stats = time.monotonic() + self.cfg.stats_interval - 0.05

    def send_stats(self) -> None:
        """One ``s <json>`` line with the client's live stats, if it has any (bounded)."""
        live = getattr(self.client, "live_stats", None)
        if not callable(live):
            return
        try:
            line = json.dumps(live(), separators=(",", ":"), default=str)
        except Exception:  # stats are informative only
            return
        if len(line) < MAX_STATS_LINE:
            _say("s " + line)

    def watch_stdin(self) -> None:
        sys.stdin.readline()  # "stop", or "" at end of input
        self.stop.set()

    def hard_stop(self) -> None:
        time.sleep(max(0.0, self.t_go + self.cfg.hard_limit - time.monotonic()))
        self.stop.set()
        self.dump("hard_limit")
        _say("done")
        os._exit(0)


_say_lock = threading.Lock()


def _say(line: str) -> None:
    """One whole line on stdout (threads share it: a long stats line must not interleave)."""
    with _say_lock:
        try:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        except (OSError, ValueError):
            pass


def _join_all(threads: list[threading.Thread], stop: threading.Event, hard_end: float) -> None:
    """Wait for the threads; after a stop request give in-flight requests 1 s more."""
    stopped_at: float | None = None
    while any(t.is_alive() for t in threads):
        now = time.monotonic()
        if now >= hard_end:
            return
        if stop.is_set():
            stopped_at = now if stopped_at is None else stopped_at
            if now - stopped_at > 1.0:
                return
        for t in threads:
            t.join(0.05)


def _run_bounded(fn: Any, timeout: float) -> None:
    """Call ``fn()`` in a daemon thread and give up waiting after ``timeout`` seconds."""
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    thread.join(timeout)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pgwarden.stress.worker CONFIG.json", file=sys.stderr)
        return 2
    with open(args[0], encoding="utf-8") as f:
        cfg = WorkerConfig.from_dict(json.load(f))
    worker = _Worker(cfg)
    worker.t_ready = time.monotonic()
    _say("ready")
    line = sys.stdin.readline()
    if not line.startswith("go"):
        return 0  # the harness went away (or said stop) before the start
    worker.t_go = time.monotonic()
    for target in (worker.watch_stdin, worker.hard_stop, worker.progress):
        threading.Thread(target=target, daemon=True).start()
    if cfg.start_delay > 0 and worker.stop.wait(cfg.start_delay):
        worker.dump("stopped before its arrival")
        _say("done")
        os._exit(0)
    try:
        worker.client = make_client(cfg.client, _ClientSettings(cfg))
        worker.orm = cfg.orm_share > 0 and callable(getattr(worker.client, "orm_write", None))
        worker.t_client = time.monotonic()
    except Exception as exc:  # an import or configuration error: report it, serve nothing
        worker.client_error = describe(exc)
    reason = "finished"
    if worker.client is not None:
        threads = [
            threading.Thread(target=worker.thread_main, args=(i,), daemon=True)
            for i in range(cfg.threads)
        ]
        for t in threads:
            t.start()
        hard_end = worker.t_go + cfg.hard_limit
        _join_all(threads, worker.stop, hard_end)
        if time.monotonic() >= hard_end and any(t.is_alive() for t in threads):
            reason = "hard_limit"  # the same end as the hard stop's, whichever writes first
        client = worker.client
        if cfg.stats_interval > 0:
            worker.send_stats()  # the final figures, for the live dashboard
        try:
            worker.stats = _jsonable(client.stats())
        except Exception as exc:  # stats are informative only
            worker.stats = {"error": str(exc)[:200]}
        _run_bounded(client.close, 3.0)
    worker.stop.set()
    worker.dump(reason)
    _say("done")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # pools may keep non-daemon threads; the results are written


@dataclass(frozen=True)
class _ClientSettings:
    cfg: WorkerConfig

    @property
    def url(self) -> str:
        return self.cfg.url

    @property
    def pool_size(self) -> int:
        return self.cfg.pool_size

    @property
    def deadline(self) -> float:
        return self.cfg.deadline

    @property
    def application_name(self) -> str:
        return self.cfg.application_name

    @property
    def orm_share(self) -> float:
        return self.cfg.orm_share

    @property
    def fleet_budget(self) -> int | str | None:
        return self.cfg.fleet_budget

    @property
    def fleet_tag(self) -> str:
        return self.cfg.fleet_tag


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        os._exit(130)
