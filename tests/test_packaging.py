"""The project as a user installs it: a built wheel, installed non-editable, used from elsewhere.

The wheel goes into a fresh virtual environment that reuses this environment's installed
dependencies (a ``.pth`` file naming our site-packages, so nothing is downloaded), and the commands
run from a temporary directory, so neither the checkout nor its ``configs/`` can be picked up by
accident: the presets must come from inside the installed package.
"""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, golden_fixture

pytestmark = pytest.mark.slow


def _run(cmd, cwd, env=None, timeout=600):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy of the sources: setuptools keeps a build/ folder in the source tree, and a
    # stale one there could smuggle removed modules into the wheel.
    src = tmp / "src"
    skip_top = {".git", ".venv", "build", "runs", "data", ".cache", ".whl", ".gl", "tests", "benchmarks"}
    shutil.copytree(REPO, src, ignore=lambda d, names: [
        n for n in names if n == "__pycache__" or n.endswith(".egg-info") or (Path(d) == REPO and n in skip_top)])
    # --no-build-isolation: the build backend (setuptools) is already here; no registry needed.
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", str(tmp / "dist"), str(src)], cwd=tmp)
    wheels = list((tmp / "dist").glob("diti_fast-*.whl"))
    assert len(wheels) == 1, wheels
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    purelib = Path(subprocess.check_output(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    # Our dependencies, after the new environment's own site-packages (where the wheel goes).
    ours = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    (purelib / "zz_reuse_deps.pth").write_text("\n".join(dict.fromkeys(ours)) + "\n")
    # Install by unpacking the wheel (what pip does for a pure-Python wheel), then the console
    # script: the new environment has no pip of its own and needs none.
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extractall(purelib)
    script = env_dir / "bin" / "diti-fast"
    script.write_text(f"#!{py}\nimport sys\nfrom diti_fast.cli import main\nsys.exit(main())\n")
    script.chmod(0o755)
    return {"wheel": wheels[0], "py": py, "script": script, "purelib": purelib, "cwd": tmp}


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.setdefault("TRITON_INTERPRET", "1")
    return env


def test_wheel_holds_the_package_presets_and_kernels(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    for want in ("diti_fast/presets/shapes32.yaml", "diti_fast/presets/celeba64.yaml",
                 "diti_fast/kernels/fused_norm.py", "diti_fast/engine/loop.py", "data_shards/__main__.py"):
        assert want in names, f"{want} missing from the wheel"
    assert not any(n.startswith(("tests/", "kernels/", "configs/")) for n in names)


def test_installed_wheel_imports_from_site_packages(installed):
    out = _run([str(installed["py"]), "-c", "import diti_fast, diti_fast.kernels, diti_fast.presets as p; "
                "print(diti_fast.__file__); print(p.__file__)"], cwd=installed["cwd"], env=_env())
    for line in out.split():
        assert Path(line).is_relative_to(installed["purelib"]), f"{line} is not the installed copy"


def test_print_config_finds_the_preset_from_another_directory(installed):
    out = _run([str(installed["script"]), "train", "--config", "shapes32", "--print-config"],
               cwd=installed["cwd"], env=_env())
    assert "preset: shapes32" in out and "stage:" in out


def test_reference_check_passes_on_the_shipped_fixture(installed):
    out = _run([str(installed["py"]), "-m", "diti_fast.reference.check", str(golden_fixture())],
               cwd=installed["cwd"], env=_env())
    assert "FAIL" not in out
