"""The delta reference: the previous collection's weights on disk (``last_checkpoint.pt``).

Runs in: the worker process (or the training process in sync mode), beside the record
builder (build.py): the builder asks for the distances from the reference, the worker
then makes the snapshot the new reference.

The file is ``torch.save({"batch_idx", "epoch", "state_dict"})``, loadable by users. It
is rewritten in place (replacing a 96 MiB file frees its page-cache pages, ~55 ms of the
worker's CPU per collection on the wide stress preset). A kill in the middle of that
rewrite would leave a file that is half old, half new weights and still loads: so a small
marker file (``last_checkpoint.pt.ok``, naming the batch) is removed before the rewrite
and written after it, and a reference without its marker is never measured against.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch

from .metrics.api import WeightDeltas, tensor_norms


class ReferenceCheckpoint:
    """The reference weights of one run (one rank): read distances, rewrite, validate."""

    def __init__(self, path: Path, names: Sequence[str], num_params: int) -> None:
        self.path = path
        self.marker = path.with_name(path.name + ".ok")
        self.names = list(names)  # every state tensor (parameters, then buffers)
        self.num_params = num_params
        self._ref_norms: list[float] | None = None  # the reference's per-parameter norms, if known

    def discard(self) -> None:
        """Forget any reference (a stale one from an earlier run would fake a delta)."""
        for p in (self.marker, self.path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        self._ref_norms = None

    def is_valid(self) -> bool:
        return self.marker.exists() and self.path.exists()

    def torn(self) -> bool:
        """The file is there but its marker is not: a rewrite was cut short."""
        return self.path.exists() and not self.marker.exists()

    def distances(self, current: Sequence[torch.Tensor]) -> WeightDeltas | None:
        """Per-parameter distances of ``current`` from the reference; None without a valid one.

        The same pass over ``current`` also gives its norms (``WeightDeltas.current_norms``),
        so the record's weight norms cost no second pass over the weights.
        """
        if not self.is_valid():
            return None
        deltas, ref_norms, batch_idx, cur_norms = fused_reference_pass(
            self.path, self.names[: self.num_params], current, self._ref_norms)
        return WeightDeltas(deltas, ref_norms, batch_idx, cur_norms)

    def save(self, slot: Sequence[torch.Tensor], batch_idx: int | None, epoch: int | None,
             norms: list[float] | None = None) -> None:
        """Make ``slot`` (parameters and buffers) the reference; ``norms``: its parameter norms, if known."""
        state = dict(zip(self.names, slot, strict=True))
        self._ref_norms = None
        with contextlib.suppress(FileNotFoundError):
            self.marker.unlink()  # from here until the marker is back, the file may be torn
        crc = torch.serialization.get_crc32_options()
        try:
            # No CRC32 of each record: 45 of the 83 ms of this write on the wide preset.
            # torch.load (ours, and a user's) does not need it; `unzip -t` would complain.
            # Restored right after: in sync mode this is the user's process.
            torch.serialization.set_crc32_options(False)
            with open(self.path, "r+b" if self.path.exists() else "wb") as f:
                torch.save({"batch_idx": batch_idx, "epoch": epoch, "state_dict": state}, f)
                f.truncate()
        except BaseException:
            with contextlib.suppress(OSError):
                self.path.unlink()
            raise
        finally:
            torch.serialization.set_crc32_options(crc)
        self.marker.write_text(f"{batch_idx}\n")
        self._ref_norms = norms if norms is not None else tensor_norms(list(slot[: self.num_params]))


# Bytes of the reference read at a time: 1 MiB stays in L2 between the read, the
# subtraction and the norms (4 MiB chunks cost ~1.5x on the wide preset, docs/benchmarks.md).
_READ_CHUNK = 1 << 20


def reference_norms(
    path: Path, names: Sequence[str], current: Sequence[torch.Tensor], known_norms: Sequence[float] | None = None
) -> tuple[list[float], list[float], int | None]:
    """(||current_i - reference_i||, ||reference_i||) per parameter, and the reference's batch_idx."""
    deltas, ref_norms, batch_idx, _ = fused_reference_pass(path, names, current, known_norms)
    return deltas, ref_norms, batch_idx


def fused_reference_pass(
    path: Path, names: Sequence[str], current: Sequence[torch.Tensor], known_norms: Sequence[float] | None = None
) -> tuple[list[float], list[float], int | None, list[float]]:
    """One pass over ``current`` and the reference: per parameter ||current - reference||,
    ||reference||, and ||current||; and the reference's batch_idx.

    ``known_norms``: the reference's norms when the caller knows them (the worker computed
    them when it wrote the reference); they are then not recomputed.

    The reference is the checkpoint at ``path`` (torch.save of ``{"batch_idx", "epoch",
    "state_dict"}``). ``torch.load(mmap=True)`` gives names, shapes and where each tensor's
    bytes lie without reading them; the bytes are then read with ``pread`` through one
    reusable 1 MiB buffer, and for each chunk, while it is in cache, the subtraction in place
    in that buffer and a dot product of each array with itself (``_chunk_sq``): the
    weights are read from memory once and the reference once (float32 sums per chunk,
    added up in float64; a float64 norm is 20-35x slower on CPU). Measured on the wide
    stress preset (96 MiB, one thread): 38.6 ms with a subtraction into a third buffer and
    a fused ``_foreach_norm`` per chunk, of which the read alone is 12 ms. Reading
    through the mmap instead would count every page of the reference in our RSS until
    the mapping goes: a third copy of the weights at peak, on top of the two slots.
    Falls back to the mmap when the file's layout is not the one torch.save writes today
    (an uncompressed zip mapped whole).
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    state = ckpt["state_dict"]
    missing = [name for name in names if name not in state]
    if missing:
        raise KeyError(f"{path} lacks {len(missing)} parameters, e.g. {missing[0]!r}")
    refs = [state[name] for name in names]
    for name, ref, cur in zip(names, refs, current, strict=True):
        if ref.shape != cur.shape or ref.dtype != cur.dtype:
            raise ValueError(f"{path}: {name} is {ref.dtype}{list(ref.shape)}, the model's {cur.dtype}{list(cur.shape)}")
    batch_idx = ckpt.get("batch_idx")
    offsets = _file_offsets(path, refs)
    if offsets is None:
        return (weight_delta_norms(current, refs), list(known_norms or tensor_norms(refs)), batch_idx,
                tensor_norms(list(current)))
    del ckpt, state, refs  # only the offsets are needed now: the mapping can go
    buf = bytearray(_READ_CHUNK)
    raw = torch.frombuffer(buf, dtype=torch.uint8)
    view = memoryview(buf)
    deltas: list[float] = []
    ref_norms: list[float] = []
    cur_norms: list[float] = []
    with open(path, "rb") as f:
        fd = f.fileno()
        for cur, offset in zip(current, offsets, strict=True):
            flat = cur.reshape(-1)
            item = flat.element_size()
            per = max(1, _READ_CHUNK // item)
            d2 = r2 = c2 = 0.0
            for start in range(0, flat.numel(), per):
                count = min(per, flat.numel() - start)
                nbytes = count * item
                if os.preadv(fd, [view[:nbytes]], offset + start * item) != nbytes:
                    raise OSError(f"{path}: short read (was it truncated?)")
                ref_part = raw[:nbytes].view(flat.dtype)
                part = flat[start : start + count]
                if known_norms is None:
                    r2 += _chunk_sq(ref_part)
                ref_part.sub_(part)  # reference - current, in the read buffer: same norm, no third array
                d2 += _chunk_sq(ref_part)
                c2 += _chunk_sq(part)
            deltas.append(math.sqrt(d2))
            ref_norms.append(math.sqrt(r2))
            cur_norms.append(math.sqrt(c2))
    return deltas, list(known_norms) if known_norms is not None else ref_norms, batch_idx, cur_norms


def _chunk_sq(part: torch.Tensor) -> float:
    """The squared L2 norm of one contiguous chunk.

    float32/float64: a BLAS dot product of the chunk with itself (per 1 MiB chunk in cache,
    one thread: 10 us, against 26 us for ``vector_norm`` and 72 us for a two-tensor
    ``_foreach_norm``; the chunk sums add up in float64). Half precision: reduced in float32.
    """
    if part.dtype in (torch.float32, torch.float64):
        return float(torch.dot(part, part))
    n = float(torch.linalg.vector_norm(part, dtype=torch.float32))
    return n * n


def _file_offsets(path: Path, tensors: Sequence[torch.Tensor]) -> list[int] | None:
    """The byte offset in ``path`` of each mmap-loaded tensor's data, or None if it cannot be told.

    torch.load(mmap=True) maps the file once and each storage at its zip entry's data
    offset, so (storage address - entry offset) is one constant: checked, not assumed.
    """
    if not tensors or any(not t.is_contiguous() for t in tensors):
        return None
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
            entries = []
            for info in zf.infolist():
                if "/data/" not in info.filename or info.compress_type != zipfile.ZIP_STORED:
                    continue
                f.seek(info.header_offset)
                local = f.read(30)  # the local file header: its name and extra lengths come last
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                entries.append((info.header_offset + 30 + name_len + extra_len, info.file_size))
    except (OSError, zipfile.BadZipFile, struct.error):
        return None
    storages = list({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.items())
    known = set(entries)
    first_ptr, first_size = storages[0]
    for offset, size in entries:
        base = first_ptr - offset
        if size == first_size and all((ptr - base, nbytes) in known for ptr, nbytes in storages):
            return [t.data_ptr() - base for t in tensors]
    return None




_DELTA_CHUNK = 1 << 20  # elements: bounds the temporary difference to 4 MiB (float32)


def weight_delta_norms(current: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> list[float]:
    """||current_i - reference_i|| for each parameter tensor.

    Chunked, so the worker never holds a second copy of the weights as a difference
    (a one-shot _foreach_sub of a 25M-parameter model costs 96 MiB more at peak).
    """
    out = []
    for cur, ref in zip(current, reference, strict=True):
        flat_cur, flat_ref = cur.reshape(-1), ref.reshape(-1)
        sq = 0.0
        for start in range(0, flat_cur.numel(), _DELTA_CHUNK):
            part = flat_cur[start : start + _DELTA_CHUNK] - flat_ref[start : start + _DELTA_CHUNK]
            sq += float(torch.linalg.vector_norm(part, dtype=torch.float64)) ** 2
        out.append(math.sqrt(sq))
    return out
