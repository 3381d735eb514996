"""Core components loaded from a verified artifact set: what retrieval serves and what the
offline build and evaluation measure come from this one loader.

Shapes are checked against the manifest's counts and dims; a mismatch refuses the set.
"""
from __future__ import annotations

import faiss
import numpy as np

from common.artifacts import ArtifactError, ArtifactSet, check_shape
from common.faiss_index import GPU_MAX_K, load_index
from core.channels import BertChannel, CfChannel, ItemToItemChannel, ItemVectors, PopularChannel
from core.item_overlay import ItemOverlay
from core.limits import DEFAULT_QUOTAS
from core.retriever import Retriever


def _load_index(artifacts: ArtifactSet, name: str, gpu: bool) -> tuple[faiss.Index, int | None]:
    """index_<name>.faiss with the manifest's search parameters (a set built before the manifest
    recorded them keeps the ones stored in the file), on the GPU if asked; returns (index, the
    largest k one search may ask for, None = no limit)."""
    search = artifacts.manifest.get("indexes", {}).get(name, {}).get("search", {})
    index, on_gpu = load_index(artifacts.path(f"index_{name}.faiss"), search, gpu)
    return index, GPU_MAX_K if on_gpu else None


def load_retriever(artifacts: ArtifactSet, gpu: bool = False) -> Retriever:
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
    overlay = item_overlay(artifacts)
    bert = BertChannel(text_index, ItemVectors(item_text, overlay), text_max_k)
    cf_channel = CfChannel(cf_index, artifacts.json("cf_users.json"), user_cf, item_cf,
                           artifacts.npy("cf_gram.npy"), cf["alpha"], cf["regularization"], cf_max_k)
    popular = PopularChannel(artifacts.npy("popular.npy"), artifacts.npy("item_counts.npy"))
    item2item = item_to_item_channel(artifacts)
    # Per-channel quotas tuned by the build on validation users (offline/quotas.py).
    quotas = checked_quotas(m.get("retrieval", {}).get("quotas") or DEFAULT_QUOTAS)
    return Retriever(artifacts.version, bert, cf_channel, popular, overlay, quotas, extra=[item2item])


def item_to_item_channel(artifacts: ArtifactSet) -> ItemToItemChannel:
    """item_neighbours.npz (offline/item_neighbours.py): ids [n_items, N] int32 in -1..n_items-1,
    weights [n_items, N] float32, N = the manifest's item2item.top_n."""
    name = "item_neighbours.npz"
    m = artifacts.manifest
    with np.load(artifacts.path(name), allow_pickle=False) as z:
        ids, weights = z["ids"], z["weights"]
    top_n = m.get("item2item", {}).get("top_n")
    if not isinstance(top_n, int):
        raise ArtifactError(f"manifest item2item.top_n: an integer is needed for {name}, got {top_n!r}")
    check_shape(f"{name} ids", ids, m["counts"]["items"], top_n)
    check_shape(f"{name} weights", weights, m["counts"]["items"], top_n)
    if ids.dtype != np.int32 or weights.dtype != np.float32:
        raise ArtifactError(f"{name}: dtypes {ids.dtype}/{weights.dtype}, want int32/float32")
    if ids.size and (ids.min() < -1 or ids.max() >= m["counts"]["items"]):
        raise ArtifactError(f"{name}: neighbour ids outside -1..{m['counts']['items'] - 1}")
    return ItemToItemChannel(ids, weights)


def item_overlay(artifacts: ArtifactSet, catalog: dict | None = None) -> ItemOverlay:
    """An empty overlay for the set's items: the item log applies on top of it from the manifest's
    `item_log_seq` (the log position the build folded in; 0 for a set built before the log).
    catalog: catalog.json when the caller has read it already."""
    m = artifacts.manifest
    catalog = artifacts.json("catalog.json") if catalog is None else catalog
    item_ids = catalog["item_ids"]
    if len(item_ids) != m["counts"]["items"]:
        raise ArtifactError(f"catalog.json: {len(item_ids)} item ids, the manifest counts {m['counts']['items']}")
    categories = {name: j for j, name in enumerate(catalog.get("category_names", [""]))}
    return ItemOverlay(item_ids, m["dims"]["text"], categories, folded_seq=int(m.get("item_log_seq", 0)))


def checked_quotas(quotas: dict) -> dict[str, int]:
    """Quotas from a manifest: known channels, non-negative integers, else the set is refused."""
    unknown = set(quotas) - set(DEFAULT_QUOTAS)
    if unknown or not all(isinstance(v, int) and v >= 0 for v in quotas.values()):
        raise ArtifactError(f"manifest retrieval.quotas: channels must be {sorted(DEFAULT_QUOTAS)} with "
                            f"integer quotas >= 0, got {quotas}")
    return dict(quotas)
