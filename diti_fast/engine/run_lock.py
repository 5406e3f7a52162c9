"""One job per run directory: a lock file held by rank 0, and the shared-filesystem check.

Two jobs writing the same ``run.dir`` would delete each other's temporary checkpoints and interleave
their metrics. Rank 0 creates ``RUN/.lock`` exclusively (``O_CREAT | O_EXCL``) holding its host, its
machine identity (kernel boot id and pid namespace), pid, start time and a random token, and
touches it every :data:`HEARTBEAT_S` seconds from a daemon thread. A second job finds the file and
is refused, naming the holder, unless the lock is stale:

* same host and same machine identity: the holder's pid no longer exists (a killed job; pids are
  checked with signal 0). Containers sharing a hostname, or a host rebooted since, have another
  identity: their pids mean nothing here;
* anywhere else: no heartbeat for :data:`STALE_S` seconds.

Taking the lock, judging a stale one and replacing it happen under an exclusive ``flock`` on
``RUN/.lock.guard`` (a file that is never deleted), so of several jobs that find the same stale
lock exactly one replaces it; the others then find the new, live lock. Where the filesystem has no
locks, the exclusive creation of ``RUN/.lock.taking`` is the guard instead (the heartbeat rule
still judges the lock itself).

The token doubles as the shared-filesystem check: every rank reads the lock back and must find
rank 0's token, otherwise that rank's ``run.dir`` is not the same directory (a node-local disk), and
checkpoints written by some ranks would be invisible to the others at resume.
"""
from __future__ import annotations

import errno
import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path

from diti_fast.config import ConfigError
from diti_fast.engine.distributed import agree
from diti_fast.files import write_text_atomic

LOCK_NAME = ".lock"
GUARD_NAME = ".lock.guard"
TAKING_NAME = ".lock.taking"
GUARD_WAIT_S = 60.0  # the guard is held for milliseconds; a longer wait means a stuck filesystem
TAKING_STALE_S = 30.0
HEARTBEAT_S = 30.0
STALE_S = 120.0


class RunDirBusy(ConfigError):
    """Another live job holds the run directory."""


def machine_id() -> str:
    """Where a pid means something: this kernel boot and this pid namespace ('' if unknown)."""
    parts = []
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    except OSError:
        pass
    try:
        parts.append(os.readlink("/proc/self/ns/pid"))  # e.g. 'pid:[4026531836]'; one per container
    except OSError:
        pass
    return "/".join(parts)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def stale_reason(info: dict | None, age_s: float, host: str, machine: str | None = None) -> str | None:
    """Why a lock left by ``info`` (heartbeat ``age_s`` seconds ago) is stale; None if it is live.
    Its pid is checked only where it means something: the same host and ``machine`` identity."""
    if info is None:
        # Unreadable: a crash between create and write, or a writer right now. Give a writer time.
        return f"unreadable lock file, untouched for {age_s:.0f} s" if age_s > 5 else None
    machine = machine_id() if machine is None else machine
    if info.get("host") == host and machine and info.get("machine") == machine:
        try:
            pid = int(info.get("pid", -1))
        except (TypeError, ValueError):
            pid = -1
        return None if pid > 0 and _pid_alive(pid) else f"pid {pid} on this host is gone"
    return f"no heartbeat for {age_s:.0f} s" if age_s > STALE_S else None


class _Guard:
    """Mutual exclusion for taking or replacing the lock, for the duration of a ``with``: an
    exclusive flock on ``RUN/.lock.guard``; where the filesystem has no locks, the exclusive creation
    of ``RUN/.lock.taking`` (removed on exit; one left by a crash is removed after
    :data:`TAKING_STALE_S` seconds)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / GUARD_NAME
        self.fd: int | None = None
        self.taking: Path | None = None

    def __enter__(self) -> "_Guard":
        deadline = time.monotonic() + GUARD_WAIT_S
        if self._flock(deadline):
            return self
        marker = self.run_dir / TAKING_NAME
        while True:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                self.taking = marker
                return self
            except FileExistsError:
                try:
                    if time.time() - marker.stat().st_mtime > TAKING_STALE_S:
                        marker.unlink()  # left by a job that died while taking the lock
                        continue
                except FileNotFoundError:
                    continue
            self._wait(deadline)

    def _flock(self, deadline: float) -> bool:
        """True once flock'ed; False where the filesystem (or the OS) has no flock."""
        try:
            import fcntl  # lazy: POSIX only (the ImportError is the no-flock case)
        except ImportError:
            return False
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                self._wait(deadline)
            except OSError as e:
                os.close(self.fd)
                self.fd = None
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    return False
                raise

    def _wait(self, deadline: float) -> None:
        if time.monotonic() > deadline:
            self.__exit__()
            raise RunDirBusy(f"run.dir={self.run_dir}: another job has been taking its lock for "
                             f"{GUARD_WAIT_S:.0f} s ({self.path} or {TAKING_NAME} stays locked: a stuck filesystem?)")
        time.sleep(0.01)

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
            self.fd = None
        if self.taking is not None:
            try:
                self.taking.unlink()
            except FileNotFoundError:
                pass
            self.taking = None


class RunLock:
    """The lock of one run directory, held by this process until :meth:`release`."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.run_dir = Path(run_dir)
        self.token = secrets.token_hex(8)
        self.taken_over: str | None = None   # set when a stale lock was replaced: what it was
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with _Guard(self.run_dir):
            return self._acquire()

    def _acquire(self) -> "RunLock":
        host, machine = socket.gethostname(), machine_id()
        info = {"host": host, "machine": machine, "pid": os.getpid(), "started": time.time(), "token": self.token}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                try:
                    age = time.time() - self.path.stat().st_mtime
                except FileNotFoundError:
                    continue  # released meanwhile: try again
                why = stale_reason(holder, age, host, machine)
                if why is None:
                    who = (f"pid {holder.get('pid')} on host {holder.get('host')}, started "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('started', 0)))}"
                           if holder else "a job that is writing it now")
                    raise RunDirBusy(
                        f"run.dir={self.run_dir} is in use by {who} (lock file {self.path}, heartbeat "
                        f"{age:.0f} s ago). Two jobs on one run directory would delete each other's "
                        f"checkpoints; wait for it, use another run.dir, or delete the lock file if that "
                        f"job is gone (a lock on another host counts as stale after {STALE_S:.0f} s "
                        "without heartbeat)") from None
                # Every job that creates or replaces the lock holds the guard: the file judged stale
                # is still the one there.
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                self.taken_over = f"{holder or {}} ({why})"
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
                f.flush()
                os.fsync(f.fileno())
            self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
            self._thread.start()
            _HELD.append(self)
            return self
        raise RunDirBusy(f"run.dir={self.run_dir}: could not take the lock {self.path} (other jobs keep "
                         "replacing it)")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self in _HELD:
            _HELD.remove(self)
        try:
            guard = _Guard(self.run_dir).__enter__()
        except (OSError, RunDirBusy):
            guard = None  # releasing must not fail: at worst the lock is judged stale later
        try:
            holder = _read(self.path)
            if holder is not None and holder.get("token") == self.token:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
        finally:
            if guard is not None:
                guard.__exit__()


_HELD: list[RunLock] = []


def release_held(error: BaseException | None = None) -> None:
    """Release every lock this process holds (the engine's exit path, whatever the exit); with an
    ``error``, record the launch as failed in its run directory first."""
    for lock in list(_HELD):
        if error is not None:
            write_status(lock.run_dir, "failed", error=f"{type(error).__name__}: {error}")
        lock.release()


def read_token(run_dir: Path) -> str | None:
    info = _read(Path(run_dir) / LOCK_NAME)
    return None if info is None else info.get("token")


def claim(run_dir: Path, rank: int) -> None:
    """Collective: rank 0 takes the lock (released by :func:`release_held`), then every rank checks
    it reads rank 0's token back. A busy directory or a rank that sees another directory stops
    every rank with the same ConfigError."""
    err, token = None, None
    if rank == 0:
        try:
            lock = RunLock(run_dir).acquire()
            token = lock.token
            if lock.taken_over:
                print(f"[diti-fast] {run_dir}: replaced a stale lock {lock.taken_over}", flush=True)
        except (ConfigError, OSError) as e:
            err = e
    token = agree(f"locking run.dir={run_dir}", err, token, exc=ConfigError)[0]
    agree("checking the run directory", None if read_token(run_dir) == token else
          f"run.dir={run_dir} here is not the directory rank 0 locked: checkpoints need a filesystem "
          "shared by every node (each rank writes its part of every checkpoint into it)", exc=ConfigError)


def write_status(run_dir: Path, status: str, **fields) -> None:
    """``RUN/status.json``: what the last launch ended with. Launchers report their own exit status
    (torchrun and deepspeed turn any rank's non-zero exit into 1), so a job script reads this:
    "done", "stopped" (checkpoint written; relaunch to resume) or "failed"."""
    path = Path(run_dir) / "status.json"
    try:
        write_text_atomic(path, json.dumps(dict(status=status, time=time.time(), **fields), indent=1))
    except OSError:
        pass  # a status file must never turn a finished run into a failed one
