"""``python -m diti_fast.eval COMMAND ...``: the evaluation commands without the console script."""
import sys

from .cli import main

sys.exit(main())
