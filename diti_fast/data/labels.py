"""Per-sample labels from any of the three members shard writers use.

``.f32`` (this project's: a float32 vector in manifest attribute order), ``.json`` (an object whose
keys are attribute names; the WebDataset ecosystem's usual metadata) and ``.cls`` (one integer as
text: a single categorical attribute). A sample whose labels cannot be read is skipped by the loader
and counted as ``missing_label`` or ``bad_label``. Shard sets without a manifest get their attribute
list from these members (``infer_attributes``).
"""

from __future__ import annotations

import json
import math

import numpy as np

from .codec import ATTRS_EXT, CLS_EXT, JSON_EXT

LABEL_EXTS = (ATTRS_EXT, JSON_EXT, CLS_EXT)


class LabelError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason  # "missing_label" or "bad_label"


def read_labels(sample: dict, attributes: list[dict]) -> np.ndarray:
    """float32 [A] in ``attributes`` order; raises LabelError. ``.f32`` wins when present (exact,
    no parsing), then ``.json``, then ``.cls`` (only for a single attribute)."""
    n = len(attributes)
    raw = sample.get(ATTRS_EXT)
    if raw is not None:
        if len(raw) != 4 * n:
            raise LabelError("bad_label", f".{ATTRS_EXT} member has {len(raw)} bytes, expected {4 * n}")
        return np.frombuffer(raw, "<f4")
    raw = sample.get(JSON_EXT)
    if raw is not None:
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LabelError("bad_label", f".{JSON_EXT} member is not JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise LabelError("bad_label", f".{JSON_EXT} member is a {type(obj).__name__}, not an object")
        out = np.empty(n, np.float32)
        for i, attr in enumerate(attributes):
            if attr["name"] not in obj:
                raise LabelError("missing_label", f".{JSON_EXT} member has no {attr['name']!r}")
            out[i] = _value(obj[attr["name"]], attr)
        return out
    raw = sample.get(CLS_EXT)
    if raw is not None and n == 1:
        try:
            return np.array([int(raw.decode("ascii").strip())], np.float32)
        except (UnicodeDecodeError, ValueError):
            raise LabelError("bad_label", f".{CLS_EXT} member {raw[:20]!r} is not an integer") from None
    have = "/".join(e for e in LABEL_EXTS if e in sample) or "none"
    raise LabelError("missing_label", f"no label member for {n} attribute(s) (.{ATTRS_EXT}/.{JSON_EXT}"
                     f"{'/.' + CLS_EXT if n == 1 else ''}; has {have})")


def _value(v, attr: dict) -> float:
    classes = attr.get("classes")
    if isinstance(v, str) and classes:
        try:
            return float(classes.index(v))
        except ValueError:
            raise LabelError("bad_label", f"{attr['name']}={v!r} is not one of its classes") from None
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)) and math.isfinite(v):
        if attr["kind"] == "categorical" and (v != int(v) or not 0 <= v < attr.get("num_classes", math.inf)):
            raise LabelError("bad_label", f"{attr['name']}={v!r} is not a class id")
        return float(v)
    raise LabelError("bad_label", f"{attr['name']}={v!r} is not a number")


def label_names(sample: dict) -> tuple[str | None, list[str]]:
    """(label member, attribute names) a manifest-less set gets from its first sample."""
    if JSON_EXT in sample:
        try:
            obj = json.loads(sample[JSON_EXT])
        except (UnicodeDecodeError, json.JSONDecodeError):
            obj = None
        if isinstance(obj, dict):
            keys = [k for k, v in obj.items() if isinstance(v, (bool, int, float, str))]
            if keys:
                return JSON_EXT, keys
    if CLS_EXT in sample:
        return CLS_EXT, ["cls"]
    if ATTRS_EXT in sample:
        return ATTRS_EXT, [f"attr{i}" for i in range(len(sample[ATTRS_EXT]) // 4)]
    return None, []


class AttributeScan:
    """Collects label values over a pass, to give a manifest-less set kinds and class counts with
    the rule of ``data_shards``' attribute CSVs: values in {0,1} → binary, non-negative integers →
    categorical, other numbers → continuous, strings → categorical (classes sorted)."""

    def __init__(self, member: str | None, names: list[str]):
        self.member, self.names = member, names
        self.values: list[set] = [set() for _ in names]

    def add(self, sample: dict) -> None:
        if self.member == JSON_EXT and JSON_EXT in sample:
            try:
                obj = json.loads(sample[JSON_EXT])
            except (UnicodeDecodeError, json.JSONDecodeError):
                return
            if isinstance(obj, dict):
                for seen, name in zip(self.values, self.names):
                    v = obj.get(name)
                    if isinstance(v, (bool, int, float, str)) and len(seen) <= 1000:
                        seen.add(v)
        elif self.member == CLS_EXT and CLS_EXT in sample:
            try:
                self.values[0].add(int(sample[CLS_EXT].decode("ascii").strip()))
            except (UnicodeDecodeError, ValueError):
                pass

    def attributes(self) -> list[dict]:
        out = []
        for name, seen in zip(self.names, self.values):
            attr: dict = {"name": name, "kind": "continuous"}
            strings = sorted(v for v in seen if isinstance(v, str))
            numbers = [v for v in seen if not isinstance(v, str)]
            if self.member == ATTRS_EXT:
                pass  # a bare vector says nothing about kinds
            elif strings:
                attr.update(kind="categorical", num_classes=len(strings), classes=strings)
            elif numbers and set(numbers) <= {0, 1}:
                attr["kind"] = "binary"
            elif numbers and all(float(v).is_integer() and v >= 0 for v in numbers) and len(seen) <= 1000:
                attr.update(kind="categorical", num_classes=int(max(numbers)) + 1)
            out.append(attr)
        return out
