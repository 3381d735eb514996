"""Replay test users through the running system, so what is measured is what is served.

Per user, over gRPC to the real stack (tools.stack.Stack):
  * gateway Recommend(user_id, k, history_item_ids=<train+valid, oldest first>) -> the served slate
    ("full_pipeline"); with the user id, the CF channel uses the user's trained ALS vector, as
    serving does for a known user;
  * retrieval Retrieve(same history) -> the merged candidates the gateway ranked ("retrieval_order");
  * Triton fused_ranker on those candidates -> fused scores ("fused_ranker" = top k by score).
In process, on the same artifact set (same code and FAISS indexes the retrieval service runs):
  * each channel alone at depth 300 (BertChannel, CfChannel, PopularChannel): per-channel recall
    and the "bert_only", "cf_only", "item2item_only", "popular" baselines;
  * core.rerank.DiversityReranker over the fused scores at each diversity weight (the sweep),
    and at the served weight as a check that the replay reproduces the gateway's slate.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import lightgbm as lgb
import numpy as np
from threadpoolctl import threadpool_limits

from common.artifacts import ArtifactSet
from common.components import load_retriever
from offline.serving.seq_encoder import in_process_encoder
from core.features import FUSED_RANKER_NAME, retrieval_features
from common.wire import candidates_from_proto
from offline.eval_aggregate import SLATE_K, UserResult, first_k, top_k_by_score
from offline.eval_testset import ImpressionCase, TestUser, served_history
from protos import fusionrec_pb2 as pb
from protos import fusionrec_pb2_grpc as pb_grpc
from core.blend import Blend, untrained
from core.rerank import DiversityReranker, NoCorrection
from ranking.ranker import served_fresh, served_reranking
from ranking.triton_scorer import TritonScorer
from core.limits import BERT_HISTORY, DEFAULT_CANDIDATES, MAX_HISTORY

if TYPE_CHECKING:
    from tools.stack import Stack

DEPTH = DEFAULT_CANDIDATES   # per-channel depth = the retrieval service's default candidate count
CALL_TIMEOUT_S = 10.0   # generous: the replay measures quality, not latency


class StackReplayer:
    """One async session against a running stack; use `async with`."""

    def __init__(self, artifacts: ArtifactSet, stack: "Stack", served_weight: float,
                 sweep_weights: tuple[float, ...], k: int = SLATE_K) -> None:
        self.artifacts = artifacts
        self.stack = stack                      # channels to its gateway, retrieval and Triton
        self.served_weight = served_weight
        self.sweep_weights = sweep_weights
        self.k = k
        self.item_ids: list[str] = artifacts.json("catalog.json")["item_ids"]
        self.index_of = {iid: j for j, iid in enumerate(self.item_ids)}
        self.retriever = load_retriever(artifacts, seq_encoder=in_process_encoder(artifacts))
        self.item_text = artifacts.npy("item_text.npy")
        booster = lgb.Booster(model_file=str(artifacts.path("reranker.txt")))
        threadpool_limits(1, "openmp")   # as the ranking service: one LightGBM thread
        trees, _ = served_reranking(artifacts.manifest)   # as the ranking service: the build may switch the trees off
        self.popularity = artifacts.npy("item_side.npy")[:, 0]
        self.reranker = DiversityReranker(booster if trees else NoCorrection(), self.item_text,
                                          artifacts.npy("item_category.npy"),
                                          artifacts.npy("item_side.npy"),
                                          # as the ranking service: the build's slots unless its env sets them
                                          fresh=served_fresh(artifacts.manifest,
                                                             int(os.environ.get("FUSIONREC_FRESH_SLOTS", "-1"))))
        self.blend = Blend.from_manifest(artifacts.manifest)   # as the ranking service serves it
        self.counts = artifacts.npy("item_counts.npy")
        self.version = artifacts.version
        self.requests = 0

    async def __aenter__(self) -> "StackReplayer":
        self._gateway_channel = self.stack.gateway_channel("recommend", aio=True)
        self._retrieval_channel = self.stack.channel("retrieval", aio=True)
        self.gateway = pb_grpc.RecommenderStub(self._gateway_channel)
        self.retrieval = pb_grpc.RetrievalStub(self._retrieval_channel)
        self._triton = self.stack.triton_client(aio=True)
        self.scorer = TritonScorer(self._triton, str(self.artifacts.manifest["models"][FUSED_RANKER_NAME]))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._gateway_channel.close()
        await self._retrieval_channel.close()
        await self._triton.close()

    async def user(self, user: TestUser, train_counts: np.ndarray, history_len: int | None = None,
                   anonymous: bool = False, sweep: bool = True) -> UserResult:
        """Replay one test user. history_len keeps only the most recent items (simulated cold
        start; older ones are excluded, not forgotten); anonymous sends no user id (CF folds in)."""
        full = user.history
        history, older = served_history(full, history_len)
        user_id = "" if anonymous else user.user_id
        self.requests += 1

        served = await self.gateway.Recommend(pb.RecommendRequest(
            user_id=user_id, k=self.k, history_item_ids=[self.item_ids[i] for i in history],
            exclude_item_ids=[self.item_ids[i] for i in older], request_id=f"eval-{self.requests}"),
            timeout=CALL_TIMEOUT_S)
        gateway_slate = np.array([self.index_of[it.item_id] for it in served.items], np.int64)

        retrieved = await self.retrieval.Retrieve(pb.RetrieveRequest(
            user_id=user_id, history=history.tolist(), exclude=older.tolist(), num_candidates=DEPTH,
            artifact_version=self.version), timeout=CALL_TIMEOUT_S)
        items, columns = candidates_from_proto(retrieved.candidates)
        features = retrieval_features(columns, len(items))
        fused = await self.scorer.score(history, items, features, CALL_TIMEOUT_S) if len(items) else \
            np.zeros(0, np.float32)

        channels = self._channels(user_id, history, set(full.tolist()))
        channels["merged"] = items
        slates = {"popular": first_k(channels["popular"], self.k), "cf_only": first_k(channels["cf"], self.k),
                  "bert_only": first_k(channels["bert"], self.k),
                  "item2item_only": first_k(channels.get("item2item", np.zeros(0, np.int64)), self.k),
                  "retrieval_order": first_k(items, self.k),
                  "fused_ranker": top_k_by_score(items, fused, self.k), "full_pipeline": gateway_slate}
        result = UserResult(set(user.positives.tolist()),
                            {int(i) for i in user.positives if train_counts[i] == 0},
                            user.n_train, channels, slates, degraded=list(served.degraded_reasons))
        if len(items):
            served_scores = self.blend.apply(fused, features, untrained(items, self.popularity))
            replayed, _ = self.reranker.rerank(items, served_scores, features, self.k, self.served_weight)
            result.matches_gateway = bool(np.array_equal(replayed, gateway_slate))
            for w in self.sweep_weights if sweep else ():
                result.sweep[w] = (replayed if w == self.served_weight
                                   else self.reranker.rerank(items, served_scores, features, self.k, w)[0])
        return result

    def _channels(self, user_id: str, history: np.ndarray, excluded: set[int]) -> dict[str, np.ndarray]:
        """Each channel's own list at DEPTH, seen items removed (what retrieval merges from)."""
        exclude = np.fromiter(excluded, np.int64, len(excluded))
        results = self.retriever.channel_results(user_id, history, exclude, DEPTH)
        return {name: result.items for name, result in results.items()}

    async def impression(self, case: ImpressionCase) -> dict[str, np.ndarray]:
        """Score what an impression showed: fused ranker (Triton, with the retrieval features the
        Retrieval service gives those items for this history), popularity, BERT similarity."""
        history = case.history[-MAX_HISTORY:]
        retrieved = await self.retrieval.Retrieve(pb.RetrieveRequest(
            user_id=case.user_id, history=history.tolist(), num_candidates=DEPTH,
            artifact_version=self.version), timeout=CALL_TIMEOUT_S)
        items, columns = candidates_from_proto(retrieved.candidates)
        retrieved_features = retrieval_features(columns, len(items))
        row = {int(item): j for j, item in enumerate(items)}
        features = np.zeros((len(case.shown), retrieved_features.shape[1]), np.float32)
        for j, item in enumerate(case.shown.tolist()):
            if item in row:   # shown items retrieval would not propose (or has seen) get zeros
                features[j] = retrieved_features[row[item]]
        fused = await self.scorer.score(history, case.shown, features, CALL_TIMEOUT_S)
        return {"fused_ranker": fused, "popular": self.counts[case.shown].astype(np.float32),
                "bert_similarity": self._bert_similarity(history, case.shown)}

    def _bert_similarity(self, history: np.ndarray, shown: np.ndarray) -> np.ndarray:
        """Cosine of each shown item [S] to the mean recent-history BERT vector (0 without history)."""
        if len(history) == 0:
            return np.zeros(len(shown), np.float32)
        query = self.item_text[history[-BERT_HISTORY:]].mean(axis=0)
        norm = np.linalg.norm(query)
        return (self.item_text[shown] @ (query / norm if norm else query)).astype(np.float32)
