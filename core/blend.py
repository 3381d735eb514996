"""Score fusion: the fused ranker's order blended with the strongest retrieval channel's, as the build chose.

Measured on all three formats, the fused ranker alone ranks below one of its own inputs on test
(ml-latest-small: the item-to-item channel alone 0.083 nDCG@10 against the fused ranker's 0.074; the
generic catalog: CF alone 0.122 against 0.100; the MIND-format set: BERT alone 0.024 against 0.021).
So the ranking stage serves, per candidate,

    alpha * 1/log2(fused rank + 1) + (1 - alpha) * <channel>_rank_inv (+ a tie-break on the fused rank)

with the channel and alpha chosen by the build on validation lists the ranker did not train on
(offline.blend.choose_blend, manifest "blend"); the LightGBM re-ranker then trains on and corrects
that score. alpha = 1, or a manifest without "blend", serves the fused logits unchanged. Ranks, not
raw scores, are blended: the fused logits and each channel's scores have unrelated scales.

Items without training interactions (online items, catalog items nobody touched in training) can
have no rank in a behaviour channel: for them the fused rank stands in for the channel's, so the
blend judges them by the fused ranker alone instead of pushing every new item to the bottom.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.features import CHANNELS, RETRIEVAL_FEATURES

BLEND_ALPHAS = (1.0, 0.75, 0.5, 0.25, 0.0)   # what the build chooses among (1 = the fused order alone)
TIE_BREAK = 1e-4                              # the fused rank's share where the blend ties (alpha 0)


class BlendError(ValueError):
    """A manifest "blend" section that cannot be served."""


@dataclass(frozen=True)
class Blend:
    channel: str | None = None   # a retrieval channel (core.features.CHANNELS); None: no blend
    alpha: float = 1.0           # the fused order's share

    @property
    def active(self) -> bool:
        return self.channel is not None and self.alpha < 1.0

    def apply(self, fused: np.ndarray, features: np.ndarray, untrained: np.ndarray | None = None) -> np.ndarray:
        """fused [N] logits, features [N, F] retrieval features, untrained [N] bool (see `untrained`)
        -> the served scores [N] float32."""
        fused = np.asarray(fused, np.float32)
        if not self.active or len(fused) == 0:
            return fused
        ranks = np.empty(len(fused), np.float64)
        ranks[np.argsort(-fused, kind="stable")] = np.arange(1, len(fused) + 1)
        by_fused = 1.0 / np.log2(ranks + 1.0)
        by_channel = features[:, RETRIEVAL_FEATURES.index(f"{self.channel}_rank_inv")].astype(np.float64)
        if untrained is not None:
            by_channel = np.where(untrained, by_fused, by_channel)
        blended = self.alpha * by_fused + (1.0 - self.alpha) * by_channel + TIE_BREAK * by_fused
        return blended.astype(np.float32)

    def describe(self) -> dict[str, object]:
        return {"channel": self.channel, "alpha": self.alpha}

    @classmethod
    def from_manifest(cls, manifest: dict) -> "Blend":
        """The manifest's "blend" section; none: no blend (sets built before it)."""
        section = manifest.get("blend")
        if not section:
            return cls()
        channel, alpha = section.get("channel"), section.get("alpha")
        if channel is not None and channel not in CHANNELS:
            raise BlendError(f"manifest blend.channel: one of {list(CHANNELS)} or null, got {channel!r}")
        if not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
            raise BlendError(f"manifest blend.alpha: a number in [0, 1], got {alpha!r}")
        return cls(channel, float(alpha))


def untrained(items: np.ndarray, popularity: np.ndarray) -> np.ndarray:
    """items [N] -> [N] bool: no training interaction (popularity 0, the item_side column) or an
    online item (index past the table)."""
    items = np.asarray(items, np.int64)
    known = items < len(popularity)
    out = ~known
    out[known] = popularity[items[known]] == 0
    return out
