"""The one in-memory form every loader returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Values of `Interactions.fixed_split`.
SPLIT_TRAIN = 0
SPLIT_TEST = 2


@dataclass
class Interactions:
    """Raw user-item interactions as parallel arrays, before id remapping.

    users, items: int64 raw ids as found in the file (any non-negative integers).
    order: per-interaction sort key inside a user's history (timestamp or sequence
        position), or None when the file carries no order. Ties keep file order.
    fixed_split: None, or an int8 array with SPLIT_TRAIN / SPLIT_TEST per row, for
        datasets published with a fixed split (Gowalla's LightGCN train.txt/test.txt).
    name: short dataset name; source: the file(s) it came from.
    order_kind: "timestamp", "sequence" or "none" (reported in results).
    """

    users: np.ndarray
    items: np.ndarray
    order: np.ndarray | None = None
    fixed_split: np.ndarray | None = None
    name: str = "dataset"
    source: str = ""
    order_kind: str = "none"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.users = np.asarray(self.users, dtype=np.int64)
        self.items = np.asarray(self.items, dtype=np.int64)
        n = len(self.users)
        if len(self.items) != n:
            raise ValueError("users and items must have the same length")
        if self.order is not None:
            self.order = np.asarray(self.order)
            if len(self.order) != n:
                raise ValueError("order must have the same length as users")
        if self.fixed_split is not None:
            self.fixed_split = np.asarray(self.fixed_split, dtype=np.int8)
            if len(self.fixed_split) != n:
                raise ValueError("fixed_split must have the same length as users")

    def __len__(self) -> int:
        return len(self.users)

    @property
    def n_users(self) -> int:
        return int(len(np.unique(self.users)))

    @property
    def n_items(self) -> int:
        return int(len(np.unique(self.items)))

    def stats(self) -> dict:
        """Dataset statistics as printed by `fedrec data info`."""
        n = len(self)
        if n == 0:
            return {"name": self.name, "interactions": 0, "users": 0, "items": 0}
        _, per_user = np.unique(self.users, return_counts=True)
        _, per_item = np.unique(self.items, return_counts=True)
        return {
            "name": self.name,
            "source": self.source,
            "users": int(len(per_user)),
            "items": int(len(per_item)),
            "interactions": int(n),
            "density": float(n / (len(per_user) * len(per_item))),
            "order": self.order_kind,
            "fixed_split": self.fixed_split is not None,
            "history_length": {
                "min": int(per_user.min()),
                "median": float(np.median(per_user)),
                "mean": float(per_user.mean()),
                "max": int(per_user.max()),
            },
            "item_popularity": {
                "min": int(per_item.min()),
                "median": float(np.median(per_item)),
                "max": int(per_item.max()),
            },
        }
