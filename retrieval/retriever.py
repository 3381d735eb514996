"""The retrieval pipeline as a plain object: channels -> merge, over one loaded artifact set."""
from __future__ import annotations

from dataclasses import dataclass, field

import faiss
import numpy as np

from common.artifacts import ArtifactError, ArtifactSet, check_shape
from common.faiss_index import GPU_MAX_K, load_index
from common.metrics import CANDIDATES, stage_timer
from common.online_items import OnlineItems
from protos import fusionrec_pb2 as pb
from retrieval.channels import BertChannel, CfChannel, ChannelResult, PopularChannel
from retrieval.merge import DEFAULT_CANDIDATES, DEFAULT_QUOTAS, CandidateMerger, MergedCandidates

SERVICE = "retrieval"


@dataclass
class Retrieval:
    candidates: MergedCandidates
    skipped: list[str] = field(default_factory=list)
    stage_ms: dict[str, float] = field(default_factory=dict)


def _load_index(artifacts: ArtifactSet, name: str, gpu: bool) -> tuple[faiss.Index, int | None]:
    """index_<name>.faiss with the manifest's search parameters (a set built before the manifest
    recorded them keeps the ones stored in the file), on the GPU if asked; returns (index, the
    largest k one search may ask for, None = no limit)."""
    search = artifacts.manifest.get("indexes", {}).get(name, {}).get("search", {})
    index, on_gpu = load_index(artifacts.path(f"index_{name}.faiss"), search, gpu)
    return index, GPU_MAX_K if on_gpu else None


class Retriever:
    def __init__(self, artifacts: ArtifactSet, gpu: bool = False) -> None:
        """gpu: search flat and IVF indexes on the GPU (see common.faiss_index.resolve_faiss_gpu)."""
        m = artifacts.manifest
        n_items, text_dim, cf_dim = m["counts"]["items"], m["dims"]["text"], m["dims"]["cf"]
        item_text = artifacts.npy("item_text.npy")
        item_cf = artifacts.npy("item_cf.npy")
        user_cf = artifacts.npy("user_cf.npy")
        check_shape("item_text.npy", item_text, n_items, text_dim)
        check_shape("item_cf.npy", item_cf, n_items, cf_dim)
        check_shape("user_cf.npy", user_cf, m["counts"]["cf_users"], cf_dim)
        text_index, text_max_k = _load_index(artifacts, "text", gpu)
        cf_index, cf_max_k = _load_index(artifacts, "cf", gpu)
        check_shape("index_text.faiss", np.empty((text_index.ntotal, 0)), n_items)
        check_shape("index_cf.faiss", np.empty((cf_index.ntotal, 0)), n_items)
        cf = m["cf"]
        self.version = artifacts.version
        self.n_items = n_items
        self.online = OnlineItems(n_items, text_dim)
        self.bert = BertChannel(text_index, item_text, self.online, text_max_k)
        self.cf = CfChannel(cf_index, artifacts.json("cf_users.json"), user_cf, item_cf,
                            artifacts.npy("cf_gram.npy"), cf["alpha"], cf["regularization"], cf_max_k)
        self.popular = PopularChannel(artifacts.npy("popular.npy"), artifacts.npy("item_counts.npy"))
        self.merger = CandidateMerger()
        self.index_sizes = {"text": text_index.ntotal, "cf": cf_index.ntotal}
        # Per-channel quotas tuned by the build on validation users (offline/quotas.py).
        self.quotas = checked_quotas(m.get("retrieval", {}).get("quotas") or DEFAULT_QUOTAS)

    def update_items(self, update: pb.ItemUpdate) -> int:
        """Apply online additions/removals (artifact items may get a new text vector); returns the
        number of online items held. Raises ValueError naming the field on a malformed update."""
        indices = np.array(update.add_indices, np.int64)
        dim = self.bert.item_vectors.shape[1]
        if len(update.add_vectors) != len(indices) * dim or len(update.add_categories) != len(indices):
            raise ValueError(f"add_vectors/add_categories: need {len(indices)} x {dim} floats and {len(indices)} categories")
        vectors = np.array(update.add_vectors, np.float32).reshape(len(indices), dim)
        online = indices >= self.n_items
        self.online.apply(pb.ItemUpdate(
            add_indices=indices[online].tolist(), add_vectors=vectors[online].ravel().tolist(),
            add_categories=np.array(update.add_categories)[online].tolist(), remove_indices=update.remove_indices))
        if (~online).any():   # copy on write: a concurrent reader keeps a consistent table
            table = self.bert.item_vectors.copy()
            table[indices[~online]] = vectors[~online]
            self.bert.item_vectors = table
        if len(indices):
            self.bert.add(indices, vectors)
        self.index_sizes["text"] = self.bert.index.ntotal
        return len(self.online.vectors)

    def retrieve(self, user_id: str, history: np.ndarray, exclude: np.ndarray,
                 total: int = DEFAULT_CANDIDATES, quotas: dict[str, int] | None = None) -> Retrieval:
        """history [L] int64 oldest first; exclude [E] int64. Seen and excluded items never return."""
        quotas = dict(self.quotas if not quotas else quotas)
        # Ask each channel for enough to fill the whole list alone if the others come up short.
        want = max(total, max(quotas.values(), default=0))
        out = Retrieval(candidates=None)  # type: ignore[arg-type]
        results = self.channel_results(user_id, history, exclude, want, out.stage_ms)
        out.skipped = [c for c, r in results.items() if len(r.items) == 0]
        with stage_timer(SERVICE, "merge", out.stage_ms):
            out.candidates = self.merger.merge(results, quotas, total)
        for channel, count in out.candidates.per_channel.items():
            CANDIDATES.labels(channel).observe(count)
        CANDIDATES.labels("merged").observe(len(out.candidates.items))
        return out

    def channel_results(self, user_id: str, history: np.ndarray, exclude: np.ndarray, want: int,
                        stage_ms: dict[str, float] | None = None) -> dict[str, ChannelResult]:
        """Each channel's top `want`, before merging; seen, excluded and deleted items left out."""
        stage_ms = {} if stage_ms is None else stage_ms
        excluded = set(map(int, history)) | set(map(int, exclude)) | self.online.removed
        results: dict[str, ChannelResult] = {}
        with stage_timer(SERVICE, "channel_bert", stage_ms):
            results["bert"] = self.bert.retrieve(history, want, excluded)
        with stage_timer(SERVICE, "channel_cf", stage_ms):
            results["cf"] = self.cf.retrieve(user_id, history, want, excluded)
        with stage_timer(SERVICE, "channel_popular", stage_ms):
            results["popular"] = self.popular.retrieve(want, excluded)
        return results


def checked_quotas(quotas: dict) -> dict[str, int]:
    """Quotas from a manifest: known channels, non-negative integers, else the set is refused."""
    unknown = set(quotas) - set(DEFAULT_QUOTAS)
    if unknown or not all(isinstance(v, int) and v >= 0 for v in quotas.values()):
        raise ArtifactError(f"manifest retrieval.quotas: channels must be {sorted(DEFAULT_QUOTAS)} with "
                            f"integer quotas >= 0, got {quotas}")
    return dict(quotas)
