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


_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS images ({_COLUMNS});
CREATE INDEX IF NOT EXISTS images_chunk ON images(chunk);
CREATE INDEX IF NOT EXISTS images_sha1 ON images(sha1);
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
