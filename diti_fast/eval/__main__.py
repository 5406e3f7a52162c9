"""``python -m diti_fast.eval COMMAND ...``: the evaluation commands without the console script."""
import os
import sys

# Before torch loads its OpenMP runtime: idle threads sleep instead of spinning, which on a machine
# shared with other processes keeps small sampler batches from slowing down several-fold.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .commands import main  # noqa: E402

sys.exit(main())
