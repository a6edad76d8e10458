"""Reader for the IDX format of MNIST and Fashion-MNIST (http://yann.lecun.com/exdb/mnist/).

An IDX file is: two zero bytes, a type code, the number of dimensions n, n big-endian uint32
sizes, then the data in C order. Files may be gzip-compressed (``.gz``).
"""

from __future__ import annotations

import gzip
import math
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


def read_idx(path: str | Path, limit: int | None = None) -> torch.Tensor:
    """Read an IDX (or gzipped IDX) file into a tensor of the shape its header gives.

    The data is read (and decompressed) only as far as the header declares, and a header that
    declares more than ``limit`` bytes of data (the published file's size) is refused before any
    of it is read: a small ``.gz`` that would expand to gigabytes costs nothing. Raises
    :class:`DatasetError` naming the file when it is truncated, too long, empty or not IDX.
    """
    path = Path(path)
    fix = "delete it and download it again"
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _TYPES:
                raise DatasetError(f"{path} is not an IDX file (bad magic number); {fix}")
            dtype, ndim = _TYPES[head[2]], head[3]
            dims = f.read(4 * ndim)
            if len(dims) < 4 * ndim:
                raise DatasetError(f"{path} is truncated (incomplete header); {fix}")
            shape = tuple(int(d) for d in np.frombuffer(dims, dtype=">u4", count=ndim))
            expected = math.prod(shape) * dtype.itemsize  # Python integers: no overflow
            if limit is not None and expected > limit:
                raise DatasetError(
                    f"{path} declares {shape}: {expected:,} bytes of data, more than the published file's "
                    f"{limit:,}; {fix}"
                )
            chunks, got = [], 0
            while got <= expected:  # in pieces: a header may promise more than memory holds
                piece = f.read(min(1 << 24, expected + 1 - got))
                if not piece:
                    break
                chunks.append(piece)
                got += len(piece)
            body = b"".join(chunks)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # a bad header, a cut stream, a corrupt block
        raise DatasetError(f"{path} is not a readable gzip file ({brief(e)}); {fix}") from None
    except OSError as e:  # the file itself cannot be read: its permissions, not its content
        raise DatasetError(unreadable(path, e, "check the file and the disk")) from None
    if len(body) != expected:
        held = len(body) if len(body) <= expected else "more"
        raise DatasetError(
            f"{path} is truncated or corrupt: its header promises {expected} bytes of data {shape}, "
            f"it holds {held}; {fix}"
        )
    if not shape or shape[0] == 0:
        raise DatasetError(f"{path} holds no examples (its header says {shape}); {fix}")
    data = np.frombuffer(body, dtype=dtype).reshape(shape)
    return torch.from_numpy(data.astype(dtype.newbyteorder("="), copy=True))
