"""A torch optimizer's group settings (hyperparameters): taken, kept across a checkpoint's load, checked against it.

A checkpoint holds the inner and outer optimizers' ``state_dict``, whose
``param_groups`` carry the hyperparameters they were saved with. A resumed
peer keeps its own (``keep_settings``: its ``--inner-lr``, its ``--outer-lr``)
and restores only the moments; a checkpoint of another kind of inner
optimizer is refused before anything is loaded (``inner_kind_problem``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)


def group_settings(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each parameter group's hyperparameters (its settings without the parameters)."""
    return [{k: v for k, v in group.items() if k not in ("params", "param_names")} for group in optimizer.param_groups]


def keep_settings(optimizer: torch.optim.Optimizer, settings: Sequence[dict], what: str) -> None:
    """Put ``settings`` (group_settings taken before a load_state_dict) back into the optimizer's groups, logging
    the ones the loaded state had otherwise."""
    for group, own in zip(optimizer.param_groups, settings):
        changed = [f"{k} {own[k]} (the checkpoint's: {group.get(k)})" for k in own if not _same(group.get(k), own[k])]
        if changed:
            log.info("resumed the %s optimizer with this peer's %s", what, ", ".join(changed))
        group.update(own)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return bool(a == b)


def inner_kind_problem(mine: Sequence[dict], saved: Sequence[Any]) -> str:
    """Why a checkpoint's inner optimizer groups (``saved``, its state dict's param_groups) are not of this peer's
    kind (``mine``, its groups' settings without the parameters); "" when they are. The settings' names tell the
    kinds apart (SGD's momentum, Adam's betas), as a checkpoint does not name its optimizer's class."""
    theirs = [set(group) - {"params"} if isinstance(group, dict) else set() for group in saved]
    if len(theirs) != len(mine):
        return (f"the checkpoint's inner optimizer has {len(theirs)} parameter group(s) and this peer's "
                f"{len(mine)}: it was written with another --inner")
    for names, group in zip(theirs, mine):
        if names != set(group):
            only_theirs, only_mine = sorted(names - set(group)), sorted(set(group) - names)
            return ("the checkpoint's inner optimizer is another kind than this peer's --inner (its settings "
                    f"{', '.join(only_theirs) or 'none'} against this peer's {', '.join(only_mine) or 'none'})")
    return ""
