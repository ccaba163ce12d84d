"""keeper: what must outlive a server, and the server's supervision (``zcached run``).

Owns: the memfd arena (made here, mapped and locked here: ``_core.Hold``), the FUSE mount and
its /dev/fuse descriptors (one per worker, cloned here), the server process (started,
restarted when it dies, replaced on upgrade), the keeper state file that ``zcached status``
and ``zcached upgrade`` read, and the upgrade request file.  The loop device and the swap are
set up by daemon.py in this same process.
Must not: touch page data (it never reads or writes the store; only the arena's header is
written, when the arena is made), serve requests, or stop restarting the server before the
swap is off and the file system unmounted: the swapoff needs a server to read the pages back.

SUPERVISION (one thread, ``Supervisor._run``)
  spawn -> wait for the ready byte -> wait for the exit; on an exit it did not ask for, spawn
  again at once (a server that dies within a second of its start, repeatedly, is spawned with
  a growing pause of up to 5 s: a bug must not spin a CPU; it never gives up, because the
  swapped-out pages are in the arena and only a server can give them back).  While a server
  runs, the arena pages in memory are faulted into the keeper's locked mapping every few
  seconds (``Hold.pin``), so they stay locked while no server maps them (after a death);
  the keeper's RSS therefore counts those pages, shared with the server, not extra.

  Generation n's server gets ``--generation n``; its descriptors are inherited (pass_fds) and
  it runs in its own session, so a Ctrl-C to the keeper's process group never reaches it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from zcached import _core

log = logging.getLogger("zcached")

READY_TIMEOUT = 60.0  # a server that attaches, recovers and starts its workers in this long
STOP_TIMEOUT = 10.0  # SIGTERM to a server, then SIGKILL
PIN_INTERVAL = 1.0
FAST_DEATH = 1.0  # a server dying sooner than this after its start counts as a crash loop
MAX_PAUSE = 5.0
COMPACT_COALESCE = 1.0  # seconds: compaction requests closer than this are one


class KeeperError(RuntimeError):
    """The first server never came up; the message is one human line."""


@dataclass
class ServerArgs:
    """What a server is started with (an upgrade may change config and metrics address)."""

    config: str | None
    overrides: dict[str, Any]
    verbose: bool = False


@dataclass
class KeeperState:
    """The keeper's state, written as JSON (atomically) for ``status`` and ``upgrade``."""

    path: str
    keeper_pid: int = field(default_factory=os.getpid)
    server_pid: int | None = None
    generation: int = 0
    restarts: int = 0
    upgrades: int = 0
    last_recovery_ms: float | None = None
    last_upgrade_error: str | None = None
    loop_device: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def save(self) -> None:
        """Written by the main thread (upgrades) and the supervision thread: one at a time."""
        with self._lock:
            doc = {k: v for k, v in self.__dict__.items() if k not in ("path", "_lock")}
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as f:
                json.dump(doc, f)
            os.replace(tmp, self.path)

    def remove(self) -> None:
        for p in (self.path, f"{self.path}.tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)


def read_state(path: str) -> dict[str, Any]:
    """A keeper's state file (KeeperState.save); empty if missing or unreadable."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


class Supervisor:
    """Runs one server at a time on ``fds`` and ``arena_fd``; see SUPERVISION above."""

    def __init__(
        self, arena_fd: int, fds: list[int], hold: _core.Hold, state: KeeperState,
        args: ServerArgs, mountpoint: str, backing: tuple[int, int] | None = None,
        rings: tuple[int, _core.Hold] | None = None,
    ) -> None:  # fmt: skip
        self.mountpoint = mountpoint  # resolved before the mount (a stat would block on it)
        self.arena_fd = arena_fd
        self.backing = backing  # the writeback tier's file (descriptor, bytes), kept here
        self.rings = rings  # FUSE over io_uring: the ring area's memfd and our locked mapping
        self.fds = fds
        self.hold = hold
        self.state = state
        self.args = args
        self._lock = threading.Lock()  # guards _proc, _stopping, _upgrade
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = False
        self._upgrade: ServerArgs | None = None
        self._thread: threading.Thread | None = None
        self._died_at: float | None = None  # when the server we did not stop was seen dead
        self._last_compact = -COMPACT_COALESCE

    # ---- the first server ----------------------------------------------------------------

    def start(self, stopped: Callable[[], bool]) -> None:
        """Start the first server and wait until it serves; KeeperError if it exits first or
        never gets ready, or when ``stopped()`` (a stop signal during start-up) says so."""
        proc, ready = self._spawn(self.args)
        with self._lock:
            self._proc = proc
        t0 = time.monotonic()
        try:
            while not self._wait_ready(ready, 0.1, b"M"):
                if proc.poll() is not None:
                    raise KeeperError(f"the server exited ({_how(proc.returncode)}) at start-up")
                if stopped():
                    return
                if time.monotonic() - t0 > READY_TIMEOUT:
                    raise KeeperError(f"the server was not ready within {READY_TIMEOUT:.0f} s")
        finally:
            os.close(ready)
        self._serving(proc)
        self._thread = threading.Thread(target=self._run, name="zcached-keeper", daemon=True)
        self._thread.start()

    # ---- requests from the main thread ---------------------------------------------------

    def request_compaction(self) -> None:
        """SIGUSR1 to the server, at most once a second: a storm of requests is one run (the
        server's compactor coalesces what comes while it runs, the keeper what comes faster
        than a run can start)."""
        now = time.monotonic()
        if now - self._last_compact < COMPACT_COALESCE:
            log.debug("compaction request coalesced with the one before")
            return
        self._last_compact = now
        self.signal(signal.SIGUSR1)

    def signal(self, signo: int) -> None:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self._proc.send_signal(signo)

    def probe_installed(self) -> str | None:
        """Why the version installed now cannot take over the live store (another arena
        format), or None if it can: asked before an upgrade stops the server."""
        argv = [sys.executable, "-m", "zcached.server", "--probe-arena", str(self.arena_fd)]
        try:
            p = subprocess.run(
                argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                pass_fds=(self.arena_fd,), timeout=READY_TIMEOUT,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"could not run the installed version: {e}"
        if p.returncode == 0:
            return None
        lines = p.stderr.strip().splitlines()
        return lines[-1].removeprefix("zcached: ") if lines else f"exit {p.returncode}"

    def upgrade(self, args: ServerArgs) -> None:
        """Replace the server with a new one (the code installed now, ``args``)."""
        with self._lock:
            if self._stopping:
                return
            self._upgrade = args
            proc = self._proc
        if proc is not None:
            log.info("upgrade: stopping server %d", proc.pid)
            _terminate(proc)

    def quiesce(self) -> None:
        """No more restarts or upgrades (just before the unmount, which ends the server's
        connection: its exit then is the expected one, not a death to recover from)."""
        with self._lock:
            self._stopping = True

    def stop(self) -> None:
        """End supervision and the server (after the unmount: nothing needs it any more)."""
        with self._lock:
            self._stopping = True
            proc = self._proc
        if proc is not None:
            _terminate(proc)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=STOP_TIMEOUT)
            if proc.poll() is None:
                log.warning("server %d did not stop: SIGKILL", proc.pid)
                proc.kill()
                proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=STOP_TIMEOUT + 5)
        self.state.server_pid = None
        self.state.save()

    # ---- the supervision thread ----------------------------------------------------------

    def _run(self) -> None:
        pause = 0.0
        while True:
            proc = self._proc
            assert proc is not None
            started = time.monotonic()
            self._watch(proc)
            with self._lock:
                if self._stopping:
                    return
                upgrade, self._upgrade = self._upgrade, None
            if upgrade is not None:
                self.args = upgrade
                self.state.upgrades += 1
                log.info("upgrade: server %d ended (%s)", proc.pid, _how(proc.returncode))
            else:
                self.state.restarts += 1
                log.warning(
                    "server %d died (%s): starting a new one on the live store",
                    proc.pid, _how(proc.returncode),
                )  # fmt: skip
            self._died_at = time.monotonic()
            pause = min(MAX_PAUSE, pause * 2 or 0.25) if self._died_at - started < FAST_DEATH else 0
            if pause and upgrade is None:
                log.warning("server crash loop: next start in %.2f s", pause)
                time.sleep(pause)
            self._respawn()

    def _watch(self, proc: subprocess.Popen[bytes]) -> None:
        """Until ``proc`` exits; keeps the arena's resident pages locked meanwhile.  The pages
        a server faulted in since the last pin are locked by that server alone: the moment it
        is gone they may be paged out (DAMON's reclaim on this VM did so, to our own swap,
        which then had no server: the next one hung faulting them in), so they are pinned
        first thing, before the log line, a crash-loop pause or the next server's start."""
        try:
            pidfd = os.pidfd_open(proc.pid)
        except ProcessLookupError:  # gone already
            self._pin()
            proc.wait()
            return
        try:
            while not select.select([pidfd], [], [], PIN_INTERVAL)[0]:
                self._pin()
            self._pin()
            proc.wait()
        finally:
            os.close(pidfd)

    def _pin(self) -> None:
        """Lock what a server faulted in of the arena (and of the ring area) into our maps."""
        self.hold.pin()
        if self.rings is not None:
            self.rings[1].pin()

    def _respawn(self) -> None:
        """Start servers until one is ready (or stop is asked)."""
        while True:
            with self._lock:
                if self._stopping:
                    return
            try:
                proc, ready = self._spawn(self.args)
            except OSError as e:
                log.error("cannot start a server: %s; again in 1 s", e)
                time.sleep(1.0)
                continue
            with self._lock:
                self._proc = proc
                stopping = self._stopping
            if stopping:
                os.close(ready)
                return
            self._pin()  # the arena's pages stay locked while the new one attaches
            try:
                ok = self._wait_ready(ready, READY_TIMEOUT, b"R")
            finally:
                os.close(ready)
            if ok:
                self._serving(proc)
                return
            log.error("server %d was not ready (%s): again", proc.pid, _how(proc.poll()))
            _terminate(proc, kill=True)
            proc.wait()
            time.sleep(0.25)

    def _serving(self, proc: subprocess.Popen[bytes]) -> None:
        st = self.state
        st.server_pid = proc.pid
        if self._died_at is not None:
            st.last_recovery_ms = round((time.monotonic() - self._died_at) * 1000, 1)
            log.info("server %d serving %.0f ms after the last one ended", proc.pid,
                     st.last_recovery_ms)  # fmt: skip
        st.save()

    # ---- spawning ------------------------------------------------------------------------

    def _spawn(self, args: ServerArgs) -> tuple[subprocess.Popen[bytes], int]:
        """A new server (generation n+1) and the read end of its ready pipe."""
        r, w = os.pipe2(os.O_CLOEXEC)
        self.state.generation += 1
        argv = [
            sys.executable, "-m", "zcached.server",
            "--arena-fd", str(self.arena_fd),
            "--fuse-fds", ",".join(map(str, self.fds)),
            "--ready-fd", str(w),
            "--overrides", json.dumps(args.overrides),
            "--state-file", self.state.path,
            "--generation", str(self.state.generation),
            "--mountpoint", self.mountpoint,
        ]  # fmt: skip
        if args.config is not None:
            argv += ["--config", args.config]
        if args.verbose:
            argv.append("-v")
        extra: tuple[int, ...] = ()
        if self.backing is not None:
            argv += ["--backing-fd", str(self.backing[0]), "--backing-size", str(self.backing[1])]
            extra = (self.backing[0],)
        if self.rings is not None:
            argv += ["--ring-fd", str(self.rings[0])]
            extra = (*extra, self.rings[0])
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, pass_fds=(self.arena_fd, *self.fds, w, *extra),
                start_new_session=True,
            )  # fmt: skip
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        return proc, r

    @staticmethod
    def _wait_ready(ready: int, timeout: float, want: bytes) -> bool:
        """Whether the server wrote ``want`` (b"R": serving, b"M": metrics up as well) within
        ``timeout`` (False at once if it exits: the pipe's write end closes with it)."""
        deadline = time.monotonic() + timeout
        while True:
            rlist, _, _ = select.select([ready], [], [], max(0.0, deadline - time.monotonic()))
            if not rlist:
                return False
            got = os.read(ready, 1)
            if got == want:
                return True
            if not got or time.monotonic() > deadline:
                return False


def _terminate(proc: subprocess.Popen[bytes], kill: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError):
        if kill:
            proc.kill()
        else:
            proc.send_signal(signal.SIGTERM)


def _how(rc: int | None) -> str:
    if rc is None:
        return "still running"
    if rc < 0:
        return f"signal {signal.Signals(-rc).name}"
    return f"exit {rc}"


def make_arena(store_factory: Callable[[], Any]) -> int:
    """A new arena: the store is made (header and layout only: no page data) and closed; the
    returned descriptor (CLOEXEC, passed explicitly to servers) keeps the memfd."""
    store = store_factory()
    try:
        return os.dup(store.memfd())
    finally:
        store.close()


def clone_fds(mount: Any, n: int) -> list[int]:
    """The mount's descriptor and n-1 clones: one per FUSE worker (each its own queue)."""
    fds = [mount.fd]
    for _ in range(n - 1):
        try:
            fds.append(mount.clone())
        except OSError as e:
            log.warning("FUSE_DEV_IOC_CLONE failed (%s): %d worker(s)", e.strerror, len(fds))
            break
    return fds
