"""verify's pure logic, without a database: the pgoutput parser (bytes
captured from PostgreSQL 15's pgoutput, protocol 1), how tables are tracked,
the baseline's chunks, snapshot visibility, the SQL builders."""

from __future__ import annotations

import pytest
from psycopg import sql

from steps.state import RunState
from steps.verify import pgoutput as p
from steps.verify import plan
from steps.verify import sql as q
from steps.verify.report import TableResult, VerifyReport, VerifyStatus

# Captured with pg_logical_slot_peek_binary_changes(..., 'proto_version', '1',
# 'publication_names', ...) from:
#   CREATE TABLE cap."Items" (id int8 PRIMARY KEY, "v it" text, big text, n numeric);
#   CREATE TABLE cap.comp (a text, b uuid, x int, PRIMARY KEY (a, b));
#   CREATE TABLE cap.full_t (x int, y text); ALTER TABLE cap.full_t REPLICA IDENTITY FULL;
#   CREATE TABLE cap.p1 PARTITION OF cap.p (id int, d date, PRIMARY KEY (id, d)) ...;
CAPTURED = {
    "begin": "4200000000015289f80003048de4212ba0000002d6",
    "rel_items": ("5200004001636170004974656d73006400040169640000000014ffffffff00762069740000000019ffffffff0062"
                  "69670000000019ffffffff006e00000006a4ffffffff"),
    # INSERT (2, NULL, 'null', 'NaN')
    "insert_items": "49000040014e00047400000001326e74000000046e756c6c74000000034e614e",
    "commit": "430000000000015289f80000000001528a280003048de4212ba0",
    # UPDATE "v it" = 'é\' WHERE id = 1: the TOASTed column `big` is unchanged
    "update_toast": "55000040014e00047400000001317400000003c3a95c757400000003312e35",
    # UPDATE id = 3 WHERE id = 2: the old key comes with it
    "update_key": "55000040014b00047400000001326e6e6e4e00047400000001336e74000000046e756c6c74000000034e614e",
    "delete_key": "44000040014b00047400000001336e6e6e",
    "rel_comp": ("520000400863617000636f6d700064000301610000000019ffffffff01620000000b86ffffffff0078000000001"
                 "7ffffffff"),
    "update_comp": ("55000040084e000374000000016b740000002461306565626339392d396330622d346566382d626236642d36"
                    "6262396264333830613131740000000132"),
    "rel_full": "520000400f6361700066756c6c5f740066000201780000000017ffffffff01790000000019ffffffff",
    "update_full": "550000400f4f00027400000001317400000001614e0002740000000131740000000162",
    "delete_full": "440000400f4f0002740000000131740000000162",
    "rel_part": "5200004019636170007031006400020169640000000017ffffffff0164000000043affffffff",
    "truncate": "540000000200000040080000400f",
}


def msg(name: str):
    return p.parse(bytes.fromhex(CAPTURED[name]))


def test_begin_and_commit():
    b, c = msg("begin"), msg("commit")
    assert isinstance(b, p.Begin) and b.xid == 726 and b.final_lsn == 0x15289F8
    assert isinstance(c, p.Commit) and c.commit_lsn == b.final_lsn and c.end_lsn == 0x1528A28
    assert c.end_lsn > c.commit_lsn  # what a subscriber's origin records: the end


def test_relation_names_columns_and_key_flags():
    r = msg("rel_items")
    assert (r.oid, r.namespace, r.name, r.replident) == (16385, "cap", "Items", "d")
    assert [(c.name, c.type_oid, c.is_key) for c in r.columns] == [
        ("id", 20, True), ("v it", 25, False), ("big", 25, False), ("n", 1700, False)]
    full = msg("rel_full")
    assert full.replident == "f" and all(c.is_key for c in full.columns)  # FULL: every column is "key"
    assert msg("rel_part").name == "p1"  # a partition's changes come under its own name


def test_tuples_text_null_and_unchanged_toast():
    assert msg("insert_items").new == ("2", None, "null", "NaN")  # the text 'null' is not NULL
    u = msg("update_toast")
    assert u.old is None and u.new[:2] == ("1", "é\\") and u.new[2] is p.UNCHANGED and u.new[3] == "1.5"


def test_keys_of_each_kind_of_change():
    items = msg("rel_items")
    assert p.change_keys(msg("insert_items"), items, ["id"]).keys == [("2",)]
    assert p.change_keys(msg("update_toast"), items, ["id"]).keys == [("1",)]
    assert p.change_keys(msg("update_key"), items, ["id"]).keys == [("3",), ("2",)]  # new and old key
    assert p.change_keys(msg("delete_key"), items, ["id"]).keys == [("3",)]
    comp = msg("rel_comp")
    assert p.change_keys(msg("update_comp"), comp, ["a", "b"]).keys == [("k", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")]
    full = msg("rel_full")
    assert p.change_keys(msg("update_full"), full, None).whole  # no usable key: the table changed
    d = msg("delete_full")
    assert isinstance(d, p.Delete) and d.old_kind == "O" and d.old == ("1", "b")


def test_a_key_that_cannot_be_read_means_the_whole_table():
    items = msg("rel_items")
    assert p.change_keys(msg("update_toast"), items, ["big"]).whole  # an unchanged TOASTed key column
    assert p.change_keys(msg("insert_items"), items, ["gone"]).whole  # a key column the relation lacks


def test_truncate_lists_relations():
    t = msg("truncate")
    assert isinstance(t, p.Truncate) and t.rels == (16392, 16399)


def test_protocol_errors():
    with pytest.raises(p.ProtocolError):
        p.parse(b"Z\x00")
    with pytest.raises(p.ProtocolError):
        p.parse(bytes.fromhex(CAPTURED["insert_items"])[:-3])
    assert isinstance(p.parse(b"O" + b"\x00" * 8 + b"origin\x00"), p.Other)


# --- how tables are tracked -------------------------------------------------------------------------

def classify(**kw):
    args = dict(nspname="app", relname="t", label="app.t", persistence="p", replident="d", root=("app", "t"),
                pages=640, size=640 * 8192, cols=["id"], types=["bigint"], type_oids=[20], is_primary=True)
    args.update(kw)
    return plan.classify(**args)


def test_classify():
    t = classify()
    assert t.kind == plan.KEYED and t.bucket_kind == "range" and t.neutral
    assert classify(cols=["k"], types=["text"], type_oids=[25]).bucket_kind == "hash"
    assert not classify(cols=["at"], types=["timestamp with time zone"], type_oids=[1184]).neutral
    assert classify(replident="f", cols=None, types=None, type_oids=None, is_primary=None).kind == plan.WHOLE
    assert classify(replident="d", cols=None, types=None, type_oids=None, is_primary=None).kind == plan.UNTRACKED
    assert classify(replident="n").kind == plan.UNTRACKED  # cannot be published
    assert classify(persistence="u").kind == plan.UNTRACKED  # unlogged: never decoded
    assert classify(replident="i", is_primary=False).kind == plan.KEYED  # the replica identity index


def test_a_partition_tree_with_an_unpublishable_leaf_is_not_published():
    a = classify(label="app.p1", relname="p1", root=("app", "p"))
    b = classify(label="app.p2", relname="p2", root=("app", "p"), replident="n")
    c = classify()
    assert plan.publishable_roots([a, b, c]) == [("app", "t")]
    assert a.kind == plan.UNTRACKED and "app.p" in a.why


def test_geometry_and_chunks():
    t = classify(size=640 * 8192)
    plan.geometry(t, pages=640, lo=1, hi=100000)  # 10 buckets of 64 pages
    assert (t.width, t.first_bucket, t.last_bucket) == (10000, 0, 10)
    chunks = plan.next_chunks([t], budget=t.bytes // 11 * 3)
    assert chunks == [plan.Chunk("app.t", None, 3, 3)]  # open below: keys under the old minimum too
    t.next_bucket = 3
    assert plan.next_chunks([t], budget=10 * t.bytes) == [plan.Chunk("app.t", 3, None, None)]  # open above
    t.next_bucket = None
    assert plan.next_chunks([t]) == []


def test_chunks_take_whole_tables_and_stop_at_the_budget():
    w = classify(label="app.w", replident="f", cols=None, types=None, type_oids=None, is_primary=None, size=100)
    plan.geometry(w, 1, None, None)
    h = classify(label="app.h", cols=["k"], types=["text"], type_oids=[25], size=10 ** 9)
    plan.geometry(h, 10 ** 5, None, None)
    k = classify(label="app.k", size=10 ** 6)
    plan.geometry(k, 100, 1, 10)
    assert [c.label for c in plan.next_chunks([w, h, k], budget=1000)] == ["app.w", "app.h"]
    assert plan.next_chunks([h], budget=1)[0] == plan.Chunk("app.h", None, None, None)  # one pass, whatever its size


# --- snapshots ----------------------------------------------------------------------------------------

def test_snapshot_visibility_and_cover():
    s = plan.Snapshot.parse("100:110:102,105")
    assert s.visible(99) and s.visible(104) and not s.visible(102) and not s.visible(110)
    earlier = plan.Snapshot.parse("95:102:97")
    assert s.covers(earlier)  # 102 and 105 had not started when `earlier` was taken
    assert not plan.Snapshot.parse("100:110:101").covers(earlier)  # 101 finished per the WAL, still shown running
    assert plan.Snapshot.parse("96:110:").covers(earlier)
    assert not plan.Snapshot.parse("90:100:").covers(earlier)  # older than earlier


def test_xid8_epoch():
    s = plan.Snapshot.parse(f"{(3 << 32) + 10}:{(3 << 32) + 20}:")
    assert plan.xid8(15, s) == (3 << 32) + 15
    assert plan.xid8(2 ** 32 - 5, s) == (2 << 32) + 2 ** 32 - 5  # just before the epoch turned


def test_pending_groups_and_differences():
    keys, whole = plan.pending_groups([("(0,1)", "a", ["1"]), ("(0,2)", "a", ["1"]), ("(0,3)", "b", None),
                                       ("(0,4)", "a", ["2"])])
    assert keys == {"a": {("1",): ["(0,1)", "(0,2)"], ("2",): ["(0,4)"]}} and whole == {"b": ["(0,3)"]}
    ks = [("1",), ("2",), ("3",), ("4",)]
    # key 1 equal, 2 differs, 3 on the source only, 4 absent on both (deleted on both: equal)
    assert plan.differing(ks, {1: "x", 2: "y", 3: "z"}, {1: "x", 2: "w"}) == [("2",), ("3",)]
    assert plan.bucket_differences({1: (1, 2, 3), 2: (1, 1, 1)}, {1: (1, 2, 3), 3: (1, 1, 1)}) == [2, 3]


def test_should_stop():
    assert plan.should_stop(RunState()) is None
    assert plan.should_stop(RunState(cutover_started_at=1.0)) is None  # it waits for the preparation
    assert "cutover" in plan.should_stop(RunState(cutover_started_at=1.0, verify_prepared_at=1.0))
    assert "cutover" in plan.should_stop(RunState(cutover_started_at=1.0, verify_skipped_preparation=True))
    assert "end position" in plan.should_stop(RunState(end_position="barrier:x"))
    assert plan.should_stop(RunState(end_position="barrier:x", cutover_started_at=1.0)) is None
    assert "finished" in plan.should_stop(RunState(finished_at=2.0))


# --- SQL ---------------------------------------------------------------------------------------------

def test_rows_by_key_looks_up_by_typed_key():
    text = q.rows_by_key(("app", "My T"), ["a", "B"], ["text", "uuid"]).as_string()
    assert 'JOIN ONLY "app"."My T" AS t ON t."a" = x."k0"::text AND t."B" = x."k1"::uuid' in text
    assert text.count("unnest(%s::text[])") == 2 and "WITH ORDINALITY" in text


def test_key_function_reads_only_the_key_and_normalises_when_needed():
    f = q.key_function(123, ["id"], neutral=True).as_string()
    assert '"verify_k_123"' in f and 'NEW."id"::text' in f and 'OLD."id"::text' in f
    assert "to_jsonb" not in f and "SET " not in f.split("AS $")[0]
    g = q.key_function(7, ["at"], neutral=False).as_string()
    assert "SET \"TimeZone\" TO 'UTC'" in g and "SET \"DateStyle\" TO 'ISO'" in g
    with pytest.raises(ValueError):
        q.key_function(8, ["a$db_upgrade_verify$b"], neutral=True)


def test_triggers_are_always_and_carry_the_label():
    stmts = [s.as_string() for s in q.install_triggers(("app", "x y"), 'app."x y"', "verify_k_1")]
    assert any("ENABLE ALWAYS TRIGGER \"db_upgrade_verify\"" in s for s in stmts)
    assert any("AFTER TRUNCATE" in s and "'app.\"x y\"'" in s for s in stmts)
    assert stmts[0].startswith("DROP TRIGGER IF EXISTS")


def test_publication_and_filters():
    assert q.create_publication("p", [("app", "a"), ("app", "B")]).as_string() == \
        'CREATE PUBLICATION "p" FOR TABLE "app"."a", "app"."B"'
    assert q.create_publication("p", []).as_string() == 'CREATE PUBLICATION "p"'
    assert q.range_filter("id", 10, None, 3).as_string() == 't."id" < 30'
    assert q.range_filter("id", 10, 3, None).as_string() == 't."id" >= 30'
    assert q.range_filter("id", 10, None, None).as_string() == "true"
    assert "floor" in q.bucket_expr("range", ["id"], 5).as_string()
    assert 'hashtextextended(ARRAY["t"."k"::text]::text COLLATE "C", 2)' in q.bucket_expr("hash", ["k"], 5).as_string()
    with pytest.raises(ValueError):
        q.create_slot_command("bad name; DROP")
    assert "-c TimeZone=UTC" in q.normalised_options() and "-c extra_float_digits=1" in q.normalised_options()
    assert isinstance(q.whole_sums(("a", "b")), sql.Composed)


def test_report_summary():
    r = VerifyReport(ok=True, mode="upgrade", tables=[TableResult("a", 1, 1, True)], keys_rechecked=5,
                     whole_tables=["b"])
    assert "5 changed rows by key" in r.summary() and r.as_dict()["summary"] == r.summary()
    bad = VerifyReport(ok=False, mode="upgrade", mismatched=["app.x"], sequences_behind=["s (1 < 2)"])
    assert bad.summary() == "verification FAILED: tables differ: app.x; sequences behind: s (1 < 2)"
    st = VerifyStatus(prepared=True, pending_keys=3, without_key=[("app.h", 2048, "no key")])
    assert "3 changed row(s)" in st.lines()[0] and "app.h (2.0 kB)" in st.lines()[1]
    assert "NOT prepared" in VerifyStatus(prepared=False).lines()[0]


# --- keyless tables: a checksum kept by deltas -------------------------------------------------------

def test_a_keyless_full_identity_table_is_kept_by_checksum_when_its_row_text_can_be_rebuilt():
    keyless = {"replident": "f", "cols": None, "types": None, "type_oids": None, "is_primary": None}
    t = classify(**keyless, columns=(3, "x integer, y text, z bytea", False, False))
    assert t.kind == plan.WHOLE and t.checksum and (t.ncols, t.columns) == (3, "x integer, y text, z bytea")
    assert "checksum" in t.why
    # pgoutput leaves generated columns out; reg* text depends on search_path; nothing to hash
    for cols, word in (((2, "a int, b int", True, False), "generated"), ((1, "r regclass", False, True), "reg*"),
                       ((0, "", False, False), "no column")):
        u = classify(**keyless, columns=cols)
        assert u.kind == plan.WHOLE and not u.checksum and word in u.why
    assert not classify(**keyless).checksum  # no column information: as before
    assert not classify(columns=(2, "id bigint, v text", False, False)).checksum  # keyed: by key


def test_row_images_of_each_change_of_a_full_identity_table():
    full = msg("rel_full")  # cap.full_t (x int, y text), REPLICA IDENTITY FULL
    assert plan.row_images(msg("update_full"), len(full.columns)) == [(-1, ("1", "a")), (1, ("1", "b"))]
    assert plan.row_images(msg("delete_full"), 2) == [(-1, ("1", "b"))]
    assert plan.row_images(p.Insert(1, ("7", None)), 2) == [(1, ("7", None))]  # NULL stays NULL
    assert plan.row_images(p.Insert(1, ("7", "null")), 2) == [(1, ("7", "null"))]  # the text 'null' is text


def test_an_unchanged_toasted_value_of_the_new_row_is_the_old_rows():
    u = p.Update(1, old=("1", "big" * 1000, "a"), old_kind="O", new=("1", p.UNCHANGED, "b"))
    assert plan.row_images(u, 3) == [(-1, ("1", "big" * 1000, "a")), (1, ("1", "big" * 1000, "b"))]


def test_row_images_that_cannot_be_had_say_why():
    assert "old row" in plan.row_images(p.Update(1, None, None, ("1", "b")), 2)  # no old row (not FULL)
    assert "old row" in plan.row_images(p.Delete(1, ("1", None), "K"), 2)  # only the key
    assert "TOASTed" in plan.row_images(p.Update(1, ("1", p.UNCHANGED), "O", ("1", p.UNCHANGED)), 2)
    assert "TOASTed" in plan.row_images(p.Insert(1, ("1", p.UNCHANGED)), 2)
    assert "columns" in plan.row_images(p.Insert(1, ("1", "a", "c")), 2)  # the definition changed
    assert "binary" in plan.row_images(p.Insert(1, ("1", b"\x00")), 2)


def test_image_columns_are_the_signs_then_one_list_per_column():
    images = [(-1, ("1", "a")), (1, ("1", None)), (1, ("2", "x"))]
    assert plan.image_columns(images, 2) == [[-1, 1, 1], ["1", "1", "2"], ["a", None, "x"]]


def test_sums_are_a_multiset_checksum():
    a, b = plan.Sums(1, 2 ** 63 - 1, -(2 ** 63)), plan.Sums(1, 5, 6)
    assert a + b == plan.Sums(2, 2 ** 63 + 4, -(2 ** 63) + 6)  # exact: no 64-bit wrap
    assert plan.Sums.parse((a + b).text()) == a + b
    assert plan.Sums.of(("3", "-4", "5")) == plan.Sums(3, -4, 5)
    row = plan.Sums(1, 10, 20)
    removed = plan.Sums(-1, -10, -20)
    assert row + row != row and row + row + removed == row  # a duplicate counts; removing one leaves one
    assert not (row + removed) and plan.Sums() == plan.Sums(0, 0, 0)


def test_a_decoded_transaction_counts_once():
    base = plan.Snapshot.parse("100:110:102,105")  # the snapshot the source checksum was taken in
    cur = plan.Snapshot.parse("100:200:")
    # committed before the checksum's position: in it (a round that died before advancing decodes it again)
    assert not plan.delta_applies(end=50, xid32=150, sums_at=50, base=base, current=cur)
    # after the position, but visible in the checksum's snapshot: in it already
    assert not plan.delta_applies(end=60, xid32=104, sums_at=50, base=base, current=cur)
    # running when it was taken, or started after it: not in it
    assert plan.delta_applies(end=60, xid32=105, sums_at=50, base=base, current=cur)
    assert plan.delta_applies(end=60, xid32=150, sums_at=50, base=base, current=cur)
    # the epoch comes from the current snapshot: an xid past 2^32 is not mistaken for an old one
    base8 = plan.Snapshot.parse(f"{2 ** 32 - 10}:{2 ** 32 - 5}:")
    cur8 = plan.Snapshot.parse(f"{2 ** 32 + 10}:{2 ** 32 + 20}:")
    assert plan.delta_applies(end=60, xid32=3, sums_at=50, base=base8, current=cur8)
    assert not plan.delta_applies(end=60, xid32=2 ** 32 - 20, sums_at=50, base=base8, current=cur8)
    assert plan.Snapshot.parse(base.text()) == base and base.text() == "100:110:102,105"


def test_decoded_rows_are_hashed_as_the_table_prints_them():
    text = q.decoded_row_sums(3).as_string()
    assert "ROW(x.c0, x.c1, x.c2)::text" in text and text.count("unnest(%s::text[])") == 3
    assert 'hashtextextended(ROW(x.c0, x.c1, x.c2)::text COLLATE "C", 0)' in text and ", 1)" in text
    assert "unnest(%s::int[])" in text and "x.s *" in text
    with pytest.raises(ValueError):
        q.decoded_row_sums(0)


def test_the_row_trigger_of_a_keyless_table_records_signed_hashes_in_normalised_settings():
    f = q.note_rows_function().as_string()
    assert "SET \"TimeZone\" TO 'UTC'" in f and "SET \"extra_float_digits\" TO '1'" in f
    assert "SET \"bytea_output\" TO 'hex'" in f and "SET \"IntervalStyle\" TO 'postgres'" in f
    assert "r := OLD::text" in f and "r := NEW::text" in f and "-1, hashtextextended(r COLLATE \"C\", 0)" in f
    stmts = [s.as_string() for s in q.install_triggers(("app", "k"), "app.k", q.NOTE_ROWS)]
    assert any('"verify_note_rows"(\'app.k\')' in s and "FOR EACH ROW" in s for s in stmts)
    assert any('"verify_note_whole"(\'app.k\')' in s and "AFTER TRUNCATE" in s for s in stmts)
    assert "DELETE FROM" in q.consume_deltas().as_string() and "DELETE" not in q.read_deltas().as_string()
    assert "verify_deltas" in " ".join(s.as_string() for s in q.drop_target_objects())
    ddl = q.target_ddl().as_string()
    assert "ADD COLUMN IF NOT EXISTS \"src_sums\" text" in ddl and "verify_note_rows" in ddl


def test_report_names_the_tables_compared_by_checksum():
    r = VerifyReport(ok=True, mode="upgrade", tables=[TableResult("a", 1, 1, True, "checksum")], keys_rechecked=5,
                     by_checksum=["a"])
    assert "1 keyless table(s) by checksum, 0 table(s) re-read whole" in r.summary()
    assert "keyless" not in VerifyReport(ok=True, mode="upgrade").summary()
