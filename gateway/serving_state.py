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

    @classmethod
    def load(cls, artifacts: ArtifactSet) -> "ServingState":
        return cls(artifacts.version, Catalog(artifacts), ArtifactHistoryStore(artifacts),
                   str(artifacts.manifest["models"][TEXT_ENCODER_NAME]))
