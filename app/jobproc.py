"""Runs a worker function in a child Python process and relays what it emits.

Inside the GUI process a job's thread holds the GIL for long stretches (first-use imports of
transformers' modeling code, torch calls that keep it), and the UI thread cannot run meanwhile:
the window stutters for up to ~200 ms at a time. A child process has its own interpreter and GIL,
so the UI thread only ever waits for the operating system's scheduler — and the job process
runs at a lower CPU priority (`job_niceness()`), so that wait is short too.

`run_in_child(fn, kwargs, sink=, cancel=)` has the worker-function shape `TaskRunner` expects: it
blocks the calling (worker) thread until the child ends, passes the child's events to `sink`
(the same core event dataclasses), returns the child's return value, re-raises the child's
exception (same class and message where it pickles, the child's traceback chained as its cause)
and raises `Cancelled` once a cancel request made the child stop.

The parent and its own spawned child talk over two pipes, never through files. Child → parent,
pickled tuples: ("event", ev) any number of times, then exactly one of ("result", value),
("error", exc | None, message, type name, traceback text) or ("cancelled",). Parent → child:
"cancel", which fires the child's CancelToken; end of file on that pipe (the parent died) fires
it too, so an orphaned job stops and cleans up after itself. What the child prints goes to its
stderr and never into either pipe.

This module never imports Qt: the child imports it (and the modules its function lives in).
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

from core.events import CancelToken, Cancelled, Log, Sink, null_sink

log = logging.getLogger(__name__)

# How long a cancelled child may take to stop by itself (the engine checks between linears and
# removes its partial output) before it is killed.
KILL_AFTER_S = 5.0
# How often the waiting worker thread looks at the cancel token between two child messages.
_POLL_S = 0.05
# The job process's CPU priority below the GUI's (POSIX nice). A job keeps every core busy; on an
# equal footing the scheduler makes the UI thread wait its turn behind the job's threads after
# each repaint (measured on 2 cores: p99 timer lateness 56-67 ms at nice 0, 22-29 ms at 10).
# It costs the job nothing when the machine has nothing else to do; while other programs keep
# the cores busy the job gets a smaller share. QUANTSCOPE_JOB_NICENESS=N sets another value.
JOB_NICENESS = 10
_NICENESS_ENV = "QUANTSCOPE_JOB_NICENESS"


def job_niceness() -> int:
    """How much lower than the GUI's the job process's priority is (never higher than the GUI's)."""
    try:
        return max(0, int(os.environ.get(_NICENESS_ENV, JOB_NICENESS)))
    except ValueError:
        return JOB_NICENESS


class JobProcessError(RuntimeError):
    """The child failed with an exception that could not be sent back as it was, or the child
    process ended without reporting (killed by a signal, e.g. the out-of-memory killer)."""


class _RemoteTraceback(Exception):
    """Carries the child's formatted traceback as the cause of the re-raised exception, so the
    details pane shows where in the child it failed (as concurrent.futures does)."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


def run_in_child(fn: Callable[..., Any], kwargs: dict[str, Any] | None = None, *, sink: Sink = null_sink,
                 cancel: CancelToken | None = None, on_kill: Callable[[], None] | None = None,
                 kill_after: float = KILL_AFTER_S) -> Any:
    """Call `fn(sink=..., cancel=..., **kwargs)` in a spawned child process (see module docstring).

    `fn` must be a module-level function and `kwargs` picklable. `on_kill` runs after a child that
    ignored a cancel request for `kill_after` seconds was killed; it removes what the child could
    not (e.g. the job's temporary output folder).
    """
    ctx = multiprocessing.get_context("spawn")  # fork would copy the GUI's threads and Qt state
    events_in, events_out = ctx.Pipe(duplex=False)
    control_in, control_out = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(fn, dict(kwargs or {}), events_out, control_in),
                       name=f"quantscope-{getattr(fn, '__name__', 'job')}", daemon=True)
    proc.start()
    # Only the child holds these ends now, so its exit shows up here as end of file.
    events_out.close()
    control_in.close()
    try:
        try:
            outcome = _relay(proc, events_in, control_out, sink, cancel, kill_after)
        except BaseException:
            # The relay itself failed (e.g. the sink's receiver is gone): stop the job as if
            # cancelled rather than leave it running unobserved.
            _request_cancel(control_out)
            if not _stop(proc, kill_after) and on_kill is not None:
                on_kill()
            raise
        _stop(proc, kill_after)
    finally:
        events_in.close()
        control_out.close()
    if outcome is None or (outcome[0] == "died" and cancel is not None and cancel.cancelled):
        # Killed after ignoring the cancel request, or gone without a word after one: nothing
        # removed its partial output.
        if on_kill is not None:
            on_kill()
        raise Cancelled("cancelled by user")
    return _unpack(outcome, proc)


def _relay(proc: Any, events: Connection, control: Connection, sink: Sink, cancel: CancelToken | None,
           kill_after: float) -> tuple | None:
    """Forward events until the child's outcome arrives; None when the child had to be killed."""
    cancel_sent: float | None = None
    while True:
        if cancel is not None and cancel.cancelled and cancel_sent is None:
            cancel_sent = time.monotonic()
            _request_cancel(control)
        if cancel_sent is not None and time.monotonic() - cancel_sent > kill_after:
            log.warning("job process %s ignored the cancel request for %.0f s; killing it", proc.pid, kill_after)
            proc.kill()
            return None
        ready = wait([events, proc.sentinel], timeout=_POLL_S)
        if not ready:
            continue
        # Read the pipe even when the child has exited: its last messages are still in it.
        if events not in ready and not events.poll():
            return ("died",)
        try:
            msg = events.recv()
        except EOFError:
            return ("died",)
        except Exception as exc:  # noqa: BLE001 - a message that does not unpickle here
            return ("error", None, f"could not read the job process's message: {exc}", type(exc).__name__,
                    traceback.format_exc())
        if msg[0] == "event":
            sink(msg[1])
        else:
            return msg


def _request_cancel(control: Connection) -> None:
    try:
        control.send("cancel")
    except OSError:
        pass  # the child is already gone; its outcome (or end of file) is in the event pipe


def _stop(proc: Any, grace: float) -> bool:
    """Wait for the child to exit (it does right after reporting); kill it if it hangs. True when
    it exited by itself."""
    proc.join(grace)
    if not proc.is_alive():
        return True
    log.warning("job process %s did not exit; killing it", proc.pid)
    proc.kill()
    proc.join()
    return False


def _unpack(outcome: tuple, proc: Any) -> Any:
    kind = outcome[0]
    if kind == "result":
        return outcome[1]
    if kind == "cancelled":
        raise Cancelled("cancelled by user")
    if kind == "error":
        _, exc, message, type_name, tb = outcome
        if not isinstance(exc, BaseException):
            exc = JobProcessError(message or type_name)
        exc.__cause__ = _RemoteTraceback(tb)
        raise exc
    code = proc.exitcode
    if code is not None and code < 0:
        how = f"was killed by signal {-code}" + (" (out of memory?)" if code == -9 else "")
    else:
        how = f"exited with code {code} without a result"
    raise JobProcessError(f"the job process {how}")


# ------------------------------------------------------------------------------------ child side

def _child_main(fn: Callable[..., Any], kwargs: dict[str, Any], events: Connection, control: Connection) -> None:
    # Whatever a library prints (Python or C level) goes to stderr: stdout may be a parent's
    # document (`--json`), and the event channel is a pipe of its own.
    try:
        sys.stdout.flush()
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
    if hasattr(os, "nice"):
        os.nice(job_niceness())
    cancel = CancelToken()
    threading.Thread(target=_watch_control, args=(control, cancel), name="quantscope-cancel", daemon=True).start()
    lock = threading.Lock()  # the sink may be called from any of the function's threads

    def send(msg: tuple) -> None:
        with lock:
            events.send(msg)

    def sink(event: Any) -> None:
        try:
            data = pickle.dumps(("event", event), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - one odd event must not fail the job
            data = pickle.dumps(("event", Log("debug", f"event {type(event).__name__} not relayed: {exc}")))
        with lock:
            events.send_bytes(data)

    try:
        try:
            sink(Log("debug", f"running in job process {os.getpid()}"))
            result = fn(sink=sink, cancel=cancel, **kwargs)
        except Cancelled:
            send(("cancelled",))
        except BaseException as exc:  # noqa: BLE001 - every failure is reported to the parent
            send(("error", _sendable(exc), str(exc), type(exc).__name__, traceback.format_exc()))
        else:
            try:
                send(("result", result))
            except Exception as exc:  # noqa: BLE001 - an unpicklable result
                send(("error", None, f"the job's result could not be sent back: {exc}", type(exc).__name__,
                      traceback.format_exc()))
    except OSError:
        pass  # the parent is gone; nobody is left to tell
    finally:
        events.close()


def _watch_control(control: Connection, cancel: CancelToken) -> None:
    try:
        while control.recv() != "cancel":
            pass
    except (EOFError, OSError):
        pass  # the parent closed its end or died: stop the job as if cancelled
    cancel.cancel()


def _sendable(exc: BaseException) -> BaseException | None:
    """`exc` when it pickles and its class rebuilds from what it pickles to (what the parent's
    unpickling does), with the same message — so a ValueError reaches the user word for word and
    `isinstance` checks still work — else None."""
    try:
        pickle.dumps(exc)
        rebuild, args = exc.__reduce_ex__(pickle.HIGHEST_PROTOCOL)[:2]
        back = rebuild(*args)
    except Exception:  # noqa: BLE001 - exceptions with custom constructors often do not
        return None
    return exc if type(back) is type(exc) and str(back) == str(exc) else None


# ------------------------------------------------------------------------------------ self-test

def _selftest_child(*, sink: Sink, cancel: CancelToken) -> dict[str, Any]:
    sink(Log("info", "hello from the job process"))
    return {"pid": os.getpid(), "frozen": bool(getattr(sys, "frozen", False)),
            "nice": os.nice(0) if hasattr(os, "nice") else None}


def selftest() -> int:
    """`python -m app.jobproc` (in a standalone build: `quantscope -m app.jobproc`): start one job
    process and get an event and a result back; proves process start-up works where it runs."""
    events: list[Any] = []
    got = run_in_child(_selftest_child, sink=events.append)
    ok = got["pid"] != os.getpid() and any(getattr(e, "message", "") == "hello from the job process" for e in events)
    print(f"job process {'ok' if ok else 'FAILED'}: pid {got['pid']} (this one {os.getpid()}), "
          f"nice {got['nice']}, frozen {got['frozen']}, {len(events)} events")
    return 0 if ok else 1


if __name__ == "__main__":
    # Through the module's own name, so the child finds the function as app.jobproc._selftest_child.
    from app.jobproc import selftest as _selftest

    sys.exit(_selftest())
