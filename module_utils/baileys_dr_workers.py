# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Work shared among forked worker processes (Workers), and one call run in a thread beside (in_thread).

Used by the full export (a company per task), the standby refresh (a share of the companies per worker), the proof of
a tree (a chunk of companies per task) and the failback (baileys_dr_failback).
"""

from __future__ import annotations

import os
import signal
import threading

from ansible.module_utils.baileys_dr_fs import libc
from ansible.module_utils.baileys_dr_tree import SessionsError

# A full export of at least this many keys (and 2 companies) is shared among worker processes, at most this many.
PARALLEL_MIN_KEYS = 20000
MAX_EXPORT_WORKERS = 4


def export_workers():
    """Worker processes a large full export uses: one per usable CPU, at most MAX_EXPORT_WORKERS."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_EXPORT_WORKERS))


_prctl = None


def _die_with_parent():
    """PR_SET_PDEATHSIG: a worker must not outlive a killed module (it would write into a removed staging tree)."""
    global _prctl
    try:
        if _prctl is None:
            _prctl = libc().prctl
        _prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Workers:
    """Forked worker processes, each with its own state (its own database connection), doing the tasks the parent hands
    out one at a time, so that JSON work, file I/O and the server's work use every core. Shared by the export
    (ExportWorkers) and the failback (baileys_dr_failback).

    start(attach, do, detach) forks; in each worker, state = attach() (its connection), then do(state, task) gives the
    (picklable) result of each task received, and detach(state) ends it. Protocol on each worker's pipe: the worker sends
    ("ready", None) once attached, then ("done", position, result) per task, or ("error", exception) and exits. start()
    returns False when a worker could not attach (max_connections, say): the caller then does the work alone. The workers
    are forked with the parent's memory as it is then: they see what the parent computed before, nothing after.
    """

    def __init__(self, count, what="a worker"):
        self.count = count
        self.what = what
        self.pids = {}  # pipe -> pid
        self.failures = {}  # position -> exception of a task whose worker failed (map(drain=True))

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.kill()

    def start(self, attach, do, detach=None):
        try:
            for _ in range(self.count):
                self._start(attach, do, detach)
        except BaseException:
            self.kill()
            raise
        for pipe in list(self.pids):
            try:
                self._receive(pipe)
            except Exception:
                self.kill()
                return False
        return True

    def _start(self, attach, do, detach):
        from multiprocessing.connection import Pipe  # here, not at the top: most runs never fork

        parent_end, child_end = Pipe()
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the parent's stack
            code = 1
            try:
                parent_end.close()
                _die_with_parent()
                self._work(child_end, attach, do, detach)
                code = 0
            except BaseException:  # noqa: B036 - the worker reports what it can, then exits
                pass
            finally:
                os._exit(code)
        child_end.close()
        self.pids[parent_end] = pid

    def _work(self, pipe, attach, do, detach):
        state = None
        try:
            state = attach()
            pipe.send(("ready", None))
            while True:
                message = pipe.recv()
                if message is None:
                    break
                position, task = message
                pipe.send(("done", position, do(state, task)))
        except BaseException as exc:  # noqa: B036 - sent to the parent, which raises it
            try:
                pipe.send(("error", exc))
            except Exception:
                pipe.send(("error", SessionsError("%s failed: %s: %s" % (self.what, type(exc).__name__, exc))))
            raise
        finally:
            if detach is not None and state is not None:
                detach(state)

    def _receive(self, pipe):
        try:
            message = pipe.recv()
        except (EOFError, OSError):
            pid = self.pids.get(pipe)
            raise SessionsError("%s (pid %s) ended without a word (killed?)" % (self.what, pid)) from None
        if message[0] == "error":
            raise message[1]
        return message

    def map(self, tasks, accept=None, drain=False):
        """{position: result} of the tasks (a list), handed out one at a time to whichever worker is free.

        accept(position, result), called in the parent as each result comes, returning False hands out no further task
        (the tasks in flight finish; the others get no result). A failed worker raises its error at once, unless drain:
        then it gets no further task, the others finish theirs, and the failure is in failures (its task's position)."""
        from multiprocessing.connection import wait

        results, pending, next_position, stopped = {}, {}, 0, False
        idle = list(self.pids)
        while True:
            while idle and not stopped and next_position < len(tasks):
                pipe = idle.pop()
                pipe.send((next_position, tasks[next_position]))
                pending[pipe] = next_position
                next_position += 1
            if not pending:
                return results
            for pipe in wait(list(pending)):
                position = pending.pop(pipe)
                try:
                    _, _, result = self._receive(pipe)
                except Exception as exc:
                    if not drain:
                        raise
                    self.failures[position] = exc
                    self._forget(pipe)
                    stopped = True
                    continue
                results[position] = result
                idle.append(pipe)
                if accept is not None and accept(position, result) is False:
                    stopped = True

    def finish(self):
        """Let every worker end (detach), then reap it; a worker that ended badly raises."""
        for pipe in self.pids:
            pipe.send(None)
        for pipe, pid in list(self.pids.items()):
            status = os.waitpid(pid, 0)[1]
            del self.pids[pipe]
            pipe.close()
            if os.waitstatus_to_exitcode(status) != 0:
                raise SessionsError("%s (pid %d) failed at its end (exit %d)" % (self.what, pid, os.waitstatus_to_exitcode(status)))

    def _forget(self, pipe):
        pid = self.pids.pop(pipe)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        pipe.close()

    def kill(self):
        """Kill and reap whatever worker is left (after a failure, before the staging tree is removed)."""
        for pipe in list(self.pids):
            self._forget(pipe)


def in_thread(function, *args):
    """Start function(*args) in a thread; returns a callable that waits and gives its result (or raises its error)."""
    outcome = {}

    def target():
        try:
            outcome["value"] = function(*args)
        except BaseException as exc:  # handed to the caller
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="baileys-dr-check", daemon=True)
    thread.start()

    def result():
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]
    return result
