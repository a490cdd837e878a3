"""Leak detection: who holds a connection longer than ``leak_threshold``, and from where.

At checkout (only when ``leak_threshold`` is set) the pool notes the time, the holder (the asyncio
task's name, or the thread's) and the checkout site: a walk of the frames as (code, offset) pairs,
nothing formatted. One watcher per pool (a ``call_later`` on the event loop for async engines, a
daemon thread for sync ones), started lazily and asleep until the earliest checkout reaches the
threshold, reports each connection once while it is still out: a WARNING on
``fault_tolerant_pool.leak`` with the holder, the age and the application's frames of the checkout
(SQLAlchemy's, the pool's and the event loop's left out). When it comes back, one INFO. A
connection that SQLAlchemy's garbage collector reclaims (never returned) is reported with the same
site. HikariCP's ``leakDetectionThreshold`` is the model.
"""

from __future__ import annotations

import asyncio
import linecache
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import CodeType
from typing import Any, Protocol

import sqlalchemy

try:
    from greenlet import getcurrent  # type: ignore[import-untyped]
except ImportError:  # only async engines call it, and they cannot run without greenlet
    getcurrent = None

from .errors import redact
from .lifetime import optional_seconds
from .stats import LeakKind

logger = logging.getLogger("fault_tolerant_pool.leak")

#: Off unless asked for (HikariCP's default too).
DEFAULT_LEAK_THRESHOLD: float | None = None
#: Frames kept per checkout, innermost first: the checkout site and its callers.
MAX_FRAMES = 32

#: What a report is about: held past the threshold, reclaimed by the garbage collector, still
#: out when the pool shut down.
LEAK_KINDS: tuple[LeakKind, ...] = ("held", "reclaimed", "shutdown")


def leak_threshold(value: Any) -> float | None:
    """``leak_threshold``: a positive number of seconds, or None (off)."""
    return optional_seconds("leak_threshold", value)


# -- the checkout site --------------------------------------------------------------------------

Stack = list[Any]
"""Innermost first, flat: each frame's code, then the offset of its current instruction (one
list per checkout, no tuple per frame: fewer objects for the garbage collector to count)."""


CALLERS: Any = object()
"""``capture_stack``'s default start: the frame of its caller's caller."""

#: Where a task's own stack begins: frames above it belong to whoever runs the event loop.
_LOOP_STEP: CodeType = asyncio.events.Handle._run.__code__


def capture_stack(frame: Any = CALLERS, outer: Any = None, last: Any = None) -> Stack:
    """The frames from ``frame`` (default: the caller's caller; None: none) outwards, cheaply:
    no line numbers, no strings (resolved when reported).

    ``outer``: for async engines, the frame the parent greenlet (the event loop's, running the
    task) is suspended in, or one of its callers; the pool's code runs in SQLAlchemy's greenlet,
    whose own frames end where it was spawned, so the walk goes on from ``outer`` to the
    application's coroutines, up to ``last`` (the task's outermost coroutine) or the event
    loop's step of the task.

    Every frame walked costs Python a frame object, made now and freed when the frame returns
    (measured: 2-3 % of a ``SELECT 1`` loop's throughput for 8 frames), so the walk is two plain
    loops (this greenlet's frames, then the parent's), stops at ``last`` without touching the
    event loop's frames, and stops at :data:`MAX_FRAMES`.
    """
    if frame is CALLERS:
        frame = _getframe(2)
    stack: Stack = []
    append = stack.append
    left = MAX_FRAMES
    while frame is not None:  # this greenlet's frames (a thread's: all of them)
        code = frame.f_code
        if code is _LOOP_STEP or not left:
            return stack
        append(code)
        append(frame.f_lasti)
        left -= 1
        frame = frame.f_back
    if outer is not None:
        frame = outer
        while frame is not None:
            code = frame.f_code
            if code is _LOOP_STEP or not left:
                break
            append(code)
            append(frame.f_lasti)
            left -= 1
            if frame is last:
                break
            frame = frame.f_back
    return stack


def capture_task_stack(depth: int, parent: Any, last: Any) -> Stack:
    """:func:`capture_stack` for a checkout in SQLAlchemy's greenlet, ``depth`` frames above
    the caller: the parent's frames first, and this greenlet's only when they may hold the
    application's. ``AsyncConnection.start`` spawns the greenlet that runs ``Engine.connect``,
    all SQLAlchemy's own frames (left out of a report anyway), so after it they are not walked,
    and neither ``start`` nor ``greenlet_spawn`` above it is kept: the checkout of
    ``async with engine.connect()`` keeps two frames (``__aenter__`` and the application's).
    Anything else (``run_sync``, a session) walks them: the application's code may run there.
    """
    spawn = None if parent is None else parent.gr_frame  # greenlet_spawn, in its switch here
    start = None if spawn is None else spawn.f_back
    if start is not None and start.f_code is _async_connection_start and start is not last:
        return capture_stack(None, start.f_back, last)
    outer = capture_stack(None, spawn, last)  # the parent's frames only
    return (capture_stack(_getframe(depth + 1)) + outer)[: MAX_FRAMES * 2]


_getframe = sys._getframe
#: The coroutine that spawns SQLAlchemy's greenlet for ``AsyncEngine.connect()`` (the caller
#: of ``greenlet_spawn`` in the parent greenlet); set once an async engine's tracker exists
#: (``sqlalchemy.ext.asyncio`` needs greenlet, which a sync-only install may lack).
_async_connection_start: CodeType | None = None


def _find_async_connection_start() -> None:
    global _async_connection_start
    if _async_connection_start is None:
        from sqlalchemy.ext.asyncio import AsyncConnection

        _async_connection_start = AsyncConnection.start.__code__


def _line_of(code: CodeType, offset: int) -> int:
    for start, end, line in code.co_lines():
        if start <= offset < end and line is not None:
            return line
    return code.co_firstlineno


def _package_dirs(module: Any) -> set[str]:
    """A package's directory as imported and as resolved (they differ behind a symlink)."""
    path = Path(module.__file__)
    return {str(path.parent) + os.sep, str(path.resolve().parent) + os.sep}


def _hidden_prefixes() -> tuple[str, ...]:
    """Frames left out of a report: the house (SQLAlchemy, greenlet), the pool itself, and what
    runs every task or thread (the event loop, executors); code generated from a string too."""
    import concurrent.futures

    modules = [sqlalchemy, asyncio, concurrent.futures, sys.modules[__package__]]
    if getcurrent is not None:  # installed without greenlet: a sync engine, no greenlet frames
        modules.append(sys.modules["greenlet"])
    return tuple(sorted(set().union(*(_package_dirs(module) for module in modules))))


_HIDDEN_PREFIXES = _hidden_prefixes()
_THREADING = {threading.__file__, str(Path(threading.__file__).resolve())}


#: File names of code compiled from a string: SQLAlchemy generates some of its own functions
#: (a session's ``_connection_for_bind`` wrapper): 2.1 names them ``<sqlalchemy generated ...>``,
#: 2.0 ``<string>`` (as ``dataclasses`` does).
_GENERATED = ("<sqlalchemy generated ", "<string>")


def _hidden(filename: str) -> bool:
    return (
        filename.startswith(_HIDDEN_PREFIXES)
        or filename in _THREADING
        or filename.startswith(_GENERATED)
    )


class Site:
    """A checkout site resolved for a report: the application's frames, outermost first."""

    __slots__ = ("frames",)

    def __init__(self, stack: Stack) -> None:
        shown: list[tuple[str, int, str]] = []
        for code, offset in zip(stack[::2], stack[1::2], strict=True):
            if not _hidden(code.co_filename):
                shown.append((code.co_filename, _line_of(code, offset), code.co_name))
        shown.reverse()
        self.frames = shown

    def innermost(self) -> str:
        """``file:line in function`` of the frame that checked the connection out."""
        if not self.frames:
            return "an unknown site (no application frame)"
        filename, line, function = self.frames[-1]
        return f"{filename}:{line} in {function}"

    def format(self) -> str:
        lines = []
        for filename, line, function in self.frames:
            lines.append(f'  File "{filename}", line {line}, in {function}')
            source = linecache.getline(filename, line).strip()
            if source:  # a URL's password or a password= pair in the source is scrubbed
                lines.append(f"    {redact(source)}")
        return "\n".join(lines)


# -- one checkout ------------------------------------------------------------------------------

Entry = tuple[float, Any, Stack, Any]
"""What a checkout notes, as a plain tuple (the cheapest object to make): since when, held by
whom (the task, or the thread: names are read when reported), the stack, SQLAlchemy's weak
reference to the fairy."""


class Checkout:
    """One connection out of the pool, for a report: since when, held by whom, checked out
    where."""

    __slots__ = ("fairy", "record", "stack", "started", "who")

    def __init__(self, record: Any, entry: Entry) -> None:
        self.record = record
        self.started, self.who, self.stack, self.fairy = entry

    @property
    def holder(self) -> str:
        """``task 'name'`` or ``thread 'name'``, read now (both can be renamed)."""
        who = self.who
        if isinstance(who, threading.Thread):
            return f"thread {who.name!r}"
        if isinstance(who, asyncio.Task):
            return f"task {who.get_name()!r}"
        return f"task {who!r}"  # an asyncio.Future-like task of another loop implementation


_get_running_loop = asyncio.events._get_running_loop
_current_thread = threading.current_thread


def _task_lookup() -> Callable[[Any], Any]:
    """``asyncio.current_task(loop)`` for a loop known to run, without a Python frame when the
    interpreter allows: 3.12 and later implement it in C; 3.10 and 3.11 in Python, as a look
    into the ``_current_tasks`` mapping that the C tasks keep up to date (used directly)."""
    current_task = asyncio.current_task
    tasks = getattr(current_task, "__globals__", {}).get("_current_tasks")
    if isinstance(tasks, dict):
        return tasks.get
    return current_task


_current_task = _task_lookup()


class LeakListener(Protocol):
    """Told of every report (the counters behind ``stats()`` and the metric)."""

    def leaked(self, kind: LeakKind) -> None: ...


class Watcher(Protocol):
    """Calls ``tracker.watch()`` once ``delay`` seconds from now (started lazily)."""

    def ensure(self, delay: float) -> None: ...


class LeakTracker:
    """The checkouts of one pool (and of the pools it is recreated as) and their reports.

    Pure bookkeeping with an injected clock: :meth:`watch` reports what is due and says when to
    look again; a :class:`Watcher` decides how to wait for that.
    """

    def __init__(
        self,
        threshold: float,
        listener: LeakListener | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        in_loop: bool = False,
    ) -> None:
        self.threshold = threshold
        self.listener = listener
        self.clock = clock
        self.out: dict[Any, Entry] = {}
        self.reported: set[Any] = set()
        """The records of the checkouts reported while still out (each is reported once)."""
        self.armed: object = None
        """The event loop a :class:`LoopWatcher` has a wake-up scheduled on (None: none)."""
        self._lock = threading.Lock()  # one watch at a time: each checkout is reported once
        self.in_loop = False
        self.watcher: Watcher = ThreadWatcher(self)  # a thread starts only with a checkout
        self.use_loop(in_loop)

    def use_loop(self, in_loop: bool) -> None:
        """Choose the watcher: the event loop (async engines) or a thread (sync engines)."""
        if in_loop:
            _find_async_connection_start()
        if in_loop != self.in_loop:
            self.in_loop = in_loop
            self.watcher = LoopWatcher(self) if in_loop else ThreadWatcher(self)

    # -- the checkout path (every checkout: kept to a few attribute reads and one walk) -------

    def checked_out(self, record: Any, fairy_ref: Any, depth: int = 1) -> None:
        """``record``'s connection was lent; ``fairy_ref`` is SQLAlchemy's weak reference to
        what it lent; the checkout site's walk starts ``depth`` frames above this call (1: the
        caller)."""
        if self.in_loop:
            loop = _get_running_loop()
            task = None if loop is None else _current_task(loop)
            if task is None:  # a checkout outside any task: this thread's frames
                who: Any = _current_thread()
                stack = capture_stack(_getframe(depth))
            else:  # the task itself is kept: its name is read when reported
                who = task
                try:
                    last = task.get_coro().cr_frame  # its outermost frame
                except AttributeError:  # not a coroutine: up to the event loop's step
                    last = None
                stack = capture_task_stack(depth, getcurrent().parent, last)
            self.out[record] = (self.clock(), who, stack, fairy_ref)
            if loop is None or self.armed is not loop:
                self.watcher.ensure(self.threshold)
        else:
            self.out[record] = (self.clock(), _current_thread(), capture_stack(_getframe(depth)),
                                fairy_ref)  # fmt: skip
            self.watcher.ensure(self.threshold)

    def checked_in(self, record: Any) -> None:
        """``record`` came back: by the application, or reclaimed by the garbage collector."""
        entry = self.out.pop(record, None)
        if entry is None:
            return
        reported = self.reported
        was_reported = record in reported if reported else False
        if was_reported:
            reported.discard(record)
        fairy_ref = entry[3]
        if fairy_ref is not None and fairy_ref() is None:
            self._report(Checkout(record, entry), "reclaimed", self.clock())
        elif was_reported:
            logger.info(
                "previously reported leaked connection of %s returned after %.2fs",
                Checkout(record, entry).holder, self.clock() - entry[0],
            )  # fmt: skip

    # -- the watcher's side ------------------------------------------------------------------

    def watch(self) -> float | None:
        """Report every checkout past the threshold not reported yet; seconds until the next
        one is due, or None when no checkout is waiting for a report."""
        with self._lock:
            now = self.clock()
            due_at = None
            reported = self.reported
            for record, entry in list(self.out.items()):
                if record in reported:
                    continue
                deadline = entry[0] + self.threshold
                if deadline <= now:
                    reported.add(record)
                    self._report(Checkout(record, entry), "held", now)
                elif due_at is None or deadline < due_at:
                    due_at = deadline
            return None if due_at is None else due_at - now

    def oldest_age(self) -> float:
        """Seconds the oldest connection still out has been out (0.0 when none is)."""
        starts = [entry[0] for entry in list(self.out.values())]
        return self.clock() - min(starts) if starts else 0.0

    def stragglers(self) -> list[tuple[Any, Checkout]]:
        return [(record, Checkout(record, entry)) for record, entry in list(self.out.items())]

    def report_straggler(self, entry: Checkout) -> None:
        """Still out when the pool shut down: reported (again, if it was) as a leak."""
        self.reported.add(entry.record)
        self._report(entry, "shutdown", self.clock())

    def _report(self, entry: Checkout, kind: LeakKind, now: float) -> None:
        site = Site(entry.stack)
        age = now - entry.started
        if kind == "held":
            what = (
                f"connection leak: checked out {age:.2f}s ago by {entry.holder} and not returned "
                f"(leak_threshold={self.threshold:g}s)"
            )
        elif kind == "reclaimed":
            what = (
                f"connection leak: checked out by {entry.holder} {age:.2f}s ago and never "
                "returned; reclaimed by the garbage collector"
            )
        else:
            what = (
                f"connection leak: still checked out by {entry.holder} after {age:.2f}s when the "
                "pool shut down; closing it"
            )
        logger.warning(
            "%s; checked out at %s\nStack of the checkout (most recent call last; SQLAlchemy's "
            "and the pool's frames left out):\n%s",
            what, site.innermost(), site.format(),
        )  # fmt: skip
        if self.listener is not None:
            self.listener.leaked(kind)


# -- watchers ----------------------------------------------------------------------------------


class LoopWatcher:
    """Async engines: one ``call_later`` on the running event loop at a time."""

    __slots__ = ("_fallback", "_handle", "_loop", "tracker")

    def __init__(self, tracker: LeakTracker) -> None:
        self.tracker = tracker
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fallback: ThreadWatcher | None = None

    def ensure(self, delay: float) -> None:
        if self._handle is not None and self._loop is not None and not self._loop.is_closed():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a checkout outside any event loop: watch from a thread
            if self._fallback is None:
                self._fallback = ThreadWatcher(self.tracker)
            self._fallback.ensure(delay)
            return
        self._loop = loop
        self._handle = loop.call_later(delay, self._fire)
        self.tracker.armed = loop  # later checkouts in this loop skip this call

    def _fire(self) -> None:
        self._handle = None
        self.tracker.armed = None
        delay = self.tracker.watch()
        if delay is not None and self._loop is not None:
            self._handle = self._loop.call_later(delay, self._fire)
            self.tracker.armed = self._loop


class ThreadWatcher:
    """Sync engines: a daemon thread asleep until the next report is due; it ends when nothing
    is out and the next checkout starts it again."""

    __slots__ = ("_lock", "_thread", "tracker")

    def __init__(self, tracker: LeakTracker) -> None:
        self.tracker = tracker
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def ensure(self, delay: float) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, args=(delay,), name="fault_tolerant_pool.leak", daemon=True
                )
                self._thread.start()

    def _run(self, delay: float) -> None:
        me = threading.current_thread()
        while True:
            time.sleep(delay)
            next_delay = self.tracker.watch()
            if next_delay is None:
                with self._lock:
                    self._thread = None
                # a checkout made meanwhile saw this thread running and started none: look again
                next_delay = self.tracker.watch()
                if next_delay is None:
                    return
                with self._lock:
                    if self._thread is not None:
                        return  # a checkout started another one
                    self._thread = me
            delay = next_delay
