"""The training engine: the loop (``loop.py``) and only what it uses. ``diti_fast/train.py`` launches it."""
