"""Deep Compression storage (Han et al., ICLR 2016): the `.onnxc` single-file archive.

`pack` / `unpack` (bytes), `pack_file` / `unpack_file` (paths), `compression_table` (the
paper's Table 1 for a packed model). Layout and guarantees: see `format`.
"""

from onnxcompress.archive.format import (
    MAGIC,
    VERSION,
    PackedLayer,
    PackResult,
    pack,
    pack_file,
    read_archive,
    unpack,
    unpack_file,
)
from onnxcompress.archive.table import compression_table, table_markdown

__all__ = [
    "MAGIC",
    "VERSION",
    "PackedLayer",
    "PackResult",
    "pack",
    "pack_file",
    "read_archive",
    "unpack",
    "unpack_file",
    "compression_table",
    "table_markdown",
]
