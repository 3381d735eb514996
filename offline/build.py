"""The offline build: dataset -> embeddings, CF, FAISS indexes, fused ranker, re-ranker, manifest.

Writes a new version: artifacts/<v>/ and model_repository/fused_ranker/<v>/ (+ config.pbtxt).
Everything is staged in a temporary folder and published only once complete.
"""
from __future__ import annotations

import hashlib
import json
import resource
import shutil
import tempfile
import time
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import faiss
import numpy as np
import torch

from common.artifacts import next_version, open_artifacts, publish, write_manifest
from common.components import load_retriever
from core.item_text import item_text as embedding_text
from common.faiss_index import index_info
from core.features import FUSED_RANKER_NAME, RETRIEVAL_FEATURES, TEXT_ENCODER_NAME, retrieval_features
from common.logs import get_logger
from offline import datasets
from offline.cf import train_als
from offline.item_log_fold import fold_item_log, read_item_log
from offline.item_vectors import load_brought_vectors
from offline.index import EXACT_BELOW, RECALL_K, build_index, cf_index_rows, recall_at_k
from offline.item_neighbours import NeighbourConfig, choose_decay, item_neighbours, save_neighbours
from offline.metrics import auc, intra_list_diversity, ndcg_at_k
from offline.quotas import quota_key, tune_quotas
from offline.ranker import MAX_HISTORY, RankingList, cut_lists, score_lists, train_ranker, use_cf_tables
from offline.inner_tables import REFITTED, cut_span_mask, fit_tables, refitted_manifest, write_inner_set
from core.blend import untrained
from core.fresh import FRESH_CANDIDATES, FreshItems
from offline.blend import choose_blend
from offline.fresh import choose_fresh_slots
from offline.reranker import cross_validated_choice
from offline.serving.export import RANKER_WEIGHTS, publish_fused_ranker, publish_text_encoder, script_ranker
from offline.serving.export import publish_seq_encoder, weights_checksum
from offline.serving.seq_encoder import SEQ_ENCODER_WEIGHTS
from offline.serving.seq_encoder import (SEQ_INDEX, SEQ_INDEX_NAME, SEQ_ITEM_VECTORS, SEQ_TEXT_BIAS,
                                         SEQ_TEXT_PROJ, InProcessSeqEncoder, script_encoder)
from offline.sequential import SeqConfig, Validation, recall_figures, train_sequential, user_vectors
from core.features import SEQ_ENCODER_NAME
from offline.serving.fused_ranker import FusedRanker
from offline.split import dataset_split, split_impressions
from offline.text_encoder import TextEncoder
from core.rerank import DiversityReranker, NoCorrection
from core.limits import DEFAULT_QUOTAS
from core.retriever import Retriever

log = get_logger("offline.build")
HISTORY_KEEP = 100   # recent history per user kept for serving
QUOTA_USERS = 2000    # validation users the channel quotas are tuned on (bounds the stage's time)
INDEX_QUERIES = 100   # sample queries per FAISS index, for tuning and again for measuring recall
# Fused-ranker training lists (offline/ranker.py): late cut points per ranker user's training
# sequence, weighing less than the validation lists (their targets were seen by the CF tables).
RANKER_CUTS = 4
RANKER_CUT_WEIGHT = 0.5
RANKER_BATCH = 4      # lists per optimizer step
RANKER_PATIENCE = 2   # epochs without a better validation nDCG@10 before stopping


@dataclass
class BuildOptions:
    data: str
    artifacts: Path
    model_repo: Path
    cache_dir: Path = Path(".cache")
    text_model_dir: Path | None = None
    max_items: int | None = None     # keep the most popular N items (tests, quick looks)
    max_users: int | None = None
    epochs: int = 6
    cf_factors: int = 64
    seed: int = 0
    progress: bool = True
    item_log: str | None = None      # sqlite:<path> or redis://...: fold online item changes in
    # Bring your own embeddings (offline/item_vectors.py): these replace the text encoding.
    item_vectors: Path | None = None          # .npy (+ ids file) or .parquet
    item_vector_ids: Path | None = None       # default: <item_vectors>.ids.txt beside it
    item_vectors_same_encoder: bool = False   # made by text_model_dir's model: encode missing ones, online upserts match
    # The sequential next-item channel (offline/sequential.py, served by Triton's seq_encoder). Off by
    # default: on ml-latest-small it recalls less than item2item and CF, does not raise merged
    # recall@300, and its Triton hop costs ~3 core-ms per request (README "Quality").
    sequential: bool = False


@dataclass
class StageLog:
    rows: list[tuple[str, float, float, str]] = field(default_factory=list)

    @contextmanager
    def stage(self, name: str, figures: dict[str, str]) -> Iterator[None]:
        start = time.perf_counter()
        log.info("stage start", extra={"stage": name})
        yield
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.rows.append((name, time.perf_counter() - start, peak_mb, ", ".join(
            f"{k}={v}" for k, v in figures.items())))

    def table(self) -> str:
        lines = [f"{'stage':<14} {'seconds':>8} {'peak MiB':>9}  figures", "-" * 72]
        lines += [f"{n:<14} {s:>8.1f} {m:>9.0f}  {f}" for n, s, m, f in self.rows]
        lines.append(f"{'total':<14} {sum(r[1] for r in self.rows):>8.1f}")
        return "\n".join(lines)


def subset_dataset(ds: datasets.Dataset, max_items: int | None, max_users: int | None) -> datasets.Dataset:
    keep = np.ones(len(ds), bool)
    if max_users:
        users = sorted(set(ds.users), key=lambda u: zlib.crc32(u.encode()))[:max_users]
        keep &= np.isin(ds.users, users)
    if max_items:
        ids, counts = np.unique(ds.item_ids[keep], return_counts=True)
        top = set(ids[np.argsort(-counts, kind="stable")[:max_items]])
        keep &= np.array([i in top for i in ds.item_ids])
        items = [it for it in ds.items if it.item_id in top]
    else:
        items = ds.items
    labels = None if ds.split_labels is None else ds.split_labels[keep]
    return datasets.Dataset(ds.name, items, ds.users[keep], ds.item_ids[keep], ds.timestamps[keep],
                            ds.values[keep], ds.impressions, ds.report, labels)


def user_sequences(users: np.ndarray, items: np.ndarray, ts: np.ndarray) -> dict[str, np.ndarray]:
    order = np.lexsort((ts, users))
    out: dict[str, list[int]] = {}
    for u, i in zip(users[order], items[order]):
        out.setdefault(u, []).append(int(i))
    return {u: np.array(v, np.int64) for u, v in out.items()}


def _lists(retriever: Retriever, histories: dict[str, np.ndarray], targets: dict[str, np.ndarray],
           users: list[str]) -> list[RankingList]:
    out = []
    for u in users:
        if u not in targets:
            continue
        history = histories.get(u, np.zeros(0, np.int64))
        r = retriever.retrieve(u, history, np.zeros(0, np.int64))
        c = r.candidates
        labels = np.isin(c.items, targets[u]).astype(np.float32)
        out.append(RankingList(history[-MAX_HISTORY:], c.items,
                               retrieval_features(c.columns, len(c.items)), labels))
    return out


def _impression_lists(retriever: Retriever, impressions: list[datasets.Impression],
                      index_of: dict[str, int]) -> list[RankingList]:
    """MIND-style impressions as ranking lists: what was shown, labelled by what was clicked.

    Retrieval features come from running retrieval on the impression's history: a shown item the
    channels would also have proposed gets that channel's score and rank, others get zeros.
    """
    out = []
    for imp in impressions:
        history = np.array([index_of[i] for i in imp.history if i in index_of], np.int64)
        shown = [(index_of[i], c) for i, c in zip(imp.shown, imp.clicked) if i in index_of]
        if not shown:
            continue
        candidates = np.array([i for i, _ in shown], np.int64)
        r = retriever.retrieve(imp.user_id, history, np.zeros(0, np.int64)).candidates
        retrieved = retrieval_features(r.columns, len(r.items))
        row = {int(item): j for j, item in enumerate(r.items)}
        features = np.zeros((len(candidates), retrieved.shape[1]), np.float32)
        for j, item in enumerate(candidates):
            if int(item) in row:
                features[j] = retrieved[row[int(item)]]
        out.append(RankingList(history[-MAX_HISTORY:], candidates, features,
                               np.array([float(c) for _, c in shown], np.float32)))
    return out


def build(opts: BuildOptions) -> Path:
    stages = StageLog()
    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)
    with stages.stage("load", figures := {}):
        ds = subset_dataset(datasets.load(opts.data), opts.max_items, opts.max_users)
        # After the subset: items from the log have no interactions, and must not be cut for it.
        ds, folded = fold_item_log(ds, read_item_log(opts.item_log) if opts.item_log else [])
        if opts.item_log:
            log.info("item log folded in", extra=folded.figures())
        item_ids = [it.item_id for it in ds.items]
        index_of = {iid: j for j, iid in enumerate(item_ids)}
        inter_items = np.array([index_of[i] for i in ds.item_ids], np.int64)
        figures.update(items=str(len(item_ids)), interactions=str(len(ds)),
                       users=str(len(set(ds.users))), malformed=str(len(ds.report.malformed)),
                       item_log_seq=str(folded.last_seq))
        log.info("dataset loaded", extra={"report": ds.report.summary()})

    with stages.stage("split", figures := {}):
        split = dataset_split(ds)
        impressions_train, impressions_held_out = split_impressions(ds)
        figures.update(rule=split.rule, train=str(split.train.sum()), valid=str(split.valid.sum()),
                       test=str(split.test.sum()), imp_train=str(len(impressions_train)),
                       imp_held_out=str(len(impressions_held_out)))

    with stages.stage("text", figures := {}):
        encoder = TextEncoder(opts.text_model_dir, cache_dir=opts.cache_dir / "embeddings")
        bert_bar = "bert" if opts.progress else None
        brought = None
        if opts.item_vectors:
            def encode_rows(rows: list[int]) -> np.ndarray:
                return encoder.encode([embedding_text(ds.items[j].title, ds.items[j].text, ds.items[j].category)
                                       for j in rows], progress=bert_bar)
            brought = load_brought_vectors(opts.item_vectors, item_ids, encoder.dim, encoder.name,
                                           opts.item_vector_ids,
                                           encode_rows if opts.item_vectors_same_encoder else None)
            item_text = brought.vectors
            figures.update(brought=Path(brought.file).name, encoded=str(brought.encoded),
                           unknown=str(brought.unknown))
        else:
            texts = [embedding_text(it.title, it.text, it.category) for it in ds.items]
            item_text = encoder.encode(texts, progress=bert_bar)
        # "brought": the vectors come from a model the online text_encoder is not, so an item added
        # online cannot be embedded into this space by Triton (README "Bring your own embeddings").
        text_space = "brought" if brought is not None and not opts.item_vectors_same_encoder else "encoder"
        figures.update(model=encoder.name, dim=str(encoder.dim), space=text_space)

    with stages.stage("cf", figures := {}):
        tr = split.train
        cf_users = sorted(set(ds.users[tr]))
        row = {u: j for j, u in enumerate(cf_users)}
        cf = train_als(np.array([row[u] for u in ds.users[tr]]), inter_items[tr], len(cf_users),
                       len(item_ids), cf_users, factors=opts.cf_factors, seed=opts.seed)
        figures.update(users=str(len(cf_users)), factors=str(opts.cf_factors))

    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=_ensure(opts.artifacts)))
    version = max(next_version(opts.artifacts), next_version(opts.model_repo / FUSED_RANKER_NAME),
                  next_version(opts.model_repo / SEQ_ENCODER_NAME))
    with stages.stage("item2item", figures := {}):
        # Sparse top-N neighbours per item from the training sequences (offline/item_neighbours.py).
        neighbour_config = NeighbourConfig()
        _, train_user_rows = np.unique(ds.users[tr], return_inverse=True)
        neighbours = item_neighbours(train_user_rows, inter_items[tr], ds.timestamps[tr], len(item_ids),
                                     neighbour_config, progress=opts.progress)
        save_neighbours(staging / "item_neighbours.npz", neighbours)
        # The channel's recency decay: chosen on validation users (train history -> validation items).
        train_seq = user_sequences(ds.users[split.train], inter_items[split.train], ds.timestamps[split.train])
        valid_t = user_sequences(ds.users[split.valid], inter_items[split.valid], ds.timestamps[split.valid])
        decay, ndcg_by_decay = choose_decay(neighbours, train_seq, valid_t,
                                            sorted(valid_t, key=lambda u: zlib.crc32(u.encode()))[:QUOTA_USERS])
        item2item_info = {**neighbour_config.describe(), "method": neighbours.method, "decay": decay,
                          "valid_ndcg@10_by_decay": ndcg_by_decay, "filled": round(neighbours.filled, 4)}
        del neighbours   # retrieval loads the file like a service does
        figures.update(method=item2item_info["method"], top_n=str(neighbour_config.top_n),
                       window=str(neighbour_config.window), decay=f"{decay:g}",
                       ndcg=f"{ndcg_by_decay[f'{decay:g}']:.3f}", filled=f"{item2item_info['filled']:.2f}")

    sequential_info = None   # the stage is opt-in (BuildOptions.sequential)
    if opts.sequential:
        with stages.stage("sequential", figures := {}):
            # The next-item encoder (offline/sequential.py) on the training sequences: its item vectors
            # are index_seq.faiss, its TorchScript the seq_encoder Triton serves to retrieval.
            seq_config = SeqConfig(seed=opts.seed)
            # Validation users (train history -> validation items, seen ones excluded): the stage
            # stops on their recall, reports their figures (so those are optimistic) and tunes and
            # measures the index with their vectors.
            seq_users = [u for u in sorted(valid_t, key=lambda u: zlib.crc32(u.encode())) if u in train_seq][:QUOTA_USERS]
            seq_valid = Validation([train_seq[u] for u in seq_users], [np.unique(valid_t[u]) for u in seq_users])
            seq = train_sequential([train_seq[u] for u in sorted(train_seq)], item_text, seq_config,
                                   progress=opts.progress, valid=seq_valid)
            script_encoder(seq.encoder, staging / SEQ_ENCODER_WEIGHTS)
            np.save(staging / SEQ_ITEM_VECTORS, seq.item_vectors)
            np.save(staging / SEQ_TEXT_PROJ, seq.text_proj)
            np.save(staging / SEQ_TEXT_BIAS, seq.text_bias)
            seq_queries = user_vectors(seq.encoder, seq_valid.histories)
            seq_figures = recall_figures(seq.item_vectors, seq_queries, seq_valid.histories, seq_valid.targets)
            # IVF above the exact size: HNSW construction over ~1M vectors takes far longer than this stage.
            seq_index = build_index(seq.item_vectors, ivf_above=EXACT_BELOW,
                                    queries=seq_queries[::2] if len(seq_users) > 1 else None, k=RECALL_K, seed=opts.seed)
            faiss.write_index(seq_index, str(staging / SEQ_INDEX))
            seq_index_recall = recall_at_k(seq_index, seq.item_vectors, seq_queries[1::2], RECALL_K) if len(seq_users) > 1 else 1.0
            seq_index_info = {**asdict(index_info(seq_index)), f"recall@{RECALL_K}": seq_index_recall}
            del seq_index
            sequential_info = {**seq_config.describe(), "softmax": seq.softmax, "steps": seq.steps,
                               "best_step": seq.best_step, "valid_checks": seq.checks,
                               "train_loss": [round(x, 4) for x in seq.losses], "valid_users": len(seq_users),
                               "valid": {k: round(v, 4) for k, v in seq_figures.items()}}
            figures.update(steps=str(seq.steps), best_step=str(seq.best_step), softmax=seq.softmax,
                           loss=f"{seq.losses[0]:.3f}->{seq.losses[-1]:.3f}" if seq.losses else "-",
                           recall_at_300=f"{seq_figures['recall@300']:.3f}")

    with stages.stage("index", figures := {}):
        rng = np.random.default_rng(opts.seed)
        quality: dict[str, float] = {}
        indexes: dict[str, dict] = {}
        counts = np.bincount(inter_items[split.train], minlength=len(item_ids)).astype(np.int64)
        # The CF index holds only items with training interactions: the others' ALS factors are
        # their near-zero initialisation, which CF cannot rank (and at 1M latent items, 95% of
        # them, they forced nprobe 1024 on an IVF index for recall 0.98). None: every item.
        cf_rows = cf_index_rows(counts)
        for name, vectors, pool, ids in (("text", item_text, item_text, None),
                                         ("cf", cf.item_factors, cf.user_factors, cf_rows)):
            # Disjoint query samples: one tunes efSearch/nprobe, the other measures the recall reported.
            picks = rng.choice(len(pool), min(2 * INDEX_QUERIES, len(pool)), replace=False)
            tune_queries, eval_queries = pool[picks[::2]], pool[picks[1::2] if len(picks) > 1 else picks]
            index = build_index(vectors, queries=tune_queries, k=RECALL_K, seed=opts.seed, ids=ids)
            faiss.write_index(index, str(staging / f"index_{name}.faiss"))
            recall = recall_at_k(index, vectors, eval_queries, RECALL_K, ids)
            quality[f"index_{name}_recall@{RECALL_K}"] = recall
            info = index_info(index)
            indexes[name] = {**asdict(info), "vectors": int(index.ntotal), f"recall@{RECALL_K}": recall}
            figures[f"{name}_index"] = " ".join([info.kind, *(f"{p}={v}" for p, v in info.search.items())])
            figures[f"{name}_recall@{RECALL_K}"] = f"{recall:.3f}"

        popularity = (np.log1p(counts) / max(np.log1p(counts).max(), 1e-6)).astype(np.float32)
        stamps = np.array([it.timestamp for it in ds.items], np.float64)
        newest = max(stamps.max(initial=0), float(ds.timestamps.max(initial=0)))
        age = np.where(stamps > 0, np.clip((newest - stamps) / (365.25 * 86400 * 50), 0, 1), 0.5).astype(np.float32)
        categories = sorted({it.category for it in ds.items if it.category})
        cat_of = {c: j + 1 for j, c in enumerate(categories)}      # 0 = unknown
        item_category = np.array([cat_of.get(it.category, 0) for it in ds.items], np.int64)
        item_side = np.column_stack([popularity, age]).astype(np.float32)

        np.save(staging / "item_text.npy", item_text)
        np.save(staging / "item_cf.npy", cf.item_factors)
        np.save(staging / "user_cf.npy", cf.user_factors)
        np.save(staging / "cf_gram.npy", cf.gram)
        np.save(staging / "item_counts.npy", counts)
        np.save(staging / "popular.npy", np.argsort(-counts, kind="stable").astype(np.int64))
        np.save(staging / "item_category.npy", item_category)
        np.save(staging / "item_side.npy", item_side)
        (staging / "cf_users.json").write_text(json.dumps(cf_users))
        (staging / "catalog.json").write_text(json.dumps({
            "item_ids": item_ids, "titles": [it.title for it in ds.items],
            "categories": [it.category for it in ds.items], "category_names": ["", *categories]}))
        all_seq = user_sequences(ds.users, inter_items, ds.timestamps)
        users_sorted = sorted(all_seq)
        lengths = np.array([min(len(all_seq[u]), HISTORY_KEEP) for u in users_sorted], np.int64)
        np.savez(staging / "user_history.npz", users=np.array(users_sorted, dtype=str),
                 offsets=np.r_[0, np.cumsum(lengths)],
                 items=np.concatenate([all_seq[u][-HISTORY_KEEP:] for u in users_sorted] or [np.zeros(0, np.int64)]))
        manifest = {
            "version": version, "dataset": ds.name, "data_spec": opts.data,
            "data_fingerprint": data_fingerprint(item_ids, ds), "split": split.rule,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_options": {"max_items": opts.max_items, "max_users": opts.max_users,
                              "epochs": opts.epochs, "seed": opts.seed},
            "counts": {"items": len(item_ids), "cf_users": len(cf_users), "users": len(users_sorted),
                       "interactions": len(ds), "categories": len(categories)},
            "dims": {"text": int(item_text.shape[1]), "cf": int(cf.item_factors.shape[1])},
            "text_encoder": encoder.name,
            "text_space": text_space,   # "encoder": text_encoder's space; "brought": vectors from elsewhere
            "item_vectors": brought.describe() if brought is not None else None,
            "cf": {"alpha": cf.alpha, "regularization": cf.regularization, "factors": opts.cf_factors},
            "models": {FUSED_RANKER_NAME: str(version), "reranker": str(version)},
            "indexes": indexes,   # kind and tuned search parameters; retrieval applies them at load
            "item2item": item2item_info,   # how item_neighbours.npz was built (top_n: its width)
            # Room for untrained items in every merged list (core.fresh); the slots are chosen later.
            "fresh": FreshItems(FRESH_CANDIDATES, 0).describe(),
            # Services replay only the item-log records after this position on this version.
            "item_log_seq": folded.last_seq,
            "item_log_fold": {"added": folded.added, "updated": folded.updated, "dropped": folded.dropped,
                              "interactions_dropped": folded.interactions_dropped},
            "quality": quality,
        }
        # The sequential channel (its "sequential" section is what tells the loader the set has it).
        if sequential_info is not None:
            manifest["sequential"] = sequential_info
            indexes[SEQ_INDEX_NAME] = seq_index_info
            quality[f"index_seq_recall@{RECALL_K}"] = seq_index_recall
            quality.update({f"seq_{k}_valid": v for k, v in sequential_info["valid"].items()})
        write_manifest(staging, manifest)

    with stages.stage("quotas", figures := {}):
        retriever = load_retriever(open_artifacts(staging), seq_encoder=InProcessSeqEncoder(staging / SEQ_ENCODER_WEIGHTS)
                                   if opts.sequential else None)
        hist_seq = user_sequences(ds.users[split.train | split.valid], inter_items[split.train | split.valid],
                                   ds.timestamps[split.train | split.valid])
        test_t = user_sequences(ds.users[split.test], inter_items[split.test], ds.timestamps[split.test])
        sample = sorted(valid_t, key=lambda u: zlib.crc32(u.encode()))[:QUOTA_USERS]   # seeded, spread
        quotas, recall_by_quotas, lead = tune_quotas(retriever, train_seq, valid_t, sample, progress=opts.progress)
        retriever.quotas = quotas
        manifest["retrieval"] = {"quotas": quotas, "recall@300_valid": recall_by_quotas,   # written at publish
                                 "lead": lead}
        quality["merged_recall@300_valid"] = recall_by_quotas[quota_key(quotas)]
        quality["default_quotas_recall@300_valid"] = recall_by_quotas[quota_key(DEFAULT_QUOTAS)]
        figures.update(quotas="/".join(f"{c}={n}" for c, n in quotas.items()), lead=str(lead["channel"]),
                       recall=f"{quality['default_quotas_recall@300_valid']:.3f}->{quality['merged_recall@300_valid']:.3f}")

    with stages.stage("ranker", figures := {}):
        # Users are split too: the re-ranker learns from fused scores the ranker did not train on.
        ranker_users = [u for u in sorted(valid_t) if zlib.crc32(u.encode()) % 10 < 7]
        rerank_users = [u for u in sorted(valid_t) if zlib.crc32(u.encode()) % 10 >= 7]
        # Validation lists: each ranker user's whole training history -> the validation period.
        valid_lists = _lists(retriever, train_seq, valid_t, ranker_users)

        # Training lists: late cut points inside the same users' training sequences, candidates
        # from a retriever on the prefix (offline.ranker.cut_lists) over inner tables fitted
        # without the cut spans: the served ones saw those targets (offline/inner_tables.py).
        held = cut_span_mask(ds.users[tr], ds.timestamps[tr], set(ranker_users), RANKER_CUTS)
        inner_dir = Path(tempfile.mkdtemp(prefix=".inner-", dir=opts.artifacts))
        try:
            inner = write_inner_set(staging, inner_dir, ds.users[tr][~held], inter_items[tr][~held],
                                    ds.timestamps[tr][~held], len(item_ids), opts.cf_factors, opts.seed,
                                    neighbour_config)
            inner_retriever = load_retriever(open_artifacts(inner_dir), seq_encoder=InProcessSeqEncoder(
                staging / SEQ_ENCODER_WEIGHTS) if opts.sequential else None)
            inner_retriever.quotas = quotas

            def retrieve_inner_prefix(history: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                c = inner_retriever.retrieve("", history, np.zeros(0, np.int64)).candidates
                return c.items, retrieval_features(c.columns, len(c.items))
            train_lists = cut_lists(retrieve_inner_prefix, train_seq, ranker_users, RANKER_CUTS, RANKER_CUT_WEIGHT)
            inner_retriever = None   # its tables are not needed past the cut lists
        finally:
            shutil.rmtree(inner_dir, ignore_errors=True)
        n_cut = len(train_lists)
        # Impressions (MIND) are real negatives; the held-out ones never train (offline.split).
        train_lists += _impression_lists(retriever, impressions_train, index_of)
        impression_test = _impression_lists(retriever, impressions_held_out, index_of)
        n_features = len(RETRIEVAL_FEATURES)

        def new_model() -> FusedRanker:
            # Trained with the inner CF tables, as its cut lists were retrieved (use_cf_tables below).
            torch.manual_seed(opts.seed)   # the initial weights: same seed, same model
            return FusedRanker(item_text, inner.cf.item_factors, inner.cf.gram, cf.alpha, cf.regularization,
                               popularity, age, item_category, len(categories), n_features)

        train_args = {"seed": opts.seed, "progress": opts.progress, "batch": RANKER_BATCH}
        tuned = None
        # Early stopping watches a seeded quarter of the validation lists; the other three
        # quarters train beside the cut lists, as all of them do in the refit (trained on cut
        # lists alone, the ranker peaked after one epoch and that undertrained the refit).
        stop = [zlib.crc32(f"stop:{u}".encode()) % 4 == 0 for u in ranker_users]
        watched = [l for l, s in zip(valid_lists, stop) if s]
        taught = [l for l, s in zip(valid_lists, stop) if not s]
        if any(l.labels.any() for l in train_lists + taught) and any(l.labels.any() for l in watched):
            tuned = train_ranker(new_model(), train_lists + taught, epochs=opts.epochs, valid=watched,
                                 patience=RANKER_PATIENCE, **train_args)
            epochs = max(tuned.best_epoch, 1)
        else:   # too little data to hold lists out: train on everything for the fixed epochs
            epochs = opts.epochs
        model = new_model()
        final = train_ranker(model, train_lists + valid_lists, epochs=epochs, **train_args)
        use_cf_tables(model, cf.item_factors, cf.gram)   # served with the outer tables
        losses = final.losses
        manifest["ranker"] = {
            "lists": len(train_lists) + len(valid_lists), "cut_lists": n_cut,
            "valid_lists": len(valid_lists), "early_stopping_lists": len(watched),
            "cuts_per_user": RANKER_CUTS, "cut_weight": RANKER_CUT_WEIGHT,
            "cut_lists_from": f"inner tables without the cut spans ({int(held.sum())} of {int(tr.sum())} "
                              "training interactions held out; offline/inner_tables.py)",
            "max_epochs": opts.epochs, "epochs_chosen": epochs, "refit": tuned is not None,
            "refit_on": "train+valid" if tuned else "all lists (no early stopping: too few lists)",
            "valid_ndcg@10": [round(v, 5) for v in tuned.valid_ndcg] if tuned else None}
        model_dir = staging / "model"
        model_dir.mkdir()
        scripted = script_ranker(model, model_dir / RANKER_WEIGHTS)
        test_lists = _lists(retriever, hist_seq, test_t, rerank_users)
        eager, script = score_lists(model, test_lists[:20]), score_lists(scripted, test_lists[:20])
        quality["torchscript_max_abs_diff"] = float(max((np.abs(a - b).max() for a, b in zip(eager, script)), default=0))
        fused_test = score_lists(scripted, test_lists)
        quality["ranker_auc"] = _mean_auc(fused_test, test_lists)
        quality["popularity_auc"] = _mean_auc([popularity[l.candidates] for l in test_lists], test_lists)
        quality["retrieval_order_auc"] = _mean_auc([-np.arange(len(l.candidates), dtype=np.float32) for l in test_lists], test_lists)
        if impression_test:   # MIND's group AUC over held-out impressions
            quality["impression_auc"] = _mean_auc(score_lists(scripted, impression_test), impression_test)
            quality["impression_popularity_auc"] = _mean_auc(
                [popularity[l.candidates] for l in impression_test], impression_test)
            figures["imp_auc"] = f"{quality['impression_auc']:.3f}"
        if tuned:
            figures["valid_ndcg"] = f"{max(tuned.valid_ndcg):.3f}@{epochs}"
        figures.update(lists=str(len(train_lists) + len(valid_lists)), loss=f"{losses[0]:.3f}->{losses[-1]:.3f}",
                       auc=f"{quality['ranker_auc']:.3f}", pop_auc=f"{quality['popularity_auc']:.3f}")

    with stages.stage("reranker", figures := {}):
        rr_lists = _lists(retriever, train_seq, valid_t, rerank_users)
        # Score fusion first (core.blend: the fused order blended with the strongest channel's, as
        # chosen on these lists); the re-ranker then trains on and corrects the served score.
        rr_fused = score_lists(scripted, rr_lists)
        blend, blend_rows = choose_blend(rr_lists, rr_fused, popularity)
        manifest["blend"] = {**blend.describe(), "lists": len(rr_lists), "valid_ndcg@10": blend_rows}
        rr_scores = [blend.apply(s, l.features, untrained(l.candidates, popularity)) for s, l in zip(rr_fused, rr_lists)]

        # Trees on or off and the diversity weight, chosen by cross-validation over these lists
        # (offline.reranker.cross_validated_choice); the served booster trains on all of them.
        booster, chosen = cross_validated_choice(rr_lists, rr_scores, item_text, item_category, item_side,
                                                 seed=opts.seed, progress=opts.progress)
        booster.save_model(str(staging / "reranker.txt"))
        manifest["reranker"] = chosen
        # The test-list figures below are at the served configuration (reported, never chosen on).
        reranker = DiversityReranker(booster if chosen["trees"] else NoCorrection(), item_text, item_category,
                                     item_side, float(chosen["diversity_weight"]))
        # Fresh slots (core.fresh, offline/fresh.py): chosen on the same lists, at the served slates.
        no_history = np.zeros(0, np.int64)
        fresh, fresh_report = choose_fresh_slots(
            FreshItems(FRESH_CANDIDATES, 0),
            [reranker.rerank(l.candidates, s, l.features, 10) for l, s in zip(rr_lists, rr_scores)],
            [(l.candidates, s) for l, s in zip(rr_lists, rr_scores)], [valid_t[u] for u in rerank_users],
            [retriever.channel_results(u, train_seq.get(u, no_history), no_history, 10, ["bert"])["bert"].items
             for u in rerank_users], popularity)
        manifest["fresh"] = {**fresh.describe(), **fresh_report}
        reranker.fresh = fresh
        fused_ndcg, rerank_ndcg, fused_ild, rerank_ild = [], [], [], []
        for lst, scores in zip(test_lists, fused_test):
            relevant = set(lst.candidates[lst.labels > 0].tolist())
            by_fused = lst.candidates[np.argsort(-scores, kind="stable")[:10]]
            served = blend.apply(scores, lst.features, untrained(lst.candidates, popularity))
            slate, _ = reranker.rerank(lst.candidates, served, lst.features, 10)
            fused_ndcg.append(ndcg_at_k(by_fused.tolist(), relevant, 10))
            rerank_ndcg.append(ndcg_at_k(slate.tolist(), relevant, 10))
            fused_ild.append(intra_list_diversity(item_text[by_fused]))
            rerank_ild.append(intra_list_diversity(item_text[slate]))
        quality.update({"fused_ndcg@10": float(np.mean(fused_ndcg)), "reranked_ndcg@10": float(np.mean(rerank_ndcg)),
                        "fused_ild@10": float(np.mean(fused_ild)), "reranked_ild@10": float(np.mean(rerank_ild))})
        figures.update(lists=str(chosen["lists"]), folds=str(chosen["folds"]), rounds=str(chosen["rounds"]),
                       ndcg=f"{quality['fused_ndcg@10']:.3f}->{quality['reranked_ndcg@10']:.3f}",
                       ild=f"{quality['fused_ild@10']:.3f}->{quality['reranked_ild@10']:.3f}",
                       weight=f"{chosen['diversity_weight']:g}", trees=str(chosen["trees"]).lower(),
                       blend=f"{blend.channel}:{blend.alpha:g}" if blend.active else "none",
                       fresh_slots=str(fresh.slots))

    with stages.stage("refit", figures := {}):
        # Everything above was tuned with tables fitted on the training split; the served CF model,
        # its index, the item-to-item neighbours and the counts are fitted again on train + valid,
        # so that they know the newest interactions before the test period (the references of
        # `fusionrec eval` fit on the same), and the ranker takes the refitted CF tables.
        seen = split.train | split.valid
        served_tables = fit_tables(staging, ds.users[seen], inter_items[seen], ds.timestamps[seen], len(item_ids),
                                   opts.cf_factors, opts.seed, neighbour_config, progress=opts.progress)
        manifest.update(refitted_manifest(manifest, served_tables))
        quality[f"index_cf_recall@{RECALL_K}"] = served_tables.index_recall
        manifest["served_tables"] = {"fitted_on": "train+valid", "tuned_on": "train",
                                     "refitted": list(REFITTED), "interactions": int(seen.sum())}
        use_cf_tables(model, served_tables.cf.item_factors, served_tables.cf.gram)
        script_ranker(model, model_dir / RANKER_WEIGHTS)
        figures.update(interactions=str(int(seen.sum())), cf_users=str(len(served_tables.cf_users)),
                       cf_recall=f"{served_tables.index_recall:.3f}")

    with stages.stage("publish", figures := {}):
        model_src = staging / "model"
        manifest["quality"] = quality
        manifest["stages"] = [{"stage": n, "seconds": round(s, 2), "peak_mib": round(m)} for n, s, m, _ in stages.rows]
        model_version_dir = publish_fused_ranker(opts.model_repo, model_src / RANKER_WEIGHTS, version)
        manifest["models"][TEXT_ENCODER_NAME] = publish_text_encoder(opts.model_repo, encoder)
        if (staging / SEQ_ENCODER_WEIGHTS).exists():   # Triton serves it to retrieval (retrieval/seq_encoder.py)
            publish_seq_encoder(opts.model_repo, staging / SEQ_ENCODER_WEIGHTS, version)
            manifest["models"][SEQ_ENCODER_NAME] = str(version)
        shutil.rmtree(model_src)
        manifest["model_checksum"] = weights_checksum(model_version_dir / RANKER_WEIGHTS)   # the weights, not the bytes
        write_manifest(staging, manifest)
        final = publish(opts.artifacts, staging, version)
        figures.update(version=str(version), path=str(final))
    print(stages.table())
    return final


def _ensure(path: Path) -> Path:
    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


def data_fingerprint(item_ids: list[str], ds: datasets.Dataset) -> str:
    digest = hashlib.sha256()
    digest.update("\n".join(item_ids).encode())
    digest.update(ds.timestamps.tobytes())
    digest.update("\n".join(ds.users.tolist()).encode())
    return digest.hexdigest()[:16]


def _mean_auc(scores: list[np.ndarray], lists: list[RankingList]) -> float:
    values = [auc(s, l.labels) for s, l in zip(scores, lists) if 0 < l.labels.sum() < len(l.labels)]
    return float(np.mean(values)) if values else float("nan")

