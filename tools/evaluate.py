"""Offline evaluation of a built artifact set on its held-out test split, through the serving stack.

  fusionrec eval --artifacts artifacts --model-repo model_repository --max-users 300

Fits reference recommenders (offline.references: EASE with λ tuned on validation, ItemKNN, ALS,
BPR) on every non-test interaction, starts the real system (Triton + retrieval + ranking + gateway,
tools.stack.Stack), replays test users through it (tools.eval_replay), scores the references on the
same users, histories and positives, compares every system side by side (the verdict: the full
pipeline against the best reference), sweeps the re-ranker's diversity weight (served: the build's
choice from the manifest, as the ranking service does, unless --diversity-weight), repeats the replay
for simulated cold users, scores held-out MIND impressions when the data has them, and writes
reports/<dataset>/quality.{md,json} + PNG plots.
"""
from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from common.artifacts import open_artifacts
from common.logs import get_logger
from offline import eval_aggregate as agg
from offline.eval_testset import EvalSet, ImpressionCase, TestUser, load_eval_set, sample, served_history
from offline.references import DEFAULT_MAX_ITEMS, FittedReferences, fit_references
from offline.report import write_report
from ranking.ranker import served_reranking
from tools.eval_replay import DEPTH, StackReplayer
from tools.stack import Stack

log = get_logger("offline.evaluate")
SWEEP_WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
SHORT_HISTORY = 5   # "short history" = at most this many training items


@dataclass(frozen=True)
class EvalOptions:
    artifacts: Path
    model_repo: Path
    out: Path | None = None               # default reports/<dataset>
    data: str | None = None               # default: the manifest's data_spec
    build_max_items: int | None = None    # the build's --max-items (default: the manifest's, if recorded)
    build_max_users: int | None = None
    max_users: int | None = None          # test users replayed (deterministic sample)
    max_impressions: int | None = 2000
    cold_history: int = SHORT_HISTORY     # simulated cold users keep this many recent items; 0 = skip
    diversity_weight: float | None = None   # None: the build's choice (manifest), as the ranking service serves
    sweep_weights: tuple[float, ...] = SWEEP_WEIGHTS
    run_dir: Path | None = None           # process logs (default: a temporary folder, removed after)
    progress: bool = True
    references: bool = True               # fit and score the reference recommenders
    reference_max_items: int | None = DEFAULT_MAX_ITEMS   # EASE / ItemKNN keep the most popular N items
    insecure_dev: bool = False            # start the stack without TLS and tokens


def evaluate(opts: EvalOptions) -> Path:
    """Run the whole evaluation; returns the folder the report was written to."""
    faiss.omp_set_num_threads(1)   # as the retrieval service; the services share the cores
    artifacts = open_artifacts(opts.artifacts)
    manifest = artifacts.manifest
    # The served weight: the build's choice unless --diversity-weight overrides it (ranking gets the flag).
    weight_from = "flag" if opts.diversity_weight is not None and opts.diversity_weight >= 0 else "build"
    trees, served_weight = served_reranking(manifest, opts.diversity_weight)
    opts = replace(opts, diversity_weight=served_weight)
    build_opts = manifest.get("build_options", {})
    data_spec = opts.data or manifest["data_spec"]
    max_items = opts.build_max_items if opts.build_max_items is not None else build_opts.get("max_items")
    max_users = opts.build_max_users if opts.build_max_users is not None else build_opts.get("max_users")
    evalset = load_eval_set(artifacts, data_spec, max_items, max_users)
    users = sample(evalset.users, opts.max_users)
    cases = _spread(evalset.impressions, opts.max_impressions)
    out = opts.out or Path("reports") / manifest["dataset"]
    log.info("evaluating", extra={"artifact_version": artifacts.version, "users": len(users),
                                  "impressions": len(cases), "out": str(out)})
    started = time.monotonic()
    # References first: they need the cores (BLAS) while the stack is not yet running.
    fitted = (fit_references(evalset.interactions.train, evalset.interactions.valid, opts.reference_max_items,
                             progress=opts.progress) if opts.references else None)
    # Process logs go to --run-dir when given, else to a folder removed afterwards (a failed start
    # raises with the failing process's last log lines anyway).
    with tempfile.TemporaryDirectory(prefix="fusionrec-eval-") as scratch, \
            Stack(opts.artifacts, opts.model_repo, opts.run_dir or Path(scratch),
                  ranking_args=["--diversity-weight", str(served_weight)] if weight_from == "flag" else [],
                  insecure_dev=opts.insecure_dev) as stack:
        main, cold, scored = asyncio.run(_replay(artifacts, stack, evalset, users, cases, opts))
    if fitted is not None:
        add_reference_slates(fitted, users, main, None, opts.progress)
        add_reference_slates(fitted, users, cold, opts.cold_history, opts.progress)
    tables = agg.ItemTables(artifacts.npy("item_text.npy"), artifacts.npy("item_category.npy"), evalset.train_counts)
    report, curves = assemble(evalset, tables, artifacts.manifest, data_spec, main, cold, scored, opts,
                              fitted.info if fitted is not None else None)
    report["config"]["seconds"] = round(time.monotonic() - started, 1)
    report["config"].update(served_diversity_weight_from=weight_from, rerank_trees=trees)
    report["build_reranker"] = manifest.get("reranker")   # the build's validation sweep and choice
    report["build_fresh"] = manifest.get("fresh")         # the build's fresh-slot choice (offline/fresh.py)
    for path in write_report(report, curves, out):
        log.info("written", extra={"path": str(path)})
    return out


async def _replay(artifacts, stack: Stack, evalset: EvalSet, users: list, cases: list[ImpressionCase],
                  opts: EvalOptions) -> tuple[list[agg.UserResult], list[agg.UserResult], list]:
    weights = tuple(sorted({*opts.sweep_weights, opts.diversity_weight}))
    async with StackReplayer(artifacts, stack, opts.diversity_weight, weights) as replayer:
        main = [await replayer.user(u, evalset.train_counts)
                for u in tqdm(users, desc="test users", unit="user", disable=not opts.progress)]
        cold = [await replayer.user(u, evalset.train_counts, history_len=opts.cold_history, anonymous=True,
                                    sweep=False)
                for u in tqdm(users if opts.cold_history else [], desc=f"cold users (last {opts.cold_history})",
                              unit="user", disable=not opts.progress)]
        scored = [(await replayer.impression(c), c.labels)
                  for c in tqdm(cases, desc="impressions", unit="imp", disable=not opts.progress)]
    return main, cold, scored


def add_reference_slates(fitted: FittedReferences, users: list[TestUser], results: list[agg.UserResult],
                         history_len: int | None, progress: bool = False) -> None:
    """Each reference's slate for each replayed user, into results[j].slates[name].

    The reference sees what the gateway was sent (tools.eval_replay: the same history, cut to the
    API's limit or to history_len for simulated cold users) and, like the gateway, never recommends
    an item of the user's whole history."""
    if not results:
        return
    histories = [served_history(u.history, history_len)[0] for u in users]
    excludes = [u.history for u in users]
    for name, model in tqdm(fitted.models.items(), desc="reference slates" + (" (cold)" if history_len else ""),
                            unit="model", disable=not progress):
        for result, slate in zip(results, model.recommend(histories, excludes, agg.SLATE_K), strict=True):
            result.slates[name] = slate


def assemble(evalset: EvalSet, tables: agg.ItemTables, manifest: dict[str, Any], data_spec: str,
             main: list[agg.UserResult], cold: list[agg.UserResult],
             scored: list[tuple[dict[str, np.ndarray], np.ndarray]], opts: EvalOptions,
             references: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Per-user results -> (the report dict written to quality.json, recall curves for the plot).

    references: offline.references.FittedReferences.info (None: no reference was fitted, and the
    report's systems are the pipeline's own and popular)."""
    names = tuple(n for n in agg.SYSTEMS if not main or n in main[0].slates)
    systems, per_user = agg.system_table(main, tables, names)
    retrieval, curves = agg.retrieval_table(main)
    short = [r for r in main if r.n_train <= SHORT_HISTORY]
    short_systems = agg.system_table(short, tables, names)[0] if short else {}
    cold_systems = agg.system_table(cold, tables, names)[0] if cold else {}
    checks = [r.matches_gateway for r in main if r.matches_gateway is not None]
    degraded = Counter(reason for r in (*main, *cold) for reason in r.degraded)
    report: dict[str, Any] = {
        "dataset": manifest["dataset"], "artifact_version": str(manifest["version"]), "data_spec": data_spec,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": {"k": agg.SLATE_K, "recall_depths": list(agg.RECALL_DEPTHS), "max_users": opts.max_users,
                   "served_diversity_weight": opts.diversity_weight, "cold_history": opts.cold_history,
                   "short_history_max_train_items": SHORT_HISTORY, "candidates": DEPTH},
        "counts": {"users": len(main), "test_users_available": len(evalset.users),
                   "positives": sum(len(r.relevant) for r in main), "impressions": len(scored),
                   "items": len(evalset.item_ids)},
        "systems": systems,
        "retrieval": retrieval,
        "diversity_sweep": agg.sweep_table(main, tables),
        "cold_start": {
            "short_history_users": {"max_train_items": SHORT_HISTORY, "users": len(short), "systems": short_systems},
            "simulated_cold_users": {"history_len": opts.cold_history, "anonymous": True,
                                     "systems": cold_systems} if cold else None,
            "cold_items": agg.cold_item_table(main, names)},
        "impressions": agg.impression_table(scored) if scored else None,
        "serving_check": {"gateway_matches_replay": float(np.mean(checks)) if checks else float("nan"),
                          "degraded_requests": sum(1 for r in (*main, *cold) if r.degraded),
                          "degraded_reasons": dict(degraded)},
        "references": references,
        "verdict": {"references": agg.reference_verdict(systems, per_user),
                    "best_ndcg@10": agg.best_system(systems), "winner": agg.winner_verdict(systems, per_user),
                    "reranker": agg.reranker_verdict(per_user)},
        "build_quality": manifest.get("quality", {}),
        "method": METHOD,
    }
    return report, curves


METHOD = [
    "Split: offline.split.dataset_split recomputed from the same data and subset options as the build "
    "(checked against the manifest's data fingerprint and split rule): MIND's own train/dev folders when "
    "both are given (test = dev clicks), else the per-user time split (newest 10% of each user's items); "
    "history = train + valid items, oldest first; positives = test items not already in the history.",
    "full_pipeline: the gateway's Recommend(user_id, k=10, history_item_ids=history) on the running "
    "stack (Triton + retrieval + ranking + gateway); at most 1,000 history ids (the API limit), older ones "
    "sent as exclude_item_ids.",
    "References (offline.references), each fitted on every train + valid interaction of the split: "
    "EASE (Steck 2019, B = I - P·diag(1/diag(P)), P = (XᵀX + λI)⁻¹; λ from a grid by validation nDCG@10 "
    "with the model fitted on train and scored on train histories, then refitted on train + valid), "
    "ItemKNN (cosine over item co-occurrence, each item's top-N neighbours, score = sum of the "
    "similarities to the history), ALS (implicit, 64 factors, the CF channel's settings; the user vector "
    "folded in from the history by implicit's recalculate_user), BPR (implicit, 64 factors; implicit has "
    "no BPR fold-in, so the user vector is the mean of the history's item factors, plus the item bias). "
    "Each scores the history sent to the gateway and never recommends an item of the user's whole "
    "history; popular is the popular channel's list (training counts). EASE and ItemKNN keep the most "
    "popular N items of larger catalogs (the References section says when). Full pipeline vs the best "
    "reference: paired bootstrap over users (2,000 resamples).",
    "retrieval_order: the Retrieval service's merged candidates (300) for the same request, first 10; "
    "fused_ranker: those candidates scored by fused_ranker on Triton, top 10 by score.",
    "bert_only / cf_only / item2item_only / popular and per-channel recall: each channel's own list at depth 300, computed in "
    "process by core.channels on the same artifact set (the code and FAISS indexes the service runs).",
    "Diversity sweep: core.rerank.DiversityReranker in process over the Triton fused scores; at the "
    "served weight it must reproduce the gateway's slate (the replay check).",
    "Simulated cold users: the same users, anonymous (CF vector folded in from the history), with only "
    "their most recent items as history; older items excluded so they are not recommended again.",
    "Impressions (MIND only): the dev folder's (or, from one folder, the newest 20% by time), which the "
    "ranker never trained on; the shown items "
    "are scored by fused_ranker on Triton with the retrieval features the Retrieval service gives them.",
]


def _spread(values: list, limit: int | None) -> list:
    """At most `limit` values, evenly spaced (impressions are ordered by time)."""
    if not limit or limit >= len(values):
        return list(values)
    return [values[int(j)] for j in np.linspace(0, len(values) - 1, limit)]


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="<kind>:<path> the build read (default: the manifest's data_spec)")
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="artifact root (default: %(default)s)")
    p.add_argument("--model-repo", type=Path, default=Path("model_repository"),
                   help="Triton model repository (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="report folder (default: reports/<dataset>/)")
    p.add_argument("--max-users", type=_non_negative, default=None,
                   help="replay at most N test users (default: all)")
    p.add_argument("--max-impressions", type=_non_negative, default=2000,
                   help="held-out MIND impressions to score (default: %(default)s; 0 = all)")
    p.add_argument("--build-max-items", type=_non_negative, default=None,
                   help="the build's --max-items, if it used one (default: from the manifest when recorded)")
    p.add_argument("--build-max-users", type=_non_negative, default=None,
                   help="the build's --max-users, likewise")
    p.add_argument("--cold-history", type=int, default=SHORT_HISTORY,
                   help="simulated cold users keep this many recent items (default: %(default)s; 0 = skip)")
    p.add_argument("--diversity-weight", type=float, default=None,
                   help="serve this re-ranker diversity weight (default, or negative: the weight the build "
                        "chose on validation, from the manifest)")
    p.add_argument("--run-dir", type=Path, default=None, help="process logs (default: a temporary folder)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-references", action="store_true",
                   help="skip the reference recommenders (EASE, ItemKNN, ALS, BPR)")
    p.add_argument("--reference-max-items", type=_non_negative, default=DEFAULT_MAX_ITEMS,
                   help="EASE / ItemKNN keep the N most popular items of a larger catalog "
                        "(default: %(default)s; 0 = the whole catalog)")
    p.add_argument("--insecure-dev", action="store_true", help="start the stack without TLS and tokens")


def options_from(a: argparse.Namespace) -> EvalOptions:
    return EvalOptions(artifacts=a.artifacts, model_repo=a.model_repo, out=a.out, data=a.data,
                       build_max_items=a.build_max_items, build_max_users=a.build_max_users,
                       max_users=a.max_users or None, max_impressions=a.max_impressions or None,
                       cold_history=a.cold_history, diversity_weight=a.diversity_weight,
                       run_dir=a.run_dir, progress=not a.no_progress, references=not a.no_references,
                       reference_max_items=a.reference_max_items or None, insecure_dev=a.insecure_dev)


def run(args: argparse.Namespace) -> int:
    out = evaluate(options_from(args))
    print(f"report written: {out / 'quality.md'}")
    return 0
