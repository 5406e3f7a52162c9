"""Wheel preflight: does ``.whl/`` hold, for Python 3.12 on x86-64 Linux, every package the GPU
machine lacks, and do those wheels import?

Checked per distribution the machine needs (``settings.DEVICE_WHEELS``):

- exactly one wheel of that name in the folder (two versions stop ``pip install`` there);
- its filename tags fit CPython 3.12 on manylinux x86-64 (``py3``/``cp312`` with ``none``/``abi3``/
  ``cp312`` and ``any``/``manylinux*_x86_64``/``linux_x86_64``);
- the wheel holds the module it is carried for (``pydantic_core/__init__.py`` in pydantic-core's);
- its ``Requires-Dist`` (markers evaluated for Python 3.12 on Linux, extras left out) are met by
  the other wheels (name and version) or by the machine's image (name);
- it imports: all wheels are unpacked into one folder and each module imported there by a Python
  3.12 interpreter when this machine has one (``GPU_CHECK_PY312`` or ``python3.12`` on PATH or
  under pyenv); modules that need torch (deepspeed) are imported by the current interpreter from a
  folder holding only that wheel, the rest of the environment being this machine's.

Pure Python (zipfile, the ``packaging`` library): no pip, no network.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from email.parser import Parser
from pathlib import Path

from gpucheck.settings import DEVICE_IMAGE, DEVICE_PYTHON, DEVICE_WHEELS, NEEDS_TORCH

_WHEEL_NAME = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(?:-(?P<build>\d[^-]*))?-(?P<py>[^-]+)-(?P<abi>[^-]+)"
                         r"-(?P<plat>[^-]+)\.whl$")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_wheel_name(filename: str) -> dict | None:
    m = _WHEEL_NAME.match(Path(filename).name)
    if not m:
        return None
    d = m.groupdict()
    d["dist"] = normalise(d["name"])
    return d


def tags_fit(info: dict, py: tuple[int, int] = DEVICE_PYTHON) -> tuple[bool, str]:
    """Whether a wheel's (python, abi, platform) tags install on CPython ``py`` on x86-64 Linux."""
    cp = f"cp{py[0]}{py[1]}"
    pys, abis, plats = info["py"].split("."), info["abi"].split("."), info["plat"].split(".")

    def py_ok(t: str) -> bool:
        if t in (f"py{py[0]}", f"py{py[0]}{py[1]}", cp):
            return True
        m = re.fullmatch(r"cp(\d)(\d+)", t)   # cp38 + abi3: any later CPython 3
        return bool(m and "abi3" in abis and (int(m.group(1)), int(m.group(2))) <= py)

    def abi_ok(t: str) -> bool:
        return t in ("none", "abi3", cp)

    def plat_ok(t: str) -> bool:
        return t == "any" or t == "linux_x86_64" or bool(re.fullmatch(r"manylinux(1|2010|2014|_\d+_\d+)_x86_64", t))

    why = []
    if not any(py_ok(t) for t in pys):
        why.append(f"python tag {info['py']} is not for {cp}")
    if not any(abi_ok(t) for t in abis):
        why.append(f"abi tag {info['abi']} is not for {cp}")
    if not any(plat_ok(t) for t in plats):
        why.append(f"platform tag {info['plat']} is not x86-64 Linux")
    return (not why, "; ".join(why) or f"{info['py']}-{info['abi']}-{info['plat']} fits {cp}")


def holds_module(names: list[str], module: str) -> bool:
    return any(n == f"{module}.py" or n.startswith(f"{module}/__init__.") or
               (n.startswith(f"{module}.") and n.endswith((".so", ".pyd"))) for n in names)


def requirements(zf: zipfile.ZipFile) -> list[str]:
    meta = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
    if not meta:
        return []
    msg = Parser().parsestr(zf.read(meta[0]).decode("utf-8", "replace"))
    return msg.get_all("Requires-Dist") or []


def unmet_requirements(reqs: list[str], versions: dict[str, str], py: tuple[int, int] = DEVICE_PYTHON) -> list[str]:
    """The requirements (for ``py`` on Linux, no extras) that neither a wheel nor the image meets."""
    from packaging.requirements import Requirement
    from packaging.version import Version
    env = {"python_version": f"{py[0]}.{py[1]}", "python_full_version": f"{py[0]}.{py[1]}.0",
           "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
           "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "extra": ""}
    bad = []
    for text in reqs:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = normalise(req.name)
        if name in versions:
            if req.specifier and not req.specifier.contains(Version(versions[name]), prereleases=True):
                bad.append(f"{text} (the wheel is {versions[name]})")
        elif name not in DEVICE_IMAGE:
            bad.append(f"{text} (no wheel, not in the machine's image)")
    return bad


def find_python(py: tuple[int, int] = DEVICE_PYTHON) -> str | None:
    """An interpreter of the device's Python version on this machine, if any."""
    want = f"{py[0]}.{py[1]}"
    cands = [os.environ.get("GPU_CHECK_PY312") or "", shutil.which(f"python{want}") or "", sys.executable]
    cands += sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{want}*/bin/python{want}")))
    for c in cands:
        if not c:
            continue
        try:
            r = subprocess.run([c, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0 and r.stdout.strip() == want:
            return c
    return None


_IMPORT_TO_DIST = {"yaml": "pyyaml", "cpuinfo": "py-cpuinfo", "PIL": "pillow", "xdist": "pytest-xdist"}


def _missing_image_module(error: str) -> str | None:
    """The module named by a "No module named X" error, when the machine's image provides it."""
    m = re.search(r"No module named '([^'.]+)", error)
    if not m:
        return None
    dist = _IMPORT_TO_DIST.get(m.group(1), normalise(m.group(1)))
    return m.group(1) if dist in DEVICE_IMAGE else None


@dataclass
class WheelCheck:
    dist: str
    module: str
    wheel: str | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    imported: str = "not tried"

    @property
    def ok(self) -> bool:
        return not self.problems


def _try_import(python: str, module: str, path: list[str], extra_env: dict | None = None) -> tuple[bool, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONPATH=os.pathsep.join(path), PYTHONNOUSERSITE="1", **(extra_env or {}))
    code = (f"import importlib, sys; m = importlib.import_module({module!r}); "
            f"print(getattr(m, '__file__', '') or '')")
    try:
        r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    except subprocess.TimeoutExpired:
        return False, "import timed out"
    if r.returncode:
        last = [ln for ln in r.stderr.strip().splitlines() if ln.strip()][-1:] or ["?"]
        return False, last[0][:200]
    return True, r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""


def check_wheels(folder: Path, import_check: bool = True, py: tuple[int, int] = DEVICE_PYTHON,
                 needed: dict[str, str] | None = None) -> dict:
    """The preflight: {"ok", "folder", "checks": [WheelCheck as dict], "python", "extra_wheels", "summary"}."""
    folder = Path(folder)
    needed = DEVICE_WHEELS if needed is None else needed
    files = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    by_dist: dict[str, list[Path]] = {}
    for f in files:
        info = parse_wheel_name(f.name)
        by_dist.setdefault(info["dist"] if info else f"?{f.name}", []).append(f)
    versions = {d: parse_wheel_name(fs[0].name)["version"] for d, fs in by_dist.items()
                if len(fs) == 1 and not d.startswith("?")}
    checks = []
    usable: dict[str, Path] = {}
    for dist, module in needed.items():
        c = WheelCheck(dist, module)
        checks.append(c)
        found = by_dist.get(normalise(dist), [])
        if not found:
            c.problems.append(f"no wheel in {folder}")
            continue
        if len(found) > 1:
            c.problems.append("several wheels: " + ", ".join(p.name for p in found) + " (keep one)")
            continue
        whl = found[0]
        c.wheel = whl.name
        fits, why = tags_fit(parse_wheel_name(whl.name), py)
        if not fits:
            c.problems.append(why)
            continue
        try:
            with zipfile.ZipFile(whl) as zf:
                names = zf.namelist()
                reqs = requirements(zf)
        except zipfile.BadZipFile as e:
            c.problems.append(f"not a wheel archive: {e}")
            continue
        if not holds_module(names, module):
            c.problems.append(f"holds no module {module}")
            continue
        unmet = unmet_requirements(reqs, versions, py)
        if unmet:
            c.problems.append("unmet requirements: " + "; ".join(unmet))
        usable[dist] = whl
    python = find_python(py) if import_check else None
    if import_check and usable:
        with tempfile.TemporaryDirectory(prefix="gpu_check-wheels-") as tmp:
            site = Path(tmp) / "site"
            for whl in usable.values():
                with zipfile.ZipFile(whl) as zf:
                    zf.extractall(site)
            for c in checks:
                if c.dist not in usable:
                    continue
                if c.dist in NEEDS_TORCH:
                    # torch is the device's: import with this interpreter (which has torch) from a
                    # folder holding only this wheel, so the module really comes from it.
                    alone = Path(tmp) / c.dist
                    with zipfile.ZipFile(usable[c.dist]) as zf:
                        zf.extractall(alone)
                    ok, where = _try_import(sys.executable, c.module, [str(alone)],
                                            {"DS_ACCELERATOR": "cpu"})
                    label = f"python {sys.version_info[0]}.{sys.version_info[1]} (has torch)"
                    if ok and not where.startswith(str(alone)):
                        ok, where = False, f"imported from {where}, not the wheel"
                elif python is None:
                    c.notes.append(f"import not tried: no Python {py[0]}.{py[1]} here (tags and module checked)")
                    continue
                else:
                    ok, where = _try_import(python, c.module, [str(site)])
                    label = f"python {py[0]}.{py[1]}"
                image_dep = _missing_image_module(where) if not ok else None
                if image_dep:
                    ok, label = True, f"{label}, up to {image_dep} which the machine's image has"
                c.imported = f"ok ({label})" if ok else f"FAILED ({label}): {where}"
                if not ok:
                    c.problems.append(f"import {c.module} fails: {where}")
    extra = sorted(d for d in by_dist if normalise(d) not in {normalise(n) for n in needed})
    ok = all(c.ok for c in checks)
    return {"ok": ok, "folder": str(folder), "python": python, "extra_wheels": extra,
            "checks": [dict(c.__dict__, ok=c.ok) for c in checks],
            "summary": (f"all {len(checks)} wheels the GPU machine lacks are in {folder} and fit Python "
                        f"{py[0]}.{py[1]}" if ok else
                        f"{sum(not c.ok for c in checks)} of {len(checks)} wheels missing or unusable in {folder}: "
                        + ", ".join(c.dist for c in checks if not c.ok))}


def report_lines(res: dict) -> list[str]:
    lines = [("OK: " if res["ok"] else "PROBLEM: ") + res["summary"]]
    for c in res["checks"]:
        state = "ok" if c["ok"] else "PROBLEM"
        lines.append(f"  {c['dist']:<18} {c['wheel'] or '-':<70} {state}; import {c['imported']}"
                     + "".join(f"; {p}" for p in c["problems"]) + "".join(f"; {n}" for n in c["notes"]))
    if res["extra_wheels"]:
        lines.append("  also in the folder (installed too): " + ", ".join(res["extra_wheels"]))
    return lines
