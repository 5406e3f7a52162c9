"""Preemption and failure: launcher signals, verified checkpoints with fall-back, agreed failures,
the run-directory lock, elastic resume (ranks and ZeRO stage), a 2-node simulation on localhost.

Multi-process runs go through the real launchers (torchrun, DeepSpeed's per-node launcher) on
DeepSpeed's CPU accelerator with tiny DDPM-stage models, so each launch is a few seconds of
training after ~10 s of start-up.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from diti_fast.engine import checkpoints as ckpt
from diti_fast.engine import run_lock
from diti_fast.engine.loop import train
from diti_fast.engine.config_files import apply_overrides, build_config
from diti_fast.engine.sample_log import read_indices
from helpers import tree_diff  # noqa: E402 - tests/ is on sys.path (no __init__.py)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "diti_fast" / "train.py")

TINY = {
    "stage": "ddpm",
    "preset": "tiny",   # as the config files the launchers read say
    "model": {"unet": {"base_channel": 32, "channel_multiplier": [1, 2], "num_residual_blocks_of_a_block": 1,
                       "attention_resolutions": [2], "num_heads": 1, "dropout": 0.0}},
    "run": {"threads": 1, "seed": 5},
    "data": {"source": "fixed", "batch_size": 8, "image_size": 16, "num_workers": 0},
    "optim": {"lr": 1e-3, "lr_rule": "none"},
    "ema": {"decay": 0.9},
    "log": {"every": 1, "progress": False, "tensorboard": False},
    "checkpoint": {"every": 0, "keep": 3},
    "debug": {"sample_log": True},
}


def tiny(run_dir: Path, *overrides: str):
    return build_config(apply_overrides(TINY, [f"run.dir={run_dir}", *overrides]), "test")


def _free_port() -> int:
    """A port held for the child: a connection to it is closed from the listening side first, which
    leaves the port in TIME_WAIT for about a minute. Meanwhile the kernel hands it to no one else
    (no ephemeral bind, no plain bind), but a listener that sets SO_REUSEADDR, as c10d's TCPStore
    does (torchrun's rendezvous, rank 0's store), binds it at once."""
    with socket.socket() as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            conn, _ = srv.accept()
            conn.close()  # the accepting side closes first: TIME_WAIT on the listening port
    return port


def _env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    return env


def _config_file(tmp_path: Path, cfg: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def torchrun(config: Path, *overrides: str, nproc: int = 2, extra=()) -> list[str]:
    # --standalone: torchrun picks its rendezvous port itself and hands it to the ranks
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone", *extra,
            SCRIPT, "--config", str(config), *overrides]


def deepspeed_launch(config: Path, *overrides: str, nproc: int = 2) -> list[str]:
    """DeepSpeed's per-node launcher (what ``deepspeed`` runs on every node); on SIGTERM it sends
    SIGTERM to the whole process tree, DataLoader workers included, then SIGKILL after 30 s."""
    world = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(nproc))}).encode()).decode()
    return [sys.executable, "-m", "deepspeed.launcher.launch", f"--world_info={world}", "--node_rank=0",
            "--master_addr=127.0.0.1", f"--master_port={_free_port()}", SCRIPT, "--config", str(config),
            *overrides]


def run(cmd: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(), cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _steps_logged(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(line)["step"] for line in lines if line.strip()), default=0)


def start(cmd: list[str], cwd: Path, name: str) -> tuple[subprocess.Popen, object]:
    log = open(cwd / f"{name}.log", "w+")
    return subprocess.Popen(cmd, env=_env(), cwd=cwd, stdout=log, stderr=subprocess.STDOUT, text=True), log


def finish(proc: subprocess.Popen, log, timeout: int = 240) -> tuple[int, str]:
    rc = proc.wait(timeout=timeout)
    log.seek(0)
    return rc, log.read()


def sigterm_after(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> threading.Thread:
    """In the background: SIGTERM to ``proc`` once the run has logged ``step`` steps (so the test
    can do other work meanwhile)."""
    def watch():
        deadline = time.monotonic() + timeout
        while _steps_logged(run_dir) < step and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ============================================================================ launcher signals

@pytest.mark.slow
def test_sigterm_to_the_deepspeed_launcher_stops_all_ranks_at_one_step_and_resume_is_bit_identical(tmp_path):
    """Slow (3 launches of 2 ranks). Only this test signals DeepSpeed's launcher, whose SIGTERM
    reaches DataLoader workers too, and resumes 2 ranks bit for bit (ZeRO-2 partitions, RNG, data)."""
    # DeepSpeed's per-node launcher sends SIGTERM to its whole process tree (rank 0's first, then
    # rank 1's), DataLoader workers included — what SLURM does too. Shards with a worker per rank,
    # ZeRO-2, dropout: the resume must restore weights, EMA, partitioned Adam state, per-rank RNG
    # and the data position. (SIGTERM to torchrun: the 2-node test below.)
    from data_shards.synthetic import make_synthetic_shards
    shards = tmp_path / "shards"
    make_synthetic_shards(shards, 32, image_size=16, seed=0, maxcount=8)
    cfg = apply_overrides(TINY, [f"data.shards={shards}", "data.source=shards", "data.image_size=0",
                                 "data.num_workers=1", "data.shuffle_buffer=8", "deepspeed.zero_stage=2",
                                 "model.unet.dropout=0.1", "run.max_images=128"])   # 16 steps, 4 epochs
    config = _config_file(tmp_path, cfg)
    full, cut = tmp_path / "full", tmp_path / "cut"
    # The uninterrupted reference and the interrupted run side by side (the latter mostly sleeps).
    ref = start(torchrun(config, f"run.dir={full}"), tmp_path, "full")
    # The run waits after step 3 for the signal, which is sent once step 3 is logged: it stops at 3.
    proc, log = start(deepspeed_launch(config, f"run.dir={cut}", "debug.hold_after_step=3"), tmp_path, "cut")
    sigterm_after(cut, 3, proc)
    rc, out = finish(proc, log)
    step = assert_stopped_at_one_step(cut, out, before=[], total=16)
    assert step == 3, out[-3000:]
    assert "DataLoader worker" not in out and "Main process received SIGTERM" in out, out[-4000:]
    # The launcher's own status after a SIGTERM it received is 1 (the ranks' 75 is in status.json).
    assert rc == 1, out[-3000:]
    rc, ref_out = finish(*ref)
    assert rc == 0, ref_out[-4000:]

    done = run(torchrun(config, f"run.dir={cut}"), tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert f"resumed from {cut / 'checkpoints' / f'step-{step:08d}'}" in done.stdout
    assert json.loads((cut / "status.json").read_text())["status"] == "done"
    for name in ("model.pt", "rank-00000.pt", "rank-00001.pt"):
        diffs = tree_diff(_load(full / "checkpoints/step-00000016" / name),
                            _load(cut / "checkpoints/step-00000016" / name))
        assert diffs == [], f"{name} differs at {diffs[:5]}"
    assert sorted(read_indices(cut)) == list(range(16 * 8))  # no global sample index twice or skipped
    assert not (cut / run_lock.LOCK_NAME).exists()


def assert_stopped_at_one_step(run_dir: Path, out: str, before: list[int], total: int) -> int:
    """status.json says stopped; exactly one new checkpoint, holding every rank's state at that
    step; no rank trained past it."""
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "stopped" and status["reason"] == "signal", (status, out[-4000:])
    assert status["exit_code"] == 75, status
    step = status["step"]
    assert before[-1:] < [step] and step < total, out[-3000:]
    assert [s for s, _ in ckpt.checkpoint_dirs(run_dir / "checkpoints")] == before + [step], out[-3000:]
    ranks = [_load(run_dir / f"checkpoints/step-{step:08d}/rank-{r:05d}.pt") for r in (0, 1)]
    assert [s["step"] for s in ranks] == [step, step]
    recs = [json.loads(line) for path in (run_dir / "debug").glob("samples-rank*.jsonl")
            for line in path.read_text().splitlines()]
    assert {max(x["step"] for x in recs if x["rank"] == r and x["world"] == 2) for r in (0, 1)} == {step}
    return step


# ============================================================================ failures agreed by all ranks

@pytest.mark.slow
def test_disk_full_on_rank_1_during_a_save_stops_both_ranks_with_one_error(tmp_path):
    config = _config_file(tmp_path, apply_overrides(TINY, ["run.max_images=32", "checkpoint.every=2",
                                                           "debug.fail_save_rank=1"]))
    run_dir = tmp_path / "run"
    proc = run(torchrun(config, f"run.dir={run_dir}"), tmp_path, timeout=180)
    ended = time.time()
    assert proc.returncode != 0
    # Both ranks exit (status 4) with the same message naming rank 1 and the errno, within seconds
    # of the failed save (the step-2 metrics line is the last thing written before it): without
    # the agreement, rank 0 would wait in the next collective for the process-group timeout (30 min).
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: checkpoint")]
    assert len(errors) == 2 and errors[0] == errors[1], proc.stderr[-4000:]
    assert "rank 1" in errors[0] and "No space left on device" in errors[0] and "rank 0 (" not in errors[0]
    # The first rank out exits 4; torchrun then SIGTERMs the other, which may still be exiting
    # (after printing the same error above), so its recorded code is 4 or -15.
    assert "exitcode  : 4" in proc.stderr, proc.stderr[-3000:]
    assert ended - (run_dir / "metrics.jsonl").stat().st_mtime < 30
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and "No space left on device" in status["error"]
    assert ckpt.checkpoint_dirs(run_dir / "checkpoints") == []  # nothing half-written in place
    assert _steps_logged(run_dir) == 2


# ============================================================================ verified resume, fall-back

def test_resume_falls_back_past_a_broken_checkpoint_and_refuses_when_none_is_complete(tmp_path, capsys):
    base = tmp_path / "base"
    train(tiny(base, "run.max_images=24", "checkpoint.every=1"))   # checkpoints at steps 1, 2, 3
    meta = json.loads((base / "checkpoints/step-00000003/meta.json").read_text())
    listed = meta["files"]["rank-00000.pt"]
    assert listed["bytes"] == (base / "checkpoints/step-00000003/rank-00000.pt").stat().st_size
    assert len(listed["sha256"]) == 64 and set(meta["files"]) == {"model.pt", "rank-00000.pt", "optimizer-full.pt"}
    reference = tmp_path / "reference"
    shutil.copytree(base, reference)
    assert train(tiny(reference, "run.max_images=32", "checkpoint.every=0")).step == 4
    capsys.readouterr()

    def resume(broken: Path):
        res = train(tiny(broken, "run.max_images=32", "checkpoint.every=0"))
        return res, capsys.readouterr().out

    # A truncated rank file in the newest checkpoint: resume from step 2, saying why.
    trunc = tmp_path / "trunc"
    shutil.copytree(base, trunc)
    f = trunc / "checkpoints/step-00000003/rank-00000.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    (trunc / "checkpoints/.tmp-step-00000004").mkdir()   # a crashed save's leftovers
    res, out = resume(trunc)
    assert "step-00000003" in out and "truncated" in out and "falling back" in out, out
    assert f"resumed from {trunc / 'checkpoints/step-00000002'}" in out
    assert res.step == 4 and not (trunc / "checkpoints/.tmp-step-00000004").exists()
    # Step 3 was redone from step 2: the same weights as resuming from the good step 3.
    assert tree_diff(_load(reference / "checkpoints/step-00000004/model.pt"),
                       _load(trunc / "checkpoints/step-00000004/model.pt")) == []

    # An empty meta.json: the same fall-back, naming meta.json.
    empty = tmp_path / "empty"
    shutil.copytree(base, empty)
    (empty / "checkpoints/step-00000003/meta.json").write_text("")
    res, out = resume(empty)
    assert "step-00000003/meta.json is missing or unreadable" in out and res.step == 4
    assert f"resumed from {empty / 'checkpoints/step-00000002'}" in out

    # Nothing complete: a clear error listing every checkpoint and what is wrong with it.
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    for step in (1, 2, 3):
        (broken / f"checkpoints/step-{step:08d}/meta.json").write_text("")
    with pytest.raises(ckpt.ResumeError, match=r"no complete checkpoint in .*step-00000003.*step-00000001") as e:
        train(tiny(broken, "run.max_images=32"))
    assert "meta.json" in str(e.value)
    assert not (broken / run_lock.LOCK_NAME).exists()  # the lock is released on the way out


def test_the_data_position_maps_to_the_same_number_of_consumed_samples_on_a_new_layout():
    from diti_fast.engine.elastic import map_position
    # 2 ranks x micro 2 consumed 6 micro-batches each of epoch 1: 24 samples of it.
    meta = {"world_size": 2, "micro_batch": 2, "data": {"epoch": 1, "batch": 6}}
    assert map_position(meta, world=1, micro=4) == {"epoch": 1, "batch": 6}     # 6 x 4 = 24
    assert map_position(meta, world=4, micro=1) == {"epoch": 1, "batch": 6}     # 6 x 1 x 4 = 24
    assert map_position(meta, world=3, micro=4) == {"epoch": 1, "batch": 2}     # 24 // 12
    assert map_position({**meta, "data": {"epoch": 3, "batch": 0}}, world=8, micro=2) == {"epoch": 3, "batch": 0}


def test_leftovers_of_an_interrupted_save_are_cleaned_and_a_moved_aside_step_restored(tmp_path):
    root = tmp_path / "checkpoints"
    for name in (".tmp-step-00000004", ".old-step-00000003", ".old-step-00000002", "step-00000002"):
        (root / name).mkdir(parents=True)
        (root / name / "meta.json").write_text(name)
    ckpt.clean_temp(root)
    # step 3 was moved aside to be re-saved and the crash came before the new one took its place.
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000003"]
    assert (root / "step-00000003/meta.json").read_text() == ".old-step-00000003"
    assert (root / "step-00000002/meta.json").read_text() == "step-00000002"


# ============================================================================ the run-directory lock

def test_a_second_job_on_a_run_dir_is_refused_and_a_stale_lock_replaced(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / run_lock.LOCK_NAME
    host = socket.gethostname()
    # A live job (this test process) holds it.
    lock.write_text(json.dumps({"host": host, "pid": os.getpid(), "started": time.time(), "token": "t"}))
    with pytest.raises(run_lock.RunDirBusy, match=rf"in use by pid {os.getpid()} on host {host}"):
        train(tiny(run_dir, "run.max_images=8"))
    assert lock.exists() and not (run_dir / "config.yaml").exists()
    # Another host, heartbeat fresh: refused; heartbeat older than STALE_S: stale.
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": time.time(), "token": "t"}))
    with pytest.raises(run_lock.RunDirBusy, match="elsewhere"):
        train(tiny(run_dir, "run.max_images=8"))
    old = time.time() - run_lock.STALE_S - 10
    os.utime(lock, (old, old))
    assert train(tiny(run_dir, "run.max_images=8")).status == "done"
    assert "replaced a stale lock" in capsys.readouterr().out and not lock.exists()
    # A job on this host that is gone (its pid no longer exists): stale at once.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"host": host, "machine": run_lock.machine_id(), "pid": dead.pid,
                                "started": time.time(), "token": "t"}))
    assert train(tiny(run_dir, "run.max_images=16")).step == 2
    assert f"pid {dead.pid} on this host is gone" in capsys.readouterr().out


def test_a_rank_that_does_not_see_rank_0s_run_dir_is_refused(tmp_path, monkeypatch):
    # What rank 1 on a node with a node-local run.dir does: it receives rank 0's token (here
    # through a stand-in for the collective) and does not find it in its own directory.
    lock = run_lock.RunLock(tmp_path / "shared").acquire()
    monkeypatch.setattr(run_lock, "agree", lambda what, err=None, payload=None, exc=None:
                        ([lock.token] if err is None else (_ for _ in ()).throw(exc(err))))
    try:
        run_lock.claim(tmp_path / "shared", rank=1)   # sees the same directory: fine
        from diti_fast.config import ConfigError
        with pytest.raises(ConfigError, match="not the directory rank 0 locked: checkpoints need a filesystem shared"):
            run_lock.claim(tmp_path / "node-local", rank=1)
    finally:
        lock.release()
    assert not (tmp_path / "shared" / run_lock.LOCK_NAME).exists()


# ============================================================================ elastic resume, 2 nodes

ELASTIC = apply_overrides(TINY, ["model.unet.base_channel=64", "deepspeed.grad_accum=2"])
# 64 channels: two per GroupNorm group (see tests/test_train_dist.py: with one, Adam amplifies the
# rounding noise of identically-zero bias gradients, and runs summing in another order drift by ~lr).


def test_a_held_port_refuses_other_binds_and_takes_a_tcpstore():
    from datetime import timedelta

    import torch.distributed as dist
    port = _free_port()
    with socket.socket() as other:
        with pytest.raises(OSError):
            other.bind(("127.0.0.1", port))   # nobody else gets it meanwhile
    store = dist.TCPStore("127.0.0.1", port, 1, True, timeout=timedelta(seconds=30))  # the child's listener
    store.set("k", "v")
    assert store.get("k") == b"v"


def two_node_agents(config: Path, *overrides: str) -> list[list[str]]:
    """Two torchrun agents, one process each, meeting at a c10d rendezvous on 127.0.0.1."""
    endpoint = f"127.0.0.1:{_free_port()}"
    return [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "resilience",
             "--node_rank", str(node), SCRIPT, "--config", str(config), *overrides] for node in (0, 1)]


@pytest.mark.slow
def test_elastic_resume_1_rank_to_2_nodes_stopped_by_sigterm_to_torchrun_to_1_rank(tmp_path):
    """Slow (2 torchrun agents). Only this test changes the number of ranks and the ZeRO stage across
    resumes (elastic), with a 2-node c10d rendezvous and a signal to one node only."""
    # 1 rank ZeRO-0 (steps 1-2) -> 2 nodes x 1 rank ZeRO-2, SIGTERM to node 0's torchrun only (node
    # 1's rank stops at the same step through the agreement) -> 1 rank ZeRO-1 to step 8; against
    # one uninterrupted process: parameters within 1e-5, every global sample index trained once.
    ref, run_dir = tmp_path / "ref", tmp_path / "elastic"
    first = train(build_config(apply_overrides(ELASTIC, [f"run.dir={run_dir}", "run.max_images=16"]), "test"))
    assert first.step == 2

    config = _config_file(tmp_path, ELASTIC)
    agents = [start(cmd, tmp_path, f"node{n}") for n, cmd in enumerate(
        two_node_agents(config, f"run.dir={run_dir}", "run.max_images=64", "deepspeed.zero_stage=2",
                        "debug.hold_after_step=3"))]
    sigterm_after(run_dir, 3, agents[0][0])   # both ranks wait after step 3 until it arrives
    # The uninterrupted reference in this process meanwhile.
    train(build_config(apply_overrides(ELASTIC, [f"run.dir={ref}", "run.max_images=64"]), "test"))
    out = "".join(finish(*agent)[1] for agent in agents)
    assert "ranks=2" in out and "resumed from" in out and "zero=2" in out, out[-3000:]
    step = assert_stopped_at_one_step(run_dir, out, before=[2], total=8)
    assert step == 3, out[-3000:]
    meta = json.loads((run_dir / f"checkpoints/step-{step:08d}/meta.json").read_text())
    assert (meta["world_size"], meta["zero_stage"]) == (2, 2)

    last = train(build_config(apply_overrides(ELASTIC, [f"run.dir={run_dir}", "run.max_images=64",
                                                        "deepspeed.zero_stage=1"]), "test"))
    assert last.status == "done" and last.step == 8

    a = _load(ref / "checkpoints/step-00000008/model.pt")
    b = _load(run_dir / "checkpoints/step-00000008/model.pt")
    for part in ("module", "ema"):
        for k in a[part]:
            torch.testing.assert_close(b[part][k], a[part][k], rtol=0, atol=1e-5, msg=f"{part}.{k}")
    sa = _load(ref / "checkpoints/step-00000008/optimizer-full.pt")["state"]
    sb = _load(run_dir / "checkpoints/step-00000008/optimizer-full.pt")["state"]
    assert set(sa) == set(sb) and {s["step"] for s in sb.values()} == {8.0}
    for k in sa:
        torch.testing.assert_close(sb[k]["exp_avg"], sa[k]["exp_avg"], rtol=0, atol=1e-5)
        # Adam's second moment is of the order of a squared gradient: held to 1e-5 of its own scale.
        scale = sa[k]["exp_avg_sq"].abs().max().item()
        assert scale > 0, k
        torch.testing.assert_close(sb[k]["exp_avg_sq"], sa[k]["exp_avg_sq"], rtol=0, atol=1e-5 * scale)
    assert sorted(read_indices(run_dir)) == list(range(8 * 8)), "a global sample index was trained twice or skipped"
