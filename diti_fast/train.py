"""The launch script: what ``deepspeed``, ``torchrun`` and ``python`` run. The loop is in ``engine/``.

    deepspeed --num_gpus 8 diti_fast/train.py --config celeba64
    deepspeed --num_gpus 8 --module diti_fast.train --config celeba64
    torchrun --nproc_per_node 8 diti_fast/train.py --config celeba64
    python -m diti_fast.train --config shapes32 stage=ddpm
"""
import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a file (the launchers): Python put this folder first on sys.path, where diti_fast/data
    # etc. would shadow same-named top-level modules. Import through the installed package instead.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

from diti_fast.engine.loop import main  # noqa: E402

if __name__ == "__main__":
    code = main()
    if code != 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A multi-rank run that stopped early or failed: leave without the interpreter's teardown.
        # There the C++ process group's threads can hit std::terminate (SIGABRT) once the other
        # ranks are gone, and the launcher would record that signal instead of our exit status.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
