"""Files a run shares are created with the process umask, as an ordinary ``open`` would: the export
that evaluation and ``init.ddpm`` load, config.yaml, metrics, checkpoints, reports. (The safetensors
writer alone creates its files 0600, unreadable to a colleague's eval job.)"""
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from diti_fast.engine.loop import train
from test_train_resilience import tiny


@contextmanager
def _umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_run_files_follow_the_umask(tmp_path, mask):
    with _umask(mask):
        assert train(tiny(tmp_path / "run", "run.max_images=8", "checkpoint.every=1")).status == "done"
    modes = _files(tmp_path / "run")
    for name in ("export/ema.safetensors", "config.yaml", "metrics.jsonl", "status.json"):
        assert name in modes, sorted(modes)
    assert any(n.startswith("checkpoints/") for n in modes), sorted(modes)
    wanted = 0o666 & ~mask  # what open(path, "w") gives
    assert {n: oct(m) for n, m in modes.items() if m != wanted} == {}


def test_another_user_can_read_an_export():
    if os.geteuid() != 0:
        pytest.skip("needs root to run a reader as another uid")
    import pwd
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody'")
    shared = Path(tempfile.mkdtemp(prefix="diti-modes-"))
    try:
        shared.chmod(0o755)  # a directory others may enter, as a shared run directory is
        with _umask(0o022):
            assert train(tiny(shared / "run", "run.max_images=8")).status == "done"
        export = shared / "run" / "export" / "ema.safetensors"
        reader = ("import os, sys; os.setgid(%d); os.setuid(%d); "
                  "sys.stdout.write(str(len(open(sys.argv[1], 'rb').read())))") % (nobody.pw_gid, nobody.pw_uid)
        proc = subprocess.run([sys.executable, "-c", reader, str(export)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert int(proc.stdout) == export.stat().st_size
    finally:
        shutil.rmtree(shared, ignore_errors=True)
