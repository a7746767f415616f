"""Refinable channel spaces against a brute-force union-find over single channels, and grouped-conv blocks."""

from __future__ import annotations

import numpy as np
import pytest

from graph_ops.channel_spaces import Spaces, merge_blocks
from graph_ops.channels import analyze
from graph_ops.errors import PlanValidationError
from tests.graphs_refine import grouped_se_block


class _Channels:
    """Union-find over (space, channel) pairs: the definition the refinement must agree with."""

    def __init__(self) -> None:
        self.parent: dict[tuple[int, int], tuple[int, int]] = {}

    def find(self, x: tuple[int, int]) -> tuple[int, int]:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            x = self.parent[x]
        return x

    def union(self, a: tuple[int, int], b: tuple[int, int]) -> None:
        self.parent[self.find(a)] = self.find(b)


def _piece_of(spaces: Spaces, space: int, channel: int) -> tuple[int, int]:
    """(leaf root, position in the leaf) of one channel of a space."""
    ((leaf, start, _),) = spaces.leaves(space, channel, 1)
    return spaces.find(leaf), start


@pytest.mark.parametrize("seed", range(20))
def test_refinement_equals_channelwise_union_find(seed: int) -> None:
    rng = np.random.default_rng(seed)
    spaces, brute = Spaces(), _Channels()
    sizes = [int(rng.integers(2, 12)) for _ in range(4)]
    ids = [spaces.new(f"t{i}", n, f"p{i}") for i, n in enumerate(sizes)]
    for _ in range(int(rng.integers(1, 8))):
        a, b = rng.integers(len(ids), size=2)
        length = int(rng.integers(1, min(sizes[a], sizes[b]) + 1))
        start_a, start_b = int(rng.integers(sizes[a] - length + 1)), int(rng.integers(sizes[b] - length + 1))
        if rng.random() < 0.3:
            spaces.cut(ids[a], start_a)
            continue
        spaces.union_range(ids[a], start_a, ids[b], start_b, length)
        for i in range(length):
            brute.union((a, start_a + i), (b, start_b + i))
    channels = [(s, c) for s in range(len(ids)) for c in range(sizes[s])]
    piece = {x: _piece_of(spaces, ids[x[0]], x[1]) for x in channels}
    for x in channels:
        for y in channels:
            assert (brute.find(x) == brute.find(y)) == (piece[x] == piece[y]), (x, y)
    for s, size in zip(ids, sizes, strict=True):  # the leaves of a space partition it
        assert sum(n for _, _, n in spaces.leaves(s, 0, size)) == size


def test_ids_name_the_piece_of_the_first_origin() -> None:
    spaces = Spaces()
    a, b = spaces.new("a", 8, "pa"), spaces.new("b", 3, "pb")
    spaces.union_range(b, 0, a, 2, 3)
    names = [spaces.group_id(spaces.find(leaf)) for leaf, _, _ in spaces.leaves(a, 0, 8)]
    assert names == ["a[0:2]", "a[2:5]", "a[5:8]"]
    assert spaces.producers[spaces.find(b)] == ["pa", "pb"]


def test_blocks_merge_by_lcm_when_it_divides() -> None:
    assert merge_blocks(2, 4, 16) == 4
    assert merge_blocks(2, 3, 12) == 6
    assert merge_blocks(4, 3, 16) is None


def test_grouped_groups_come_in_blocks_and_plans_must_respect_them() -> None:
    model, _ = grouped_se_block()
    index = analyze(model)
    blocked = [g for g in index.groups if g.blocks > 1]
    assert [(g.size, g.blocks) for g in blocked] == [(16, 4), (16, 4)]
    group = blocked[0]
    index.validate_keep({group.id: [0, 4, 8, 12]})  # one channel of each block of 4
    with pytest.raises(PlanValidationError, match="same number of channels in each block"):
        index.validate_keep({group.id: [0, 1, 8, 12]})
