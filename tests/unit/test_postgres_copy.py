"""The COPY text of baileys_dr_postgres: escaping, the stream's chunks, an error while producing lines."""

from __future__ import annotations

from ansible.module_utils import baileys_dr_failback_errors as fb_errors
from ansible.module_utils import baileys_dr_postgres as pg


def test_copy_text_escapes_what_copy_text_format_reads_as_control():
    assert pg.copy_text('a\\b\tc\nd\re"') == 'a\\\\b\\tc\\nd\\re"'


def test_the_copy_stream_yields_every_line_in_chunks_of_at_most_the_size_asked():
    lines = ["%d\t%s\n" % (i, "é" * (i % 50)) for i in range(2000)]
    stream = pg.CopyStream(iter(lines))
    chunks = []
    while True:
        chunk = stream.read(1000)
        if not chunk:
            break
        assert len(chunk) <= 1000
        chunks.append(chunk)
    assert b"".join(chunks).decode("utf-8") == "".join(lines) and stream.error is None


def test_an_error_while_producing_copy_lines_ends_the_stream_and_is_kept_for_the_caller():
    def lines():
        yield "1\n"
        raise fb_errors.FileProblem("is not JSON")

    stream = pg.CopyStream(lines())
    assert stream.read(100) == b"1\n" and stream.read(100) == b""
    assert isinstance(stream.error, fb_errors.FileProblem)
