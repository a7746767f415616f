"""Channel spaces that can be refined: union-find over spaces, each of which may be cut into pieces.

A *space* is a run of ``size`` channels created by a source (a Conv's output, a graph input). Analysis describes a
tensor's channel axis as segments ``(space, offset, start, length)``: channels ``start .. start+length-1`` of a
space, laid at ``offset``. Two operations keep the description exact:

* **union** of equal ranges of two spaces (a residual Add, an SE gate): channel ``start_a + i`` of one space and
  ``start_b + i`` of the other must be removed together, for every ``i < length``;
* **cut** of a space at an inner position ``k`` (a Split / Slice off a segment boundary, a union of two
  differently segmented layouts): the space becomes two child spaces ``[0, k)`` and ``[k, size)``, which are
  pruned independently from then on.

The result is the *common refinement*: the coarsest partition of every space into pieces such that every segment
of every tensor covers whole pieces, and pieces joined by a union are the same piece. Each final piece (a *leaf*:
a union-find root that is not cut) is one :class:`~graph_ops.groups.ChannelGroup`.

Invariants: a union joins two leaves of equal size; a cut only applies to a leaf (a cut of a space that is
already cut descends into the child holding the position); a child is strictly smaller than its parent, so the
"piece of" relation has no cycles. Cutting a leaf cuts it for everything unioned with it, so every tensor that
carries the leaf sees the same pieces. Union-then-cut and cut-then-union give the same refinement because
:meth:`Spaces.union_range` first refines both ranges to the union of their piece boundaries (repeating until both
agree: a cut can add a boundary to the other side when the two ranges share pieces), then joins the pieces pairwise.

Ids are deterministic: a leaf is named after the space it was cut from (its *origin*, the tensor whose source
created it) and its offset there: ``"<tensor>"`` for a whole space, ``"<tensor>[a:b]"`` for a piece; the
representative of a union is the one whose origin was created first (topological order), then the lowest offset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Spaces:
    """Union-find over refinable channel spaces (see the module docstring); mutated only during one analysis."""

    parent: list[int] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    children: list[list[int] | None] = field(default_factory=list)
    origin: list[str] = field(default_factory=list)
    whole: list[int] = field(default_factory=list)  # size of the origin space
    key: list[tuple[int, int]] = field(default_factory=list)  # (creation order of the origin, offset in it)
    reason: list[str | None] = field(default_factory=list)
    producers: list[list[str]] = field(default_factory=list)

    def new(self, origin: str, size: int, producer: str | None, frozen: str | None = None) -> int:
        """A new space of ``size`` channels created by ``producer`` for tensor ``origin``."""
        space = len(self.parent)
        self._append(origin, size, size, (space, 0), frozen, [producer] if producer else [])
        return space

    def _append(self, origin: str, size: int, whole: int, key: tuple[int, int], reason: str | None,
                producers: list[str]) -> int:
        space = len(self.parent)
        self.parent.append(space)
        self.size.append(size)
        self.children.append(None)
        self.origin.append(origin)
        self.whole.append(whole)
        self.key.append(key)
        self.reason.append(reason)
        self.producers.append(producers)
        return space

    def find(self, space: int) -> int:
        """Root of a space (path halving)."""
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def cut(self, space: int, at: int) -> None:
        """Make ``at`` a piece boundary of ``space`` (no-op at 0, at its size, or on an existing boundary)."""
        root = self.find(space)
        while 0 < at < self.size[root]:
            kids = self.children[root]
            if kids is None:
                self.children[root] = [self._piece(root, 0, at), self._piece(root, at, self.size[root] - at)]
                return
            for kid in kids:
                if at < self.size[kid]:
                    root = self.find(kid)
                    break
                at -= self.size[kid]

    def _piece(self, root: int, start: int, size: int) -> int:
        origin_key = self.key[root]
        return self._append(self.origin[root], size, self.whole[root], (origin_key[0], origin_key[1] + start),
                            self.reason[root], list(self.producers[root]))

    def leaves(self, space: int, start: int, length: int) -> list[tuple[int, int, int]]:
        """``(leaf, start in leaf, length)`` runs covering channels ``[start, start+length)`` of ``space``."""
        root = self.find(space)
        kids = self.children[root]
        if kids is None:
            return [(root, start, length)]
        runs: list[tuple[int, int, int]] = []
        pos = 0
        for kid in kids:
            lo, hi = max(start, pos), min(start + length, pos + self.size[kid])
            if lo < hi:
                runs.extend(self.leaves(kid, lo - pos, hi - lo))
            pos += self.size[kid]
        return runs

    def whole_leaves(self, space: int, start: int, length: int) -> list[int]:
        """Cut ``space`` at both ends of the range and return the leaves covering it, in order."""
        self.cut(space, start)
        self.cut(space, start + length)
        return [leaf for leaf, _, _ in self.leaves(space, start, length)]

    def union_range(self, a: int, start_a: int, b: int, start_b: int, length: int) -> None:
        """Join channels ``start_a + i`` of ``a`` and ``start_b + i`` of ``b`` for ``i < length`` (refining both)."""
        while True:
            runs_a = self._bounds(a, start_a, length)
            runs_b = self._bounds(b, start_b, length)
            if runs_a == runs_b:
                break
            for at in runs_b - runs_a:
                self.cut(a, start_a + at)
            for at in runs_a - runs_b:
                self.cut(b, start_b + at)
        pairs = zip(self.leaves(a, start_a, length), self.leaves(b, start_b, length), strict=True)
        for (x, _, _), (y, _, _) in list(pairs):
            self._union_leaves(x, y)

    def _bounds(self, space: int, start: int, length: int) -> set[int]:
        self.cut(space, start)
        self.cut(space, start + length)
        bounds, pos = set(), 0
        for _, _, n in self.leaves(space, start, length):
            pos += n
            bounds.add(pos)
        return bounds

    def _union_leaves(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx == ry:
            return
        assert self.size[rx] == self.size[ry] and self.children[rx] is None and self.children[ry] is None
        keep, drop = sorted((rx, ry), key=lambda s: self.key[s])
        self.parent[drop] = keep
        self.reason[keep] = self.reason[keep] or self.reason[drop]
        self.producers[keep].extend(self.producers[drop])

    def freeze(self, space: int, start: int, length: int, reason: str) -> None:
        """Freeze the pieces covering a range (the first reason of a piece is kept)."""
        for leaf in self.whole_leaves(space, start, length):
            self.reason[leaf] = self.reason[leaf] or reason

    def group_id(self, leaf: int) -> str:
        """Deterministic id of a leaf: its origin tensor, with ``[a:b]`` for a piece of the origin's space."""
        offset = self.key[leaf][1]
        if offset == 0 and self.size[leaf] == self.whole[leaf]:
            return self.origin[leaf]
        return f"{self.origin[leaf]}[{offset}:{offset + self.size[leaf]}]"


def merge_blocks(a: int, b: int, size: int) -> int | None:
    """Block count satisfying both equal-count constraints (``lcm``), or None when it does not divide ``size``."""
    blocks = math.lcm(a, b)
    return blocks if size % blocks == 0 else None
