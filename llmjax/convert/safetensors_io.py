"""Reading and writing the safetensors file format with numpy alone (no extra dependency).

A safetensors file is: an 8-byte little-endian header length n, n bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`,
offsets relative to the end of the header), then the raw little-endian tensor bytes,
packed with no gaps. bfloat16 arrays are numpy arrays of `ml_dtypes.bfloat16`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

# safetensors dtype codes <-> numpy (little-endian) dtypes.
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_CODES = {dt: code for code, dt in DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 2**20  # the reference implementation's limit


class SafetensorsError(ValueError):
    """A file that is not valid safetensors, or a dtype this module cannot map to numpy."""


@dataclasses.dataclass(frozen=True)
class TensorRecord:
    """Where one tensor lives: its file, dtype code, shape and byte range (absolute)."""

    file: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    def load(self) -> np.ndarray:
        """The tensor as a numpy array (read from disk now).

        Raises:
          SafetensorsError: a dtype code with no numpy equivalent (e.g. F8_E4M3).
        """
        if self.dtype not in DTYPES:
            raise SafetensorsError(f"tensor {self.name!r} in {self.file} has dtype {self.dtype}, "
                                   f"which cannot be read; readable: {', '.join(DTYPES)}")
        dt = DTYPES[self.dtype]
        count = int(np.prod(self.shape, dtype=np.int64))
        return np.fromfile(self.file, dtype=dt, count=count, offset=self.start).reshape(self.shape)


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorRecord], dict[str, str]]:
    """Parses a safetensors header without reading any tensor data.

    Args:
      path: a `.safetensors` file.
    Returns:
      ({name: TensorRecord}, metadata dict; empty when the file has none).
    Raises:
      SafetensorsError: truncated file, bad JSON, or offsets that do not fit the data.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path} is not a safetensors file: {size} bytes, too short for a header")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER_BYTES, size - 8):
            raise SafetensorsError(f"{path} is not a safetensors file: header length {n} "
                                   f"does not fit a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: the safetensors header is not valid JSON ({e})") from e
    metadata = header.pop("__metadata__", None) or {}
    base, records = 8 + n, {}
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            record = TensorRecord(path, name, entry["dtype"], tuple(int(d) for d in entry["shape"]),
                                  base + int(begin), base + int(end))
        except (KeyError, TypeError, ValueError) as e:
            raise SafetensorsError(f"{path}: bad header entry for tensor {name!r}: {entry!r}") from e
        itemsize = DTYPES[record.dtype].itemsize if record.dtype in DTYPES else None
        nbytes = None if itemsize is None else itemsize * int(np.prod(record.shape, dtype=np.int64))
        if record.end > size or record.start > record.end or (nbytes is not None and nbytes != record.end - record.start):
            raise SafetensorsError(f"{path}: tensor {name!r} (shape {list(record.shape)}, {record.dtype}) "
                                   f"has byte range [{begin}, {end}) that does not fit the file")
        records[name] = record
    return records, metadata


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> int:
    """Writes arrays as one safetensors file (names sorted, data packed, header 8-byte aligned).

    Args:
      path: the file to write (overwritten).
      tensors: name -> array of a dtype in `DTYPES` (jax arrays are converted with np.asarray).
      metadata: optional string -> string map stored as `__metadata__`.
    Returns:
      Number of tensor data bytes written.
    Raises:
      SafetensorsError: an array dtype with no safetensors code.
    """
    arrays, header, offset = [], {}, 0
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        if dt not in _CODES:
            raise SafetensorsError(f"tensor {name!r} has dtype {a.dtype}; writable: "
                                   f"{', '.join(str(d) for d in _CODES)}")
        a = np.asarray(a, dtype=dt, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        header[name] = {"dtype": _CODES[dt], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad so the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            a.tofile(f)
    return offset
