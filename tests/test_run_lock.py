"""The run-directory lock: of several jobs that find the same stale lock, exactly one takes it; a
pid is only judged where it means something (same host, boot and pid namespace)."""
import errno
import fcntl
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest

from diti_fast.engine import run_lock

RACERS, ROUNDS = 4, 20
WAIT_S = 60  # every barrier and queue wait is bounded: a stuck racer fails the test, never hangs it


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    return proc.pid


def _stale_lock(path, pid: int, machine: str | None = None) -> None:
    path.write_text(json.dumps({"host": socket.gethostname(), "machine": run_lock.machine_id() if machine is None
                                else machine, "pid": pid, "started": time.time(), "token": "stale"}))


def _racer(run_dir, start, done, results) -> None:
    for r in range(ROUNDS):
        start.wait(WAIT_S)
        try:
            lock = run_lock.RunLock(run_dir).acquire()
            results.put((r, "won", lock.token))
        except run_lock.RunDirBusy:
            results.put((r, "busy", None))
        done.wait(WAIT_S)  # the winner keeps the lock (and its file) until every racer has tried


def _no_flock(fd, op):
    raise OSError(errno.ENOLCK, "no locks available")


@pytest.mark.parametrize("fs", ["flock", "no locks"])
def test_racing_jobs_take_a_stale_lock_exactly_once(tmp_path, monkeypatch, fs):
    # Each round: a lock left by a dead pid of this host, and RACERS processes released at once to
    # take the run directory. Exactly one may win, and the lock file must be the winner's. Judging
    # the lock is made slow (as a slow filesystem would), so every racer judges the same stale file
    # before any replaces it: the takeover must be atomic whatever the timing.
    judge = run_lock.stale_reason

    def slow_judge(*args, **kwargs):
        time.sleep(0.03)
        return judge(*args, **kwargs)

    monkeypatch.setattr(run_lock, "stale_reason", slow_judge)
    if fs == "no locks":  # a filesystem without flock: the rename fallback
        monkeypatch.setattr(fcntl, "flock", _no_flock)
    ctx = multiprocessing.get_context("fork")  # the racers start with run_lock (and the slow judge) in place
    start, done, results = ctx.Barrier(RACERS + 1), ctx.Barrier(RACERS + 1), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(tmp_path, start, done, results), daemon=True) for _ in range(RACERS)]
    for p in procs:
        p.start()
    lock, dead, winners = tmp_path / run_lock.LOCK_NAME, _dead_pid(), []
    try:
        for r in range(ROUNDS):
            _stale_lock(lock, dead)
            start.wait(WAIT_S)
            got = [results.get(timeout=WAIT_S) for _ in range(RACERS)]
            won = [tok for rr, what, tok in got if what == "won"]
            assert all(rr == r for rr, _, _ in got)
            winners.append(len(won))
            assert len(won) == 1, f"round {r}: {len(won)} racers took the lock"
            assert json.loads(lock.read_text())["token"] == won[0]
            done.wait(WAIT_S)
    finally:
        start.abort()  # racers still waiting leave at once (BrokenBarrierError)
        done.abort()
        for p in procs:
            p.join(timeout=WAIT_S)
            if p.is_alive():
                p.kill()
    assert winners == [1] * ROUNDS


def test_a_pid_is_judged_only_on_the_same_machine(tmp_path):
    # A lock naming a pid that does not exist here, written on a host of the same name but another
    # boot or container (pid namespace): that pid says nothing, so only the heartbeat counts.
    lock, dead = tmp_path / run_lock.LOCK_NAME, _dead_pid()
    host, here = socket.gethostname(), run_lock.machine_id()
    assert here and "pid:[" in here  # Linux: the boot id and the pid namespace are both known
    info = {"host": host, "machine": "another-boot/pid:[1]", "pid": dead, "token": "t"}
    assert run_lock.stale_reason(info, 1.0, host, here) is None
    assert run_lock.stale_reason(info, run_lock.STALE_S + 1, host, here).startswith("no heartbeat")
    assert run_lock.stale_reason(dict(info, machine=here), 1.0, host, here) == f"pid {dead} on this host is gone"
    assert run_lock.stale_reason(dict(info, machine=here, pid=os.getpid()), 1.0, host, here) is None
    # Through acquire: a fresh lock from another container of this hostname is refused ...
    _stale_lock(lock, dead, machine="another-boot/pid:[1]")
    with pytest.raises(run_lock.RunDirBusy, match=f"in use by pid {dead} on host {host}"):
        run_lock.RunLock(tmp_path).acquire()
    # ... the same lock from this machine is replaced at once.
    _stale_lock(lock, dead)
    taken = run_lock.RunLock(tmp_path).acquire()
    try:
        assert f"pid {dead} on this host is gone" in taken.taken_over
        assert json.loads(lock.read_text())["token"] == taken.token
    finally:
        taken.release()
    assert not lock.exists()
