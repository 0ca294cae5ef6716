"""Heat-map files: the crash-safe writer, the reader and shard merging (schema in docs/heatmaps.md)."""

from afloc_cli.heatmaps.store import (
    SCHEMA_VERSION,
    AsyncHeatmapWriter,
    HeatmapFile,
    HeatmapWriter,
    ImageRecord,
    content_differences,
    equal_contents,
    merge,
)

__all__ = [
    "SCHEMA_VERSION",
    "AsyncHeatmapWriter",
    "HeatmapFile",
    "HeatmapWriter",
    "ImageRecord",
    "content_differences",
    "equal_contents",
    "merge",
]
