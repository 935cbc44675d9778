"""The caching-allocator model (and its replay, advisor/plan/replay.py) against hand-written sequences whose reserved bytes follow from
PyTorch's algorithm (c10/cuda/CUDACachingAllocator.cpp), each worked out in its comment."""

from __future__ import annotations

import random

import pytest

from advisor.plan.allocator import AllocatorSettings, CachingAllocator, OutOfMemory
from advisor.plan.replay import allocation_peaks


MIB, GIB = 2**20, 2**30
EXPANDABLE = AllocatorSettings(expandable_segments=True)


def test_three_small_large_requests_share_one_20_mib_segment():
    # 3 MiB is a large-pool request under 10 MiB: the first takes a new 20 MiB segment (kLargeBuffer),
    # keeps 3 MiB and leaves 17 MiB cached; the next two are split from that remainder.
    a = CachingAllocator()
    blocks = [a.malloc(3 * MIB) for _ in range(3)]
    assert (a.allocated, a.reserved, a.segments) == (9 * MIB, 20 * MIB, 1)
    for b in blocks:
        a.free(b)
    assert (a.allocated, a.reserved) == (0, 20 * MIB)  # freed blocks stay cached


def test_a_request_larger_than_every_free_block_needs_a_new_segment():
    # Two 600 MiB requests get their own segments (over 10 MiB: rounded to 2 MiB, exact here). Once
    # both are freed, 1200 MiB sit cached but in two segments that can't join: 1 GiB needs a third.
    a = CachingAllocator()
    first, second = a.malloc(600 * MIB), a.malloc(600 * MIB)
    a.free(first)
    a.free(second)
    a.malloc(GIB)
    assert a.reserved == 600 * MIB + 600 * MIB + 1024 * MIB
    assert (a.peak_allocated, a.segments) == (1200 * MIB, 3)


def test_what_a_sequence_needs_is_less_than_it_reserves_with_room():
    # The same sequence as allocations and frees (-k: the allocation k back): with room it reserves
    # 2224 MiB; on a smaller card the 1 GiB request finds cudaMalloc failing, both whole 600 MiB
    # segments go back, and it succeeds: the least capacity is the allocated peak, 1200 MiB.
    peaks = allocation_peaks([600 * MIB, 600 * MIB, -2, -1, GIB])
    assert (peaks.allocated, peaks.reserved, peaks.needs) == (1200 * MIB, 2224 * MIB, 1200 * MIB)
    a = CachingAllocator(capacity=1536 * MIB)
    first, second = a.malloc(600 * MIB), a.malloc(600 * MIB)
    a.free(first)
    a.free(second)
    a.malloc(GIB)
    assert (a.reserved, a.flushes) == (GIB, 1)


def test_with_expandable_segments_the_freed_space_joins_and_serves_the_larger_request():
    # One segment grows page by page (20 MiB pages): 600 MiB is 30 pages, the second 600 MiB maps 30
    # more right after it; freed, the two merge into one 1200 MiB block that holds 1 GiB.
    a = CachingAllocator(settings=EXPANDABLE)
    first, second = a.malloc(600 * MIB), a.malloc(600 * MIB)
    a.free(first)
    a.free(second)
    a.malloc(GIB)
    assert (a.reserved, a.segments) == (1200 * MIB, 1)


def test_sizes_are_rounded_to_512_bytes_and_small_requests_share_2_mib_segments():
    a = CachingAllocator()
    a.malloc(1)
    a.malloc(513)
    assert (a.allocated, a.reserved) == (512 + 1024, 2 * MIB)
    a.malloc(MIB)  # 1 MiB is still small: it fits the same 2 MiB segment
    assert (a.reserved, a.segments) == (2 * MIB, 1)
    a.malloc(MIB + 1)  # one byte more is large: a 20 MiB segment of its own
    assert (a.reserved, a.segments) == (22 * MIB, 2)


def test_best_fit_takes_the_smallest_free_block_that_holds_the_request():
    # Cached: a 30 MiB and a 50 MiB segment. 25 MiB goes into the 30 MiB one (split: 5 MiB stays
    # cached), so nothing new is reserved and the 50 MiB block still serves 50 MiB.
    a = CachingAllocator()
    thirty, fifty = a.malloc(30 * MIB), a.malloc(50 * MIB)
    a.free(thirty)
    a.free(fifty)
    a.malloc(25 * MIB)
    a.malloc(50 * MIB)
    assert (a.reserved, a.allocated) == (80 * MIB, 75 * MIB)


def test_a_remainder_of_1_mib_or_less_is_not_split_and_counts_as_allocated():
    # A large block is split only if more than 1 MiB would remain (should_split): 11.5 MiB in a
    # cached 12 MiB block takes all of it, and memory_allocated counts the block's 12 MiB.
    a = CachingAllocator()
    a.free(a.malloc(12 * MIB))
    a.malloc(11 * MIB + 512 * 1024)
    assert (a.allocated, a.reserved) == (12 * MIB, 12 * MIB)


def test_freed_neighbours_merge_into_one_block():
    # 3 x 3 MiB from one 20 MiB segment; freeing the first two leaves one free 6 MiB run at the
    # start of the segment (and 11 MiB at its end): a 6 MiB request fits without a new segment.
    a = CachingAllocator()
    first, second, _third = (a.malloc(3 * MIB) for _ in range(3))
    a.free(first)
    a.free(second)
    a.malloc(6 * MIB)
    assert (a.reserved, a.segments) == (20 * MIB, 1)


def test_empty_cache_releases_only_whole_segments():
    # The 20 MiB segment still holds a live 3 MiB block: it stays; the freed 40 MiB segment goes.
    a = CachingAllocator()
    a.malloc(3 * MIB)
    a.free(a.malloc(40 * MIB))
    a.empty_cache()
    assert (a.reserved, a.segments) == (20 * MIB, 1)


def test_when_the_card_is_full_the_cache_is_emptied_and_the_request_retried():
    # 100 MiB card: a cached 60 MiB segment can't hold 70 MiB, and a new segment would not fit next
    # to it; the allocator frees its cache (release_cached_blocks) and then succeeds.
    a = CachingAllocator(capacity=100 * MIB)
    a.free(a.malloc(60 * MIB))
    a.malloc(70 * MIB)
    assert (a.reserved, a.segments) == (70 * MIB, 1)
    with pytest.raises(OutOfMemory, match="tried to allocate 40 MiB"):
        a.malloc(40 * MIB)  # 70 MiB live + 40 MiB is over 100 MiB: nothing cached to give back


def test_a_block_freed_on_one_stream_serves_only_that_stream():
    a = CachingAllocator()
    a.free(a.malloc(50 * MIB, stream=1))
    a.malloc(50 * MIB, stream=0)
    assert a.reserved == 100 * MIB
    a.malloc(50 * MIB, stream=1)
    assert a.reserved == 100 * MIB


def test_max_split_size_keeps_small_requests_out_of_oversize_blocks():
    # max_split_size:100MB makes a cached 200 MiB block oversize: a 50 MiB request may not take it;
    # a 190 MiB request may (within 20 MiB of its size), a 150 MiB one may not.
    a = CachingAllocator(settings=AllocatorSettings(max_split_size=100 * MIB))
    a.free(a.malloc(200 * MIB))
    a.malloc(50 * MIB)
    assert a.reserved == 250 * MIB
    a.malloc(190 * MIB)
    assert a.reserved == 250 * MIB
    a.malloc(150 * MIB)
    assert a.reserved == 400 * MIB


def test_expandable_segments_map_whole_pages_and_empty_cache_unmaps_the_free_ones():
    # 30 MiB maps two 20 MiB pages; freed and emptied, both pages go back (the block spans them).
    # A live 1 MiB small request maps one 2 MiB small page, which stays.
    a = CachingAllocator(settings=EXPANDABLE)
    small = a.malloc(MIB)
    a.free(a.malloc(30 * MIB))
    assert a.reserved == 2 * MIB + 40 * MIB
    a.empty_cache()
    assert a.reserved == 2 * MIB
    a.free(small)
    a.empty_cache()
    assert (a.reserved, a.segments) == (0, 0)


@pytest.mark.parametrize("settings", [AllocatorSettings(), EXPANDABLE, AllocatorSettings(max_split_size=64 * MIB)])
def test_any_sequence_keeps_the_books_balanced(settings):
    # Bookkeeping that must hold for any sequence: reserved covers allocated, and once everything
    # is freed and the cache emptied, nothing is reserved or allocated.
    rng = random.Random(7)
    a = CachingAllocator(settings=settings)
    live = []
    for _ in range(3000):
        if live and rng.random() < 0.45:
            a.free(live.pop(rng.randrange(len(live))))
        else:
            live.append(
                a.malloc(rng.choice([rng.randrange(1, 4096), rng.randrange(1, 16 * MIB), rng.randrange(1, GIB)]))
            )
        assert a.allocated <= a.reserved
        if rng.random() < 0.01:
            a.empty_cache()
    for block in live:
        a.free(block)
    a.empty_cache()
    assert (a.allocated, a.reserved, a.segments) == (0, 0, 0)


def test_a_card_too_small_for_one_page_is_out_of_memory_with_expandable_segments():
    a = CachingAllocator(capacity=MIB, settings=EXPANDABLE)
    with pytest.raises(OutOfMemory):
        a.malloc(3 * MIB)  # one 20 MiB large page is more than the card
    assert allocation_peaks([512, 512, -1], EXPANDABLE).needs == 2 * MIB  # one small page
