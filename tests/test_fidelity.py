"""The data-fidelity suite (issue 11, item 4; docs/fidelity.md).

The set and the writer (local/fidelity.py) hold what real databases hold and
what pgcopydb 0.17's change stream is measured to corrupt. They run through an
upgrade with each engine, the writer writing during the copy and the change
stream, and the target is compared with the source independently of
steps.verify: every table's sorted row text hashed, and every value, so that a
failure names the table, the key, the column and both values.

- native: the upgrade completes and every value is equal.
- pgcopydb-follow: the full set stops its apply (exit 12) and a reduced set
  reaches verify, which fails and names the corrupted tables. Both are the
  documented expected outcome, asserted as such: when pgcopydb changes, these
  tests fail and say what changed.
"""

from __future__ import annotations

import os
import random
import re
import secrets
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from local import fidelity as f
from tests.conftest import DB_UPGRADE, step_env

# ---------------------------------------------------------------- fast: the pure parts


def test_awkward_values_cover_what_change_streams_get_wrong():
    values = set(f.AWKWARD_TEXT)
    for v in ("null", "NULL", "nullable", "null:1", "y'", "it's'", "", None, "line1\nline2", "tab\there"):
        assert v in values, v
    assert any("\\" in v for v in values if v)
    assert any(ord(c) > 0xFFFF for v in values if v for c in v)  # emoji
    assert any("\u0300" <= c <= "\u036f" for v in values if v for c in v)  # combining marks
    assert any("\u0590" <= c <= "\u05ff" for v in values if v for c in v)  # right-to-left
    assert "NaN" in f.NUMERIC_SPECIAL and "Infinity" in f.NUMERIC_SPECIAL and "-Infinity" in f.NUMERIC_SPECIAL
    assert 7.180783208205241 in f.FLOAT8_SPECIAL and "16.000000000016" in f.NUMERIC_30_12_SPECIAL
    assert all(op in f.OPERATIONS for op in ("docs_touch", "docs_note", "reading_move", "ledger_update"))


def test_generated_values_keep_full_precision_and_do_not_compress():
    import zlib

    rng = random.Random(1)
    x = f.full_precision_float(rng)
    assert len(repr(abs(x)).replace(".", "").lstrip("0").split("e")[0]) >= 15
    assert f.exact_real(f.exact_real(0.1)) == f.exact_real(0.1) != 0.1
    assert len(f.numeric_30_12(rng).split(".")[1]) == 12
    text = f.random_text(rng).encode()
    assert len(text) >= f.TOAST_BYTES and len(zlib.compress(text)) > 0.7 * len(text)
    assert f.random_text(random.Random(3)) == f.random_text(random.Random(3))  # seeded: reproducible


def test_profiles_leave_out_only_what_stops_pgcopydb():
    full, reduced = f.FULL, f.PGCOPYDB_017_COMPLETES
    assert full.doc_bytes() >= f.TOAST_BYTES and reduced.doc_bytes() < 2000
    assert "it's complicated" in full.enum_labels() and "it's complicated" not in reduced.enum_labels()
    assert "null" in full.regions() and "null" not in reduced.regions()
    assert "null" in reduced.enum_labels()  # 'null' text in a nullable column stays: it is corrupted, not fatal


@pytest.mark.parametrize("source,target,kind", [
    ("x" * 200, "unchanged-toast-datum", "unchanged-toast-datum"),
    ("\\x" + "ab" * 100, "\\x" + b"unchanged-toast-datum".hex(), "unchanged-toast-datum"),
    ("null", None, "null text"),
    ("nullable", None, "null text"),
    ("null:1", None, "null text"),
    ("$$", None, "value became NULL"),
    ("", None, "value became NULL"),
    ("y'", "y", "trailing quote"),
    ("it's''", "it's", "trailing quote"),
    ('{"q": "it\'s\'"}', '{"q": "it\'\'s\'\'"}', "doubled quotes"),
    ("7.180783208205241", "7.180783", "numeric precision"),
    ("16.000000000016", "16.000000000000", "numeric precision"),
    ("1.7976931348623157e+308", "1.797693e+308", "numeric precision"),
    ("0.000000000001", "0.000000", "numeric precision"),
    ("NaN", "0", "other"),
    ("-478957183245544280.33756586341138696023", "-478957183245544280.33756586341138696123", "other"),
    ("abc", "abd", "other"),
    (None, "x", "other"),
])
def test_classify_names_each_known_corruption(source, target, kind):
    assert f.classify(source, target) == kind


def test_compare_rows_names_table_key_column_and_both_values():
    t = f.Table("texts", ("id",), ("id", "label", "value"))
    src = {"id=1": ("1", "a", "null"), "id=2": ("2", "b", "y'"), "id=3": ("3", "c", "x"), "id=4": ("4", "d", "")}
    tgt = {"id=1": ("1", "a", None), "id=2": ("2", "b", "y"), "id=4": ("4", "d", ""), "id=5": ("5", "e", "z")}
    diffs = f.compare_rows(t, src, tgt)
    assert [(d.key, d.column, d.kind) for d in diffs] == [
        ("id=1", "value", "null text"), ("id=2", "value", "trailing quote"),
        ("id=3", "(row)", "missing row"), ("id=5", "(row)", "extra row")]
    assert str(diffs[0]) == "texts id=1 value: source 'null' -> target NULL [null text]"
    assert str(diffs[1]) == "texts id=2 value: source \"y'\" -> target 'y' [trailing quote]"
    assert f.compare_rows(t, src, dict(src)) == []


def test_compare_rows_pairs_keyless_rows_and_counts_duplicates():
    t = f.Table("ledger", (), ("ticket", "who", "amount", "memo"))
    row = ("1", "seed", "0.1", "it's'")
    dup = ("2", "seed", "0.2", "a")
    diffs = f.compare_rows(t, Counter([row, dup, dup]), Counter([("1", "seed", "0.1", "it's"), dup]))
    assert [(d.key, d.column, d.kind) for d in diffs] == [
        ("ticket=1, who=seed", "memo", "trailing quote"), ("ticket=2, who=seed", "(row)", "missing row")]
    assert f.compare_rows(t, Counter([row, dup, dup]), Counter([dup, row, dup])) == []


def test_long_values_are_previewed_but_compared_whole():
    t = f.Table("docs", ("id",), ("id", "body"))
    body = "it's' " + "x" * 10_000 + "'"
    (d,) = f.compare_rows(t, {"id=1": ("1", body)}, {"id=1": ("1", body[:-1])})
    assert d.kind == "trailing quote" and d.source.endswith("(10007 chars)") and len(d.source) < 100


def test_queries_quote_every_identifier():
    q = f.values_query(f.Table('we"ird', ("id", "re gion"), ("id", "re gion", "it's"))).as_string(None)
    assert '"fid"."we""ird"' in q and '"re gion"' in q and "\"it's\"" in q and "'re gion'" in q
    assert f.values_query(f.Table("ledger", (), ("a", "b"))).as_string(None) == \
        'SELECT "a"::text, "b"::text FROM ONLY "fid"."ledger"'
    assert "FROM ONLY" in f.digest_query("docs").as_string(None)


def test_freeze_sql_revokes_and_restores_the_app_role(tmp_path):
    readonly, unfreeze = f.freeze_sql_files(tmp_path)
    role = '"fid ""app"" writer"'
    assert f"REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA \"fid\" FROM {role}" in readonly.read_text()
    assert f"GRANT TRUNCATE ON \"fid\".scratch TO {role}" in unfreeze.read_text()


# ---------------------------------------------------------------- slow: real servers

def _during_follow(app: str) -> dict:
    """What the writer's steady stream does not: TRUNCATE, a transaction over a WAL
    segment, one over logical_decoding_work_mem."""
    f.truncate_scratch(app)
    first, last = f.segment_spanning_transaction(app)
    f.many_changes_transaction(app)
    return {"segments": (first, last)}


@pytest.mark.slow
def test_the_set_and_writer_survive_a_dump_and_restore_exactly(pair, dbs):
    """The set, written to by the writer, copied by pg_dump | pg_restore (17):
    the comparison finds nothing; then one corrupted value per class is named."""
    from steps.pgcopydb import bwrap_prefix, rootfs

    src, tgt = dbs
    f.load(src)
    f.ensure_app_role(pair.target.uri())
    writer = f.Writer(f.app_uri(src), rate=60).start()
    try:
        time.sleep(2)
        extra = _during_follow(f.app_uri(src))
        time.sleep(1)
    finally:
        stats = writer.stop()
    assert stats.refused == 0, stats.errors
    assert set(stats.ops) == set(f.OPERATIONS), f"operations never run: {set(f.OPERATIONS) - set(stats.ops)}"
    assert extra["segments"][0] != extra["segments"][1], "the big transaction stayed in one WAL segment"
    sizes = f.toast_sizes(src)
    assert all(v >= f.TOAST_BYTES for v in sizes.values()), f"TOASTed values compressed: {sizes}"

    bwrap, bindir = bwrap_prefix(rootfs(), []), "/usr/lib/postgresql/17/bin"

    def without_password(uri: str) -> tuple[str, dict]:  # passwords in the environment, not in argv
        params = conninfo_to_dict(uri)
        return make_conninfo(**{k: v for k, v in params.items() if k != "password"}), \
            {**os.environ, "PGPASSWORD": params.get("password", "")}

    (src_conninfo, src_env), (tgt_conninfo, tgt_env) = without_password(src), without_password(tgt)
    # -Z0: compressing random data costs seconds and saves nothing.
    dump = subprocess.Popen([*bwrap, f"{bindir}/pg_dump", "-Fc", "-Z0", "-d", src_conninfo], stdout=subprocess.PIPE,
                            env=src_env)
    restore = subprocess.run([*bwrap, f"{bindir}/pg_restore", "--exit-on-error", "-d", tgt_conninfo],
                             stdin=dump.stdout, capture_output=True, text=True, env=tgt_env, check=False)
    assert dump.wait() == 0 and restore.returncode == 0, restore.stderr[-2000:]

    diffs = f.differences(src, tgt)
    assert diffs == [], f.summary(diffs)
    assert f.digests(src) == f.digests(tgt)
    assert f.sequences(src) == f.sequences(tgt) and f.sequences_behind(src, tgt) == {}
    assert set(f.digests(tgt)) == {"docs", "texts", "numbers", "misc", "readings_eu", "readings_us", "readings_other",
                                   "ledger", "scratch", "bulk"}  # each partition on its own

    # The comparison can fail, and says where and how.
    corruptions = {
        "unchanged-toast-datum": "UPDATE fid.docs SET body = 'unchanged-toast-datum' WHERE id = (SELECT min(id) FROM fid.docs)",
        "null text": "UPDATE fid.texts SET value = NULL WHERE id = (SELECT min(id) FROM fid.texts WHERE value = 'nullable')",
        "trailing quote": "UPDATE fid.texts SET value = 'y' WHERE id = (SELECT min(id) FROM fid.texts WHERE value = 'y''')",
        "numeric precision": "UPDATE fid.numbers SET n30 = round(n30, 6) WHERE n30 = 16.000000000016",
        "missing row": "DELETE FROM fid.readings_eu WHERE id = (SELECT min(id) FROM fid.readings_eu)",
        "value became NULL": "UPDATE fid.misc SET span = NULL WHERE id = (SELECT id FROM fid.misc WHERE span IS NOT NULL ORDER BY id LIMIT 1)",
    }
    with psycopg.connect(tgt, autocommit=True) as conn:
        for stmt in corruptions.values():
            assert conn.execute(stmt).rowcount >= 1, stmt
        conn.execute("DELETE FROM fid.ledger WHERE ctid = (SELECT min(ctid) FROM fid.ledger)")
    diffs = f.differences(src, tgt)
    found = f.classes(diffs)
    assert set(corruptions) <= set(found), f.summary(diffs)
    assert [d.table for d in found["unchanged-toast-datum"]] == ["docs"]
    assert found["null text"][0].column == "value" and found["null text"][0].source == "nullable"
    assert any(d.table == "ledger" for d in found["missing row"])
    assert f.digests(src) != f.digests(tgt)


# ---------------------------------------------------------------- the upgrade, through each engine

@dataclass
class Run:
    source: str
    target: str
    env: dict
    settings: object
    slot: str
    log: Path
    follow: subprocess.Popen | None = None
    writer: f.Writer | None = None
    extra: dict = field(default_factory=dict)


def _settings_from(env: dict):
    """The same settings the step subprocess reads from env, for the in-process steps."""
    from steps.settings import load_settings

    fields = {k.removeprefix("DB_UPGRADE_").lower(): v for k, v in env.items() if k.startswith("DB_UPGRADE_")}
    return load_settings(source_pguri=env["PGCOPYDB_SOURCE_PGURI"], target_pguri=env["PGCOPYDB_TARGET_PGURI"],
                         **fields)


def _start(pair, dbs, tmp_path, engine: str, profile: f.Profile) -> Run:
    from steps import preflight

    src, tgt = dbs
    f.load(src, profile)
    f.ensure_app_role(pair.target.uri())
    readonly, unfreeze = f.freeze_sql_files(tmp_path / "sql")
    slot = f"fid_{secrets.token_hex(3)}"
    env = step_env(src, tgt, tmp_path / "work", DB_UPGRADE_ENGINE=engine, DB_UPGRADE_SLOT_NAME=slot,
                   DB_UPGRADE_READONLY_SQL=readonly, DB_UPGRADE_UNFREEZE_SQL=unfreeze,
                   DB_UPGRADE_APP_ROLES=f.APP_ROLE, DB_UPGRADE_TABLE_JOBS=2, DB_UPGRADE_INDEX_JOBS=2,
                   DB_UPGRADE_LAG_THRESHOLD_BYTES=256 * 1024, DB_UPGRADE_POLL_INTERVAL=0.2,
                   DB_UPGRADE_CATCHUP_TIMEOUT=120, DB_UPGRADE_SETTLE_TIMEOUT=5, DB_UPGRADE_DRAIN_TIMEOUT=90,
                   DB_UPGRADE_SKIP_VERIFY_PREPARATION="true")
    run = Run(src, tgt, env, _settings_from(env), slot, tmp_path / "follow.log")
    preflight.preflight(run.settings)  # begins the run record, as in the workflow
    run.writer = f.Writer(f.app_uri(src), profile, rate=40).start()
    time.sleep(0.5)  # the writer writes during the copy too
    run.follow = subprocess.Popen([DB_UPGRADE, "step", "follow"], env=env, stdout=run.log.open("w"),
                                  stderr=subprocess.STDOUT)
    return run


def _stop(run: Run) -> None:
    """Writes back, nothing of the run left on either side: the role and the servers are shared."""
    from steps import cleanup, freeze

    if run.writer is not None:
        run.writer.stop()
    if run.follow is not None and run.follow.poll() is None:
        run.follow.terminate()
        try:
            run.follow.wait(30)
        except subprocess.TimeoutExpired:
            run.follow.kill()
    try:
        freeze.unfreeze(run.settings, reason="test over")
    finally:
        cleanup.cleanup(run.settings)


def _follow_output(run: Run) -> str:
    return run.log.read_text(errors="replace") if run.log.exists() else ""


def _spilled(pair, slot: str, timeout: float = 15) -> int:
    """Slot statistics are reported by the walsender after each decoded transaction, a little later."""
    deadline = time.monotonic() + timeout
    while True:
        n = f.spilled_or_streamed(pair.source.uri(), slot)
        if n or time.monotonic() > deadline:
            return n
        time.sleep(0.5)


def _catch_up_then_write(run: Run) -> None:
    from steps import catchup

    catchup.wait_caught_up(run.settings)
    time.sleep(1)
    run.extra = _during_follow(f.app_uri(run.source))
    time.sleep(2)  # the writer keeps writing into the change stream, and on into the cutover


@pytest.mark.slow
def test_native_upgrade_keeps_every_value(pair, dbs, tmp_path):
    from steps import cutover

    with f.logical_decoding_work_mem(pair.source.uri(), "64kB"):
        run = _start(pair, dbs, tmp_path, "native", f.FULL)
        try:
            _catch_up_then_write(run)
            result = cutover.cutover(run.settings)  # settle, freeze, end, drain, sequences, verify
            stats = run.writer.stop()
            assert run.follow.wait(60) == 0, _follow_output(run)[-3000:]
            spilled = _spilled(pair, run.slot)
            diffs = f.differences(run.source, run.target)
            digests = f.digests(run.source), f.digests(run.target)
            behind = f.sequences_behind(run.source, run.target)
        finally:
            _stop(run)
    assert result["verify"].ok, result["verify"]
    assert diffs == [], f.summary(diffs)
    assert digests[0] == digests[1]
    assert behind == {}, behind
    # The test exercised what it says it does.
    assert set(stats.ops) == set(f.OPERATIONS), f"never run: {set(f.OPERATIONS) - set(stats.ops)}"
    assert stats.refused and all("permission denied" in e or "read-only" in e for e in stats.errors), stats.errors
    assert run.extra["segments"][0] != run.extra["segments"][1]
    assert spilled > 0, "no transaction went over logical_decoding_work_mem"
    print(f"\nnative: {stats.ok} writes, {stats.refused} refused after the freeze; "
          f"write-downtime {result['write_downtime_seconds']:.2f}s; {spilled} transaction(s) spilled or streamed")


@pytest.mark.slow
def test_pgcopydb_follow_stops_on_the_full_set(pair, dbs, tmp_path):
    """pgcopydb 0.17 (test_decoding) applies an unchanged TOASTed jsonb as its
    placeholder text, which is not JSON: the apply aborts, follow fails with a
    one-line error, and the upgrade cannot finish. Expected; the full set
    passes on native."""
    from steps import catchup, engines, state
    from steps.errors import StepError

    run = _start(pair, dbs, tmp_path, "pgcopydb-follow", f.FULL)
    try:
        deadline = time.monotonic() + 90
        streaming = False
        while run.follow.poll() is None and time.monotonic() < deadline:
            if not streaming and engines.get(run.settings).lag() is not None:
                streaming = True
                run.extra = _during_follow(f.app_uri(run.source))
            time.sleep(0.2)
        rc = run.follow.poll()
        with pytest.raises(StepError, match="follow step failed"):
            catchup.wait_caught_up(run.settings)
        error = state.load(run.settings).follow_error or ""
    finally:
        _stop(run)
    out = _follow_output(run)
    assert rc is not None, "follow kept running on the full set for 90 s"
    assert rc != 0, out[-3000:]
    assert "invalid input syntax for type json" in out, out[-3000:]
    print(f"\npgcopydb-follow, full set: follow exited {rc}: {error}")


@pytest.mark.slow
def test_pgcopydb_follow_corruption_is_named_by_verify(pair, dbs, tmp_path):
    """On the set without what stops its apply, pgcopydb 0.17 reaches the end,
    and verify blocks the cutover naming the corrupted tables; the target shows
    the classes measured in shared/research/pgcopydb.md."""
    from steps import cutover
    from steps.errors import StepError

    with f.logical_decoding_work_mem(pair.source.uri(), "64kB"):
        run = _start(pair, dbs, tmp_path, "pgcopydb-follow", f.PGCOPYDB_017_COMPLETES)
        try:
            _catch_up_then_write(run)
            # Stopped first: the rescue gives the writes back, and later writes would never reach the target.
            run.writer.stop()
            with pytest.raises(StepError) as failed:
                cutover.cutover(run.settings)
            with psycopg.connect(run.source) as conn:
                unfrozen = conn.execute("SELECT rolconfig FROM pg_roles WHERE rolname = %s",
                                        (f.APP_ROLE,)).fetchone()[0] is None
            run.follow.wait(90)
            spilled = _spilled(pair, run.slot)
            diffs = f.differences(run.source, run.target)
        finally:
            _stop(run)
    message = str(failed.value)
    found = f.classes(diffs)
    corrupted = sorted({d.table for d in diffs})
    print(f"\npgcopydb-follow: cutover refused: {message}\n" + f.summary(diffs, examples=1))
    named = set(re.findall(r"\bfid\.(\w+)", message))
    assert message.startswith("verify:") and named == set(corrupted), (message, corrupted)
    assert {"unchanged-toast-datum", "null text", "trailing quote"} <= set(found), f.summary(diffs)
    assert {d.column for d in found["unchanged-toast-datum"]} >= {"body", "blob"}
    assert unfrozen, "the failed cutover left the application's writes frozen"
    assert spilled > 0, "no transaction went over logical_decoding_work_mem"
