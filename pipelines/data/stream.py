"""Each Train worker's own read of the latents, epoch by epoch: every row once, shuffled, resumable.

The training path for datasets too large for Ray's object store (pipelines/train/driver.py:
`training_dataset`). Ray Data's `streaming_split` hands blocks to whichever worker asks first and
(with `equal=True`) drops rows to even the splits, so neither which rows a worker read nor where a
resumed epoch should start can be known; here both are functions of (seed, epoch, rank, world).

An epoch of N rows, trained at G rows per optimizer step over `world` workers:

    order    the shards in a random order drawn from (seed, epoch), the same on every worker
    split    the rows in that order, cut into `world` contiguous ranges of S x G / world rows,
             S = floor(N / G) steps; the last N - S x G rows of the order (fewer than G, a
             different set every epoch) make no full step and sit this epoch out
    buffer   each worker's range in windows of whole pieces (a piece: the rows of one shard in
             the range) of up to `buffer_rows` rows, each window shuffled by (seed, epoch, rank,
             window): the bounded local buffer
    batch    micro-batches of `micro_batch` rows, cut across windows, as torch tensors

So within an epoch each row reaches exactly one worker once (those in the left-out tail none),
and a worker resumed at row position p of its range (the training loop's `batch_in_epoch` x
its rows per step) reads exactly the rows after p, in the order it would have read them: a run
killed mid-epoch repeats and skips nothing, provided it resumes with the same number of workers
(the run folder is bound to its config, so another count needs `allow_config_change`; it then
starts the interrupted epoch's remainder under the new split, which may repeat or skip rows of
that epoch only).

I/O, the same for local files and object stores (through the project's fsspec filesystem): for
each piece, one ranged read of the shard's last FOOTER_GUESS bytes (its Parquet footer; a second
when the footer is larger), then one ranged read per row group it overlaps, covering only the
projected columns' chunks (the source key and the token-order copy are never fetched). A window is
read and shuffled in a background thread while the loop consumes the one before it.

Memory of one worker, whatever the dataset's size: the window being consumed, the next one
(prefetched) and the one being read: at most 3 x max(buffer_rows, shard rows) rows of the
projected columns (KL-16 at 4,096 rows: 3 x 128 MiB), plus one row group's fetched bytes and
Arrow's decode buffers; the plan of an epoch is one integer per shard. Measured
(benchmarks/latents_reader.py, docs/benchmarks.md): a reading process's peak RSS grows by about
560 to 620 MiB at the default 4,096 rows and 360 MiB at 1,024, the same over 4,096 or
200,000 rows.
"""

from __future__ import annotations

import bisect
import io
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipelines.core import storage
from pipelines.core.errors import SarError

FOOTER_GUESS = 64 << 10  # bytes read from a shard's end: its Parquet footer (a few KB here) and length
PARQUET_MAGIC = b"PAR1"
DEFAULT_BUFFER_ROWS = 4096


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of shard `shard` (an index into LatentStream.shards)."""

    shard: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class LatentStream:
    """The training read of a latents dataset: what every worker needs to read its part of any epoch.

    Made once by the driver (`from_manifest`) and shipped to the workers; holds no open file.
    """

    urls: tuple[str, ...]               # the committed shards, in the manifest's order
    rows: tuple[int, ...]               # rows of each shard
    sizes: tuple[int, ...]              # bytes of each shard
    columns: tuple[str, ...]            # the columns read (projection)
    shapes: dict[str, tuple[int, ...]]  # per-row shape of each tensor column (the manifest's)
    micro_batch: int                    # rows per micro-batch
    rows_per_step: int                  # rows one worker consumes per optimizer step (micro_batch x accumulation)
    world: int = 1                      # workers
    seed: int = 0
    buffer_rows: int = DEFAULT_BUFFER_ROWS
    storage_options: dict[str, Any] | None = field(default=None, repr=False)

    @classmethod
    def from_manifest(cls, latents_url: str, manifest: dict, columns, *, micro_batch: int, rows_per_step: int,
                      world: int = 1, seed: int = 0, buffer_rows: int = DEFAULT_BUFFER_ROWS,
                      storage_options: dict | None = None) -> "LatentStream":
        """The stream over a manifest's committed shards; `columns` not in the dataset are left out."""
        shards = manifest["shards"]
        wanted = tuple(c for c in columns if c in manifest["columns"])
        return cls(urls=tuple(storage.join(latents_url, s["file"]) for s in shards),
                   rows=tuple(int(s["rows"]) for s in shards), sizes=tuple(int(s["bytes"]) for s in shards),
                   columns=wanted, shapes={c: tuple(manifest["columns"][c]) for c in wanted},
                   micro_batch=micro_batch, rows_per_step=rows_per_step, world=world, seed=seed,
                   buffer_rows=buffer_rows, storage_options=storage_options)

    # The plan of an epoch (no I/O) ---------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return sum(self.rows)

    @property
    def global_batch(self) -> int:
        return self.rows_per_step * self.world

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.num_rows, self.global_batch)

    @property
    def rows_per_rank(self) -> int:
        """Rows each worker reads per epoch: whole steps only."""
        return self.steps_per_epoch * self.rows_per_step

    def order(self, epoch: int) -> np.ndarray:
        """The shards' order in `epoch`, the same on every worker."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.urls))

    def pieces(self, epoch: int, rank: int) -> list[Piece]:
        """The pieces of worker `rank`'s range in `epoch`, in reading order."""
        lo, hi = rank * self.rows_per_rank, (rank + 1) * self.rows_per_rank
        out, at = [], 0
        for s in self.order(epoch):
            n = self.rows[s]
            a, b = max(lo, at), min(hi, at + n)
            if a < b:
                out.append(Piece(int(s), a - at, b - at))
            at += n
            if at >= hi:
                break
        return out

    def windows(self, epoch: int, rank: int) -> list[list[Piece]]:
        """Consecutive pieces grouped into windows of at most `buffer_rows` rows (a larger piece alone)."""
        out: list[list[Piece]] = []
        rows = 0
        for p in self.pieces(epoch, rank):
            if not out or rows + p.rows > self.buffer_rows:
                out.append([])
                rows = 0
            out[-1].append(p)
            rows += p.rows
        return out

    def window_order(self, epoch: int, rank: int, window: int, rows: int) -> np.ndarray:
        """The shuffle of one window's rows."""
        return np.random.default_rng([self.seed, epoch, rank, window]).permutation(rows)

    def row_ids(self, epoch: int, rank: int) -> list[tuple[int, int]]:
        """(shard, row in shard) of every row worker `rank` reads in `epoch`, in order: the plan as data."""
        out = []
        for w, pieces in enumerate(self.windows(epoch, rank)):
            ids = [(p.shard, r) for p in pieces for r in range(p.start, p.stop)]
            out += [ids[i] for i in self.window_order(epoch, rank, w, len(ids))]
        return out

    # Reading ----------------------------------------------------------------------------------------
    def batches(self, epoch: int, rank: int, start: int = 0, prefetch: int = 1) -> Iterator[dict[str, Any]]:
        """Micro-batches of worker `rank` in `epoch`, from row `start` of its range (a multiple of
        micro_batch: the loop resumes at whole micro-batches), as torch tensors (a tensor column in its
        stored dtype, bfloat16 as uint16 bits: latents.column_values reads it; `key` as a list of str).

        With `prefetch` the batches are read, shuffled and cut in a background thread, up to `prefetch`
        windows' worth ahead of the consumer (0: no thread, each window read when its turn comes).
        """
        if start % self.micro_batch:
            raise ValueError(f"start {start} is not a multiple of micro_batch {self.micro_batch}")
        if rank >= self.world:
            raise ValueError(f"rank {rank} of a stream planned for {self.world} workers")
        made = self._batches(epoch, rank, start)
        if prefetch:
            made = _background(made, depth=prefetch * max(1, self.buffer_rows // self.micro_batch))
        return made

    def _batches(self, epoch: int, rank: int, start: int) -> Iterator[dict[str, Any]]:
        windows = self.windows(epoch, rank)
        ends = np.cumsum([sum(p.rows for p in w) for w in windows]).tolist()
        first = bisect.bisect_right(ends, start)
        skip = start - (ends[first - 1] if first else 0)
        carry: list[dict[str, np.ndarray]] = []  # rows of the last window that made no whole batch yet
        for w in range(first, len(windows)):
            parts = [self.read_piece(p) for p in windows[w]]
            offsets = np.cumsum([0] + [len(part[self.columns[0]]) for part in parts])
            order = self.window_order(epoch, rank, w, int(offsets[-1]))[skip if w == first else 0:]
            at = 0
            while at < len(order):
                need = self.micro_batch - sum(len(c[self.columns[0]]) for c in carry)
                carry.append(_gather(parts, offsets, order[at:at + need]))
                at += need
                if at <= len(order):
                    yield _to_torch(carry)
                    carry = []

    def read_piece(self, piece: Piece) -> dict[str, np.ndarray]:
        """The projected columns of one piece as numpy arrays: one footer read, one read per row group."""
        url, size = self.urls[piece.shard], self.sizes[piece.shard]
        with storage.translate_errors(url, self.storage_options):
            if storage.is_local(url):  # Arrow reads the projected column chunks itself
                reader = pq.ParquetFile(url.removeprefix("file://"))
                meta = reader.metadata
            else:
                reader, meta = _ranged_reader(url, size, piece, self.columns, self.storage_options)
            groups, first = [], 0
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                if first < piece.stop and first + n > piece.start:
                    groups.append((g, first))
                first += n
            if first != self.rows[piece.shard]:
                raise SarError(f"{storage.redact(url)}: {first} rows, the manifest says {self.rows[piece.shard]}; "
                               "the dataset changed under the run (re-run `sar encode`)")
            table = reader.read_row_groups([g for g, _ in groups], columns=list(self.columns), use_threads=False)
        table = table.slice(piece.start - groups[0][1], piece.rows)
        return {c: column_array(table.column(c), self.shapes[c]) for c in self.columns}


def steps_per_epoch(num_rows: int, global_batch: int) -> int:
    """Full optimizer steps in one epoch of the stream: the rows that make no full step sit it out."""
    return num_rows // global_batch


def column_array(column: pa.ChunkedArray, shape: tuple[int, ...]) -> np.ndarray:
    """A Parquet column as numpy: a tensor column (Ray's tensor extension, or its list storage when the
    extension type is not registered in this process) as (rows, *shape), strings as an object array."""
    array = column.combine_chunks()
    if isinstance(array, pa.ExtensionArray):
        array = array.storage
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type) or pa.types.is_fixed_size_list(array.type):
        return array.flatten().to_numpy(zero_copy_only=False).reshape(len(array), *shape)
    return array.to_numpy(zero_copy_only=False)


def _ranged_reader(url: str, size: int, piece: Piece, columns: tuple[str, ...],
                   storage_options: dict | None) -> tuple[pq.ParquetFile, pq.FileMetaData]:
    """A Parquet reader over the bytes of an object-store shard that `piece` needs, fetched in one ranged
    read of its footer and one per row group (the projected columns' chunks only)."""
    fs, path = storage.filesystem(url, storage_options)
    tail = fs.cat_file(path, start=max(0, size - FOOTER_GUESS), end=size)
    if len(tail) < 12 or tail[-4:] != PARQUET_MAGIC:
        raise SarError(f"{storage.redact(url)}: not a Parquet file of {size} bytes (the manifest's); "
                       "the dataset changed under the run (re-run `sar encode`)")
    need = int.from_bytes(tail[-8:-4], "little") + 8
    if need > len(tail):
        tail = fs.cat_file(path, start=size - need, end=size)
    meta = pq.read_metadata(pa.BufferReader(tail))
    spans = {size - len(tail): tail}
    first = 0
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        if first < piece.stop and first + rg.num_rows > piece.start:
            lo, hi = _chunk_span(rg, columns, url)
            spans[lo] = fs.cat_file(path, start=lo, end=hi)
        first += rg.num_rows
    return pq.ParquetFile(pa.PythonFile(_Spans(spans, size), mode="r"), metadata=meta), meta


def _chunk_span(rg: pq.RowGroupMetaData, columns: tuple[str, ...], url: str) -> tuple[int, int]:
    """The byte range [lo, hi) covering a row group's chunks of `columns` (each column's leaves)."""
    spans = []
    for j in range(rg.num_columns):
        chunk = rg.column(j)
        if chunk.path_in_schema.split(".")[0] in columns:
            start = min(o for o in (chunk.dictionary_page_offset, chunk.data_page_offset) if o)
            spans.append((start, start + chunk.total_compressed_size))
    if not spans:
        raise SarError(f"{storage.redact(url)}: none of the columns {', '.join(columns)}")
    return min(a for a, _ in spans), max(b for _, b in spans)


class _Spans(io.RawIOBase):
    """A read-only file of `size` bytes of which only some spans ({offset: bytes}) were fetched: what
    Parquet's reader needs of a shard, with no buffer the size of the file."""

    def __init__(self, spans: dict[int, bytes], size: int):
        self.spans, self.size, self.pos = sorted(spans.items()), size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        for start, data in self.spans:
            if start <= self.pos and self.pos + n <= start + len(data):
                out = memoryview(data)[self.pos - start:self.pos - start + n]
                self.pos += n
                return out
        raise OSError(f"read of {n} bytes at {self.pos} outside the fetched spans")


def _gather(parts: list[dict[str, np.ndarray]], offsets: np.ndarray, index: np.ndarray) -> dict[str, np.ndarray]:
    """Rows `index` (positions in the window: the pieces' rows end to end) of every column, in that order."""
    piece = np.searchsorted(offsets, index, side="right") - 1
    local = index - offsets[piece]
    out = {}
    for c, first in parts[0].items():
        rows = np.empty((len(index), *first.shape[1:]), first.dtype)
        for j in np.unique(piece):
            sel = piece == j
            rows[sel] = parts[j][c][local[sel]]
        out[c] = rows
    return out


def _to_torch(parts: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Batch parts joined, as torch tensors sharing their memory (strings as a list of str)."""
    joined = parts[0] if len(parts) == 1 else {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
    return {c: v.tolist() if v.dtype == object else torch.from_numpy(v) for c, v in joined.items()}


_DONE = object()


def _background(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """`items` produced in a daemon thread, at most `depth` ahead of the consumer; an error in the thread
    is raised in the consumer; a consumer that stops early stops the thread at its next item."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_DONE)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            q.put(err)

    thread = threading.Thread(target=produce, name="latent-stream", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
