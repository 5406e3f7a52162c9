"""WebDataset input pipeline for diti-fast: shard sets made by ``python -m data_shards``.

    from diti_fast.data import ShardSpec, train_loader, eval_loader, to_model_input, read_manifest

Names that need torch or webdataset are imported on first use, so the shard writer (which only
needs the storage codec and the manifest) starts without loading torch.
"""

from importlib import import_module

from .codec import decode_image, key_index
from .errors import CorruptSampleError, DataError, DataFormatError, DataWarning
from .manifest import read_manifest

_LAZY = {
    "BatchLoader": ".loader",
    "eval_loader": ".loader",
    "train_loader": ".loader",
    "ShardSpec": ".shard_spec",
    "to_model_input": ".model_input",
}

__all__ = [
    "BatchLoader",
    "CorruptSampleError",
    "DataError",
    "DataFormatError",
    "DataWarning",
    "ShardSpec",
    "decode_image",
    "eval_loader",
    "key_index",
    "read_manifest",
    "to_model_input",
    "train_loader",
]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
