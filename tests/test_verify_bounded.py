"""verify, bounded by what changed, on real PostgreSQL 15 -> 17 with native
logical replication made by hand (a publication and a subscription named as
the native engine names them): prepare, rounds, the final check.

Every way a difference can arise must be caught: a source change the apply
never made (ALTER SUBSCRIPTION ... SKIP drops that one transaction on the
target), a change on the target only, a table created again on the target."""

from __future__ import annotations

import re
import secrets
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
import pytest
from psycopg import sql

from steps import state, verify
from steps.errors import StepError
from steps.settings import load_settings
from steps.verify import pgoutput
from tests.conftest import create_database

pytestmark = pytest.mark.slow

# Production-like: TOASTed values that do not compress away, awkward text,
# full-precision numerics, a text, a uuid and a composite key, a partitioned
# table, a table without a key (REPLICA IDENTITY FULL) with duplicate rows,
# TOASTed values, awkward text, timestamps and floats (its row text is
# rebuilt from decoded values: every way it prints must come out the same).
SCHEMA = r"""
CREATE SCHEMA app;
CREATE TABLE app.items (id bigint PRIMARY KEY, v text NOT NULL, big text, n numeric(30, 12), f float8);
CREATE TABLE app."Names" (k text PRIMARY KEY, v text);
CREATE TABLE app.docs (id uuid PRIMARY KEY, body jsonb, at timestamptz);
CREATE TABLE app.pairs (a text, b int, v text, PRIMARY KEY (a, b));
CREATE TABLE app."no key" (x int, y text, big text, at timestamptz, f float8, n numeric(30, 12));
ALTER TABLE app."no key" REPLICA IDENTITY FULL;
CREATE TABLE app.ev (id bigint, at date, note text, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
CREATE TABLE app.ev_a PARTITION OF app.ev FOR VALUES FROM ('2000-01-01') TO ('2021-01-01');
CREATE TABLE app.ev_b PARTITION OF app.ev FOR VALUES FROM ('2021-01-01') TO ('2030-01-01');
CREATE TABLE app.scratch (id int PRIMARY KEY, v text);  -- truncated by one test
CREATE TABLE app.redo (id int PRIMARY KEY, v text);  -- created again on the target by one test
CREATE SEQUENCE app.s;
CREATE SCHEMA db_upgrade;
CREATE TABLE db_upgrade.test_barrier (n bigint PRIMARY KEY);
"""
DATA = r"""
INSERT INTO app.items SELECT g, CASE g % 4 WHEN 0 THEN 'null' WHEN 1 THEN E'it''s\\' WHEN 2 THEN 'ünï ' || g
  ELSE 'y''' END, CASE WHEN g % 500 = 0 THEN (SELECT string_agg(md5(random()::text || h), '') FROM
  generate_series(1, 400) h) END, g / 7.0, g / 3.0 FROM generate_series(1, 20000) g;
INSERT INTO app."Names" SELECT 'name ' || g || E' \\ ''q''', 'v' || g FROM generate_series(1, 2000) g;
INSERT INTO app.docs SELECT md5(g::text)::uuid, jsonb_build_object('g', g, 's', 'null'),
  timestamptz '2020-01-01 00:00:00.123456+00' + g * interval '1 minute' FROM generate_series(1, 2000) g;
INSERT INTO app.pairs SELECT 'a' || (g % 50), g, 'p' || g FROM generate_series(1, 3000) g;
INSERT INTO app."no key" SELECT g, CASE g % 6 WHEN 0 THEN 'null' WHEN 1 THEN E'it''s'' \\ (a, "b")' WHEN 2
  THEN 'ünï ✓ ' || g WHEN 3 THEN '' WHEN 4 THEN NULL ELSE 'r' || g END, CASE WHEN g % 50 = 0 THEN (SELECT
  string_agg(md5(random()::text || h || g), '') FROM generate_series(1, 400) h) END,
  timestamptz '2020-01-01 00:00:00.123456+00' + g * interval '1 hour', g / 3.0, g / 7.0
  FROM generate_series(1, 500) g;
INSERT INTO app."no key" SELECT * FROM app."no key" WHERE x <= 20;  -- duplicate rows
INSERT INTO app.ev SELECT g, date '2020-06-01' + g % 400, 'e' || g FROM generate_series(1, 3000) g;
INSERT INTO app.scratch SELECT g, 's' || g FROM generate_series(1, 1000) g;
INSERT INTO app.redo SELECT g, 'r' || g FROM generate_series(1, 1000) g;
SELECT setval('app.s', 42);
"""
PUBLISHED = ('app.items, app."Names", app.docs, app.pairs, app."no key", app.ev, app.scratch, app.redo, '
             'db_upgrade.test_barrier')


@dataclass
class Rep:
    s: object
    src: str
    tgt: str
    slot: str
    barrier: int = 0

    def source(self, *stmts: str) -> None:
        with psycopg.connect(self.src, autocommit=True) as c, c.transaction():
            for st in stmts:
                c.execute(st)

    def target(self, *stmts: str) -> None:
        with psycopg.connect(self.tgt, autocommit=True) as c:
            c.execute("SET session_replication_role = replica")  # as the apply writes
            with c.transaction():
                for st in stmts:
                    c.execute(st)

    def drained(self, timeout: float = 30) -> None:
        """Everything committed on the source so far is applied on the target (a
        barrier row, as the native engine's end position)."""
        self.barrier += 1
        with psycopg.connect(self.src, autocommit=True) as c:
            c.execute("INSERT INTO db_upgrade.test_barrier VALUES (%s)", (self.barrier,))
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.tgt, autocommit=True) as c:
            while not c.execute("SELECT 1 FROM db_upgrade.test_barrier WHERE n = %s", (self.barrier,)).fetchone():
                assert time.monotonic() < deadline, "the subscription did not apply the barrier"
                time.sleep(0.02)

    def miss(self, *stmts: str) -> None:
        """Commit on the source a transaction that the target never applies:
        the subscription skips exactly that transaction (its commit LSN)."""
        with psycopg.connect(self.tgt, autocommit=True) as c:
            c.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(sql.Identifier(self.slot)))
            while c.execute("SELECT 1 FROM pg_stat_subscription WHERE subname = %s AND pid IS NOT NULL",
                            (self.slot,)).fetchone():
                time.sleep(0.02)
        with psycopg.connect(self.src, autocommit=True) as c:
            probe = f"{self.slot}_probe"
            c.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput', true)", (probe,))
            c.execute("SET synchronous_commit = on")  # the test servers run it off; decoding reads flushed WAL
            with c.transaction():
                for st in stmts:
                    c.execute(st)
            rows = c.execute("SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, 'proto_version', "
                             "'1', 'publication_names', %s)", (probe, self.slot)).fetchall()
            begins = [m for m in (pgoutput.parse(r[0]) for r in rows) if isinstance(m, pgoutput.Begin)]
            assert len(begins) == 1, begins
            final = begins[0].final_lsn
        with psycopg.connect(self.tgt, autocommit=True) as c:
            ident = sql.Identifier(self.slot)
            c.execute(sql.SQL("ALTER SUBSCRIPTION {} SKIP (lsn = {})").format(
                ident, sql.Literal(f"{final >> 32:X}/{final & 0xFFFFFFFF:X}")))
            c.execute(sql.SQL("ALTER SUBSCRIPTION {} ENABLE").format(ident))
            deadline = time.monotonic() + 30
            while c.execute("SELECT subskiplsn <> '0/0' FROM pg_subscription WHERE subname = %s",
                            (self.slot,)).fetchone()[0]:
                assert time.monotonic() < deadline, "the subscription did not skip the transaction"
                time.sleep(0.02)
        self.drained()


def _wait_synced(tgt: str, slot: str, timeout: float = 600) -> None:  # 1 GB copies take minutes here
    deadline = time.monotonic() + timeout
    with psycopg.connect(tgt, autocommit=True) as c:
        while True:
            n, ready = c.execute("SELECT count(*), count(*) FILTER (WHERE srsubstate = 'r') FROM pg_subscription_rel r "
                                 "JOIN pg_subscription s ON s.oid = r.srsubid WHERE s.subname = %s", (slot,)).fetchone()
            if n and n == ready:
                return
            assert time.monotonic() < deadline, "the subscription's initial copy did not finish"
            time.sleep(0.1)


# Settings under which values print otherwise, for the target database (the
# apply's sessions, and so the triggers verify installs, run with them): what
# verify compares must not depend on them.
ODD_SETTINGS = {"TimeZone": "Asia/Kathmandu", "DateStyle": "SQL, DMY", "extra_float_digits": "0",
                "IntervalStyle": "sql_standard", "bytea_output": "escape"}


@contextmanager
def replicated(dbs, schema: str = SCHEMA, data: str = DATA, published: str = PUBLISHED, odd_target: bool = False,
               **settings):
    """Source and target with the same schema, the target kept in sync by a
    subscription (its own initial copy), and the run's settings. odd_target:
    the target database prints values otherwise (ODD_SETTINGS)."""
    src, tgt = dbs
    if odd_target:
        with psycopg.connect(tgt, autocommit=True) as c:
            for k, v in ODD_SETTINGS.items():
                c.execute(sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                    sql.Identifier(c.info.dbname), sql.Identifier(k), sql.Literal(v)))
    slot = "vb_" + secrets.token_hex(4)
    with psycopg.connect(src, autocommit=True) as c:
        c.execute(schema)
        c.execute(data)
        c.execute(f"CREATE PUBLICATION {slot} FOR TABLE {published}")
    with psycopg.connect(tgt, autocommit=True) as c:
        c.execute(schema)
        c.execute(sql.SQL("CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {} WITH (copy_data = true)").format(
            sql.Identifier(slot), sql.Literal(src), sql.Identifier(slot)))
    try:
        _wait_synced(tgt, slot)
        with psycopg.connect(src, autocommit=True) as c:  # the sequences, as steps/sequences.py sets them
            for name, last in c.execute("SELECT schemaname || '.' || sequencename, last_value FROM pg_sequences "
                                        "WHERE last_value IS NOT NULL").fetchall():
                with psycopg.connect(tgt, autocommit=True) as t:
                    t.execute("SELECT setval(%s, %s)", (name, last))
        s = load_settings(source_pguri=src, target_pguri=tgt, slot_name=slot, run_id=slot, poll_interval=0.5,
                          **settings)
        state.begin(s)
        state.record(s, stream_started_at=state.now())
        rep = Rep(s, src, tgt, slot)
        rep.drained()
        yield rep
    finally:
        try:
            verify.teardown(load_settings(source_pguri=src, target_pguri=tgt, slot_name=slot, run_id=slot))
        finally:
            with psycopg.connect(tgt, autocommit=True) as c:
                c.execute(sql.SQL("DROP SUBSCRIPTION IF EXISTS {}").format(sql.Identifier(slot)))
            with psycopg.connect(src, autocommit=True) as c:
                left = c.execute("SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE %s",
                                 (slot + "%",)).fetchall()
                assert not left, f"slots left on the source: {left}"


@pytest.fixture(scope="module")
def shared(pair):
    """One prepared pair for the tests below: each leaves it equal again (it
    heals what it broke, which also shows that verify then passes)."""
    name = "t_verify_shared_" + secrets.token_hex(2)
    dbs = create_database(pair.source.uri(), name), create_database(pair.target.uri(), name)
    with replicated(dbs, odd_target=True) as r:
        with psycopg.connect(r.tgt) as c:  # the apply's sessions, and ours in the tests, print values otherwise
            assert c.execute("SELECT current_setting('DateStyle')").fetchone()[0] == "SQL, DMY"
        assert verify.prepare(r.s)
        yield r


@pytest.fixture
def rep(shared):
    verify.round(shared.s)  # whatever an earlier test left is compared
    yield shared
    shared.drained()
    assert verify.verify(shared.s).ok, "the test left the pair different"


def test_rounds_compare_only_the_changed_rows_by_key(rep):
    """Every kind of key and change: a round re-checks exactly the keys that
    changed, and the final check only what changed after it."""
    rep.source("UPDATE app.items SET v = 'changed' WHERE id IN (5, 6, 7)",
               "UPDATE app.items SET n = 1.000000000001 WHERE id = 500",  # a TOASTed row, through another column
               "UPDATE app.items SET id = -11 WHERE id = 11",  # a key change: old and new key
               "DELETE FROM app.items WHERE id = 12")
    rep.source(r"""UPDATE app."Names" SET v = 'x' WHERE k = 'name 3 \ ''q'''""",
               "DELETE FROM app.docs WHERE id = md5('7')::uuid",
               "UPDATE app.docs SET at = at + interval '1 microsecond' WHERE id = md5('8')::uuid",
               "UPDATE app.pairs SET b = 100000 WHERE a = 'a1' AND b = 1",
               "UPDATE app.ev SET at = '2022-02-02' WHERE id = 10",  # moves a row to another partition
               "INSERT INTO app.ev VALUES (90000, '2025-01-01', 'new')")
    rep.drained()
    r = verify.round(rep.s)
    # items 5 6 7 500 11 -11 12; Names 1; docs 2; pairs 2 (old and new key); ev_a 1 (moved out), ev_b 2
    assert (r.keys_checked, r.keys_differing) == (15, 0), r
    assert r.decoded_changes == 13  # the move between partitions is a DELETE and an INSERT
    rep.source("""UPDATE app."no key" SET y = 'z' WHERE x = 3""", "UPDATE app.items SET f = 'NaN' WHERE id = 13")
    rep.drained()
    report = verify.verify(rep.s)
    assert report.ok and report.method == "bounded"
    assert report.keys_rechecked == 1 and report.whole_tables == [], report  # the keyless table: by checksum
    assert report.by_checksum == ['app."no key"'] and report.keyless_rows == 4  # x = 3 twice: old and new rows
    assert {t.table: t.how for t in report.tables}["app.items"] == "keys"


# A transaction the target never applies, then the same change made on the
# target (as the apply would): verify fails on the first, passes after.
@pytest.mark.parametrize("change, table", [
    ("UPDATE app.items SET v = 'x' WHERE id = 12000", "app.items"),
    ("UPDATE app.items SET v = 'toast kept' WHERE id = 1000", "app.items"),  # a TOASTed row, through another column
    ("UPDATE app.items SET id = 50000 WHERE id = 17", "app.items"),  # a key change
    (r"""DELETE FROM app."Names" WHERE k = 'name 9 \ ''q'''""", 'app."Names"'),  # a text key
    ("UPDATE app.docs SET body = '{}' WHERE id = md5('9')::uuid", "app.docs"),  # a uuid key
    ("UPDATE app.pairs SET v = 'w' WHERE a = 'a2' AND b = 2", "app.pairs"),  # a composite key
    ("INSERT INTO app.ev VALUES (77777, '2024-04-04', 'late')", "app.ev_b"),  # a partition
    ("""UPDATE app."no key" SET y = 'z' WHERE x = 4""", 'app."no key"'),  # a table without a key
    ("TRUNCATE app.ev_a", "app.ev_a"),  # a partition truncated
], ids=["keyed", "toasted", "key-change", "text-key", "uuid-key", "composite-key", "partition", "without-key",
        "truncate"])
def test_a_source_change_the_target_never_applied_is_caught(rep, change, table):
    rep.miss(change)
    with pytest.raises(StepError, match=re.escape(table)):
        verify.verify(rep.s)
    rep.target(change)


NO_KEY = 'app."no key"'


def keyless_changes(x: int, dup: int, toasted: int) -> dict[str, str]:
    """Each kind of change of the keyless table, on rows of its own (x: three rows with one copy each;
    dup: a row with two copies, 5-20; toasted: a row with a TOASTed value, a multiple of 50)."""
    return {
        "insert": rf"""INSERT INTO app."no key" VALUES ({9000 + x}, E'new \\ "row", (1)', NULL,
                      '2024-02-29 23:59:59.999999+00', -0.0, 1.000000000001)""",
        "update": f"""UPDATE app."no key" SET f = f + 1 WHERE x = {x}""",
        "delete": f"""DELETE FROM app."no key" WHERE x = {x + 1}""",
        "duplicate-insert": f"""INSERT INTO app."no key" SELECT * FROM app."no key" WHERE x = {x + 2}""",
        "duplicate-delete": f"""DELETE FROM app."no key" WHERE ctid = (SELECT min(ctid) FROM app."no key"
                                WHERE x = {dup})""",
        "toast-unchanged": f"""UPDATE app."no key" SET y = 'toast kept' WHERE x = {toasted}""",  # `big` not sent
    }


MISSED = keyless_changes(40, 10, 300)


def decoded(rep: Rep, *stmts: str) -> list:
    """Run stmts on the source in one transaction and return its pgoutput messages (a probe slot of the
    test's own): shows what the tracking slot is given, e.g. that an unchanged TOASTed value is not sent."""
    with psycopg.connect(rep.src, autocommit=True) as c:
        probe = f"{rep.slot}_probe"
        c.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput', true)", (probe,))
        c.execute("SET synchronous_commit = on")
        with c.transaction():
            for st in stmts:
                c.execute(st)
        rows = c.execute("SELECT data FROM pg_logical_slot_get_binary_changes(%s, NULL, NULL, 'proto_version', "
                         "'1', 'publication_names', %s)", (probe, rep.slot)).fetchall()
    return [pgoutput.parse(r[0]) for r in rows]


def count(uri: str, table: str = NO_KEY) -> int:
    with psycopg.connect(uri) as c:
        return c.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_keyless_changes_are_bounded_by_a_checksum_kept_from_them(rep):
    """Inserts, updates and deletes of a keyless table, duplicates among them and a FULL-identity UPDATE
    whose TOASTed value is not decoded: the rounds and the final check compare the table by its checksum
    (source: the decoded rows rebuilt and hashed; target: the deltas its triggers record) and never re-read
    it. A wrong hash of any decoded row would fail this verify."""
    messages = decoded(rep, """UPDATE app."no key" SET f = f * 2 WHERE x = 150""")  # a TOASTed row
    updates = [m for m in messages if isinstance(m, pgoutput.Update)]
    assert len(updates) == 1 and pgoutput.UNCHANGED in updates[0].new  # 'u': the old row carries it
    rep.source(*keyless_changes(30, 9, 100).values())
    rep.source("""UPDATE app."no key" SET at = at + interval '1 microsecond', n = n / 3 WHERE x BETWEEN 200 AND 260""",
               """INSERT INTO app."no key" (x, y) VALUES (9002, ''), (9002, ''), (9003, NULL), (9004, ' (,)\\"')""")
    rep.drained()
    r = verify.round(rep.s)
    assert r.keyless_rows > 0 and r.whole_pending == [], r
    rep.source("""UPDATE app."no key" SET y = y || '.' WHERE x IN (50, 250)""",  # 50: a TOASTed row
               """DELETE FROM app."no key" WHERE x = 9002""")
    rep.drained()
    report = verify.verify(rep.s)
    assert report.ok and report.whole_tables == [] and report.by_checksum == [NO_KEY], report
    assert report.keyless_rows == 2 * 2 + 2  # 2 updated rows: old and new; 2 deleted
    t = next(t for t in report.tables if t.table == NO_KEY)
    assert t.how == "checksum" and t.source_rows == t.target_rows == count(rep.src) == count(rep.tgt)


@pytest.mark.parametrize("change", list(MISSED.values()), ids=list(MISSED))
def test_a_keyless_change_the_target_never_applied_is_caught_by_its_checksum(rep, change, capsys):
    """The kept checksums disagree; the table is then compared whole, which names the difference."""
    rep.miss(change)
    with pytest.raises(StepError, match=re.escape(NO_KEY)):
        verify.verify(rep.s)
    v = state.load(rep.s).verify
    assert v["mismatched"] == [NO_KEY] and v["by_checksum"] == [] and v["whole_tables"] == [NO_KEY], v
    assert "its kept checksums disagree" in capsys.readouterr().err
    rep.target(change)


@pytest.mark.parametrize("wrong, heal", [
    ("""INSERT INTO app."no key" (x, y) VALUES (-1, 'extra')""", """DELETE FROM app."no key" WHERE x = -1"""),
    ("""INSERT INTO app."no key" SELECT * FROM app."no key" WHERE x = 33""",  # a duplicate on the target only
     """DELETE FROM app."no key" WHERE ctid = (SELECT max(ctid) FROM app."no key" WHERE x = 33)"""),
    ("""UPDATE app."no key" SET n = n + 0.000000000001 WHERE x = 34""",
     """UPDATE app."no key" SET n = n - 0.000000000001 WHERE x = 34"""),
], ids=["extra-row", "extra-duplicate", "changed-digit"])
def test_a_keyless_row_changed_on_the_target_only_is_caught_by_its_checksum(rep, wrong, heal):
    verify.round(rep.s)  # a round consumes the target's deltas before it: the difference is in the kept sums
    rep.target(wrong)
    verify.round(rep.s)
    with pytest.raises(StepError, match=re.escape(NO_KEY)):
        verify.verify(rep.s)
    v = state.load(rep.s).verify
    assert v["mismatched"] == [NO_KEY] and v["whole_tables"] == [NO_KEY] and v["by_checksum"] == [], v
    rep.target(heal)


def test_kept_checksums_that_are_wrong_on_equal_tables_do_not_fail_the_cutover(rep, capsys):
    """verify's own bookkeeping off by a row (the tables equal): the whole comparison, exact
    on its own, decides, and the log says which kept checksum was wrong."""
    verify.round(rep.s)
    off_by = """UPDATE db_upgrade.verify_tables SET src_sums = (split_part(src_sums, ' ', 1)::bigint + %s)
                || ' ' || split_part(src_sums, ' ', 2) || ' ' || split_part(src_sums, ' ', 3) WHERE rel = %s"""
    with psycopg.connect(rep.tgt, autocommit=True) as c:
        assert c.execute(off_by, (1, NO_KEY)).rowcount == 1
    try:
        report = verify.verify(rep.s)
        err = capsys.readouterr().err
        assert report.ok and report.whole_tables == [NO_KEY], report
        assert "wrong on the source and right on the target (verify's bookkeeping, not the data" in err, err
    finally:
        with psycopg.connect(rep.tgt, autocommit=True) as c:
            c.execute(off_by, (-1, NO_KEY))


def test_a_truncated_keyless_table_is_read_whole_then_kept_by_checksum_again(rep, capsys):
    rep.source('CREATE TEMP TABLE keep ON COMMIT DROP AS SELECT * FROM app."no key"', 'TRUNCATE app."no key"',
               'INSERT INTO app."no key" SELECT * FROM keep')
    rep.drained()
    report = verify.verify(rep.s)  # the TRUNCATE is decoded in the window: the table is re-read whole
    assert report.ok and report.whole_tables == [NO_KEY] and report.by_checksum == [], report
    assert "truncated on the source" in capsys.readouterr().err
    r = verify.round(rep.s)  # its checksum is taken again in a round
    assert NO_KEY in r.baseline and r.baseline_left == 0, r
    assert "its checksum is taken again" in capsys.readouterr().err
    rep.source("""UPDATE app."no key" SET y = 'after' WHERE x = 35""")
    rep.drained()
    report = verify.verify(rep.s)
    assert report.ok and report.whole_tables == [] and report.by_checksum == [NO_KEY], report


def test_a_difference_found_by_a_round_stays_until_verify(rep):
    """Changes tracked before the freeze count as changed: a round that finds a
    row different keeps it pending; the final check fails on it."""
    rep.miss("UPDATE app.items SET v = 'lost' WHERE id = 15000")
    r = verify.round(rep.s)
    assert (r.keys_checked, r.keys_differing) == (1, 1), r
    assert verify.round(rep.s).keys_differing == 1  # compared again, still different
    rep.source("UPDATE app.items SET v = 'seen' WHERE id = 2")
    rep.drained()
    with pytest.raises(StepError, match="app.items"):
        verify.verify(rep.s)
    assert state.load(rep.s).verify["differing_keys"] == {"app.items": [["15000"]]}
    rep.target("UPDATE app.items SET v = 'lost' WHERE id = 15000")


def test_a_change_on_the_target_only_in_an_untouched_range_is_caught(rep):
    rep.source("UPDATE app.items SET v = 'changed' WHERE id = 5")
    rep.drained()
    verify.round(rep.s)
    rep.target("UPDATE app.items SET v = v || '!' WHERE id = 19000")  # far from id 5: never changed on the source
    with pytest.raises(StepError, match="app.items"):
        verify.verify(rep.s)
    rep.target("UPDATE app.items SET v = left(v, -1) WHERE id = 19000")


def test_a_target_table_created_again_after_the_preparation_is_compared_whole(rep):
    with psycopg.connect(rep.tgt, autocommit=True) as c:  # as a copy started over would: no trigger, one row short
        c.execute("CREATE TABLE app.redo2 (LIKE app.redo INCLUDING ALL)")
        c.execute("INSERT INTO app.redo2 SELECT * FROM app.redo WHERE id <> 900")
        c.execute("DROP TABLE app.redo")
        c.execute("ALTER TABLE app.redo2 RENAME TO redo")
        c.execute("ALTER INDEX app.redo2_pkey RENAME TO redo_pkey")
    with pytest.raises(StepError, match="app.redo"):
        verify.verify(rep.s)
    assert "app.redo" in state.load(rep.s).verify["whole_tables"]
    rep.target("INSERT INTO app.redo VALUES (900, 'r900')")
    assert verify.round(rep.s).baseline == ["app.redo"]  # its triggers are back and it was compared again


def test_truncate_restarts_the_tables_baseline(rep):
    rep.source("TRUNCATE app.scratch", "INSERT INTO app.scratch VALUES (1, 'after')")
    rep.drained()
    r = verify.round(rep.s)
    assert r.baseline == ["app.scratch"] and r.baseline_left == 0, r
    report = verify.verify(rep.s)
    assert report.ok and report.whole_tables == [], report


def test_without_a_preparation_everything_is_compared(rep):
    s = rep.s.model_copy(update={"run_id": rep.s.run_id + "_unprepared"})  # a run that prepared nothing
    state.begin(s)
    try:
        report = verify.verify(s)
        assert report.ok and report.method == "full" and len(report.whole_tables) == 9
        rep.miss("UPDATE app.docs SET body = '[]' WHERE id = md5('3')::uuid")
        with pytest.raises(StepError, match="app.docs"):
            verify.verify(s)
        rep.target("UPDATE app.docs SET body = '[]' WHERE id = md5('3')::uuid")
    finally:
        state.forget(s)


def test_500_rows_changed_in_the_last_second(rep, capsys):
    """The physical floor of the window: ~500 rows changed just before the
    freeze, re-checked by key (measured, printed; not a timed assertion)."""
    rep.source("UPDATE app.items SET v = v || '.' WHERE id BETWEEN 1 AND 20000 AND id % 40 = 0")  # 500 rows, TOASTed ones among them
    rep.drained()
    t = time.monotonic()
    report = verify.verify(rep.s)
    took = time.monotonic() - t
    assert report.ok and report.keys_rechecked == 500 and report.whole_tables == []
    with capsys.disabled():
        print(f"\nverify: 500 changed rows re-checked by key in {took * 1000:.0f} ms ("
              + ", ".join(f"{k} {v * 1000:.0f}" for k, v in report.timings.items()) + " ms)")


def test_prepare_is_safe_to_stop_and_run_again(dbs, monkeypatch):
    """The state is in the databases: a preparation stopped half-way resumes."""
    from steps.verify import plan, rounds

    with replicated(dbs) as r:
        stop = threading.Event()
        monkeypatch.setattr(plan, "CHUNK_BYTES", 64 * 1024)  # many chunks
        real = rounds.run

        def one_then_stop(*a, **kw):
            out = real(*a, **kw)
            stop.set()
            return out

        monkeypatch.setattr(rounds, "run", one_then_stop)
        assert not verify.prepare(r.s, stop)
        monkeypatch.setattr(rounds, "run", real)
        assert not state.load(r.s).verify_prepared_at
        st = verify.status(r.s)
        assert not st.prepared and st.baseline_left, st
        r.source("UPDATE app.items SET v = 'during' WHERE id = 3")
        assert verify.prepare(r.s)  # resumes where it stopped
        st = verify.status(r.s)
        assert st.prepared and not st.baseline_left
        assert st.without_key[0][0] == 'app."no key"' and st.without_key[0][1] > 0
        r.drained()
        assert verify.verify(r.s).ok
        verify.teardown(r.s)  # as the cutover does, before the switch
        verify.teardown(r.s)  # idempotent
        assert verify.verify(r.s).method == "full"  # a cutover that gave the writes back: the tracking is gone
        with psycopg.connect(r.tgt) as c:
            assert c.execute("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'db_upgrade_verify%'").fetchone()[0] == 0
            assert c.execute("SELECT to_regclass('db_upgrade.verify_pending')").fetchone()[0] is None


def test_rehearsal_runs_one_bounded_round_and_counts_with_drift(rep):
    s = rep.s.model_copy(update={"mode": "rehearsal"})
    rep.source("INSERT INTO app.scratch SELECT g, 'new' FROM generate_series(5000, 5099) g")  # the source keeps writing
    report = verify.verify(s)
    assert report.ok and report.method == "rehearsal" and report.round_seconds is not None
    assert {t.table for t in report.tables} >= {"app.items", "app.scratch"}
    assert "bounded round" in report.notes[0]


def test_an_unreachable_source_is_one_line_and_leaves_nothing(pair, dbs, tmp_path):
    import subprocess

    from tests.conftest import DB_UPGRADE, step_env

    src, tgt = dbs
    dead = src.replace(f"port={pair.source.port}", "port=1")
    env = step_env(dead, tgt, tmp_path, DB_UPGRADE_SLOT_NAME="vb_dead")
    proc = subprocess.run([DB_UPGRADE, "step", "verify-prepare"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "source" in errors[0] and pair.source.password not in proc.stderr, proc.stderr
    with psycopg.connect(tgt) as c:
        assert c.execute("SELECT to_regclass('db_upgrade.verify_pending')").fetchone()[0] is None
