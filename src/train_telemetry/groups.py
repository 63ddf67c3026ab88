"""Param groups: which group each parameter is in, across every optimizer, and their names.

Runs in: the training process (at start, and in the hook when the groups change: a cheap
check of each group's length). Snapshots name the version of the map they were taken
under; the worker keeps the recent versions (messages.Groups).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .messages import Groups
from .records import OVERALL

UNASSIGNED = "unassigned"  # parameters no optimizer trains


class ParamGroups:
    """The parameter -> group map of one or several optimizers.

    Every param group of every optimizer is a group, numbered across them in order
    (optimizer 0's groups first); a group's name is its ``name`` entry, else ``group_<i>``;
    a repeated name (or "overall") gets ``_<i>`` appended.
    """

    def __init__(self) -> None:
        self.version = 0  # bumped when the map changes; snapshots carry it
        self.group_of: list[int] = []
        self.names: list[str] = []
        self._key: tuple[int, ...] | None = None

    def update(self, optimizers: Sequence[torch.optim.Optimizer], params: Sequence[torch.nn.Parameter]) -> bool:
        """Re-read the groups; True when the map changed (a new version)."""
        groups = [g for opt in optimizers for g in opt.param_groups]
        key = tuple([len(g["params"]) for g in groups])
        if key == self._key:
            return False
        index = {id(p): i for i, p in enumerate(params)}
        group_of = [-1] * len(params)
        names: list[str] = []
        for gi, group in enumerate(groups):
            name = str(group.get("name", f"group_{gi}"))
            if name in names or name == OVERALL:
                name = f"{name}_{gi}"
            names.append(name)
            for p in group["params"]:
                i = index.get(id(p))
                if i is not None:
                    group_of[i] = gi
        if any(g < 0 for g in group_of):
            names.append(UNASSIGNED)
            group_of = [g if g >= 0 else len(names) - 1 for g in group_of]
        self._key, self.group_of, self.names = key, group_of, names
        self.version += 1
        return True

    def message(self, num_params: int = 0) -> Groups:
        """The map as the worker receives it (every parameter unassigned before any optimizer)."""
        return Groups(self.version, list(self.group_of) or [-1] * num_params, list(self.names))

    def sizes(self, params: Sequence[torch.nn.Parameter]) -> dict[str, dict[str, int]]:
        """{group: {num_tensors, num_params}} for run.json."""
        out = {}
        for gi, name in enumerate(self.names):
            members = [p for p, g in zip(params, self.group_of, strict=True) if g == gi]
            out[name] = {"num_tensors": len(members), "num_params": sum(p.numel() for p in members)}
        return out
