"""LFW's attribute file (``lfw_attributes.txt``, the one DiTi's attribute regression reads) -> the
attribute CSV of the ``folder`` source.

    python -m data_shards lfw-attrs lfw_attributes.txt --out lfw_attributes.csv [--people peopleDevTrain.txt]

Input format (tab-separated):

    # 13143
    #   person  imagenum  Male  Asian  White  ...        (73 attribute names after person, imagenum)
    Aaron Eckhart   1   1.568346   -1.889130   ...

Output: a header ``path,Male:continuous,...`` and one row per image, the path relative to the
``lfw_funneled`` folder (``Aaron_Eckhart/Aaron_Eckhart_0001.jpg``), the values as given.
``--people`` keeps only the persons listed in one of LFW's people files (``peopleDevTrain.txt``,
``peopleDevTest.txt``: a count line, then ``name<TAB>number of images``), the split torchvision's
LFWPeople, and so the original's regression, uses. Errors name the file and line.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

from diti_fast.data.errors import DataFormatError, MissingFileError


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise MissingFileError(f"{path}: not found")
    return path.read_text(encoding="utf-8").splitlines()


def image_path(person: str, num: int) -> str:
    folder = person.strip().replace(" ", "_")
    return f"{folder}/{folder}_{num:04d}.jpg"


def read_lfw_attributes(path: str | Path) -> tuple[list[str], list[tuple[str, str, list[float], int]]]:
    """(attribute names, [(person, relative image path, values, line number)])."""
    path = Path(path)
    lines = _lines(path)
    if len(lines) < 2 or not lines[0].startswith("#") or not lines[1].startswith("#"):
        raise DataFormatError(f"{path}:1: expected '# COUNT' and a '#<TAB>person<TAB>imagenum<TAB>...' header")
    try:
        count = int(lines[0].lstrip("#").strip())
    except ValueError:
        raise DataFormatError(f"{path}:1: expected '# COUNT', got {lines[0].strip()!r}") from None
    header = [c.strip() for c in lines[1].lstrip("#").split("\t") if c.strip()]
    if header[:2] != ["person", "imagenum"] or len(header) < 3:
        raise DataFormatError(f"{path}:2: expected the columns person, imagenum and the attribute names, "
                              f"got {header[:3]}")
    names = header[2:]
    rows, seen = [], {}
    for lineno, line in enumerate(lines[2:], start=3):
        if not line.strip():
            continue
        cells = line.rstrip("\n").split("\t")
        if len(cells) != len(header):
            raise DataFormatError(f"{path}:{lineno}: expected {len(header)} tab-separated fields "
                                  f"(person, imagenum, {len(names)} attributes), got {len(cells)}")
        person = cells[0].strip()
        try:
            num = int(cells[1])
        except ValueError:
            raise DataFormatError(f"{path}:{lineno}: imagenum {cells[1]!r} is not an integer") from None
        values = []
        for name, cell in zip(names, cells[2:]):
            try:
                v = float(cell)
            except ValueError:
                raise DataFormatError(f"{path}:{lineno}: attribute {name!r}: {cell!r} is not a number") from None
            if not math.isfinite(v):
                raise DataFormatError(f"{path}:{lineno}: attribute {name!r}: {cell!r} is not finite")
            values.append(v)
        rel = image_path(person, num)
        if rel in seen:
            raise DataFormatError(f"{path}:{lineno}: {person!r} image {num} already on line {seen[rel]}")
        seen[rel] = lineno
        rows.append((person, rel, values, lineno))
    if len(rows) != count:
        raise DataFormatError(f"{path}:1: the count line says {count} images, the file lists {len(rows)}")
    return names, rows


def read_people(path: str | Path) -> set[str]:
    """Persons of an LFW people file (first line: the count; then ``name<TAB>images``)."""
    path = Path(path)
    lines = [line for line in _lines(path) if line.strip()]
    out = set()
    for lineno, line in enumerate(lines[1:], start=2):
        cells = line.split("\t")
        if len(cells) != 2 or not cells[1].strip().isdigit():
            raise DataFormatError(f"{path}:{lineno}: expected 'name<TAB>number of images', got {line.strip()!r}")
        out.add(cells[0].strip().replace(" ", "_"))
    first = lines[0].strip() if lines else ""
    if not first.isdigit():
        raise DataFormatError(f"{path}:1: expected the number of persons, got {first!r}")
    if int(first) != len(out):
        raise DataFormatError(f"{path}:1: the count line says {first}, the file lists {len(out)} persons")
    return out


def convert(src: str | Path, out: str | Path, people: str | Path | None = None) -> dict:
    """Write the CSV; returns counts (rows written, rows left out by ``people``)."""
    names, rows = read_lfw_attributes(src)
    keep = read_people(people) if people is not None else None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path"] + [f"{n}:continuous" for n in names])
        for person, rel, values, _ in rows:
            if keep is not None and person.replace(" ", "_") not in keep:
                continue
            w.writerow([rel] + [repr(v) for v in values])
            written += 1
    return {"rows": written, "left_out": len(rows) - written, "attributes": len(names)}
