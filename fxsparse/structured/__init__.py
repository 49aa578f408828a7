"""Structured pruning: dependency groups found on the captured graph, channel masks, and shrinking.

- :func:`groups` (``_groups``): what must be removed together, from op semantics and shapes;
- :func:`channels` (``_score``, also ``fxsparse.masks.channels``): masks that remove whole units;
- :func:`shrink` (``_shrink``): the smaller model, in the model's own class.
"""

from ._groups import Group, Groups, Member, groups
from ._score import channels
from ._shrink import shrink

__all__ = ["Group", "Groups", "Member", "channels", "groups", "shrink"]
