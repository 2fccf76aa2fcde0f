"""The folding processes' collector settings: start-up's heap frozen, fewer first-generation passes, and the
settings restored after a tuned stretch."""

from __future__ import annotations

import gc
import weakref

from services.common.gc_tuning import FOLD_GEN0_THRESHOLD, tuned_for_folding


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_a_tuned_stretch_freezes_the_heap_and_restores_the_settings() -> None:
    before = gc.get_threshold()
    frozen_before = gc.get_freeze_count()
    with tuned_for_folding():
        assert gc.get_threshold()[0] == FOLD_GEN0_THRESHOLD
        assert gc.get_freeze_count() > frozen_before, "start-up's objects are out of the collector's sight"
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_cycles_made_while_tuned_are_still_collected() -> None:
    with tuned_for_folding(gen0_threshold=1_000):
        first, second = Node(), Node()
        first.other, second.other = second, first
        watch = weakref.ref(first)
        del first, second
        assert watch() is not None, "a cycle outlives its names until the collector runs"
        # Live allocations well past the threshold (freed ones do not count): the collector runs by itself.
        kept = [Node() for _ in range(5_000)]
        assert watch() is None
        assert len(kept) == 5_000
