"""In-memory dataset shape that every loader returns and every build stage reads."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Dataset.split_labels values: the part of a predefined split an interaction belongs to.
SPLIT_TRAIN, SPLIT_VALID, SPLIT_TEST = 0, 1, 2


@dataclass(frozen=True)
class Item:
    item_id: str           # external id as the dataset spells it ("1", "N12345", "sku-9")
    title: str
    text: str              # extra text for the encoder: abstract, tags, description ("" if none)
    category: str          # main category ("" if unknown)
    subcategory: str = ""
    timestamp: int = 0     # unix seconds the item appeared (0 = unknown)


@dataclass(frozen=True)
class Impression:
    """One MIND-style impression: what a user was shown and which of it they clicked."""
    user_id: str
    timestamp: int
    history: tuple[str, ...]   # item ids clicked before, oldest first
    shown: tuple[str, ...]
    clicked: tuple[bool, ...]  # aligned with shown
    split: str = ""            # MIND folder it came from: "train" or "dev" ("" for a single folder)


@dataclass
class LoadReport:
    """Malformed input is counted and reported with file and line number, never silently dropped."""
    rows_read: dict[str, int] = field(default_factory=dict)
    malformed: list[tuple[str, int, str]] = field(default_factory=list)  # (file, line, why)

    def bad(self, file: str, line: int, why: str) -> None:
        self.malformed.append((file, line, why))

    def summary(self, limit: int = 10) -> str:
        lines = [f"{f}: {n} rows" for f, n in self.rows_read.items()]
        lines.append(f"malformed rows: {len(self.malformed)}")
        lines += [f"  {f}:{ln}: {why}" for f, ln, why in self.malformed[:limit]]
        if len(self.malformed) > limit:
            lines.append(f"  ... and {len(self.malformed) - limit} more")
        return "\n".join(lines)


@dataclass
class Dataset:
    """Items plus implicit-feedback interactions (columnar), optionally MIND impressions.

    interactions: user [n] str, item [n] str, ts [n] int64 unix seconds, value [n] float32.
    Every interaction item is in `items`; loaders count and drop the rest as malformed.
    split_labels: [n] int8 SPLIT_TRAIN / SPLIT_VALID / SPLIT_TEST when the data comes with its own
    split (MIND train + dev folders); None when it does not and the build splits by time.
    """
    name: str
    items: list[Item]
    users: np.ndarray        # [n] object (str)
    item_ids: np.ndarray     # [n] object (str)
    timestamps: np.ndarray   # [n] int64
    values: np.ndarray       # [n] float32 (rating, 1 for a click)
    impressions: list[Impression] = field(default_factory=list)
    report: LoadReport = field(default_factory=LoadReport)
    split_labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.users)
