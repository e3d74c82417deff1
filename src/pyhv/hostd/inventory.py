"""The host daemon's inventory in SQLite: VM definitions, their states, and events.

Tables:
    vms(name PRIMARY KEY, uuid, definition JSON, state, pid, started_at, last_exit,
        created_at)
    events(id AUTOINCREMENT, time, vm, kind, message)   -- kept after a VM is undefined

Design: one connection in WAL mode shared by the daemon's threads behind a lock (SQLite
serialises writers anyway; every statement here is short). Each public method is one
transaction: a state change and its event are written together or not at all, so the
inventory never shows a VM that changed state without the event that says why, and a
failure (a full disk: sqlite3.OperationalError) leaves the previous state whole.
Events are capped at MAX_EVENTS (the oldest go).

Invariants: `state` is one of models.STATES; `pid` is set exactly when the state is
starting, running or paused.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pyhv.hostd.models import STATES, Event, Vm, VmDefinition

SCHEMA = """
CREATE TABLE IF NOT EXISTS vms (
    name TEXT PRIMARY KEY,
    uuid TEXT NOT NULL,
    definition TEXT NOT NULL,
    state TEXT NOT NULL,
    pid INTEGER,
    started_at REAL,
    last_exit TEXT,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    vm TEXT,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
"""
MAX_EVENTS = 10_000
LIVE = ("starting", "running", "paused")


class Inventory:
    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                   timeout=10.0)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @staticmethod
    def _event(db: sqlite3.Connection, vm: str | None, kind: str, message: str) -> None:
        cur = db.execute("INSERT INTO events (time, vm, kind, message) VALUES (?, ?, ?, ?)",
                         (time.time(), vm, kind, message))
        if cur.lastrowid is not None and cur.lastrowid % 100 == 0:
            db.execute("DELETE FROM events WHERE id <= ?", (cur.lastrowid - MAX_EVENTS,))

    @staticmethod
    def _vm(row: tuple[Any, ...]) -> Vm:
        name, uid, definition, state, pid, started_at, last_exit = row
        return Vm(name=name, uuid=uid, state=state, pid=pid, started_at=started_at,
                  last_exit=last_exit,
                  definition=VmDefinition.model_validate(json.loads(definition)))

    _COLUMNS = "name, uuid, definition, state, pid, started_at, last_exit"

    # ------------------------------------------------------------------ reads

    def get(self, name: str) -> Vm | None:
        with self._lock:
            row = self._db.execute(f"SELECT {self._COLUMNS} FROM vms WHERE name = ?",
                                   (name,)).fetchone()
        return None if row is None else self._vm(row)

    def all(self) -> list[Vm]:
        with self._lock:
            rows = self._db.execute(f"SELECT {self._COLUMNS} FROM vms ORDER BY name"
                                    ).fetchall()
        return [self._vm(r) for r in rows]

    def events(self, vm: str | None = None, since: int = 0, limit: int = 100
               ) -> list[Event]:
        q = "SELECT id, time, vm, kind, message FROM events WHERE id > ?"
        params: list[Any] = [since]
        if vm is not None:
            q += " AND vm = ?"
            params.append(vm)
        q += " ORDER BY id DESC LIMIT ?"
        params.append(limit)
        with self._lock:
            rows = self._db.execute(q, params).fetchall()
        return [Event(id=r[0], time=r[1], vm=r[2], kind=r[3], message=r[4])
                for r in reversed(rows)]

    # ------------------------------------------------------------------ writes

    def define(self, d: VmDefinition) -> Vm:
        """Add a VM, stopped; KeyError when the name is taken."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM vms WHERE name = ?", (d.name,)).fetchone():
                raise KeyError(d.name)
            db.execute("INSERT INTO vms (name, uuid, definition, state, created_at) "
                       "VALUES (?, ?, ?, 'stopped', ?)",
                       (d.name, str(uuid.uuid4()), d.model_dump_json(), time.time()))
            self._event(db, d.name, "defined", f"defined ({d.memory_mib} MiB, "
                                               f"{d.vcpus} vCPU, engine {d.engine})")
        vm = self.get(d.name)
        assert vm is not None
        return vm

    def undefine(self, name: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM vms WHERE name = ?", (name,))
            self._event(db, name, "undefined", "undefined")

    def set_state(self, name: str, state: str, *, kind: str, message: str,
                  pid: int | None = None, last_exit: str | None = None,
                  expect_pid: int | None = None, started: bool = False) -> bool:
        """Move `name` to `state` with its event, in one transaction. With `expect_pid`
        the change is made only while the VM's recorded pid is that one (so a late
        notice about an old process cannot touch a newer run); returns whether it was."""
        assert state in STATES
        with self._tx() as db:
            row = db.execute("SELECT pid FROM vms WHERE name = ?", (name,)).fetchone()
            if row is None or (expect_pid is not None and row[0] != expect_pid):
                return False
            keep_pid = pid if state in LIVE else None
            if state in LIVE and pid is None:
                keep_pid = row[0]
            db.execute("UPDATE vms SET state = ?, pid = ? WHERE name = ?",
                       (state, keep_pid, name))
            if last_exit is not None:
                db.execute("UPDATE vms SET last_exit = ? WHERE name = ?", (last_exit, name))
            if started:
                db.execute("UPDATE vms SET started_at = ? WHERE name = ?",
                           (time.time(), name))
            self._event(db, name, kind, message)
        return True

    def event(self, vm: str | None, kind: str, message: str) -> None:
        with self._tx() as db:
            self._event(db, vm, kind, message)
