"""Quality report output: quality.json, quality.md (tables and verdicts) and PNG plots.

Input is the report dict tools.evaluate assembles (the same object goes to quality.json), so the
markdown can be re-rendered from a saved quality.json.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

SYSTEM_LABELS = {
    "popular": "most popular", "ease": "EASE (reference)", "itemknn": "ItemKNN (reference)",
    "als": "ALS, fold-in (reference)", "bpr": "BPR (reference)", "cf_only": "CF only (ALS channel)", "bert_only": "BERT only (content channel)",
    "item2item_only": "item-to-item only (channel)",
    "retrieval_order": "retrieval order (no ranker)", "fused_ranker": "fused ranker, no re-ranker",
    "full_pipeline": "full pipeline (gateway)"}
MAIN_COLUMNS = ("hr@10", "ndcg@10", "mrr@10", "recall@10", "ild@10", "category_coverage@10",
                "catalog_coverage", "novelty_norm")


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: numbers rounded, NaN/None as an en dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{value:.{digits}f}" if isinstance(value, (float, np.floating)) else str(value)


def pct(value: float | None) -> str:
    """A share as a percentage with one decimal."""
    return "–" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _system_rows(systems: dict[str, dict[str, float]], columns: tuple[str, ...] = MAIN_COLUMNS) -> list[list[Any]]:
    return [[SYSTEM_LABELS.get(name, name), *[s.get(c) for c in columns], s.get("users")]
            for name, s in systems.items()]


def render_markdown(report: dict[str, Any]) -> str:
    """The whole quality.md from the report dict."""
    r = report
    counts, verdict = r["counts"], r["verdict"]
    best = verdict["best_ndcg@10"]
    rr = verdict["reranker"]
    out = [f"# Offline quality report: {r['dataset']}", "",
           f"Artifact set {r['artifact_version']} (`{r['data_spec']}`), evaluated {r['created']} on the held-out "
           f"test split (per-user time split, newest 10% of each user's interactions). "
           f"{fmt(counts['users'])} test users, {fmt(counts['positives'])} test positives"
           + (f", {fmt(counts['impressions'])} held-out impressions" if counts.get("impressions") else "") + ".",
           "", "## Verdict", "",
           *_reference_line(r),
           f"- **Best on nDCG@10: {SYSTEM_LABELS.get(best, best)}** "
           f"({fmt(r['systems'][best]['ndcg@10'])} ± {fmt(r['systems'][best]['ndcg@10_ci95'])}, 95% interval)"
           + _runner_up(verdict.get("winner")),
           f"- Full pipeline vs fused ranker alone: nDCG@10 {_delta(rr['ndcg@10_delta'])}, "
           f"ILD@10 {_delta(rr['ild@10_delta'])} (paired bootstrap over users). "
           f"**The LightGBM re-ranker {'earns' if rr['earns_its_place'] else 'does not earn'} its place: {rr['why']}.**",
           f"- Replay check: the gateway's slate equals the in-process re-rank of the same candidates and "
           f"fused scores for {fmt(100 * r['serving_check']['gateway_matches_replay'], 1)}% of users; "
           f"{fmt(r['serving_check']['degraded_requests'])} degraded responses.",
           "", "## End to end (top 10)", "",
           table(["system", *MAIN_COLUMNS, "users"], _system_rows(r["systems"])), "",
           "HR/nDCG/MRR/recall are means over test users; ILD is the mean pairwise BERT cosine distance in "
           "a slate; category coverage is distinct categories / 10; catalog coverage is the share of the "
           "catalog shown to anyone; novelty_norm is the mean popularity rank / catalog size "
           "(0 = the most popular items, 1 = the long tail).", "",
           *_references_section(r),
           "## Retrieval", "",
           table(["list", *[f"recall@{d}" for d in r["config"]["recall_depths"]]],
                 [[name, *vals.values()] for name, vals in r["retrieval"].items() if name != "unretrieved"]), "",
           f"Test positives that no channel retrieves in its top {max(r['config']['recall_depths'])}: "
           f"{pct(_first(r['retrieval']['unretrieved']))}; not among the merged candidates: "
           f"{pct(r['retrieval']['unretrieved']['not_in_merged'])}.", "", "![recall](recall_at_k.png)", "",
           "## Re-ranker diversity weight", "",
           f"Served weight: {r['config']['served_diversity_weight']}{_served_from(r)}. For scale: the full "
           f"pipeline's nDCG@10 has a 95% interval of ± {fmt(r['systems']['full_pipeline']['ndcg@10_ci95'])}; "
           "smaller differences between weights are noise.", "",
           table(["weight", "ndcg@10", "hr@10", "ild@10", "category_coverage@10", "novelty_norm"],
                 [[_weight_label(row["weight"], r['config']['served_diversity_weight']), row["ndcg@10"],
                   row["hr@10"], row["ild@10"], row["category_coverage@10"], row["novelty_norm"]]
                  for row in r["diversity_sweep"]]), "",
           *_build_sweep(r.get("build_reranker")),
           "![diversity vs nDCG](diversity_vs_ndcg.png)", ""]
    out += _cold_start(r)
    if r.get("impressions"):
        out += ["## MIND impression metrics (held-out impressions, averaged per impression)", "",
                table(["scorer", "auc", "mrr", "ndcg@5", "ndcg@10", "impressions"],
                      [[name, m["auc"], m["mrr"], m["ndcg@5"], m["ndcg@10"], m["impressions"]]
                       for name, m in r["impressions"].items()]), ""]
    out += ["## How this was measured", "", *[f"- {line}" for line in r["method"]], ""]
    return "\n".join(out)


def _cold_start(r: dict[str, Any]) -> list[str]:
    cold = r["cold_start"]
    out = ["## Cold start", ""]
    short = cold["short_history_users"]
    out.append(f"**Users with ≤ {short['max_train_items']} training items** ({fmt(short['users'])} users):")
    out += ["", table(["system", "hr@10", "ndcg@10", "mrr@10", "users"],
                      [[SYSTEM_LABELS.get(n, n), s["hr@10"], s["ndcg@10"], s["mrr@10"], s["users"]]
                       for n, s in short["systems"].items()]) if short["users"] else "(none in this data)", ""]
    sim = cold["simulated_cold_users"]
    if sim:
        out += [f"**Simulated cold users**: the same test users served anonymously with only their "
                f"{sim['history_len']} most recent items (older ones excluded from the slate):", "",
                table(["system", "hr@10", "ndcg@10", "mrr@10", "ild@10", "users"],
                      [[SYSTEM_LABELS.get(n, n), s["hr@10"], s["ndcg@10"], s["mrr@10"], s["ild@10"], s["users"]]
                       for n, s in sim["systems"].items()]), ""]
    items = cold["cold_items"]
    out += [f"**Test positives unseen in training** ({fmt(items['positives'])} positives of "
            f"{fmt(items['users'])} users): recall of those items", ""]
    if items["users"]:
        out += [table(["system", "recall@10"], [[SYSTEM_LABELS.get(n, n), v] for n, v in items["systems"].items()]),
                "", table(["retrieval list", "recall@300"], [[n, v] for n, v in items["retrieval"].items()]), ""]
    return out + _fresh_choice(r.get("build_fresh"))


def _fresh_choice(fresh: dict[str, Any] | None) -> list[str]:
    """The build's fresh-slot choice (manifest "fresh", offline/fresh.py), when it made one."""
    if not fresh or "valid" not in fresh:
        return []
    rows = [[row["slots"], row["ndcg@10"], row["unseen_recall@10"]] for row in fresh["valid"]]
    return [f"**Fresh items** (core/fresh.py): every candidate list carries the BERT list's first "
            f"{fresh['candidates']} items without training interactions; the build chose "
            f"**{fresh['slots']} fresh slot(s)** on {fmt(fresh['lists'])} validation lists "
            f"({fmt(fresh['lists_with_unseen'])} with unseen positives; the BERT channel's own top 10 recalls "
            f"{fmt(fresh['bert_unseen_recall@10'])} of them): the fewest slots reaching that recall within "
            f"{fmt(100 * fresh['max_ndcg_cost'], 0)}% of the nDCG@10 of none. The ranking service's "
            "--fresh-slots overrides it.", "",
            table(["slots", "validation ndcg@10", "unseen recall@10"], rows), ""]


def _reference_line(r: dict[str, Any]) -> list[str]:
    """The headline: the full pipeline against the best reference recommender on nDCG@10."""
    v = r["verdict"].get("references")
    if not v or not v.get("best_reference"):
        return []
    best, system = v["best_reference"], v["system"]
    name = SYSTEM_LABELS.get(best, best).replace(" (reference)", "")
    if best == "ease" and (r.get("references") or {}).get("ease", {}).get("lambda") is not None:
        name += f" (λ={r['references']['ease']['lambda']:g})"
    said = {"beats": "beats", "loses": "loses to", "ties": "does not measurably differ from"}[v["outcome"]]
    return [f"- **Against the references: the {SYSTEM_LABELS.get(system, system)} {said} the best reference, "
            f"{name}**, on nDCG@10: {fmt(r['systems'][system]['ndcg@10'])} vs {fmt(r['systems'][best]['ndcg@10'])} "
            f"(×{fmt(v['ratio'], 2)}), difference {_delta(v['delta'])} (paired bootstrap over users; "
            + ("the interval excludes zero)." if v["outcome"] != "ties" else "the interval includes zero).")]


def _references_section(r: dict[str, Any]) -> list[str]:
    info = r.get("references")
    if not info:
        return []
    training = info.get("training", {})
    ease, knn = info.get("ease", {}), info.get("itemknn", {})

    def items(entry: dict[str, Any]) -> str:
        n = entry.get("restricted_to_items")
        return "the whole catalog" if n is None else f"only the {n:,} most popular items (the catalog is larger)"
    grid = ", ".join(f"{float(lam):g} → {fmt(v)}" for lam, v in ease.get("validation_ndcg@10", {}).items())
    rows = [
        ["EASE", f"λ = {fmt(ease.get('lambda'), 0)} (validation nDCG@10 by λ: {grid}); {items(ease)}",
         ease.get("fit_seconds")],
        ["ItemKNN", f"cosine, {fmt(knn.get('neighbours'))} neighbours per item; {items(knn)}", knn.get("fit_seconds")],
        ["ALS", f"{fmt(info.get('als', {}).get('factors'))} factors; user folded in from the history "
                "(implicit recalculate_user)", info.get("als", {}).get("fit_seconds")],
        ["BPR", f"{fmt(info.get('bpr', {}).get('factors'))} factors; user = mean of the history's item "
                "factors, plus the item bias", info.get("bpr", {}).get("fit_seconds")],
        ["most popular", "the popular channel's list (training counts)", None]]
    return ["## Reference recommenders", "",
            f"Fitted on every non-test interaction (train + valid: {_count(training.get('interactions'))} "
            f"interactions of {_count(training.get('users'))} users), scored on the same test users, histories and "
            "positives as the pipeline, seen items removed.", "",
            table(["reference", "settings", "fit seconds"],
                  [[*row[:2], "–" if row[2] is None else f"{row[2]:.1f}"] for row in rows]), ""]


def _count(value: Any) -> str:
    return "–" if value is None else f"{int(value):,}"


def _runner_up(winner: dict[str, Any] | None) -> str:
    """'; runner-up X: difference [interval], a clear win | not a measurable difference.'"""
    if not winner or not winner.get("runner_up"):
        return "."
    name = SYSTEM_LABELS.get(winner["runner_up"], winner["runner_up"])
    return (f"; runner-up {name}: difference {_delta(winner['delta'])} (paired bootstrap), "
            + ("a clear win." if winner["clear"] else "**not a measurable difference**."))


def _delta(d: dict[str, float]) -> str:
    return f"{d['delta']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"


def _first(d: dict[str, float]) -> float:
    return next(v for k, v in d.items() if k.startswith("no_channel"))


# ---------------------------------------------------------------- plots

def plot_recall_curves(curves: dict[str, np.ndarray], path: Path) -> None:
    """curves: list name -> mean recall@K [K_max] for K = 1..K_max."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for name, curve in curves.items():
        ax.plot(np.arange(1, len(curve) + 1), curve, label=name, lw=2.2 if name == "merged" else 1.5)
    ax.set_xlabel("K (candidates)")
    ax.set_ylabel("recall@K of test positives")
    ax.set_title("Retrieval recall by channel")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _weight_label(weight: float, served: float) -> str:
    return f"{fmt(weight)} (served)" if weight == served else fmt(weight)


def _served_from(r: dict[str, Any]) -> str:
    """Where the served weight came from (reports written before the build chose it say nothing)."""
    source = r["config"].get("served_diversity_weight_from")
    trees = "" if r["config"].get("rerank_trees", True) else "; LightGBM corrections off (they lowered validation nDCG@10)"
    if source == "build":
        return f" (chosen by the build on validation{trees})"
    return f" (set by --diversity-weight{trees})" if source == "flag" else ""


def _build_sweep(chosen: dict[str, Any] | None) -> list[str]:
    """The build's own validation sweep, from which it chose the weight (offline.reranker.choose_reranking)."""
    if not chosen or not chosen.get("sweep"):
        return []
    fused = chosen.get("fused_valid", {})
    rows = [["fused order", "-", fused.get("ndcg@10"), fused.get("ild@10")]]
    for label, key in (("trees", "sweep"), ("no trees", "sweep_no_trees")):
        rows += [[label, _weight_label(row["weight"], chosen["diversity_weight"])
                  if (key == "sweep") == bool(chosen["trees"]) else fmt(row["weight"]),
                  row["ndcg@10"], row["ild@10"]] for row in chosen.get(key, [])]
    return [f"The build's choice on {chosen.get('lists')} validation lists ({chosen.get('lists_source')}): "
            f"the largest ILD@10 gain within {chosen.get('ndcg_tolerance', 0.02):.0%} of the sweep's best "
            f"nDCG@10; {chosen.get('why', '')}.", "",
            table(["re-ranker", "weight", "ndcg@10 (valid)", "ild@10 (valid)"], rows), ""]


def plot_diversity_vs_ndcg(sweep: list[dict[str, float]], systems: dict[str, dict[str, float]],
                           served_weight: float, path: Path) -> None:
    """nDCG@10 against ILD@10 as the re-ranker's diversity weight varies; reference systems marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    x = [row["ild@10"] for row in sweep]
    y = [row["ndcg@10"] for row in sweep]
    ax.plot(x, y, "o-", label="re-ranker, weight varied")
    # Label a point only where it stands apart from the last labelled one (small weights crowd).
    span_x, span_y = (max(x) - min(x)) or 1.0, (max(y) - min(y)) or 1.0
    last: tuple[float, float] | None = None
    for row in sweep:
        here = (row["ild@10"], row["ndcg@10"])
        served = row["weight"] == served_weight
        if last is None or served or max(abs(here[0] - last[0]) / span_x, abs(here[1] - last[1]) / span_y) > 0.12:
            label = f"w={row['weight']:g}" + (" (served)" if served else "")
            ax.annotate(label, here, textcoords="offset points", xytext=(4, -10 if served else 4), fontsize=8)
            last = here
    for name, marker in (("fused_ranker", "s"), ("full_pipeline", "*")):   # retrieval order would squash the axes
        if name in systems:
            ax.plot(systems[name]["ild@10"], systems[name]["ndcg@10"], marker, ms=9,
                    label=SYSTEM_LABELS.get(name, name))
    ax.set_xlabel("intra-list diversity @10 (mean pairwise BERT distance)")
    ax.set_ylabel("nDCG@10")
    ax.set_title("Diversity versus accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_systems(systems: dict[str, dict[str, float]], path: Path) -> None:
    """nDCG@10 per system with its 95% interval."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(systems)
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    ax.barh([SYSTEM_LABELS.get(n, n) for n in names], [systems[n]["ndcg@10"] for n in names],
            xerr=[np.nan_to_num(systems[n]["ndcg@10_ci95"]) for n in names], color="#4c72b0", capsize=3)
    ax.invert_yaxis()
    ax.set_xlabel("nDCG@10 (95% interval)")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(report: dict[str, Any], curves: dict[str, np.ndarray], out: Path) -> list[Path]:
    """Write quality.json, quality.md and the PNGs into out/; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "quality.json", out / "quality.md", out / "recall_at_k.png",
             out / "diversity_vs_ndcg.png", out / "ndcg_by_system.png"]
    paths[0].write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n")
    paths[1].write_text(render_markdown(report))
    plot_recall_curves(curves, paths[2])
    plot_diversity_vs_ndcg(report["diversity_sweep"], report["systems"],
                           report["config"]["served_diversity_weight"], paths[3])
    plot_systems(report["systems"], paths[4])
    return paths


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None (strict JSON), numpy scalars -> Python numbers, float keys -> strings."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value
