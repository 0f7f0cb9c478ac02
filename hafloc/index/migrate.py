"""The index's SQLite schema and its migration (version 1 -> 2, in place, by the first writer)."""

from __future__ import annotations

import sqlite3

from hafloc.fileio import write_json_atomic
from hafloc.index.storebase import VERSION, StoreBase

_COLUMNS = """
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL,
    root TEXT NOT NULL,
    lat REAL, lon REAL, easting REAL, northing REAL, zone INTEGER, zone_letter TEXT,
    position_source TEXT,
    added_at TEXT NOT NULL,
    chunk INTEGER NOT NULL,
    row INTEGER NOT NULL,
    sha1 TEXT,
    UNIQUE(root, path)
"""


# SHA-1 of each per-chunk file as written (``chunks.py``), inserted in the transaction committing the
# chunk's rows; ``verify`` compares. Indexes written before it gain the table at their next write
# (their older chunks have no checksum).
_CHUNK_SUMS = """
CREATE TABLE IF NOT EXISTS chunk_sums (
    chunk INTEGER NOT NULL, kind TEXT NOT NULL, sha1 TEXT NOT NULL, PRIMARY KEY (chunk, kind)
);
"""

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS images ({_COLUMNS});
CREATE INDEX IF NOT EXISTS images_chunk ON images(chunk);
CREATE INDEX IF NOT EXISTS images_sha1 ON images(sha1);
{_CHUNK_SUMS}
"""


_V1_COLUMNS = "id, path, root, lat, lon, easting, northing, zone, zone_letter, position_source, added_at, chunk, row"


class SchemaMigration(StoreBase):
    """Reading the schema version and migrating an old one (under the write lock)."""

    def _read_schema(self) -> int:
        """0: no images table yet, 1: version 1 (path unique alone), 2: current."""
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(images)")}
        if not cols:
            return 0
        missing = {"id", "path", "root", "chunk", "row"} - cols
        if missing:
            raise sqlite3.DatabaseError(f"table images lacks column(s) {', '.join(sorted(missing))}")
        return 2 if "sha1" in cols else 1

    def _add_chunk_sums(self) -> None:
        """Give an index written before chunk checksums their table (under the write lock)."""
        if not self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'chunk_sums'").fetchone():
            self._db.executescript(_CHUNK_SUMS)

    def _migrate_v1(self) -> None:
        """Version 1 -> 2 in one transaction: UNIQUE(path) becomes UNIQUE(root, path), sha1 added."""
        seq = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'images'").fetchone()
        self._db.executescript(f"""
            BEGIN IMMEDIATE;
            CREATE TABLE images_v2 ({_COLUMNS});
            INSERT INTO images_v2 ({_V1_COLUMNS}) SELECT {_V1_COLUMNS} FROM images;
            DROP TABLE images;
            ALTER TABLE images_v2 RENAME TO images;
            CREATE INDEX images_chunk ON images(chunk);
            CREATE INDEX images_sha1 ON images(sha1);
            UPDATE sqlite_sequence SET seq = MAX(seq, {int(seq[0]) if seq else 0}) WHERE name = 'images';
            COMMIT;
        """)
        self._schema = 2
        self.info["version"] = VERSION
        write_json_atomic(self.folder / "index.json", self.info)
