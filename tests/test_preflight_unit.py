"""preflight's pure parts, without a database: the SQL builders, the scans of
the freeze SQL, and every verdict (facts in, findings out). The real servers
are in tests/test_preflight.py."""

import pytest

from steps import preflight as p
from steps.engines.native import preflight as native
from steps.engines.pgcopydb_follow import preflight as follow
from steps.settings import StepSettings

ME = p.RoleFacts(name="migrator", superuser=False, replication=False, createrole=False, rds_replication=False,
                 db_create=True, signal_backend=False)
SUPER = ME._replace(superuser=True)


def kinds(findings) -> list[str]:
    return [f.kind for f in findings]


# -- helpers -----------------------------------------------------------------------------------

def test_report_dispatches_and_counts(capsys):
    r = p.Report()
    r.add(p.fine("a"), p.problem("b"), p.note("c"), p.problem("d"))
    assert (r.ok, r.problems, r.notes) == (["a"], ["b", "d"], ["c"])
    err = capsys.readouterr().err
    assert "  ok       a" in err and "  PROBLEM  b" in err and "  note     c" in err


def test_names_truncates():
    assert p.names([str(i) for i in range(12)]) == "0, 1, 2, 3, 4, 5, 6, 7, 8, 9 and 2 more"
    assert p.names(["x"]) == "x"


def test_like_ours_escapes_underscores():
    assert p.like_ours("db_upgrade") == r"db\_upgrade\_%"


def test_shown_and_ident():
    assert p.shown("email") == "email"
    assert p.shown('Audit "Log"') == '"Audit ""Log"""'
    assert p.ident("app") == '"app"'


@pytest.mark.parametrize("setting, unit, expected", [
    ("-1", "MB", None), ("0", "MB", 0), ("1024", "MB", 1024 ** 3), ("16", "8kB", 128 * 1024), ("5", None, 5)])
def test_setting_bytes(setting, unit, expected):
    assert p.setting_bytes(setting, unit) == expected


def test_unit_bytes_refuses_a_non_size():
    with pytest.raises(ValueError):
        p.unit_bytes("ms")


@pytest.mark.parametrize("setting, plugin, allowed", [
    ("pgoutput, test_decoding", "pgoutput", True),
    ("pgoutput, test_decoding", "test_decoding", True),
    ("pgoutput, test_decoding", "wal2json", False),
    ("test_decoding", "pgoutput", False),
    ("$libdir/wal2json.so,pgoutput", "wal2json", True),
    ('"pgoutput"', "pgoutput", True),
    ("", "pgoutput", False),
    ("pgoutput_extra", "pgoutput", False),
])
def test_plugin_allowed(setting, plugin, allowed):
    assert p.plugin_allowed(setting, plugin) is allowed


def test_duration():
    assert p.duration(30) == "30 s"
    assert p.duration(15 * 60) == "15 min"
    assert p.duration(3 * 3600) == "3.0 h"


# -- scans of the freeze SQL -----------------------------------------------------------------

SAMPLE_READONLY = ('REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA "shop" FROM "app ""rw"" user";\n'
                   'ALTER ROLE "app ""rw"" user" SET default_transaction_read_only = on;\n')


@pytest.mark.parametrize("text, calls", [
    (SAMPLE_READONLY, []),
    ("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app'", ["pg_terminate_backend"]),
    ("SELECT setval ('s', 1); select NEXTVAL('t')", ["nextval", "setval"]),
    ("COPY t TO PROGRAM 'rm -rf /'", ["to program"]),
    ("SELECT pg_reload_conf()", ["pg_reload_conf"]),
    ("SELECT pg_stat_reset_shared('wal')", ["pg_stat_reset_shared"]),
    ("SELECT dblink_exec('x', 'y')", ["dblink_exec"]),
    ("-- no setval here\nSELECT 1", []),  # a name without a call is fine
])
def test_non_transactional_calls(text, calls):
    assert p.non_transactional_calls(text) == calls


@pytest.mark.parametrize("text, found", [
    (SAMPLE_READONLY, []),
    ("BEGIN;\n" + SAMPLE_READONLY + "COMMIT;", ["BEGIN", "COMMIT"]),
    ("start   transaction; select 1; end", ["END", "START TRANSACTION"]),
    ("REVOKE x ON t FROM y; ROLLBACK", ["ROLLBACK"]),
    ("DO $$ BEGIN PERFORM 1; END $$;", []),
    ("DO $body$ BEGIN COMMIT; END $body$;", []),
    ("SELECT 'commit; begin'", []),
    ("-- commit\nREVOKE x ON t FROM y", []),
    ("/* BEGIN; */ SELECT CASE WHEN true THEN 1 END;", []),
    ("PREPARE TRANSACTION 'x'", ["PREPARE TRANSACTION"]),
])
def test_transaction_control(text, found):
    assert p.transaction_control(text) == found


def test_judge_sql_file():
    assert p.judge_sql_file("readonly", SAMPLE_READONLY) is None
    f = p.judge_sql_file("readonly", "BEGIN; " + SAMPLE_READONLY + " COMMIT;")
    assert f.kind == "problem" and "transaction control (BEGIN, COMMIT)" in f.text
    f = p.judge_sql_file("unfreeze", "SELECT pg_terminate_backend(1)")
    assert f.kind == "note" and "not dry-run" in f.text and "pg_terminate_backend" in f.text


def test_dry_run_sql_wraps_in_execute():
    text = "ALTER ROLE \"it's\" SET x = 'a\\b';"
    q = p.dry_run_sql(text).as_string(None)
    assert q.startswith("DO ") and "BEGIN EXECUTE" in q and q.rstrip().endswith("END'")
    assert "it''''s" in q  # quoted twice: once for EXECUTE's literal, once for DO's


def test_judge_dry_run_and_pair():
    f = p.judge_dry_run("readonly", "role \"x\" does not exist", 0.01, [])
    assert f.kind == "problem" and "DB_UPGRADE_READONLY_SQL" in f.text and "nothing changed" in f.text
    f = p.judge_dry_run("unfreeze", None, 0.004, ["table privileges"])
    assert f.kind == "ok" and "4 ms" in f.text and "rolled back" in f.text
    f = p.judge_dry_run("readonly", None, 2.0, [], "it waited more than 2s for a lock")
    assert f.kind == "note" and "lock" in f.text and "the freeze would wait" in f.text
    assert kinds(p.judge_freeze_pair(["table privileges"], [])) == ["ok"]
    assert kinds(p.judge_freeze_pair([], [])) == ["note"]
    out = p.judge_freeze_pair(["role logins"], ["role logins"])
    assert kinds(out) == ["note"] and "role logins" in out[0].text


# -- SQL builders ----------------------------------------------------------------------------

def test_database_locale_sql_by_version():
    assert "datlocale" in p.database_locale_sql(17) and "daticulocale" not in p.database_locale_sql(17)
    assert "daticulocale" in p.database_locale_sql(15)
    assert "datlocprovider" not in p.database_locale_sql(14)


def test_apply_index_methods():
    assert p.apply_index_methods(15) == []
    assert p.apply_index_methods(16) == ["btree"]
    assert p.apply_index_methods(17) == ["btree", "hash"]


def test_queries_filter_the_application_schemas():
    for q in (p.TARGET_RELATIONS, p.UNREADABLE, p.TABLE_IDENTITY, p.UNREPLICATED, p.REFERENCED_ROLES,
              p.PRIVILEGE_STATE, native.NOT_OWNED, follow.COLUMN_CLASSES):
        assert "'db_upgrade'" in q and "'pgcopydb'" in q and "'pg_catalog'" in q


def test_owners_settable_sql():
    assert "'SET'" in native.owners_settable_sql(16) and "'MEMBER'" in native.owners_settable_sql(15)


def test_test_subscription_sql():
    q = native.test_subscription_sql("db_upgrade_preflight_42", "host=h password='it''s' dbname=x").as_string(None)
    assert q.startswith('CREATE SUBSCRIPTION "db_upgrade_preflight_42" CONNECTION ')
    for option in ("connect = true", "enabled = false", "create_slot = false", "slot_name = NONE"):
        assert option in q
    assert "'host=h password=''it''''s'' dbname=x'" in q
    assert native.test_subscription_name(42) == "db_upgrade_preflight_42"


# -- common verdicts -------------------------------------------------------------------------

def test_simple_verdicts():
    assert p.judge_primary(True).kind == "problem" and "standby" in p.judge_primary(True).text
    assert p.judge_primary(False).kind == "ok"
    assert p.judge_wal_level("replica").kind == "problem"
    assert p.judge_wal_level("logical").kind == "ok"
    assert p.judge_majors(15, 17).kind == "ok"
    assert p.judge_majors(15, 15).kind == "problem"
    assert p.judge_large_objects(3).kind == "problem" and p.judge_large_objects(0).kind == "ok"
    assert p.judge_readable("m", ["shop.secret"]).kind == "problem"
    assert p.judge_extensions(["old_snapshot", "pgcrypto"], {"pgcrypto"}, 17).text.count("old_snapshot") == 1
    assert p.judge_roles(["a", "b"], {"a"}).kind == "problem"
    assert p.judge_create(ME._replace(db_create=False), "target").kind == "problem"


def test_judge_target_empty():
    assert p.judge_target_empty([], False).kind == "ok"
    assert p.judge_target_empty(["public.t"], False).kind == "problem"
    assert p.judge_target_empty(["public.t"], True).kind == "ok"


LIBC = p.DbLocale("UTF8", "en_US.UTF-8", "en_US.UTF-8", "c", None, "2.36", "2.36")


def test_judge_locale():
    assert kinds(p.judge_locale(LIBC, LIBC)) == ["ok", "ok"]
    out = p.judge_locale(LIBC, LIBC._replace(encoding="SQL_ASCII", collate="C", ctype="C"))
    assert kinds(out) == ["problem", "problem"]
    assert "ENCODING 'UTF8'" in out[0].text and "LC_COLLATE 'en_US.UTF-8'" in out[1].text
    icu = LIBC._replace(provider="i", locale="und", recorded_version="153.120", actual_version="153.120")
    out = p.judge_locale(icu, LIBC)
    assert kinds(out) == ["ok", "problem"] and "LOCALE_PROVIDER icu ICU_LOCALE 'und'" in out[1].text
    out = p.judge_locale(icu, icu._replace(recorded_version="153.128", actual_version="153.128"))
    assert kinds(out) == ["ok", "ok", "note"] and "153.120" in out[2].text and "REINDEX" in out[2].text
    # A libc database's locale column is ignored; versions unknown give no note.
    assert kinds(p.judge_locale(LIBC, LIBC._replace(locale="x", actual_version=None))) == ["ok", "ok"]


def test_judge_collations():
    assert p.judge_collations([], {}) == []
    assert kinds(p.judge_collations([("en-x-icu", "153.120")], {"en-x-icu": "153.120"})) == ["ok"]
    out = p.judge_collations([("en-x-icu", "153.120"), ("de_DE", "2.36")], {"en-x-icu": "153.128"})
    assert kinds(out) == ["problem", "note"] and "de_DE" in out[0].text and "153.120 -> 153.128" in out[1].text


def table(name, replident, pk=False, ident_index=False, size=8192, rows=10, apply_index=None):
    return p.TableIdentity(name, replident, pk, ident_index, size, rows, apply_index)


def test_replica_identity_using_index_passes():
    """The seed flagged REPLICA IDENTITY USING INDEX as a problem: it is a valid key."""
    assert kinds(p.judge_identity([table("public.by_index", "i", ident_index=True)])) == ["ok"]


@pytest.mark.parametrize("t", [
    table("public.no_key", "d"),
    table("public.nothing", "n", pk=True),
    table("public.index_dropped", "i", ident_index=False),
])
def test_tables_whose_changes_cannot_replicate(t):
    out = p.judge_identity([t])
    assert kinds(out) == ["problem"] and t.name in out[0].text


def test_keyless_full_tables_listed_with_size_and_index():
    out = p.judge_identity([
        table("public.pk", "d", pk=True),
        table("public.small", "f", size=8192, rows=3),
        table("public.big", "f", size=10 * 1024 * 1024, rows=100_000, apply_index="big_at_idx"),
        table("public.full_with_pk", "f", pk=True),
    ])
    assert kinds(out) == ["ok", "note"]
    text = out[1].text
    assert text.index("public.big") < text.index("public.small")  # biggest first
    assert "10.0 MB, ~100,000 rows; the target's apply can use index big_at_idx" in text
    assert "public.small (8.0 kB, ~3 rows; no index the target's apply can use" in text
    assert "full_with_pk" not in text and "verify keeps a checksum" in text


def test_judge_unreplicated():
    out = p.judge_unreplicated([("public.cache", "r"), ("public.mv", "m")])
    assert kinds(out) == ["note", "note"] and "REFRESH MATERIALIZED VIEW" in out[1].text
    assert p.judge_unreplicated([]) == []


@pytest.mark.parametrize("me, kind, needle", [
    (ME._replace(replication=True), "ok", "has REPLICATION"),
    (SUPER, "ok", "grant-replication gives it"),
    (ME._replace(rds_replication=True), "ok", "rds_replication"),
    (ME, "problem", "only a superuser"),
])
def test_judge_replication_grant(me, kind, needle):
    f = p.judge_replication_grant(me, 15)
    assert f.kind == kind and needle in f.text
    if kind == "problem":
        assert 'GRANT rds_replication TO "migrator"' in f.text


def test_wal_run_estimate():
    seconds, retained = p.wal_run_estimate(1000.0, 50 * p.MiB * 60)  # a 60 s copy
    assert seconds == 60 + p.AFTER_COPY_SECONDS and retained == 1000.0 * seconds


def test_judge_wal():
    out = p.judge_wal(1000.0, 10 * p.MiB, None, (3, 48 * p.MiB))
    assert kinds(out) == ["ok", "note"] and "48.0 MB in 3 file(s)" in out[1].text and "free disk" in out[1].text
    out = p.judge_wal(10 * 1024.0, 10 * p.MiB, p.MiB, None)
    assert kinds(out) == ["problem"] and "invalidate the slot" in out[0].text
    out = p.judge_wal(10.0, 10 * p.MiB, 1024 * p.MiB, None)
    assert kinds(out) == ["ok", "note"] and "pg_monitor" in out[1].text


def test_judge_slots_and_senders_boundaries():
    assert p.judge_slots(10, 8, 2, "x").kind == "ok"
    assert p.judge_slots(10, 9, 2, "x").kind == "problem"
    assert p.judge_senders(1, 0, 1, "x").kind == "ok"
    assert p.judge_senders(1, 1, 1, "x").kind == "problem"


def test_judge_output_plugins():
    assert p.judge_output_plugins(None, True, "pgoutput") is None  # the server has no such setting
    assert p.judge_output_plugins(None, False, "pgoutput").kind == "note"
    assert p.judge_output_plugins("pgoutput, test_decoding", True, "pgoutput").kind == "ok"
    f = p.judge_output_plugins("test_decoding", True, "pgoutput")
    assert f.kind == "problem" and "add pgoutput" in f.text


APP = p.AppRole(name="app", superuser=False, replication=False, admin=True, privileges=False)
CREATOR = ME._replace(createrole=True, signal_backend=True)


@pytest.mark.parametrize("major, me, role, needle", [
    (17, SUPER, APP._replace(superuser=True), None),
    (17, CREATOR, APP, None),
    (17, CREATOR, APP._replace(name="migrator"), "lock the upgrade out"),
    (17, CREATOR, APP._replace(superuser=True), "is a superuser"),
    (17, ME, APP, "lacks CREATEROLE"),
    (17, CREATOR, APP._replace(admin=False), "ADMIN OPTION"),
    (15, CREATOR, APP._replace(admin=False), None),  # before 16, CREATEROLE was enough
    (15, CREATOR, APP._replace(replication=True), "has REPLICATION"),
    (17, CREATOR._replace(signal_backend=False), APP, "pg_signal_backend"),
    (17, CREATOR._replace(signal_backend=False), APP._replace(privileges=True), None),
])
def test_fence_blocker(major, me, role, needle):
    why = p.fence_blocker(major, me, role)
    assert (why is None) if needle is None else (needle in why)


def test_judge_app_roles():
    assert kinds(p.judge_app_roles([], set(), {}, CREATOR, 17)) == ["note"]
    assert kinds(p.judge_app_roles(["app"], {"app"}, {"app": APP}, CREATOR, 17)) == ["ok"]
    out = p.judge_app_roles(["app", "gone"], {"app"}, {"app": APP}, CREATOR, 17)
    assert kinds(out) == ["problem", "problem"] and "'gone'" in out[0].text and "target" in out[0].text
    out = p.judge_app_roles(["app"], {"app"}, {"app": APP._replace(superuser=True)}, CREATOR, 17)
    assert kinds(out) == ["problem"] and "cannot be fenced" in out[0].text
    # NOLOGIN on the target: refused after the switch, unless this run's own fence made it so
    out = p.judge_app_roles(["app"], {"app"}, {"app": APP._replace(can_login=False)}, CREATOR, 17)
    assert kinds(out) == ["problem"] and "'app' cannot log in to the target" in out[0].text
    assert kinds(p.judge_app_roles(["app"], {"app"}, {"app": APP._replace(can_login=False)}, CREATOR, 17,
                                   frozenset({"app"}))) == ["ok"]


def test_judge_leftovers_and_other_runs():
    found = [("replication slot on the source", "db_upgrade"), ("replication slot on the source", "db_upgrade_verify"),
             ("subscription on the target", "db_upgrade_other")]
    f = p.judge_leftovers(found, False, "db_upgrade")
    assert f.kind == "problem" and "db_upgrade_verify" in f.text and "cleanup" in f.text
    f = p.judge_leftovers(found, True, "db_upgrade")  # this run's own objects, mid-run
    assert f.kind == "problem" and "db_upgrade_verify" not in f.text and "db_upgrade_other" in f.text
    assert p.judge_leftovers([], False, "db_upgrade").kind == "ok"
    assert p.judge_other_runs([]).kind == "ok"
    assert p.judge_other_runs(["wf-1"]).kind == "problem"


# -- native ----------------------------------------------------------------------------------

def test_native_publication_and_subscription():
    assert native.judge_publication(SUPER, [("a.t", "x")]).kind == "ok"
    assert native.judge_publication(ME, []).kind == "ok"
    f = native.judge_publication(ME, [("shop.t", "owner1")])
    assert f.kind == "problem" and 'GRANT "owner1" TO "migrator"' in f.text
    assert native.judge_subscription(17, SUPER, False, ["x"]).kind == "ok"
    assert "only a superuser" in native.judge_subscription(15, ME, True, []).text
    assert "pg_create_subscription" in native.judge_subscription(17, ME, False, []).text
    assert "SET ROLE" in native.judge_subscription(17, ME, True, ["owner1"]).text
    assert native.judge_subscription(17, ME, True, []).kind == "ok"


def test_native_workers():
    assert kinds(native.judge_workers(4, 0, 8, 1, 10, 0)) == ["ok"]
    assert kinds(native.judge_workers(0, 0, 8, 1, 10, None)) == ["problem"]
    assert kinds(native.judge_workers(4, 4, 8, 8, 1, 1)) == ["problem", "problem", "problem"]


def test_native_test_subscription_verdicts():
    var = "DB_UPGRADE_SUBSCRIPTION_PGURI"
    assert native.judge_test_subscription(None, var, True, False, False).kind == "ok"
    walsender = ('could not connect to the publisher: connection to server at "h", port 5 failed: FATAL: must be '
                 "superuser or replication role to start walsender")
    assert native.judge_test_subscription(walsender, var, True, True, False).kind == "ok"
    assert native.judge_test_subscription(walsender, var, False, True, False).kind == "problem"
    f = native.judge_test_subscription("canceling statement due to statement timeout", var, True, True, False)
    assert f.kind == "problem" and "firewall" in f.text
    f = native.judge_test_subscription("password is required", var, True, True, True)
    assert f.kind == "problem" and "passfile" in f.text and "server log" in f.text
    f = native.judge_test_subscription("could not connect to the publisher: Connection refused", var, True, True, False)
    assert f.kind == "problem"
    for needle in ("DB_UPGRADE_SUBSCRIPTION_PGURI", "pg_hba.conf", "passfile", "Connection refused"):
        assert needle in f.text


def test_native_same_role_and_label():
    base = {"source_pguri": "postgres://mig:pw@h:5/db", "target_pguri": "postgres://t@h:6/db"}
    assert native.same_role(StepSettings(**base))
    assert "not set" in native.uri_label(StepSettings(**base))
    same = StepSettings(**base, subscription_pguri="postgres://mig@10.0.0.1:5/db")
    assert native.same_role(same) and native.uri_label(same) == "DB_UPGRADE_SUBSCRIPTION_PGURI"
    assert not native.same_role(StepSettings(**base, subscription_pguri="postgres://other@h:5/db"))
    assert not native.same_role(StepSettings(**base, subscription_pguri="postgres://?service=src"))


# -- pgcopydb-follow -------------------------------------------------------------------------

def test_follow_apply_privileges():
    assert follow.judge_apply_privileges(True, False, False).kind == "ok"
    assert follow.judge_apply_privileges(False, True, True).kind == "ok"
    f = follow.judge_apply_privileges(False, False, True)
    assert f.kind == "problem" and "session_replication_role" in f.text


def test_follow_identity_index():
    """USING INDEX is fine for native, but pgcopydb 0.17's test_decoding apply cannot use it."""
    tables = [table("public.by_index", "i", ident_index=True), table("public.pk", "d", pk=True)]
    assert follow.judge_identity_index(tables, "test_decoding").kind == "problem"
    assert follow.judge_identity_index(tables, "wal2json").kind == "note"
    assert follow.judge_identity_index(tables[1:], "test_decoding") is None


COLUMNS = [("shop.docs", "body", True, True, False), ("shop.docs", "meta", True, True, False),
           ("shop.prices", "amount", False, False, True)]


def test_follow_data_limit_notes():
    out = follow.data_limit_notes("test_decoding", COLUMNS)
    assert kinds(out) == ["note", "note"]
    assert "unchanged-toast-datum" in out[0].text and "'null'" in out[0].text and "single quote" in out[0].text
    assert "TOAST-able: 2 column(s) in 1 table(s), e.g. shop.docs.body" in out[1].text
    assert "no TOAST-able" in follow.data_limit_notes("test_decoding", COLUMNS[2:])[1].text
    out = follow.data_limit_notes("wal2json", COLUMNS)
    assert "6 decimals" in out[0].text and "shop.prices.amount" in out[1].text
    assert "no numeric" in follow.data_limit_notes("wal2json", COLUMNS[:2])[1].text


def test_full_identity_columns_without_equality_are_a_problem_for_native():
    from steps.engines.native import preflight as npf

    assert npf.judge_full_identity_equality([]).kind == "ok"
    f = npf.judge_full_identity_equality([("shop.audit", "payload", "json")])
    assert f.kind == "problem" and "shop.audit.payload (json)" in f.text and "jsonb" in f.text
