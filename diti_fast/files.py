"""Writing a small text file so that readers see the old content or the new one, never a half-written
file: write beside it, then rename over it (atomic within one filesystem). Files made by libraries
that create them private (0600) get the mode an ordinary ``open`` would give: the process umask."""
from __future__ import annotations

import os
from pathlib import Path


def process_umask() -> int:
    """The process umask, read without changing it where /proc says it (os.umask can only read it
    by setting it, which would race with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike) -> None:
    """Give ``path`` the permissions a plain ``open(path, "w")`` would have (0666 less the umask)."""
    os.chmod(path, 0o666 & ~process_umask())


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
