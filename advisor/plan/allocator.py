"""PyTorch's CUDA caching allocator, replayed in pure Python: what a sequence of allocations and
frees reserves on the card, not just what it allocates.

A transcription of ``DeviceCachingAllocator`` in PyTorch's ``c10/cuda/CUDACachingAllocator.cpp``
(read at pytorch/pytorch 001074d, the allocator torch 2.13 ships), keeping every rule that decides
how many bytes are reserved and dropping what only decides where or how fast:

- ``round_size``: every request is rounded up to a multiple of 512 B (``kMinBlockSize``);
  ``roundup_power2_divisions`` is off by default and not modelled.
- ``get_pool``: requests up to 1 MiB (``kSmallSize``) come from the small pool, the rest from the
  large one; each pool is searched per stream (a block freed on one stream serves only that stream).
- ``get_allocation_size``: a new segment (one ``cudaMalloc``) is 2 MiB for a small request
  (``kSmallBuffer``), 20 MiB for one under 10 MiB (``kLargeBuffer``), else the request rounded up
  to 2 MiB (``kRoundLarge``).
- ``get_free_block``: best fit, the smallest free block at least as large (then the lowest address);
  with ``max_split_size`` set, a small request never takes an oversize block, and a large one only an
  oversize block within 20 MiB of its size.
- ``should_split`` / ``alloc_found_block``: the rest of a block is split off and stays cached when
  more than 1 MiB remains of a large block (512 B for small blocks and expandable segments), and the
  request is below ``max_split_size``.
- ``free_block`` / ``try_merge_blocks``: a freed block merges with free neighbours of its segment.
- ``malloc``'s fallbacks when ``cudaMalloc`` fails: free oversize cached blocks
  (``release_available_cached_blocks``, only with ``max_split_size``), then every whole cached
  segment (``release_cached_blocks``, what ``torch.cuda.empty_cache()`` does), then out of memory.
- ``expandable_segments:True`` (Note [Expandable Segments]): one segment per stream and pool whose
  physical pages (2 MiB small, 20 MiB large) are mapped as it grows (``find_expandable_block``,
  ``map_block``, ``try_allocate_expandable_block``); emptying the cache unmaps the free pages
  (``unmap_block``).

Not modelled, each because it changes no byte of a single-process inference replay: CUDA graph
private pools, the garbage-collection threshold (off by default), IPC, and cross-stream events:
a block freed with ``record_stream`` uses is treated as free at once (the replay has no clock).
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass


KIB, MIB = 1024, 1024**2
MIN_BLOCK = 512  # kMinBlockSize
SMALL_SIZE = 1 * MIB  # kSmallSize: the largest small-pool request
SMALL_BUFFER = 2 * MIB  # kSmallBuffer: a small segment, and an expandable small page
LARGE_BUFFER = 20 * MIB  # kLargeBuffer: a segment for a 1-10 MiB request, and an expandable large page
MIN_LARGE_ALLOC = 10 * MIB  # kMinLargeAlloc
ROUND_LARGE = 2 * MIB  # kRoundLarge
NO_LIMIT = 2**64 - 1  # max_split_size's default (SIZE_MAX): no block is oversize
PHASE_START, EMPTY_CACHE = -2, -1  # an event's block when it marks no allocation (`advisor.plan.replay`)


class OutOfMemory(Exception):
    """What ``torch.OutOfMemoryError`` would say: the request and the allocator's state at that moment."""

    def __init__(self, requested: int, allocated: int, reserved: int, capacity: int) -> None:
        self.requested, self.allocated, self.reserved, self.capacity = requested, allocated, reserved, capacity
        super().__init__(
            f"out of memory: tried to allocate {requested / MIB:.0f} MiB with {allocated / MIB:.0f} MiB allocated "
            f"and {reserved / MIB:.0f} MiB reserved of {capacity / MIB:.0f} MiB"
        )


@dataclass(frozen=True)
class AllocatorSettings:
    """``PYTORCH_CUDA_ALLOC_CONF``'s options that change reserved bytes."""

    expandable_segments: bool = False
    max_split_size: int = NO_LIMIT  # bytes (the option is given in MB)


def round_size(nbytes: int) -> int:
    return max(MIN_BLOCK, -(-nbytes // MIN_BLOCK) * MIN_BLOCK)


def allocation_size(size: int) -> int:
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


class _Segment:
    """One ``cudaMalloc`` (or one expandable segment's address space, mapped a page at a time)."""

    addresses = itertools.count(1)

    def __init__(self, size: int, expandable_page: int = 0) -> None:
        self.base = next(self.addresses) << 52  # far apart: no segment's address space reaches the next
        self.page = expandable_page  # 0: an ordinary segment


class _Block:
    __slots__ = ("segment", "address", "size", "stream", "small", "allocated", "mapped", "prev", "next")

    def __init__(self, segment: _Segment, address: int, size: int, stream: int, small: bool, mapped: bool = True):
        self.segment, self.address, self.size, self.stream, self.small = segment, address, size, stream, small
        self.allocated, self.mapped = False, mapped
        self.prev: _Block | None = None
        self.next: _Block | None = None

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.stream, self.size, self.address)  # BlockComparatorSize

    @property
    def is_split(self) -> bool:
        return self.prev is not None or self.next is not None


class _Pool:
    """The free blocks of one pool (small or large), ordered by stream, size, address; and, for
    expandable segments, its unmapped ranges ordered by stream and address."""

    def __init__(self, small: bool) -> None:
        self.small = small
        self.keys: list[tuple[int, int, int]] = []
        self.blocks: dict[tuple[int, int, int], _Block] = {}
        self.unmapped: dict[int, _Block] = {}  # by address

    def insert(self, block: _Block) -> None:
        bisect.insort(self.keys, block.key)
        self.blocks[block.key] = block

    def remove(self, block: _Block) -> None:
        key = block.key
        del self.keys[bisect.bisect_left(self.keys, key)]
        del self.blocks[key]

    def first_fit(self, stream: int, size: int) -> int:
        """Index of the smallest free block of `stream` at least `size` large (``lower_bound``), or -1."""
        i = bisect.bisect_left(self.keys, (stream, size, 0))
        return i if i < len(self.keys) and self.keys[i][0] == stream else -1


class CachingAllocator:
    """One device's caching allocator. `malloc` returns a handle for `free`; the stats are what
    ``torch.cuda.memory_allocated``/``memory_reserved`` and their ``max_`` peaks report (rounded
    block bytes and segment bytes). `capacity` is what ``cudaMalloc`` can get before it fails."""

    def __init__(self, capacity: int = NO_LIMIT, settings: AllocatorSettings = AllocatorSettings()) -> None:
        self.capacity, self.settings = capacity, settings
        self.pools = {True: _Pool(small=True), False: _Pool(small=False)}
        self.allocated = self.reserved = self.peak_allocated = self.peak_reserved = 0
        self.segments = 0  # cudaMalloc'd segments (expandable ones count once)
        self.flushes = 0  # times a request found the card full and emptied the cache to fit (num_alloc_retries)

    # --- statistics -------------------------------------------------------------------------

    def reset_peaks(self) -> None:
        """``torch.cuda.reset_peak_memory_stats``: peaks restart from what is held now."""
        self.peak_allocated, self.peak_reserved = self.allocated, self.reserved

    def _reserve(self, nbytes: int) -> None:
        self.reserved += nbytes
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    # --- malloc -----------------------------------------------------------------------------

    def malloc(self, nbytes: int, stream: int = 0) -> _Block:
        size = round_size(nbytes)
        pool = self.pools[size <= SMALL_SIZE]
        block = self._free_block(pool, size, stream)
        if block is None:
            block = self._new_block(pool, size, stream)
        if block is None and self._release_oversize(pool, size, stream):
            block = self._new_block(pool, size, stream)
        if block is None:
            self.empty_cache()
            self.flushes += 1
            block = self._new_block(pool, size, stream)
        if block is None:
            raise OutOfMemory(size, self.allocated, self.reserved, self.capacity)
        if self._should_split(block, size):
            rest = _Block(block.segment, block.address + size, block.size - size, stream, pool.small)
            rest.prev, rest.next = block, block.next
            if block.next:
                block.next.prev = rest
            block.next, block.size = rest, size
            pool.insert(rest)
        block.allocated = True
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return block

    def _free_block(self, pool: _Pool, size: int, stream: int) -> _Block | None:
        """``get_free_block``: best fit on this stream, within ``max_split_size``'s limits."""
        i = pool.first_fit(stream, size)
        if i < 0:
            return None
        if self.settings.expandable_segments and pool.blocks[pool.keys[i]].segment.page:
            # A free block followed by unmapped space can grow into it: rank it by that size.
            def growable(b: _Block) -> int:
                return b.size + (b.next.size if b.next and not b.next.mapped else 0)

            while (
                i + 1 < len(pool.keys)
                and pool.keys[i + 1][0] == stream
                and pool.blocks[pool.keys[i]].segment.page
                and growable(pool.blocks[pool.keys[i + 1]]) < growable(pool.blocks[pool.keys[i]])
            ):
                i += 1
        block = pool.blocks[pool.keys[i]]
        limit = self.settings.max_split_size
        if size < limit <= block.size or (size >= limit and block.size >= size + LARGE_BUFFER):
            return None
        pool.remove(block)
        return block

    def _should_split(self, block: _Block, size: int) -> bool:
        remaining = block.size - size
        if block.small or self.settings.expandable_segments:
            return remaining >= MIN_BLOCK
        return size < self.settings.max_split_size and remaining > SMALL_SIZE

    def _new_block(self, pool: _Pool, size: int, stream: int) -> _Block | None:
        """``alloc_block``: a new segment (or, expandable, more pages mapped); None if the card is full."""
        if self.settings.expandable_segments:
            return self._expand(pool, size, stream)
        segment_size = allocation_size(size)
        if self.reserved + segment_size > self.capacity:
            return None
        segment = _Segment(segment_size)
        self.segments += 1
        self._reserve(segment_size)
        return _Block(segment, segment.base, segment_size, stream, pool.small)

    def _release_oversize(self, pool: _Pool, size: int, stream: int) -> bool:
        """``release_available_cached_blocks``: with ``max_split_size`` set, free one cached oversize
        segment that is large enough, else the largest ones until their bytes would be."""
        limit = self.settings.max_split_size
        if limit == NO_LIMIT:
            return False
        wanted = max(size, limit)
        whole = [b for k, b in pool.blocks.items() if k[0] == stream and not b.is_split and b.size >= limit]
        fitting = [b for b in whole if b.size >= wanted]
        if fitting:
            self._release(pool, min(fitting, key=lambda b: b.key))
            return True
        released = 0
        for block in sorted(whole, key=lambda b: b.key, reverse=True):
            if released >= wanted:
                break
            released += block.size
            self._release(pool, block)
        return released >= wanted

    def _release(self, pool: _Pool, block: _Block) -> None:
        pool.remove(block)
        self.reserved -= block.size
        self.segments -= 1

    # --- free and empty_cache ---------------------------------------------------------------

    def free(self, block: _Block) -> None:
        block.allocated = False
        self.allocated -= block.size
        pool = self.pools[block.small]
        for neighbour in (block.prev, block.next):
            self._merge(pool, block, neighbour)
        pool.insert(block)

    def _merge(self, pool: _Pool, into: _Block, other: _Block | None) -> None:
        """``try_merge_blocks``: absorb a free neighbour of the same mapping state."""
        if other is None or other.allocated or other.mapped != into.mapped:
            return
        if other.mapped:
            pool.remove(other)
        else:
            del pool.unmapped[other.address]
        if other is into.prev:
            into.address, into.prev = other.address, other.prev
            if other.prev:
                other.prev.next = into
        else:
            into.next = other.next
            if other.next:
                other.next.prev = into
        into.size += other.size

    def empty_cache(self) -> None:
        """``release_cached_blocks``: every whole cached segment goes back to CUDA; expandable
        segments unmap their free pages."""
        for pool in self.pools.values():
            for block in list(pool.blocks.values()):
                if block.segment.page:
                    self._unmap(pool, block)
                elif not block.is_split:
                    self._release(pool, block)

    # --- expandable segments ----------------------------------------------------------------

    def _expand(self, pool: _Pool, size: int, stream: int) -> _Block | None:
        """``try_allocate_expandable_block``: the lowest-addressed run of free and unmapped space of
        this stream with room for `size` (a new segment's address space if none), mapped to fit."""
        candidate = self._expandable_run(pool, size, stream)
        if not candidate.mapped and not self._map(pool, candidate, min(candidate.size, size)):
            return None
        while candidate.size < size:  # free, then unmapped: map what is missing and merge
            following = candidate.next
            if not self._map(pool, following, min(size - candidate.size, following.size)):
                return None
            candidate = following
        pool.remove(candidate)
        return candidate

    def _expandable_run(self, pool: _Pool, size: int, stream: int) -> _Block:
        def free(b: _Block | None) -> bool:
            return b is not None and not b.allocated

        for address in sorted(a for a, b in pool.unmapped.items() if b.stream == stream):
            start = pool.unmapped[address]
            start = start.prev if free(start.prev) else start
            room, b = 0, start
            while room < size and free(b):
                room, b = room + b.size, b.next
            if room >= size:
                return start
        page = SMALL_BUFFER if pool.small else LARGE_BUFFER
        # find_expandable_block reserves address space for 1 1/8 of the card's memory: far more than
        # any run maps, and never what limits it (mapping pages is what `capacity` bounds).
        span = -(-(2**49 + 2**49 // 8) // page) * page
        segment = _Segment(span, expandable_page=page)
        self.segments += 1
        block = _Block(segment, segment.base, span, stream, pool.small, mapped=False)
        pool.unmapped[block.address] = block
        return block

    def _map(self, pool: _Pool, block: _Block, size: int) -> bool:
        """``map_block``: back the first `size` bytes of an unmapped block with whole pages."""
        page = block.segment.page
        mapped = -(-size // page) * page
        if self.reserved + mapped > self.capacity:
            return False
        del pool.unmapped[block.address]
        block.mapped = True
        if mapped < block.size:
            rest = _Block(block.segment, block.address + mapped, block.size - mapped, block.stream, pool.small, False)
            rest.prev, rest.next = block, block.next
            if block.next:
                block.next.prev = rest
            block.next, block.size = rest, mapped
            pool.unmapped[rest.address] = rest
        self._merge(pool, block, block.prev)
        self._merge(pool, block, block.next)
        pool.insert(block)
        self._reserve(mapped)
        return True

    def _unmap(self, pool: _Pool, block: _Block) -> None:
        """``unmap_block``: give back the whole pages inside a free block; what is left of the block
        at either end stays free and mapped."""
        page = block.segment.page
        start = -(-(block.address - block.segment.base) // page) * page + block.segment.base
        end = (block.address + block.size - block.segment.base) // page * page + block.segment.base
        if end <= start:
            return
        pool.remove(block)
        for address, size, before in ((block.address, start - block.address, True), (end, 0, False)):
            size = size if before else block.address + block.size - end
            if size <= 0:
                continue
            piece = _Block(block.segment, address, size, block.stream, pool.small)
            if before:
                piece.prev, piece.next = block.prev, block
                if block.prev:
                    block.prev.next = piece
                block.prev = piece
            else:
                piece.prev, piece.next = block, block.next
                if block.next:
                    block.next.prev = piece
                block.next = piece
            pool.insert(piece)
        block.address, block.size, block.mapped = start, end - start, False
        self._merge(pool, block, block.prev)
        self._merge(pool, block, block.next)
        pool.unmapped[block.address] = block
        self.reserved -= end - start
        if not block.is_split:  # the whole segment is unmapped: its address space goes too
            del pool.unmapped[block.address]
            self.segments -= 1
