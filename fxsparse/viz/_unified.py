"""A unified diff of two texts, anchored on their unique common lines (the "patience" idea).

``difflib.unified_diff`` looks for the longest matching block over and over; on the
70,000 lines of code a 5,000-block model generates that takes 40 s. Lines that occur
exactly once in each text and in the same order pin the two texts together first;
``difflib`` then only matches the short stretches between them. The output is in
``difflib.unified_diff``'s format.
"""

from __future__ import annotations

import difflib
from collections import Counter
from collections.abc import Iterator, Sequence

__all__ = ["unified_diff"]


def unified_diff(before: Sequence[str], after: Sequence[str], context: int = 1) -> Iterator[str]:
    """``difflib.unified_diff(before, after, "before", "after", n=context)``, with patience anchors."""
    matcher = _AnchoredMatcher(before, after)
    started = False
    for group in matcher.get_grouped_opcodes(context):
        if not started:
            started = True
            yield "--- before\n"
            yield "+++ after\n"
        first, last = group[0], group[-1]
        yield f"@@ -{_range(first[1], last[2])} +{_range(first[3], last[4])} @@\n"
        for tag, i1, i2, j1, j2 in group:
            if tag == "equal":
                yield from (" " + line for line in before[i1:i2])
                continue
            yield from ("-" + line for line in before[i1:i2])
            yield from ("+" + line for line in after[j1:j2])


def _range(start: int, stop: int) -> str:
    """A hunk's line range as unified diffs write it (``difflib._format_range_unified``)."""
    length = stop - start
    beginning = start + 1 if length else start
    return f"{beginning}" if length == 1 else f"{beginning},{length}"


class _AnchoredMatcher(difflib.SequenceMatcher):  # type: ignore[type-arg]
    def __init__(self, before: Sequence[str], after: Sequence[str]) -> None:
        super().__init__(None, before, after, autojunk=False)
        self.before, self.after = before, after
        self.anchored: list[difflib.Match] | None = None

    def get_matching_blocks(self) -> list[difflib.Match]:
        if self.anchored is not None:
            return self.anchored
        blocks: list[tuple[int, int, int]] = []
        i = j = 0
        for a, b in [*_anchors(self.before, self.after), (len(self.before), len(self.after))]:
            gap = difflib.SequenceMatcher(None, self.before[i:a], self.after[j:b], autojunk=False)
            blocks += [(i + x, j + y, size) for x, y, size in gap.get_matching_blocks() if size]
            if a < len(self.before):
                blocks.append((a, b, 1))
            i, j = a + 1, b + 1
        merged: list[tuple[int, int, int]] = []
        for a, b, size in blocks:  # adjacent blocks as one, as SequenceMatcher returns them
            if merged and merged[-1][0] + merged[-1][2] == a and merged[-1][1] + merged[-1][2] == b:
                merged[-1] = (merged[-1][0], merged[-1][1], merged[-1][2] + size)
            else:
                merged.append((a, b, size))
        self.anchored = [difflib.Match(*block) for block in merged]
        self.anchored.append(difflib.Match(len(self.before), len(self.after), 0))
        return self.anchored


def _anchors(before: Sequence[str], after: Sequence[str]) -> list[tuple[int, int]]:
    """Lines unique in both texts, as (index in before, index in after), in the longest order they agree on."""
    once_before = {line for line, count in Counter(before).items() if count == 1}
    once_after = {line for line, count in Counter(after).items() if count == 1}
    where_after = {line: j for j, line in enumerate(after) if line in once_after}
    pairs = [(i, where_after[line]) for i, line in enumerate(before) if line in once_before and line in where_after]
    # Longest increasing subsequence of the after-indices (patience sorting), with back links.
    tails: list[int] = []  # tails[k]: index into pairs of the smallest tail of a run of length k + 1
    previous: list[int] = [-1] * len(pairs)
    for index, (_, j) in enumerate(pairs):
        k = _bisect(pairs, tails, j)
        if k:
            previous[index] = tails[k - 1]
        if k == len(tails):
            tails.append(index)
        else:
            tails[k] = index
    chain = []
    index = tails[-1] if tails else -1
    while index != -1:
        chain.append(pairs[index])
        index = previous[index]
    return chain[::-1]


def _bisect(pairs: list[tuple[int, int]], tails: list[int], j: int) -> int:
    low, high = 0, len(tails)
    while low < high:
        middle = (low + high) // 2
        if pairs[tails[middle]][1] < j:
            low = middle + 1
        else:
            high = middle
    return low
