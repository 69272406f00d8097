"""Reading sources and writing outputs safely: clear errors up front, no half-written output ever left behind."""

from __future__ import annotations

from pathlib import Path

from ..atomic_io import atomic_output_dir, atomic_write_text  # noqa: F401  (this module's old public names)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_local_checkpoint(path: Path) -> None:
    """Raise a clear error if ``path`` is not a loadable checkpoint directory (missing, no config, corrupt weights)."""
    if not path.exists():
        raise FileNotFoundError(f"Source checkpoint {path} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"Source checkpoint {path} is not a directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a checkpoint: config.json is missing")
    shards = sorted(path.glob("*.safetensors"))
    if not shards and not any((path / name).exists() for name in WEIGHT_FILES):
        raise ValueError(f"{path} is not a checkpoint: no weights (*.safetensors or pytorch_model.bin) found")
    from safetensors import safe_open

    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as handle:
                for key in handle.keys():
                    handle.get_slice(key)  # parses the header entry of every tensor
        except Exception as error:  # safetensors raises several types for a damaged file
            raise ValueError(f"Corrupt safetensors file {shard}: {error}") from error
        expected = _safetensors_size(shard)
        if expected is not None and expected != shard.stat().st_size:
            raise ValueError(f"Corrupt safetensors file {shard}: header promises {expected} bytes, file has {shard.stat().st_size}")


def _safetensors_size(shard: Path) -> int | None:
    import json
    import struct

    with open(shard, "rb") as handle:
        header_len = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(header_len))
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    return 8 + header_len + max(ends, default=0)


