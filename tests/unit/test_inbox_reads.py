"""Which lines of an inbox file were read before its writer finished them (no Spark)."""

from __future__ import annotations

import os

from lakehouse.streaming import may_end_unfinished, unfinished_lines


def test_an_unterminated_end_or_the_start_of_a_longer_line_is_unfinished():
    data = b'{"a": 1}\n{"b": 2\n{"c": 3}\r\n{"d": 4}\r{"e": 5, "f"'
    # Read while the writer was at '{"e": 5': the start of the longer last line now.
    assert unfinished_lines(data, ['{"e": 5']) == {'{"e": 5'}
    assert unfinished_lines(data, ['{"e": 5, "f"']) == {'{"e": 5, "f"'}  # the unterminated end itself
    # Whole lines, whatever their line end (\n, \r\n, \r), are not: broken JSON is the writer's own.
    assert unfinished_lines(data, ['{"b": 2', '{"c": 3}', '{"d": 4}', '{"a": 1}']) == set()
    # Text inside a line is not the start of one; an empty line and a line not in the file are not.
    assert unfinished_lines(data, ['"a": 1', '', 'zzz']) == set()
    # Text that is a whole line and also the start of a longer one counts as unfinished: the file as it
    # is now cannot tell which of the two was read.
    assert unfinished_lines(b'{"x"\n{"x": 1}\n', ['{"x"']) == {'{"x"'}
    assert unfinished_lines("{\"u\": \"J\u00fcrgen".encode(), ["{\"u\": \"J\u00fc"]) == {"{\"u\": \"J\u00fc"}
    # Spark's text source drops a byte order mark at the start of a file: the line read starts after it.
    assert unfinished_lines(b'\xef\xbb\xbf{"a": 1', ['{"a": 1']) == {'{"a": 1'}


def test_a_file_may_end_unfinished_when_it_changed_or_lacks_a_final_line_end(tmp_path):
    done, crlf, open_end, empty = (tmp_path / n for n in ("done", "crlf", "open", "empty"))
    done.write_bytes(b"x\ny\n")
    crlf.write_bytes(b"x\r\n")
    open_end.write_bytes(b"x\ny")
    empty.write_bytes(b"")
    ms = {p: os.stat(p).st_mtime_ns // 1_000_000 for p in (done, crlf, open_end, empty)}
    assert not may_end_unfinished(str(done), ms[done])
    assert not may_end_unfinished(str(crlf), ms[crlf])
    assert not may_end_unfinished(str(empty), ms[empty])
    assert may_end_unfinished(str(open_end), ms[open_end])
    assert may_end_unfinished(str(done), ms[done] - 1000)  # changed since it was listed
    assert may_end_unfinished(str(done), None)  # not listed: unknown
    assert not may_end_unfinished(str(tmp_path / "gone"), 0)
