"""Numbers for a strict JSON file (report.json, the commands' results, the claim's records)."""
from __future__ import annotations

import math

import numpy as np


def jsonable(o):
    """Strict JSON: NaN (an undefined metric) becomes null, numpy scalars become Python numbers."""
    if isinstance(o, dict):
        return {str(k): jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return jsonable(o.tolist())
    if isinstance(o, (np.floating, float)):
        return None if math.isnan(float(o)) else float(o)
    if isinstance(o, np.integer):
        return int(o)
    return o
