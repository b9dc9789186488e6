"""The helper's records, in SQLite (WAL) under ANNEX_STATE_DIR.

What must survive a SIGKILL at any instant lives here: every annex, every cloud call's intent
(written before the call, with the request id its resources will be tagged with) and result
(written after), and the last observation of each instance. The emulator, like a careless
client, does not honour ClientToken, so these records plus the request tag are what make a
restarted helper adopt instead of duplicate.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from annex_gahp.errors import AnnexError
from annex_gahp.names import RETIRED
from annex_gahp.offerings import Mark, Offering
from annex_gahp.spec import AnnexSpec

log = logging.getLogger(__name__)

SCHEMA_VERSION = 4
# Columns added since version 1, as (name, definition): an older file gets them when it is
# opened (ADD COLUMN keeps every row, with the default), and is then the current version.
_ADDED_COLUMNS = (
    ("launch_failures", "INTEGER NOT NULL DEFAULT 0"),
    ("retry_at", "INTEGER"),
    ("cloud_resources", "TEXT NOT NULL DEFAULT '{}'"),
    # Version 4: instances in a row that never joined the pool (controllers/liveness.py).
    ("join_failures", "INTEGER NOT NULL DEFAULT 0"),
)
# Version 4: when an instance's startd was first seen in the collector (NULL: not yet;
# controllers/liveness.py), and what billing needs (cost, issue 16): its lifecycle (spot or
# on-demand), its zone and when it was first seen ending; and the prices the helper used
# (the `prices` table), so a restarted helper computes the same cost from the same records.
_ADDED_INSTANCE_COLUMNS = (
    ("joined", "INTEGER"),
    ("lifecycle", "TEXT NOT NULL DEFAULT ''"),
    ("zone", "TEXT NOT NULL DEFAULT ''"),
    ("ended", "INTEGER"),
)
# An instance in one of these states is no longer billed from the first time it is seen so.
ENDING_STATES = ("shutting-down", "terminated")
# Version 3 keeps what the cloud backend's `prepare` made in one JSON dict only the backend
# reads (cloud_resources); versions 1 and 2 had two columns that meant a launch template and an
# SSM parameter, or a stack name and an s3:// URL. Their values move into the dict under their
# old names (the backends read those too) and the columns stay unread.
_LEGACY_RESOURCE_COLUMNS = ("template_id", "token_parameter")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS annexes (
    id INTEGER PRIMARY KEY,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    spec TEXT NOT NULL,
    region TEXT NOT NULL,
    requested INTEGER NOT NULL,
    lease_expiration INTEGER NOT NULL,
    created INTEGER NOT NULL,
    updated INTEGER NOT NULL,
    idle_since INTEGER,
    demand_idle INTEGER NOT NULL DEFAULT 0,
    demand_running INTEGER NOT NULL DEFAULT 0,
    retire_reason TEXT NOT NULL DEFAULT '',
    retired_at INTEGER,
    last_error TEXT NOT NULL DEFAULT '',
    binding_limit TEXT NOT NULL DEFAULT '',
    cloud_resources TEXT NOT NULL DEFAULT '{}',
    adopted INTEGER NOT NULL DEFAULT 0,
    launch_failures INTEGER NOT NULL DEFAULT 0,
    retry_at INTEGER,
    join_failures INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS one_live_annex ON annexes(owner, name)
    WHERE state != 'retired';
CREATE TABLE IF NOT EXISTS ops (
    id INTEGER PRIMARY KEY,
    annex_id INTEGER NOT NULL REFERENCES annexes(id),
    kind TEXT NOT NULL,
    request TEXT NOT NULL UNIQUE,
    intent TEXT NOT NULL,
    started INTEGER NOT NULL,
    finished INTEGER,
    result TEXT,
    error TEXT
);
CREATE TABLE IF NOT EXISTS instances (
    id TEXT PRIMARY KEY,
    annex_id INTEGER NOT NULL REFERENCES annexes(id),
    request TEXT NOT NULL,
    state TEXT NOT NULL,
    instance_type TEXT NOT NULL DEFAULT '',
    launched INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    joined INTEGER,
    lifecycle TEXT NOT NULL DEFAULT '',
    zone TEXT NOT NULL DEFAULT '',
    ended INTEGER
);
CREATE INDEX IF NOT EXISTS instances_by_annex ON instances(annex_id);
-- Issue 14 (capacity health). New tables rather than new columns: an older file gets them
-- by CREATE IF NOT EXISTS, with no schema version change.
CREATE TABLE IF NOT EXISTS annex_counters (
    annex_id INTEGER NOT NULL REFERENCES annexes(id),
    name TEXT NOT NULL,
    value INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (annex_id, name)
);
CREATE TABLE IF NOT EXISTS interrupted_instances (
    id TEXT PRIMARY KEY,
    annex_id INTEGER NOT NULL REFERENCES annexes(id),
    noticed INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS unavailable_offerings (
    region TEXT NOT NULL,
    instance_type TEXT NOT NULL,
    zone TEXT NOT NULL,
    lifecycle TEXT NOT NULL,
    until INTEGER NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (region, instance_type, zone, lifecycle)
);
CREATE TABLE IF NOT EXISTS prices (
    region TEXT NOT NULL,
    zone TEXT NOT NULL DEFAULT '',
    instance_type TEXT NOT NULL,
    lifecycle TEXT NOT NULL,
    since INTEGER NOT NULL,
    per_hour REAL NOT NULL,
    currency TEXT NOT NULL,
    source TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (region, zone, instance_type, lifecycle, since)
);
"""


class StoreError(AnnexError):
    code = "STATE"


@dataclasses.dataclass(frozen=True)
class Annex:
    id: int
    owner: str
    name: str
    state: str
    spec: AnnexSpec
    region: str
    requested: int
    lease_expiration: int
    created: int
    updated: int
    idle_since: int | None
    demand_idle: int
    demand_running: int
    retire_reason: str
    retired_at: int | None
    last_error: str
    binding_limit: str
    # What the cloud backend's prepare made for the annex (cloud.Resources); only it reads it.
    cloud_resources: dict[str, str]
    adopted: int
    # Failed launch attempts in a row, and when the next may be made (lifecycle.retry_delay).
    launch_failures: int
    retry_at: int | None
    # Pool-mode instances in a row whose startd never joined (lifecycle.join_failed).
    join_failures: int = 0

    @property
    def key(self) -> str:
        return f"{self.owner}/{self.name}"


@dataclasses.dataclass(frozen=True)
class Op:
    id: int
    annex_id: int
    kind: str
    request: str
    intent: dict[str, Any]
    started: int
    finished: int | None
    result: dict[str, Any] | None
    error: str | None


@dataclasses.dataclass(frozen=True)
class InstanceRecord:
    id: str
    annex_id: int
    request: str
    state: str
    instance_type: str
    launched: int
    last_seen: int
    joined: int | None = None  # when its startd was first seen in the collector
    lifecycle: str = ""
    zone: str = ""
    ended: int | None = None


@dataclasses.dataclass(frozen=True)
class PriceRow:
    region: str
    zone: str
    instance_type: str
    lifecycle: str
    since: int
    per_hour: float
    currency: str
    source: str


_ANNEX_FIELDS = [f.name for f in dataclasses.fields(Annex)]
_UPDATABLE = set(_ANNEX_FIELDS) - {"id", "owner", "name", "created"}
_SPEC_FIELDS = frozenset(f.name for f in dataclasses.fields(AnnexSpec))


def _spec_text(value: AnnexSpec | Mapping[str, Any]) -> str:
    """An annex's spec as stored (JSON). A Mapping is a record already in the stored form
    (tests write what older versions wrote)."""
    record = dataclasses.asdict(value) if isinstance(value, AnnexSpec) else dict(value)
    return json.dumps(record, sort_keys=True)


def _spec(text: str, owner: str, name: str) -> AnnexSpec:
    """The stored JSON as the typed spec: JSON lists back to tuples, keys of other versions
    dropped, the annex's own owner and name where an older record lacks them."""

    def tuples(item: Any) -> Any:
        return tuple(tuples(x) for x in item) if isinstance(item, list) else item

    record = {k: tuples(v) for k, v in json.loads(text).items() if k in _SPEC_FIELDS}
    return AnnexSpec(**{"owner": owner, "name": name, **record})


def _annex(row: sqlite3.Row) -> Annex:
    values = {k: v for k, v in dict(row).items() if k not in _LEGACY_RESOURCE_COLUMNS}
    values["spec"] = _spec(values["spec"], values["owner"], values["name"])
    values["cloud_resources"] = json.loads(values["cloud_resources"])
    return Annex(**values)


def _op(row: sqlite3.Row) -> Op:
    values = dict(row)
    values["intent"] = json.loads(values["intent"])
    values["result"] = json.loads(values["result"]) if values["result"] else None
    return Op(**values)


class Store:
    """One connection shared by the helper's threads, serialised by a lock."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.RLock()
        # Issue 14's small tables, read for every annex's view: cached, reset on each write.
        self._counters: dict[int, dict[str, int]] | None = None
        self._marks: list[Mark] | None = None
        self._depth = 0  # transactions open on the connection (the first, then savepoints)
        self._price_rows: list[PriceRow] | None = None  # Store.prices, until the next write
        self._price_generation = 0  # changes with every price write (accounting caches by it)
        fresh = not os.path.exists(path)
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            if not fresh:
                self._check_integrity()
            self._db.executescript(_SCHEMA)
            self._check_version(fresh)
        except sqlite3.DatabaseError as err:
            raise StoreError(
                f"the state file {path} is unreadable ({err}). Move it aside and restart "
                "annex_gahp: it rebuilds its records from the instances' htcondor-annex tags."
            ) from None
        self.fresh = fresh

    def _check_integrity(self) -> None:
        (verdict,) = self._db.execute("PRAGMA quick_check").fetchone()
        if verdict != "ok":
            raise sqlite3.DatabaseError(f"integrity check failed: {verdict}")

    def _check_version(self, fresh: bool) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            if not fresh and self._db.execute("SELECT count(*) FROM annexes").fetchone()[0]:
                raise sqlite3.DatabaseError("no schema version recorded")
            self._db.execute(
                "INSERT INTO meta(key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
            )
        elif 1 <= int(row[0]) < SCHEMA_VERSION:
            self._add_columns()
        elif int(row[0]) != SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"schema version {row[0]} is not the supported {SCHEMA_VERSION}"
            )

    def _add_columns(self) -> None:
        have = {info[1] for info in self._db.execute("PRAGMA table_info(annexes)")}
        with self.transaction():
            for name, definition in _ADDED_COLUMNS:
                if name not in have:
                    self._db.execute(f"ALTER TABLE annexes ADD COLUMN {name} {definition}")
            have_instances = {info[1] for info in self._db.execute("PRAGMA table_info(instances)")}
            for name, definition in _ADDED_INSTANCE_COLUMNS:
                if name not in have_instances:
                    self._db.execute(f"ALTER TABLE instances ADD COLUMN {name} {definition}")
            if set(_LEGACY_RESOURCE_COLUMNS) <= have:
                self._db.execute(
                    "UPDATE annexes SET cloud_resources = json_object("
                    "'template_id', template_id, 'token_parameter', token_parameter)"
                    " WHERE template_id != '' OR token_parameter != ''"
                )
            self._db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION),))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction (the write lock is taken at BEGIN, so a check made inside
        holds until COMMIT), held by this thread. A transaction opened inside another is a
        savepoint of it: a caller can read, decide and write in one piece while the store's
        own methods keep their own transactions."""
        with self._lock:
            if self._depth:
                yield from self._savepoint()
                return
            self._db.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self._db
            except BaseException:
                self._rollback()
                raise
            finally:
                self._depth = 0
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as err:
                # A COMMIT that fails (a deferred constraint, a full disk, a lock) can leave the
                # transaction open: every later BEGIN would then fail and the helper stop.
                self._rollback()
                raise StoreError(
                    f"could not commit to the state file {self.path} ({err}); the change was "
                    "rolled back"
                ) from None

    def _savepoint(self) -> Iterator[sqlite3.Connection]:
        name = f"nested{self._depth}"
        self._db.execute(f"SAVEPOINT {name}")
        self._depth += 1
        try:
            yield self._db
        except BaseException:
            self._db.execute(f"ROLLBACK TO {name}")
            raise
        finally:
            self._depth -= 1
            self._db.execute(f"RELEASE {name}")

    def _rollback(self) -> None:
        if not self._db.in_transaction:
            return
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error as err:  # the original error says more; this one is logged
            log.error("could not roll back the state file %s: %s", self.path, err)

    # --- annexes -------------------------------------------------------------------------

    def insert_annex(
        self,
        *,
        owner: str,
        name: str,
        state: str,
        spec: AnnexSpec | Mapping[str, Any],
        region: str,
        requested: int,
        lease_expiration: int,
        now: int | None = None,
        adopted: bool = False,
    ) -> Annex:
        now = int(time.time()) if now is None else now
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO annexes(owner, name, state, spec, region, requested,"
                " lease_expiration, created, updated, adopted)"
                " VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    owner,
                    name,
                    state,
                    _spec_text(spec),
                    region,
                    requested,
                    lease_expiration,
                    now,
                    now,
                    int(adopted),
                ),
            )
            row = db.execute("SELECT * FROM annexes WHERE id=?", (cur.lastrowid,)).fetchone()
        return _annex(row)

    def update_annex(self, annex_id: int, **fields: Any) -> Annex:
        """Write these fields as given. Which state changes are allowed, and what a write from
        an older view may still change, is lifecycle's to decide (lifecycle.record)."""
        unknown = set(fields) - _UPDATABLE
        if unknown:
            raise ValueError(f"not updatable: {sorted(unknown)}")
        if "spec" in fields:
            fields["spec"] = _spec_text(fields["spec"])
        if "cloud_resources" in fields:
            fields["cloud_resources"] = json.dumps(fields["cloud_resources"], sort_keys=True)
        fields.setdefault("updated", int(time.time()))
        with self.transaction() as db:
            assignments = ", ".join(f"{name}=?" for name in fields)
            db.execute(
                f"UPDATE annexes SET {assignments} WHERE id=?",  # noqa: S608 - names are checked
                (*fields.values(), annex_id),
            )
            row = db.execute("SELECT * FROM annexes WHERE id=?", (annex_id,)).fetchone()
        if row is None:
            raise StoreError(f"annex record {annex_id} vanished")
        return _annex(row)

    def get(self, annex_id: int) -> Annex | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM annexes WHERE id=?", (annex_id,)).fetchone()
        return _annex(row) if row else None

    def live(self, owner: str, name: str) -> Annex | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM annexes WHERE owner=? AND name=? AND state != ?",
                (owner, name, RETIRED),
            ).fetchone()
        return _annex(row) if row else None

    def last_retired(self, owner: str, name: str) -> Annex | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM annexes WHERE owner=? AND name=? AND state=?"
                " ORDER BY retired_at DESC LIMIT 1",
                (owner, name, RETIRED),
            ).fetchone()
        return _annex(row) if row else None

    def annexes(self, owner: str | None = None, include_retired: bool = False) -> list[Annex]:
        query = "SELECT * FROM annexes WHERE 1=1"
        params: list[Any] = []
        if owner is not None:
            query += " AND owner=?"
            params.append(owner)
        if not include_retired:
            query += " AND state != ?"
            params.append(RETIRED)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY owner, name, id", params).fetchall()
        return [_annex(row) for row in rows]

    # --- cloud-call intents ----------------------------------------------------------------

    def begin_op(self, annex_id: int, kind: str, intent: dict[str, Any]) -> Op:
        """Record what we are about to ask the cloud, before asking."""
        request = f"r-{uuid.uuid4().hex[:16]}"
        now = int(time.time())
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO ops(annex_id, kind, request, intent, started) VALUES (?,?,?,?,?)",
                (annex_id, kind, request, json.dumps(intent, sort_keys=True), now),
            )
            row = db.execute("SELECT * FROM ops WHERE id=?", (cur.lastrowid,)).fetchone()
        return _op(row)

    def finish_op(
        self, op_id: int, result: dict[str, Any] | None = None, error: str | None = None
    ) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE ops SET finished=?, result=?, error=? WHERE id=?",
                (
                    int(time.time()),
                    json.dumps(result, sort_keys=True) if result is not None else None,
                    error,
                    op_id,
                ),
            )

    def open_ops(self) -> list[Op]:
        with self._lock:
            query = "SELECT * FROM ops WHERE finished IS NULL ORDER BY id"
            rows = self._db.execute(query).fetchall()
        return [_op(row) for row in rows]

    def ops(self, annex_id: int) -> list[Op]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM ops WHERE annex_id=? ORDER BY id", (annex_id,)
            ).fetchall()
        return [_op(row) for row in rows]

    # --- instances -----------------------------------------------------------------------

    def record_instances(
        self,
        annex_id: int,
        request: str,
        rows: Iterable[tuple[str, str, str]],
        now: int,
        details: Mapping[str, tuple[str, str]] | None = None,
    ) -> None:
        """Upsert (instance id, state, type) as last seen; `details` adds an instance's
        (lifecycle, zone) where known. The first write in an ending state records when it
        ended (billing stops there); a later write never moves that time, so a replayed
        observation after a crash counts nothing twice."""
        details = details or {}
        with self.transaction() as db:
            for instance_id, state, instance_type in rows:
                lifecycle, zone = details.get(instance_id, ("", ""))
                ended = now if state in ENDING_STATES else None
                db.execute(
                    "INSERT INTO instances(id, annex_id, request, state, instance_type,"
                    " launched, last_seen, lifecycle, zone, ended) VALUES (?,?,?,?,?,?,?,?,?,?)"
                    " ON CONFLICT(id) DO UPDATE SET state=excluded.state,"
                    " last_seen=MAX(instances.last_seen, excluded.last_seen),"
                    " instance_type=CASE WHEN"
                    " excluded.instance_type != '' THEN excluded.instance_type"
                    " ELSE instances.instance_type END,"
                    " lifecycle=CASE WHEN excluded.lifecycle != '' THEN excluded.lifecycle"
                    " ELSE instances.lifecycle END,"
                    " zone=CASE WHEN excluded.zone != '' THEN excluded.zone"
                    " ELSE instances.zone END,"
                    " ended=COALESCE(instances.ended, excluded.ended)",
                    (
                        instance_id,
                        annex_id,
                        request,
                        state,
                        instance_type,
                        now,
                        now,
                        lifecycle,
                        zone,
                        ended,
                    ),
                )

    def instances(self, annex_id: int) -> list[InstanceRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM instances WHERE annex_id=? ORDER BY launched, id", (annex_id,)
            ).fetchall()
        return [InstanceRecord(**dict(row)) for row in rows]

    def mark_joined(self, annex_id: int, instance_ids: Iterable[str], now: int) -> None:
        """Record the first time these instances' startds were seen (kept if already set)."""
        with self.transaction() as db:
            db.executemany(
                "UPDATE instances SET joined=? WHERE annex_id=? AND id=? AND joined IS NULL",
                [(now, annex_id, i) for i in instance_ids],
            )

    def instance_owner(self, instance_id: str) -> int | None:
        with self._lock:
            row = self._db.execute(
                "SELECT annex_id FROM instances WHERE id=?", (instance_id,)
            ).fetchone()
        return row[0] if row else None

    # --- capacity health (issue 14) -------------------------------------------------------

    def bump(self, annex_id: int, name: str, by: int = 1) -> int:
        """Add `by` to the annex's counter `name` (Interruptions, ...); returns the new value."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO annex_counters(annex_id, name, value) VALUES (?,?,?)"
                " ON CONFLICT(annex_id, name) DO UPDATE SET value = value + excluded.value",
                (annex_id, name, by),
            )
            row = db.execute(
                "SELECT value FROM annex_counters WHERE annex_id=? AND name=?", (annex_id, name)
            ).fetchone()
            self._counters = None
        return int(row[0])

    def counters(self, annex_id: int) -> dict[str, int]:
        # Read for every annex's view (each ad, each ANNEX_STATUS): kept in memory, this
        # process being the file's only writer.
        with self._lock:
            if self._counters is None:
                rows = self._db.execute("SELECT annex_id, name, value FROM annex_counters")
                self._counters = {}
                for r in rows.fetchall():
                    self._counters.setdefault(int(r[0]), {})[r[1]] = int(r[2])
            return dict(self._counters.get(annex_id, {}))

    def note_interrupted(self, annex_id: int, instance_id: str, now: int) -> int | None:
        """Record that `instance_id` got an interruption notice, once: returns None the first
        time, else when it was first recorded."""
        with self.transaction() as db:
            row = db.execute(
                "SELECT noticed FROM interrupted_instances WHERE id=?", (instance_id,)
            ).fetchone()
            if row is not None:
                return int(row[0])
            db.execute(
                "INSERT INTO interrupted_instances(id, annex_id, noticed) VALUES (?,?,?)",
                (instance_id, annex_id, int(now)),
            )
        return None

    def mark_unavailable(self, marks: Iterable[tuple[Offering, int, str]]) -> None:
        """Record (offering, until, reason); a mark already there keeps the later end. The
        table stays small (one row per capacity pool ever marked): expired rows are not read."""
        with self.transaction() as db:
            self._marks = None
            for offering, until, reason in marks:
                db.execute(
                    "INSERT INTO unavailable_offerings"
                    "(region, instance_type, zone, lifecycle, until, reason) VALUES (?,?,?,?,?,?)"
                    " ON CONFLICT(region, instance_type, zone, lifecycle) DO UPDATE SET"
                    " until = max(until, excluded.until), reason = excluded.reason",
                    (
                        offering.region,
                        offering.instance_type,
                        offering.zone,
                        offering.lifecycle,
                        int(until),
                        reason,
                    ),
                )

    def unavailable(self, region: str, now: int) -> list[Mark]:
        """The region's marks still in force at `now` (the table kept in memory, as counters)."""
        with self._lock:
            if self._marks is None:
                rows = self._db.execute(
                    "SELECT * FROM unavailable_offerings ORDER BY region, instance_type, zone"
                ).fetchall()
                self._marks = [
                    Mark(
                        Offering(r["region"], r["instance_type"], r["zone"], r["lifecycle"]),
                        int(r["until"]),
                        r["reason"],
                    )
                    for r in rows
                ]
            return [m for m in self._marks if m.offering.region == region and m.until > now]

    def all_instances(self, since: int | None = None) -> list[tuple[InstanceRecord, str, str, str]]:
        """Every instance record with its annex's (owner, name, region), for cost figures;
        with `since`, only those that may have run after it."""
        query = (
            "SELECT i.*, a.owner AS a_owner, a.name AS a_name, a.region AS a_region"
            " FROM instances i JOIN annexes a ON a.id = i.annex_id"
        )
        params: list[Any] = []
        if since is not None:
            query += " WHERE COALESCE(i.ended, i.last_seen) >= ?"
            params.append(since)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY i.launched, i.id", params).fetchall()
        out = []
        for row in rows:
            values = dict(row)
            extra = (values.pop("a_owner"), values.pop("a_name"), values.pop("a_region"))
            out.append((InstanceRecord(**values), *extra))
        return out

    # --- prices ------------------------------------------------------------------------

    def record_price(
        self,
        *,
        region: str,
        zone: str,
        instance_type: str,
        lifecycle: str,
        per_hour: float,
        currency: str,
        source: str,
        now: int,
    ) -> bool:
        """Add a price point from `now` if it differs from the one in force; True if added."""
        with self.transaction() as db:
            row = db.execute(
                "SELECT per_hour, currency FROM prices WHERE region=? AND zone=? AND"
                " instance_type=? AND lifecycle=? AND since <= ? ORDER BY since DESC LIMIT 1",
                (region, zone, instance_type, lifecycle, now),
            ).fetchone()
            if row is not None and (row[0], row[1]) == (per_hour, currency):
                return False
            self._price_rows = None
            self._price_generation += 1
            db.execute(
                "INSERT OR REPLACE INTO prices(region, zone, instance_type, lifecycle, since,"
                " per_hour, currency, source) VALUES (?,?,?,?,?,?,?,?)",
                (region, zone, instance_type, lifecycle, now, per_hour, currency, source),
            )
        self._price_rows = None  # what a read inside the transaction cached may be undone
        self._price_generation += 1
        return True

    @property
    def price_generation(self) -> int:
        """A number that changes whenever a price point is written: views of the prices
        (accounting.price_table) are rebuilt only then."""
        return self._price_generation

    def prices(self) -> list[PriceRow]:
        """Every price point, oldest first. Read for every annex's view each cycle, written
        rarely: kept in memory until the next write (this process is the only writer)."""
        with self._lock:
            if self._price_rows is None:
                rows = self._db.execute("SELECT * FROM prices ORDER BY since").fetchall()
                self._price_rows = [PriceRow(**dict(row)) for row in rows]
            return list(self._price_rows)
