"""Reading sharded (DCP) checkpoints without running code from them.

torch 2.13's `FileSystemReader.read_metadata` reads `.metadata` with plain `pickle.load`, and its
`DefaultLoadPlanner.load_bytes` reads every non-tensor value of the state dict (optimizer
hyper-parameters, ints, strings) with `torch.load(weights_only=False)`: a crafted checkpoint
directory runs arbitrary code the moment it is loaded. `SafeFileSystemReader` closes both doors:

* `.metadata` goes through `MetadataUnpickler`, which admits only the classes DCP metadata is made
  of (listed by saving real FSDP checkpoints with torch 2.13 and recording every global the
  pickle names) and refuses everything else before it is looked up;
* byte items are read with `torch.load(weights_only=True)` and handed to the planner re-serialized
  from the safe result, so the planner's unrestricted `torch.load` only ever sees our own bytes.

The reader checks all of this when it is constructed, outside DCP's collective wrappers, so a
refused file is a one-line `UnsafeCheckpointError` (a `UserError`: exit 2) naming the file, on
every rank at once (no rank waits in a collective for another that failed).
"""

from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    StorageMeta,
)

from rayq.errors import UserError

__all__ = ["MetadataUnpickler", "SafeFileSystemReader", "UnsafeCheckpointError", "load_metadata", "refusal"]

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
# Every global a torch 2.13 DCP `.metadata` pickle names (FSDP2 model + AdamW state, plain and
# DTensor values), plus harmless builtin containers. Enum and dataclass constructors only store
# the values they are given; `_get_layout` maps a name to an existing torch.layout.
_ALLOWED = frozenset({
    *((_DCP_METADATA, name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"),
})


class UnsafeCheckpointError(UserError):
    """A checkpoint file holds something other than data (it would run code if unpickled)."""


class MetadataUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that resolves only the globals DCP metadata consists of (and dtypes)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which DCP metadata never contains")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("it uses persistent ids, which DCP metadata never contains")


def load_metadata(path: str | os.PathLike) -> Metadata:
    """Unpickle a DCP `.metadata` file through `MetadataUnpickler`; refuse anything else."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            metadata = MetadataUnpickler(fh).load()
    except FileNotFoundError:
        raise UserError(f"{path}: missing (a sharded checkpoint needs its DCP .metadata file)") from None
    except pickle.UnpicklingError as exc:
        if "never contains" in str(exc):
            raise UnsafeCheckpointError(f"{path}: refused: not DCP metadata ({exc}); rayq never runs code "
                                        "from a checkpoint") from None
        raise UserError(f"{path}: corrupted or truncated DCP metadata ({exc})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as exc:
        raise UserError(f"{path}: corrupted or truncated DCP metadata ({type(exc).__name__})") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{path}: refused: not DCP metadata (it holds a {type(metadata).__name__})")
    return metadata


def refusal(exc: BaseException) -> str | None:
    """Why `torch.load(weights_only=True)` refused a file, in a few words ("not a tensor file (it
    names posix.system)"), or None when `exc` is damage rather than a refusal."""
    text = str(exc)
    if not (isinstance(exc, pickle.UnpicklingError) and text.startswith("Weights only load failed")):
        return None
    found = re.search(r"GLOBAL (\S+)", text)
    return f"not a tensor file (it names {found.group(1)})" if found else "not a tensor file"


def _weights_only(stream: io.BytesIO, where: str) -> Any:
    try:
        return torch.load(stream, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged stream
        if (why := refusal(exc)) is not None:
            raise UnsafeCheckpointError(f"{where}: refused: {why}") from None
        raise UserError(f"{where}: corrupted or truncated checkpoint data ({type(exc).__name__})") from None


class _WeightsOnlyBytes:
    """The caller's load planner, except that byte items reach it only after a weights_only load
    (DCP's planners call `torch.load(weights_only=False)` on them)."""

    def __init__(self, planner: Any, directory: Path) -> None:
        self._planner, self._directory = planner, directory

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        obj = _weights_only(value, f"{self._directory}: item {read_item.dest_index.fqn}")
        clean = io.BytesIO()
        torch.save(obj, clean)
        clean.seek(0)
        self._planner.load_bytes(read_item, clean)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)


class SafeFileSystemReader(FileSystemReader):
    """`FileSystemReader` for a local DCP directory that never unpickles code (see module doc).
    Use it wherever DCP reads: `dcp.load(state, storage_reader=SafeFileSystemReader(d))`."""

    def __init__(self, path: str | os.PathLike, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self._checked: dict[str, Metadata] = {}
        self._check(self._metadata_path(None))

    def _metadata_path(self, rank: Any) -> Path:
        return Path(self._get_metadata_path(rank))

    def _check(self, path: Path) -> Metadata:
        """Read `.metadata` safely and vet every file it points at and every byte item in them."""
        key = os.fspath(path)
        if key not in self._checked:
            metadata = load_metadata(path)
            try:
                self._check_items(metadata, path)
            except (AttributeError, TypeError, ValueError) as exc:  # metadata of the right classes, wrong contents
                raise UserError(f"{path}: corrupted DCP metadata ({type(exc).__name__}: {exc})") from None
            self._checked[key] = metadata
        return self._checked[key]

    @staticmethod
    def _check_items(metadata: Metadata, path: Path) -> None:
        directory = path.parent
        for index, info in metadata.storage_data.items():
            rel = PurePosixPath(str(info.relative_path))
            if rel.is_absolute() or len(rel.parts) != 1 or rel.name in ("", ".", ".."):
                raise UnsafeCheckpointError(f"{path}: refused: it points outside its directory ({rel})")
            if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata) \
                    or info.transform_descriptors:
                continue
            shard = directory / rel.name
            try:
                with open(shard, "rb") as fh:
                    fh.seek(info.offset)
                    data = fh.read(info.length)
            except OSError as exc:
                raise UserError(f"{directory}: corrupted or incomplete sharded checkpoint "
                                f"({rel.name}: {exc.strerror})") from None
            _weights_only(io.BytesIO(data), f"{shard}: item {index.fqn}")

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = self._check(self._metadata_path(kwargs.get("rank")))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: Any, planner: Any) -> Any:
        return super().read_data(plan, _WeightsOnlyBytes(planner, Path(self.path)))
