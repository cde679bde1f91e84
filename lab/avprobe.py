"""Availability probe: like PgVillage's avchecker, but every 100 ms and counting every commit.

A writer thread inserts one numbered row per tick through the given endpoint (normally the VIP's
rw port) with short connect and statement timeouts, and records every acknowledged commit. After
it stops, it reports the longest write gap and checks that every acknowledged row is present.
It is bounded in count and time and stops by itself.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field

import psycopg

from tasks.adapters.postgres import PgEndpoint

TABLE = "public.bouwsteen_probe"


@dataclass
class Attempt:
    seq: int
    sent: float  # time.time() when the insert was sent
    latency: float | None  # seconds until the commit was acknowledged; None = failed
    error: str = ""


@dataclass
class ProbeReport:
    run_id: str
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def acknowledged(self) -> list[Attempt]:
        return [a for a in self.attempts if a.latency is not None]

    @property
    def failures(self) -> int:
        return sum(1 for a in self.attempts if a.latency is None)

    def longest_gap(self) -> float:
        """Longest time between two consecutive acknowledged commits (start and end included)."""
        acks = [a.sent + (a.latency or 0) for a in self.acknowledged]
        if not self.attempts:
            return 0.0
        edges = [self.attempts[0].sent, *acks, self.attempts[-1].sent]
        return max(b - a for a, b in zip(edges, edges[1:])) if len(edges) > 1 else 0.0

    def gaps(self, min_seconds: float) -> list[float]:
        """Every time between two consecutive acknowledged commits (start and end included) of at
        least `min_seconds`: the outages of a run that has several (a rolling restart)."""
        acks = [a.sent + (a.latency or 0) for a in self.acknowledged]
        if not self.attempts:
            return []
        edges = [self.attempts[0].sent, *acks, self.attempts[-1].sent]
        return [b - a for a, b in zip(edges, edges[1:]) if b - a >= min_seconds]

    def gap_window(self) -> tuple[float, float]:
        acks = [a.sent + (a.latency or 0) for a in self.acknowledged]
        edges = [self.attempts[0].sent, *acks, self.attempts[-1].sent] if self.attempts else [0.0, 0.0]
        best = max(zip(edges, edges[1:]), key=lambda pair: pair[1] - pair[0])
        return best


class AvailabilityProbe:
    def __init__(self, endpoint: PgEndpoint, *, interval: float = 0.1, connect_timeout: int = 1,
                 statement_timeout_ms: int = 1000, max_seconds: float = 600, max_writes: int = 20000):
        self.endpoint = endpoint
        self.interval = interval
        self.connect_timeout = connect_timeout
        self.statement_timeout_ms = statement_timeout_ms
        self.max_seconds = max_seconds
        self.max_writes = max_writes
        self.report = ProbeReport(run_id=uuid.uuid4().hex[:12])
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _connect(self) -> psycopg.Connection:
        ep = self.endpoint
        return psycopg.connect(
            host=ep.address, port=ep.port, user=ep.user, password=ep.password, dbname=ep.dbname,
            connect_timeout=self.connect_timeout, autocommit=True, application_name="bouwsteen-avprobe",
            options=f"-c statement_timeout={self.statement_timeout_ms}",
            # A dead router must not hold a send for TCP's default minutes.
            tcp_user_timeout=self.statement_timeout_ms + 500, keepalives=1, keepalives_idle=1,
            keepalives_interval=1, keepalives_count=2, **ep.libpq_extras(),
        )

    def prepare(self) -> None:
        with self._connect() as conn:
            conn.execute(f"create table if not exists {TABLE} (run_id text not null, seq int not null, "
                         "written_at timestamptz not null default clock_timestamp(), primary key (run_id, seq))")

    def start(self) -> "AvailabilityProbe":
        self.prepare()
        self._thread = threading.Thread(target=self._run, name="avprobe", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        conn: psycopg.Connection | None = None
        started = time.monotonic()
        seq = 0
        next_tick = time.monotonic()
        while not self._stop.is_set() and seq < self.max_writes and time.monotonic() - started < self.max_seconds:
            seq += 1
            sent = time.time()
            t0 = time.monotonic()
            try:
                if conn is None or conn.closed:
                    conn = self._connect()
                conn.execute(f"insert into {TABLE} (run_id, seq) values (%s, %s)", (self.report.run_id, seq))
                self.report.attempts.append(Attempt(seq, sent, time.monotonic() - t0))
            except psycopg.Error as exc:
                self.report.attempts.append(Attempt(seq, sent, None, str(exc).strip().splitlines()[0][:200]))
                if conn is not None:
                    try:
                        conn.close()
                    except psycopg.Error:
                        pass
                conn = None
            next_tick += self.interval
            delay = next_tick - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_tick = time.monotonic()
        if conn is not None:
            conn.close()

    def stop(self) -> ProbeReport:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        return self.report

    def __enter__(self) -> "AvailabilityProbe":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def missing_acknowledged(self, endpoint: PgEndpoint | None = None, timeout: float = 60) -> list[int]:
        """Acknowledged sequence numbers that are not in the table (lost commits). Retries until the
        endpoint answers, so it can run right after a failover."""
        acked = {a.seq for a in self.report.acknowledged}
        deadline = time.monotonic() + timeout
        while True:
            try:
                probe = AvailabilityProbe(endpoint or self.endpoint, connect_timeout=2, statement_timeout_ms=10000)
                with probe._connect() as conn:
                    rows = conn.execute(f"select seq from {TABLE} where run_id = %s", (self.report.run_id,)).fetchall()
                present = {r[0] for r in rows}
                return sorted(acked - present)
            except psycopg.Error:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
