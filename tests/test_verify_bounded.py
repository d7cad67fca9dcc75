"""verify's bounded mode (prepare before the freeze, re-check what changed) on
real servers, with pgcopydb's apply played by hand: a replication origin on the
target and changes written there with session_replication_role = replica."""

import psycopg
import pytest

from steps import state, verify
from steps.errors import StepError
from steps.settings import load_settings

SCHEMA = """
CREATE SCHEMA app;
CREATE TABLE app.items (id bigint PRIMARY KEY, v text NOT NULL);
INSERT INTO app.items SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, 20000) g;
CREATE TABLE app."no key" (x int, y text);
ALTER TABLE app."no key" REPLICA IDENTITY FULL;
INSERT INTO app."no key" SELECT g, 'r' || g FROM generate_series(1, 500) g;
CREATE TABLE app.ev (id bigint, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
CREATE TABLE app.ev_a PARTITION OF app.ev FOR VALUES FROM ('2000-01-01') TO ('2030-01-01');
INSERT INTO app.ev SELECT g, date '2020-01-01' + g % 300 FROM generate_series(1, 3000) g;
ANALYZE;
"""


@pytest.fixture
def prepared_pair(pair, dbs, tmp_path, monkeypatch):
    src, tgt = dbs
    for uri in dbs:
        with psycopg.connect(uri, autocommit=True) as c:
            c.execute(SCHEMA)
    workdir = tmp_path / "work"
    state.update(workdir, follow_started_at=state.now())
    slot = "vb_" + tmp_path.name[-12:].lower().replace("-", "_")
    s = load_settings(source_pguri=src, target_pguri=tgt, dir=workdir, slot_name=slot)
    with psycopg.connect(tgt, autocommit=True) as c:
        c.execute("SELECT pg_replication_origin_create(%s)", (slot,))
        c.execute("SELECT pg_replication_origin_advance(%s, 'FFFFFFFF/0')", (slot,))
    monkeypatch.setattr(verify, "BUCKET_PAGES", 20)  # several buckets on a small table
    rec = verify.prepare(s)
    assert rec is not None and verify.prepared(s) is not None
    assert len(rec["source"]["app.items"]) > 3, rec["specs"]
    yield s, src, tgt
    verify._teardown(s)
    with psycopg.connect(tgt, autocommit=True) as c:
        c.execute("SELECT pg_replication_origin_drop(%s)", (slot,))


def both(src: str, tgt: str, stmt: str, on_target: bool = True) -> None:
    with psycopg.connect(src, autocommit=True) as c:
        # The test servers run synchronous_commit=off; decoding sees only flushed
        # WAL, so flush at commit to make "tracked before the freeze" deterministic.
        c.execute("SET synchronous_commit = on")
        c.execute(stmt)
    if on_target:
        with psycopg.connect(tgt, autocommit=True) as c:
            c.execute("SET session_replication_role = replica")  # as pgcopydb applies
            c.execute(stmt)


def test_changes_applied_on_both_sides_verify_with_few_ranges(prepared_pair):
    s, src, tgt = prepared_pair
    both(src, tgt, "UPDATE app.items SET v = 'changed' WHERE id = 5")
    both(src, tgt, "INSERT INTO app.items VALUES (50000, 'new')")
    both(src, tgt, "DELETE FROM app.ev_a WHERE id = 7")  # pgcopydb writes to partitions
    report = verify.verify(s)
    assert report.ok
    rec = state.read(s.workdir())
    assert rec["verify_rechecked_tables"] == []
    assert 0 < rec["verify_rechecked_buckets"] <= 4
    assert verify.prepared(s) is None  # used once; the slot and triggers are gone
    with psycopg.connect(src) as c:
        assert c.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s",
                         (verify.tracking_slot(s),)).fetchone()[0] == 0


def test_a_change_on_the_target_only_in_an_untouched_range_is_caught(prepared_pair):
    s, src, tgt = prepared_pair
    both(src, tgt, "UPDATE app.items SET v = 'changed' WHERE id = 5")
    with psycopg.connect(tgt, autocommit=True) as c:
        c.execute("SET session_replication_role = replica")
        c.execute("DELETE FROM app.items WHERE id = 19000")  # far from id 5: another bucket
    with pytest.raises(StepError, match="app.items"):
        verify.verify(s)


@pytest.mark.parametrize("change, table", [
    ("UPDATE app.items SET v = 'x' WHERE id = 12000", "app.items"),  # a keyed table's change
    ("UPDATE app.\"no key\" SET y = 'z' WHERE x = 3", "no key"),  # a table without a key
    ("TRUNCATE app.ev_a", "app.ev_a"),  # a partition truncated
], ids=["keyed", "without-key", "truncate"])
def test_a_source_change_that_never_reached_the_target_is_caught(prepared_pair, change, table):
    s, src, tgt = prepared_pair
    both(src, tgt, change, on_target=False)
    with pytest.raises(StepError, match=table):
        verify.verify(s)


def test_a_target_table_created_again_after_the_preparation_is_compared_whole(prepared_pair):
    s, src, tgt = prepared_pair
    with psycopg.connect(tgt, autocommit=True) as c:  # as a copy started over would: no trigger, one row short
        c.execute("CREATE TABLE app.items2 (LIKE app.items INCLUDING ALL)")
        c.execute("INSERT INTO app.items2 SELECT * FROM app.items WHERE id <> 19000")
        c.execute("DROP TABLE app.items")
        c.execute("ALTER TABLE app.items2 RENAME TO items")
        c.execute("ALTER INDEX app.items2_pkey RENAME TO items_pkey")
    with pytest.raises(StepError, match="app.items"):
        verify.verify(s)


def test_changes_tracked_before_the_freeze_count_as_changed(prepared_pair):
    s, src, tgt = prepared_pair
    both(src, tgt, "UPDATE app.items SET v = 'x' WHERE id = 12000", on_target=False)  # never applied
    assert verify.track(s)  # folded into the record, the slot advanced past it
    with psycopg.connect(src) as c:
        assert c.execute("SELECT count(*) FROM pg_logical_slot_peek_changes(%s, NULL, NULL) "
                         "WHERE data LIKE 'table app.items%%'", (verify.tracking_slot(s),)).fetchone()[0] == 0
    both(src, tgt, "UPDATE app.items SET v = 'y' WHERE id = 5")
    with pytest.raises(StepError, match="app.items"):
        verify.verify(s)
