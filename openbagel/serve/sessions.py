"""Multi-turn editing sessions over HTTP, kept in SQLite so that a restart or a kill -9 loses nothing.

The database holds what `EditSession.replay` needs: the source image, the settings, and per turn the
instruction, seed, output image (PNG blob) and thought. Each turn is committed when it ends. Live
`EditSession` objects (with their KV caches) are an in-memory LRU cache in front of the database; a
session that is not in memory, after eviction or a restart, is rebuilt by replaying its turns, which
continues exactly as the original would have. Every method that touches the model runs on the
server's single model thread.
"""

from __future__ import annotations

import io
import json
import secrets
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..inference.pipeline import BagelPipeline, InputError
from ..inference.session import EditSession, Turn

MAX_TURNS = 50  # replaying a session costs one prefill per turn
SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, created REAL NOT NULL, think INTEGER NOT NULL, seed INTEGER NOT NULL,
    settings TEXT NOT NULL, source BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS turns (
    session_id TEXT NOT NULL REFERENCES sessions(id), idx INTEGER NOT NULL, instruction TEXT NOT NULL,
    seed INTEGER NOT NULL, image BLOB NOT NULL, thought TEXT, raw_thought TEXT,
    PRIMARY KEY (session_id, idx));
"""


class SessionNotFound(KeyError):
    pass


@dataclass
class SessionRecord:
    id: str
    created: float
    think: bool
    seed: int
    settings: dict[str, Any]
    source: Image.Image
    turns: list[Turn] = field(default_factory=list)

    @property
    def image(self) -> Image.Image:
        return self.turns[-1].image if self.turns else self.source


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _png(blob: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(blob))
    image.load()
    return image.convert("RGB")


class SessionStore:
    """The SQLite file. One short-lived connection per operation, so any thread may call it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30)
        try:
            db.execute("PRAGMA synchronous=FULL")
            with db:  # one transaction: committed on success, rolled back on error
                yield db
        finally:
            db.close()

    def create(self, source: Image.Image, think: bool, seed: int, settings: dict[str, Any]) -> SessionRecord:
        record = SessionRecord(f"sess_{secrets.token_hex(16)}", time.time(), think, seed, settings, source)
        with self._connect() as db:
            db.execute("INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?)",
                       (record.id, record.created, int(think), seed, json.dumps(settings), png_bytes(source)))
        return record

    def get(self, session_id: str) -> SessionRecord:
        with self._connect() as db:
            row = db.execute("SELECT id, created, think, seed, settings, source FROM sessions WHERE id = ?",
                             (session_id,)).fetchone()
            if row is None:
                raise SessionNotFound(session_id)
            turns = db.execute("SELECT instruction, seed, image, thought, raw_thought FROM turns "
                               "WHERE session_id = ? ORDER BY idx", (session_id,)).fetchall()
        return SessionRecord(row[0], row[1], bool(row[2]), row[3], json.loads(row[4]), _png(row[5]),
                             [Turn(t[0], t[1], _png(t[2]), t[3], t[4]) for t in turns])

    def add_turn(self, session_id: str, index: int, turn: Turn) -> None:
        with self._connect() as db:
            db.execute("INSERT INTO turns VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (session_id, index, turn.instruction, turn.seed, png_bytes(turn.image), turn.thought,
                        turn.raw_thought))

    def pop_turn(self, session_id: str, index: int) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM turns WHERE session_id = ? AND idx = ?", (session_id, index))


class SessionManager:
    """Sessions backed by the store, with the last few live in memory. Call from the model thread."""

    def __init__(self, pipe: BagelPipeline, store: SessionStore, live: int = 4) -> None:
        self.pipe, self.store, self.live_max = pipe, store, live
        self.live: OrderedDict[str, EditSession] = OrderedDict()

    def create(self, image: Image.Image, *, think: bool, seed: int, settings: dict[str, Any]) -> SessionRecord:
        session = EditSession(self.pipe, image, think=think, seed=seed, settings=settings)  # checks settings
        record = self.store.create(session.source, think, seed, settings)
        self._keep(record.id, session)
        return record

    def edit(self, session_id: str, instruction: str, seed: int | None,
             callback: Callable | None = None, on_text: Callable | None = None) -> SessionRecord:
        session = self._session(session_id)
        if len(session.turns) >= MAX_TURNS:
            raise InputError(f"the session has {MAX_TURNS} turns, the limit; start a new session from its image")
        session.edit(instruction, seed=seed, callback_on_step_end=callback, on_text=on_text)
        try:
            self.store.add_turn(session_id, len(session.turns) - 1, session.turns[-1])
        except Exception:
            session.undo()  # memory and disk agree, whatever happens
            raise
        return self.store.get(session_id)

    def undo(self, session_id: str) -> SessionRecord:
        record = self.store.get(session_id)
        if not record.turns:
            raise InputError("nothing to undo: the session has no turns")
        self.store.pop_turn(session_id, len(record.turns) - 1)
        if (session := self.live.get(session_id)) is not None:
            session.undo()
        return self.store.get(session_id)

    def _session(self, session_id: str) -> EditSession:
        if session_id in self.live:
            self.live.move_to_end(session_id)
            return self.live[session_id]
        r = self.store.get(session_id)
        session = EditSession.replay(self.pipe, r.source, r.turns, think=r.think, seed=r.seed, settings=r.settings)
        self._keep(session_id, session)
        return session

    def _keep(self, session_id: str, session: EditSession) -> None:
        self.live[session_id] = session
        while len(self.live) > self.live_max:
            self.live.popitem(last=False)
