"""pgcopydb 0.17 restarting its follow loop forever after the endpos: both forms
seen on real runs are recognised, and a run still on its way is not."""

from steps.engines.pgcopydb_follow.follow import EndposLoop

STREAM_FORM = """\
INFO   ld_stream.c:518   Streamed up to write_lsn 0/15AD7568, flush_lsn 0/15AD7568, stopping: endpos is 0/15AD7E68
INFO   follow.c:218      Current sentinel replay_lsn is 0/15AB00F0, endpos is 0/15AD7E68
INFO   ld_apply.c:140    Apply reached 0/15AD7568 in "cdc/000000010000000000000015.sql"
INFO   follow.c:218      Current sentinel replay_lsn is 0/15AD7568, endpos is 0/15AD7E68
INFO   ld_stream.c:518   Streamed up to write_lsn 0/15AD7568, flush_lsn 0/15AD7568, stopping: endpos is 0/15AD7E68
INFO   follow.c:218      Current sentinel replay_lsn is 0/15AD7568, endpos is 0/15AD7E68
INFO   follow.c:218      Current sentinel replay_lsn is 0/15AD7568, endpos is 0/15AD7E68
""".splitlines()


def feed(lines):
    loop = EndposLoop()
    return [loop.feed(line) for line in lines], loop


def test_stream_form_is_recognised_once_replay_caught_up_with_the_stream():
    results, loop = feed(STREAM_FORM)
    assert results.count(True) == 1 and results[-1] is True
    assert (loop.endpos_text, loop.at_text) == ("0/15AD7E68", "0/15AD7568")


def test_apply_still_behind_the_stream_is_not_stuck():
    # replay_lsn below what was streamed: the apply still has work; never signal.
    lines = [STREAM_FORM[0]] + ["INFO follow.c:218 Current sentinel replay_lsn is 0/15AB00F0, endpos is 0/15AD7E68"] * 5
    results, loop = feed(lines)
    assert not any(results) and not loop.stuck


def test_copy_phase_stop_with_no_endpos_is_not_stuck():
    lines = ["Streamed up to write_lsn 0/15A97FE8, flush_lsn 0/15A97FE8, stopping: endpos is 0/0"] + \
            ["Current sentinel replay_lsn is 0/15A97FE8, endpos is 0/0"] * 5
    assert not any(feed(lines)[0])


def test_replay_reached_form():
    lines = ["Replay reached end position 0/10 at 0/8"] + ["Current sentinel replay_lsn is 0/8, endpos is 0/10"] * 2
    results, loop = feed(lines)
    assert results == [False, False, True] and loop.endpos_text == "0/10" and loop.reached_endpos


def test_only_the_apply_statement_counts_as_reached():
    # follow trusts "Replay reached end position" when pgcopydb exits right after
    # it (exit 12 on a broken pipe); the stream form never sets it.
    assert not feed(STREAM_FORM)[1].reached_endpos
    assert feed(["Replay reached end position 0/12E88410 at 0/12E882A8"])[1].reached_endpos
