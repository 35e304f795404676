"""kms.node.rowcache's SQLite watch on a real database file: one ``PRAGMA data_version`` read
serves the lookups of the next STAMP_REUSE seconds, and no longer."""

from __future__ import annotations

import sqlite3
import time

from kms.node import rowcache


def test_one_data_version_read_serves_its_window_and_a_commit_is_seen_after_it(tmp_path):
    db = tmp_path / "store.db"
    writer = sqlite3.connect(db, isolation_level=None)
    writer.execute("CREATE TABLE t (a)")
    watch = rowcache.SqliteWatch(sqlite3.connect(db, check_same_thread=False), reuse=0.2)
    rows = rowcache.FreshRows(watch)
    reads = []

    def read():
        reads.append(1)
        return writer.execute("SELECT count(*) FROM t").fetchone()[0]

    assert rows.get("n", read) == 0 and len(reads) == 1
    writer.execute("INSERT INTO t VALUES (1)")      # another connection commits
    # within the window the kept row stands (this is the bound: at most `reuse` seconds)...
    assert rows.kept("n") == 0
    time.sleep(0.25)
    # ...and once it has passed, the commit is seen: nothing kept, the next get reads again
    assert rows.kept("n") is None
    assert rows.get("n", read) == 1 and len(reads) == 2
    assert rows.kept("n") == 1
    watch.close()
    assert watch.stamp() is None and rows.kept("n") is None     # closed: nothing is kept
    writer.close()

