from __future__ import annotations

import grpc
import pytest

from tools.stack import Stack
from protos import fusionrec_pb2_grpc as pb_grpc


@pytest.fixture(scope="session")
def stack(built, tmp_path_factory):
    """The real system: Triton (fused_ranker), retrieval (FAISS), ranking (LightGBM), gateway."""
    artifacts, model_repo = built
    with Stack(artifacts, model_repo, tmp_path_factory.mktemp("run")) as running:
        yield running


@pytest.fixture(scope="session")
def gateway(stack):
    channel = grpc.insecure_channel(stack.addr("gateway"))
    yield pb_grpc.RecommenderStub(channel)
    channel.close()


@pytest.fixture(scope="session")
def known_user(artifacts):
    from gateway.user_state import ArtifactHistoryStore
    store = ArtifactHistoryStore(artifacts)
    user = next(u for u in store.users() if len(store.history(u)) >= 20)
    catalog = artifacts.json("catalog.json")["item_ids"]
    return user, [catalog[i] for i in store.history(user)]
