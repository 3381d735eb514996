"""Core components loaded from a verified artifact set: what retrieval serves and what the
offline build and evaluation measure come from this one loader.

Shapes are checked against the manifest's counts and dims; a mismatch refuses the set.
"""
from __future__ import annotations

import struct
import zipfile

import faiss
import numpy as np

from common.artifacts import ArtifactError, ArtifactSet, check_shape
from common.faiss_index import GPU_MAX_K, load_index
from core.channels import (BertChannel, CfChannel, ItemToItemChannel, ItemVectors, PopularChannel,
                           SequentialChannel)
from core.fresh import FreshItems
from core.item_overlay import ItemOverlay
from core.limits import DEFAULT_QUOTAS, ITEM2ITEM_DECAY
from core.retriever import Retriever


def _load_index(artifacts: ArtifactSet, name: str, gpu: bool) -> tuple[faiss.Index, int | None]:
    """index_<name>.faiss with the manifest's search parameters (a set built before the manifest
    recorded them keeps the ones stored in the file), on the GPU if asked; returns (index, the
    largest k one search may ask for, None = no limit)."""
    search = artifacts.manifest.get("indexes", {}).get(name, {}).get("search", {})
    index, on_gpu = load_index(artifacts.path(f"index_{name}.faiss"), search, gpu)
    return index, GPU_MAX_K if on_gpu else None


def load_retriever(artifacts: ArtifactSet, gpu: bool = False, seq_encoder=None) -> Retriever:
    """gpu: search flat and IVF indexes on the GPU (see common.faiss_index.resolve_faiss_gpu).
    seq_encoder: history -> vector for the sequential channel in this process (the offline build
    and evaluation pass offline.serving.seq_encoder.InProcessSeqEncoder); None: the query brings
    it (query.encoded, from Triton) or the channel proposes nothing."""
    m = artifacts.manifest
    n_items, text_dim, cf_dim = m["counts"]["items"], m["dims"]["text"], m["dims"]["cf"]
    # Memory-mapped: the text and CF indexes hold the vectors they search; these tables are read
    # for history rows only (query vectors, CF fold-in). item_text is populated and its pages are
    # shared with ranking's (ArtifactSet.shared_table); item_cf (a sixth of its size) stays lazy.
    item_text = artifacts.shared_table("item_text.npy")
    item_cf = artifacts.npy("item_cf.npy", mmap=True)
    user_cf = artifacts.npy("user_cf.npy")
    check_shape("item_text.npy", item_text, n_items, text_dim)
    check_shape("item_cf.npy", item_cf, n_items, cf_dim)
    check_shape("user_cf.npy", user_cf, m["counts"]["cf_users"], cf_dim)
    text_index, text_max_k = _load_index(artifacts, "text", gpu)
    cf_index, cf_max_k = _load_index(artifacts, "cf", gpu)
    check_shape("index_text.faiss", np.empty((text_index.ntotal, 0)), n_items)
    # The CF index holds only items with training interactions (offline/build.py's index stage).
    check_shape("index_cf.faiss", np.empty((cf_index.ntotal, 0)), m.get("indexes", {}).get("cf", {}).get("vectors", n_items))
    cf = m["cf"]
    overlay = item_overlay(artifacts)
    bert = BertChannel(text_index, ItemVectors(item_text, overlay), text_max_k)
    cf_channel = CfChannel(cf_index, artifacts.json("cf_users.json"), user_cf, item_cf,
                           artifacts.npy("cf_gram.npy"), cf["alpha"], cf["regularization"], cf_max_k)
    counts = artifacts.npy("item_counts.npy")
    popular = PopularChannel(artifacts.npy("popular.npy"), counts)
    item2item = item_to_item_channel(artifacts)
    # Per-channel quotas tuned by the build on validation users (offline/quotas.py).
    quotas = checked_quotas(m.get("retrieval", {}).get("quotas") or DEFAULT_QUOTAS)
    sequential = sequential_channel(artifacts, gpu, seq_encoder)   # None for a set built before it
    return Retriever(artifacts.version, bert, cf_channel, popular, overlay, quotas,
                     extra=[item2item, *([sequential] if sequential is not None else [])],
                     fresh=fresh_items(m), counts=counts)


def fresh_items(manifest: dict) -> FreshItems:
    """The manifest's "fresh" section (core.fresh), refused with the reason when malformed."""
    try:
        return FreshItems.from_manifest(manifest)
    except ValueError as e:
        raise ArtifactError(str(e)) from None


def sequential_channel(artifacts: ArtifactSet, gpu: bool, encoder=None) -> SequentialChannel | None:
    """index_seq.faiss + seq_text_proj.npy / seq_text_bias.npy (written by the build's sequential
    stage, names in offline/serving/seq_encoder.py) when the manifest has a "sequential" section."""
    m = artifacts.manifest
    if "sequential" not in m:
        return None
    dim, text_dim = m["sequential"]["dim"], m["dims"]["text"]
    index, max_k = _load_index(artifacts, "seq", gpu)
    check_shape("index_seq.faiss", np.empty((index.ntotal, index.d)), m["counts"]["items"], dim)
    proj, bias = artifacts.npy("seq_text_proj.npy"), artifacts.npy("seq_text_bias.npy")
    check_shape("seq_text_proj.npy", proj, text_dim, dim)
    check_shape("seq_text_bias.npy", bias.reshape(1, -1), 1, dim)
    return SequentialChannel(index, encoder, max_k, text_proj=(proj, bias))


def item_to_item_channel(artifacts: ArtifactSet) -> ItemToItemChannel:
    """item_neighbours.npz (offline/item_neighbours.py): ids [n_items, N] int32 in -1..n_items-1,
    weights [n_items, N] float32, N = the manifest's item2item.top_n."""
    name = "item_neighbours.npz"
    m = artifacts.manifest
    ids, weights = (npz_member(artifacts.path(name), key) for key in ("ids", "weights"))
    top_n = m.get("item2item", {}).get("top_n")
    if not isinstance(top_n, int):
        raise ArtifactError(f"manifest item2item.top_n: an integer is needed for {name}, got {top_n!r}")
    check_shape(f"{name} ids", ids, m["counts"]["items"], top_n)
    check_shape(f"{name} weights", weights, m["counts"]["items"], top_n)
    if ids.dtype != np.int32 or weights.dtype != np.float32:
        raise ArtifactError(f"{name}: dtypes {ids.dtype}/{weights.dtype}, want int32/float32")
    if ids.size and not _ids_within(ids, -1, m["counts"]["items"] - 1):
        raise ArtifactError(f"{name}: neighbour ids outside -1..{m['counts']['items'] - 1}")
    if isinstance(ids, np.memmap):   # the check read every page: map them afresh, so only rows served stay resident
        ids = npz_member(artifacts.path(name), "ids")
    decay = m["item2item"].get("decay", ITEM2ITEM_DECAY)   # chosen by the build; older sets: the default
    if not isinstance(decay, (int, float)) or not 0.0 < decay <= 1.0:
        raise ArtifactError(f"manifest item2item.decay: a number in (0, 1] is needed, got {decay!r}")
    return ItemToItemChannel(ids, weights, decay=float(decay))


def _ids_within(ids: np.ndarray, lo: int, hi: int, chunk: int = 1 << 16) -> bool:
    flat = ids.reshape(len(ids), -1)
    return all(flat[j:j + chunk].min() >= lo and flat[j:j + chunk].max() <= hi for j in range(0, len(flat), chunk))


def npz_member(path, key: str) -> np.ndarray:
    """One array of an .npz, memory-mapped read-only when it is stored uncompressed (np.savez: at 1M
    items the 800 MB neighbour table then costs only the rows read); else read whole."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(f"{key}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        with np.load(path, allow_pickle=False) as z:
            return z[key]
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])   # the local file header
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject:
        raise ArtifactError(f"{path}: {key} holds Python objects")
    if not shape or 0 in shape:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


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
