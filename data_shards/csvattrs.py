"""Per-image attribute tables for the ``folder`` source.

Format: a header row, then one row per image. The first column is the image path relative to the
source root; every further column is one attribute. A header cell may name the kind explicitly
as ``name:binary``, ``name:categorical`` or ``name:continuous``; otherwise it is inferred:
all values in {0,1}, {-1,1} or {true,false} → binary; all non-negative integers → categorical
with ids as given; all numbers → continuous; anything else → categorical with string labels
(classes sorted). Errors name the file and line.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from diti_fast.data.errors import DataFormatError
from diti_fast.data.manifest import ATTRIBUTE_KINDS

from diti_fast.data.errors import MissingFileError

_TRUE = {"1", "true", "yes", "y", "t"}
_FALSE = {"0", "-1", "false", "no", "n", "f"}


def normalise_relpath(p: str) -> str:
    p = p.strip().replace("\\", "/")
    while p.startswith("./"):
        p = p[2:]
    return p


def _is_int(v: str) -> bool:
    try:
        int(v)
        return True
    except ValueError:
        return False


def _is_float(v: str) -> bool:
    try:
        return math.isfinite(float(v))
    except ValueError:
        return False


def _infer_kind(values: list[str]) -> str:
    low = {v.lower() for v in values}
    if low and (low <= {"0", "1"} or low <= {"-1", "1"} or low <= {"true", "false"}):
        return "binary"
    if values and all(_is_int(v) and int(v) >= 0 for v in values):
        return "categorical"
    if values and all(_is_float(v) for v in values):
        return "continuous"
    return "categorical"


def read_attribute_csv(path: str | Path) -> tuple[list[dict], dict[str, np.ndarray], dict[str, int]]:
    """Returns (attribute specs, {relative path: float32 vector}, {relative path: line number})."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: attribute file not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise DataFormatError(f"{path}:1: empty attribute file (expected a header row)") from None
        except csv.Error as exc:
            raise DataFormatError(f"{path}:{reader.line_num}: {exc}") from None
        if len(header) < 2:
            raise DataFormatError(f"{path}:1: header needs a path column and at least one attribute")
        names, kinds = [], []
        for cell in header[1:]:
            name, _, kind = cell.strip().partition(":")
            if not name:
                raise DataFormatError(f"{path}:1: empty attribute name in header")
            if kind and kind not in ATTRIBUTE_KINDS:
                raise DataFormatError(
                    f"{path}:1: attribute {name!r} has unknown kind {kind!r}; use one of {ATTRIBUTE_KINDS}"
                )
            if name in names:
                raise DataFormatError(f"{path}:1: duplicate attribute name {name!r}")
            names.append(name)
            kinds.append(kind or None)
        rows: list[tuple[int, str, list[str]]] = []
        first_line: dict[str, int] = {}
        try:
            for row in reader:
                line = reader.line_num
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != len(header):
                    raise DataFormatError(
                        f"{path}:{line}: expected {len(header)} columns "
                        f"(path + {len(names)} attributes), got {len(row)}"
                    )
                rel = normalise_relpath(row[0])
                if not rel:
                    raise DataFormatError(f"{path}:{line}: empty image path")
                if rel in first_line:
                    raise DataFormatError(f"{path}:{line}: duplicate path {rel!r} (first on line {first_line[rel]})")
                first_line[rel] = line
                rows.append((line, rel, [c.strip() for c in row[1:]]))
        except csv.Error as exc:
            raise DataFormatError(f"{path}:{reader.line_num}: {exc}") from None
    if not rows:
        raise DataFormatError(f"{path}: no data rows after the header")

    specs: list[dict] = []
    columns = np.empty((len(rows), len(names)), np.float32)
    for j, name in enumerate(names):
        values = [r[2][j] for r in rows]
        kind = kinds[j] or _infer_kind(values)
        spec: dict = {"name": name, "kind": kind}
        if kind == "binary":
            for i, (line, _, cells) in enumerate(rows):
                v = cells[j].lower()
                if v in _TRUE:
                    columns[i, j] = 1.0
                elif v in _FALSE:
                    columns[i, j] = 0.0
                else:
                    raise DataFormatError(
                        f"{path}:{line}: attribute {name!r}: {cells[j]!r} is not binary (0/1, -1/1, true/false)"
                    )
        elif kind == "continuous":
            for i, (line, _, cells) in enumerate(rows):
                if not _is_float(cells[j]):
                    raise DataFormatError(f"{path}:{line}: attribute {name!r}: {cells[j]!r} is not a finite number")
                columns[i, j] = float(cells[j])
        else:
            if all(_is_int(v) and int(v) >= 0 for v in values):
                columns[:, j] = [int(v) for v in values]
                spec["num_classes"] = int(columns[:, j].max()) + 1
            else:
                classes = sorted({v for v in values})
                if "" in classes:
                    line = rows[values.index("")][0]
                    raise DataFormatError(f"{path}:{line}: attribute {name!r}: empty value")
                lookup = {c: k for k, c in enumerate(classes)}
                columns[:, j] = [lookup[v] for v in values]
                spec["num_classes"] = len(classes)
                spec["classes"] = classes
        specs.append(spec)
    table = {rel: columns[i] for i, (_, rel, _) in enumerate(rows)}
    return specs, table, first_line
