"""WebDataset input pipeline for diti-fast: shard sets made by ``python -m data_shards``.

    from diti_fast.data import ShardSpec, train_loader, eval_loader, to_model_input, read_manifest
"""

from .codec import decode_image, key_index
from .device import to_model_input
from .errors import CorruptSampleError, DataError, DataFormatError, DataWarning
from .loader import BatchLoader, eval_loader, train_loader
from .manifest import read_manifest
from .shards import ShardSpec

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
