"""Where the ``m × d`` gradient window lives, and the passes the M-FAC algorithms make over it.

One module per storage kind, behind the contract of :mod:`~lightning_mfac.fisher.storage.base`
(docs/design.md, "Storage layouts"):

``DeviceWindow``  (:mod:`.device`) the rows (and the staging row) in one ``(m + 1, d)`` tensor on
                  the compute device.
``PagedWindow``   (:mod:`.paged`) page-major host memory ``(npages, m, page_cols)`` (pinned when CUDA
                  is present), streamed to the device a page at a time with the next page's copy in
                  flight on a side stream; host-side writes wait for that stream first.
``ShardedWindow`` (:mod:`.sharded`) under ``torch.distributed``: each rank stores a contiguous
                  1/world slice of the coordinates; dot products and Grams are all-reduced,
                  combinations all-gathered; its state is this rank's columns, and
                  :mod:`.shard_files` writes a checkpoint's files of all ranks beside it.
``LocalShardWindow`` (:mod:`.sharded`) over FSDP2 shards: each rank stores the columns of its own
                  parameter shards (a :class:`ShardLayout`); vectors stay local, dots and Grams
                  are all-reduced; the same checkpoint files.

:mod:`.planner` holds the one rule for ``storage="auto"`` (:func:`plan_storage`) and
:func:`make_window`.
"""

from lightning_mfac.fisher.storage.base import (
    CHECKPOINT_BLOCK_BYTES,
    CHECKPOINT_FORMAT,
    LOCAL_SHARD_FORMAT,
    SHARD_FILE_FORMAT,
    SHARDED_CHECKPOINT_FORMAT,
    WindowStorage,
    default_out_dtype,
    itemsize,
)
from lightning_mfac.fisher.storage.device import DeviceWindow
from lightning_mfac.fisher.storage.paged import PAGE_BUDGET_FRACTION, PagedWindow, default_page_cols
from lightning_mfac.fisher.storage.planner import (
    AUTO_DEVICE_FRACTION,
    WindowMemoryError,
    check_window_fits,
    free_bytes,
    make_window,
    plan_storage,
)
from lightning_mfac.fisher.storage.shard_files import (
    SHARD_FOLDER_SUFFIX,
    WINDOW_FILE_NAME,
    locate_window_shards,
    prune_window_folder,
    rank_local,
    rank_local_value,
    window_files,
    window_shard_folder,
    write_window_shards,
)
from lightning_mfac.fisher.storage.sharded import LocalShardWindow, ShardedWindow, ShardLayout

__all__ = [
    "AUTO_DEVICE_FRACTION",
    "CHECKPOINT_BLOCK_BYTES",
    "CHECKPOINT_FORMAT",
    "LOCAL_SHARD_FORMAT",
    "PAGE_BUDGET_FRACTION",
    "SHARDED_CHECKPOINT_FORMAT",
    "SHARD_FILE_FORMAT",
    "SHARD_FOLDER_SUFFIX",
    "WINDOW_FILE_NAME",
    "DeviceWindow",
    "PagedWindow",
    "LocalShardWindow",
    "ShardLayout",
    "ShardedWindow",
    "WindowMemoryError",
    "WindowStorage",
    "check_window_fits",
    "default_out_dtype",
    "default_page_cols",
    "free_bytes",
    "itemsize",
    "locate_window_shards",
    "make_window",
    "plan_storage",
    "prune_window_folder",
    "window_files",
    "window_shard_folder",
    "rank_local",
    "rank_local_value",
    "write_window_shards",
]
