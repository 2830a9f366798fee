"""The client-side deadline of connect(): a frozen server ends a query instead of hanging it, and nothing else changes.

A frozen server is a real backend stopped with SIGSTOP (what `docker pause` does to it): it enforces no
statement_timeout and its kernel still acknowledges everything, so only the client can end the wait.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time

import psycopg2
import psycopg2.extensions
import pytest

from ansible.module_utils import baileys_dr_testdata as testdata
from ansible.module_utils.baileys_dr_postgres import DatabaseError, client_deadline, connect


@contextlib.contextmanager
def frozen_backend(conn):
    """The server process behind conn stopped (SIGSTOP) for the duration."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        pid = cur.fetchone()[0]
    conn.rollback()
    os.kill(pid, signal.SIGSTOP)
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.fixture
def no_wait_callback():
    """Every test starts and ends without a process-wide wait callback left behind."""
    assert psycopg2.extensions.get_wait_callback() is None
    yield
    assert psycopg2.extensions.get_wait_callback() is None, "a wait callback was left installed"


def test_the_deadline_is_statement_timeout_plus_connect_timeout_and_none_without_statement_timeout():
    assert client_deadline({"statement_timeout": 1500, "connect_timeout": 2}) == 3.5
    assert client_deadline({"statement_timeout": 1500}) == 11.5
    assert client_deadline({"statement_timeout": 0, "connect_timeout": 2}) == 0
    assert client_deadline({}) == 0


def test_a_frozen_server_fails_the_query_with_a_clear_error_after_the_deadline(db_params, no_wait_callback):
    params = dict(db_params, statement_timeout=500, connect_timeout=1)
    conn = connect(params)
    try:
        with frozen_backend(conn):
            started = time.monotonic()
            with pytest.raises(psycopg2.OperationalError) as caught:
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
            elapsed = time.monotonic() - started
        message = str(caught.value)
        assert message == "no answer from PostgreSQL at 127.0.0.1:%d/baileys within 1.5 s (server frozen?)" % db_params["login_port"]
        assert db_params["login_password"] not in message
        assert 1.5 <= elapsed < 1.5 + 2, "the deadline fired after %.1fs" % elapsed
        assert conn.closed, "a connection that lost its server is not reused"
    finally:
        conn.close()


def test_a_server_side_cursor_streams_under_the_deadline(db_params, no_wait_callback):
    conn = connect(dict(db_params, statement_timeout=5000))
    try:
        assert psycopg2.extensions.get_wait_callback() is not None
        with conn.cursor(name="deadline_stream") as cur:
            cur.itersize = 100
            cur.execute("SELECT g, repeat('x', 100) FROM generate_series(1, 2500) AS g")
            seen = 0
            while True:
                rows = cur.fetchmany(100)
                if not rows:
                    break
                seen += len(rows)
        assert seen == 2500
        conn.rollback()
    finally:
        conn.close()


def test_copy_works_while_a_connection_with_a_deadline_is_open(db, db_params, no_wait_callback):
    """The test data loader (COPY) next to an export with a deadline, on connections opened before and after it."""
    guarded = connect(dict(db_params, statement_timeout=5000))
    late = connect(db_params)  # opened while the callback is installed: a non-blocking socket
    try:
        callback = psycopg2.extensions.get_wait_callback()
        assert callback is not None
        testdata.load(db, "deadline-copy", 2, 5)
        db.commit()
        # About 3 MB through the non-blocking socket: more than the kernel buffers hold at once.
        testdata.load(late, "deadline-copy-late", 4, 2000, prefix="late")
        late.commit()
        assert psycopg2.extensions.get_wait_callback() is callback, "the deadline is back after COPY"
        with guarded.cursor() as cur:
            cur.execute("SELECT count(*) FROM whatsapp_keys WHERE company_id LIKE 'company%'")
            assert cur.fetchone()[0] > 0
            cur.execute("SELECT count(*), count(DISTINCT company_id) FROM whatsapp_keys WHERE company_id LIKE 'late%'")
            assert cur.fetchone() == (8000, 4)
        guarded.rollback()
    finally:
        late.close()
        guarded.close()


def test_the_wait_callback_is_removed_when_the_last_connection_with_a_deadline_closes(db_params, no_wait_callback):
    first = connect(dict(db_params, statement_timeout=5000))
    second = connect(dict(db_params, statement_timeout=5000))
    plain = connect(db_params)
    first.close()
    assert psycopg2.extensions.get_wait_callback() is not None, "second still needs it"
    second.close()
    # no_wait_callback checks that nothing is left; the plain connection works outside green mode.
    assert psycopg2.extensions.get_wait_callback() is None
    with plain.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
    plain.close()


def test_connect_timeout_still_holds_for_a_server_that_never_answers_the_handshake(db_params, no_wait_callback):
    """libpq ignores connect_timeout for a polled (green) connection: the deadline enforces it instead."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # the kernel accepts the TCP connection; nobody ever answers the startup packet
    guarded = connect(dict(db_params, statement_timeout=5000))
    try:
        params = dict(db_params, login_port=silent.getsockname()[1], connect_timeout=1, statement_timeout=500)
        started = time.monotonic()
        with pytest.raises(DatabaseError) as caught:
            connect(params)
        elapsed = time.monotonic() - started
        assert str(caught.value) == "cannot connect to PostgreSQL at 127.0.0.1:%d/baileys: timeout expired" % params["login_port"]
        assert 1 <= elapsed < 1 + 2, "connect_timeout=1 fired after %.1fs" % elapsed
    finally:
        guarded.close()
        silent.close()
