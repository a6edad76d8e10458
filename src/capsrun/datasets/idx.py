"""Reader for the IDX format of MNIST and Fashion-MNIST (http://yann.lecun.com/exdb/mnist/).

An IDX file is: two zero bytes, a type code, the number of dimensions n, n big-endian uint32
sizes, then the data in C order. Files may be gzip-compressed (``.gz``).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from capsrun.errors import DatasetError, brief, unreadable

_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> torch.Tensor:
    """Read an IDX (or gzipped IDX) file into a tensor of the shape its header gives.

    Raises :class:`DatasetError` naming the file when it is truncated or not IDX.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:  # the file itself cannot be read: its permissions, not its content
        raise DatasetError(unreadable(path, e, "check the file and the disk")) from None
    try:
        raw = gzip.decompress(data) if path.suffix == ".gz" else data
    except (OSError, EOFError, zlib.error) as e:  # a bad header, a cut stream, a corrupt deflate block
        why = f"{path} is not a readable gzip file ({brief(e)})"
        raise DatasetError(f"{why}; delete it and download it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _TYPES:
        raise DatasetError(f"{path} is not an IDX file (bad magic number); delete it and download it again")
    dtype, ndim = _TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path} is truncated (incomplete header); delete it and download it again")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetError(
            f"{path} is truncated or corrupt: its header promises {expected} bytes of data "
            f"{shape}, it holds {len(raw) - header}; delete it and download it again"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return torch.from_numpy(data.astype(dtype.newbyteorder("="), copy=True))
