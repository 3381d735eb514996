"""What the gateway serves from one artifact version, swapped as a whole on a new version."""
from __future__ import annotations

from dataclasses import dataclass

from common.artifacts import ArtifactSet
from core.features import TEXT_ENCODER_NAME
from gateway.catalog import Catalog
from gateway.user_state import ArtifactHistoryStore


@dataclass(frozen=True)
class ServingState:
    version: str
    catalog: Catalog                  # artifact items + the item log applied on top (follower)
    base_history: ArtifactHistoryStore
    encoder_version: str
    # "brought": the build's item vectors came from another model (--item-vectors), so the online
    # text_encoder would put new items in another space; "encoder": the text_encoder made them.
    text_space: str = "encoder"

    @classmethod
    def load(cls, artifacts: ArtifactSet) -> "ServingState":
        return cls(artifacts.version, Catalog(artifacts), ArtifactHistoryStore(artifacts),
                   str(artifacts.manifest["models"][TEXT_ENCODER_NAME]),
                   str(artifacts.manifest.get("text_space", "encoder")))
