"""Build stability: N builds of the same data with different seeds, each evaluated on the same test users.

Seed s builds into its own temporary artifact root (never your artifacts/), then `fusionrec eval`
replays the same deterministic sample of test users (--max-users) through a fresh stack on it.
Printed and written to reports/<dataset>/seeds.json: per seed the full pipeline's nDCG@10 and HR@10,
the fused ranker's nDCG@10, the best reference's nDCG@10 and the re-ranker weight the build chose;
then mean ± sd (sample sd over seeds) and whether the full pipeline's nDCG@10 sd meets the target
(≤ 0.003, issue 11). Unless --no-same-seed-check, seed 0 is built a second time and the two
artifact sets' sha256s (manifest "files" and the fused ranker's model checksum) are compared:
two builds with the same seed on one machine should be identical.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

TARGET_SD = 0.003
METRICS = ("full_pipeline_ndcg@10", "full_pipeline_hr@10", "fused_ranker_ndcg@10", "best_reference_ndcg@10")


def seed_result(seed: int, quality: dict[str, Any], manifest: dict[str, Any],
                build_s: float, eval_s: float) -> dict[str, Any]:
    """One seed's row, from its eval report (quality.json) and its build's manifest."""
    systems = quality["systems"]
    best = (quality.get("verdict") or {}).get("references", {}).get("best_reference")
    chosen = manifest.get("reranker") or {}
    return {"seed": seed, "artifact_version": str(manifest["version"]),
            "full_pipeline_ndcg@10": systems["full_pipeline"]["ndcg@10"],
            "full_pipeline_hr@10": systems["full_pipeline"]["hr@10"],
            "fused_ranker_ndcg@10": systems.get("fused_ranker", {}).get("ndcg@10"),
            "best_reference": best,
            "best_reference_ndcg@10": systems[best]["ndcg@10"] if best else None,
            "diversity_weight": chosen.get("diversity_weight"), "rerank_trees": chosen.get("trees"),
            "users": quality["counts"]["users"], "build_s": round(build_s, 1), "eval_s": round(eval_s, 1)}


def aggregate(rows: list[dict[str, Any]], target_sd: float = TARGET_SD) -> dict[str, Any]:
    """Mean and sample sd of each metric over the seeds; the target is on the full pipeline's nDCG@10
    sd (missed when fewer than two seeds: no sd to speak of)."""
    out: dict[str, Any] = {"seeds": [r["seed"] for r in rows]}
    for metric in METRICS:
        values = [float(r[metric]) for r in rows if r.get(metric) is not None]
        out[metric] = {"mean": statistics.fmean(values) if values else math.nan,
                       "sd": statistics.stdev(values) if len(values) > 1 else math.nan, "values": values}
    sd = out["full_pipeline_ndcg@10"]["sd"]
    out["target"] = {"metric": "full_pipeline_ndcg@10", "sd_max": target_sd, "sd": sd,
                     "met": bool(not math.isnan(sd) and sd <= target_sd)}
    return out


def same_seed_check(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Two manifests of builds with the same seed: do their files' sha256s (and the model's) agree?"""
    a, b = dict(first["files"]), dict(second["files"])
    a["<fused ranker model>"], b["<fused ranker model>"] = first.get("model_checksum"), second.get("model_checksum")
    differ = sorted(name for name in a.keys() | b.keys() if a.get(name) != b.get(name))
    return {"seed": first.get("build_options", {}).get("seed"), "identical": not differ, "differ": differ,
            "files": len(a)}


def render(summary: dict[str, Any]) -> str:
    """The printed table and the mean ± sd lines."""
    lines = [f"{'seed':>4}  {'nDCG@10':>8}  {'HR@10':>6}  {'fused':>7}  {'best ref':>8}  {'weight':>6}  trees",
             "-" * 60]
    for r in summary["per_seed"]:
        ref = f"{r['best_reference_ndcg@10']:.4f}" if r.get("best_reference_ndcg@10") is not None else "-"
        fused = f"{r['fused_ranker_ndcg@10']:.4f}" if r.get("fused_ranker_ndcg@10") is not None else "-"
        lines.append(f"{r['seed']:>4}  {r['full_pipeline_ndcg@10']:>8.4f}  {r['full_pipeline_hr@10']:>6.3f}  "
                     f"{fused:>7}  {ref:>8}  {str(r.get('diversity_weight')):>6}  {r.get('rerank_trees')}")
    agg = summary["aggregate"]
    names = {"full_pipeline_ndcg@10": "full pipeline nDCG@10", "full_pipeline_hr@10": "full pipeline HR@10",
             "fused_ranker_ndcg@10": "fused ranker nDCG@10", "best_reference_ndcg@10": "best reference nDCG@10"}
    for metric, label in names.items():
        lines.append(f"{label}: {agg[metric]['mean']:.4f} ± {agg[metric]['sd']:.4f} (mean ± sd over "
                     f"{len(agg[metric]['values'])} seeds)")
    t = agg["target"]
    lines.append(f"target: sd of full pipeline nDCG@10 ≤ {t['sd_max']}: {'met' if t['met'] else 'missed'} "
                 f"(sd {t['sd']:.4f})")
    check = summary.get("same_seed")
    if check:
        lines.append(f"same seed twice (seed {check['seed']}): "
                     + ("identical artifact sha256s" if check["identical"]
                        else f"DIFFER in {len(check['differ'])} of {check['files']}: {', '.join(check['differ'])}"))
    return "\n".join(lines)


def _build(data: str, root: Path, seed: int, a: argparse.Namespace) -> tuple[Path, Path, dict[str, Any], float]:
    from common.artifacts import open_artifacts
    from offline.build import BuildOptions, build
    started = time.monotonic()
    build(BuildOptions(data=data, artifacts=root / "artifacts", model_repo=root / "model_repository",
                       cache_dir=a.cache_dir, max_items=a.build_max_items, max_users=a.build_max_users,
                       seed=seed, progress=not a.no_progress))
    return root / "artifacts", root / "model_repository", open_artifacts(root / "artifacts").manifest, \
        time.monotonic() - started


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="movielens:data/ml-latest-small", help="dataset spec (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=5, help="builds, seeds 0..N-1 (default: %(default)s)")
    p.add_argument("--max-users", type=int, default=None, help="replay at most N test users per eval (default: all)")
    p.add_argument("--build-max-items", type=int, default=None, help="each build's --max-items (quick looks)")
    p.add_argument("--build-max-users", type=int, default=None, help="each build's --max-users (quick looks)")
    p.add_argument("--cache-dir", type=Path, default=Path(".cache"), help="embedding cache (default: %(default)s)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="keep each seed's artifacts and report under this folder (default: a temporary one, removed)")
    p.add_argument("--out", type=Path, default=None, help="summary JSON (default: reports/<dataset>/seeds.json)")
    p.add_argument("--no-same-seed-check", action="store_true", help="skip building seed 0 a second time")
    p.add_argument("--insecure-dev", action="store_true", help="start each eval's stack without TLS and tokens")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(a: argparse.Namespace) -> int:
    from offline.eval_testset import resolve_data_spec
    from tools.evaluate import EvalOptions, evaluate
    if a.seeds < 1:
        raise SystemExit("--seeds must be at least 1")
    data = resolve_data_spec(a.data)
    rows: list[dict[str, Any]] = []
    check = None
    with tempfile.TemporaryDirectory(prefix="fusionrec-seeds-") as scratch:
        work = a.work_dir or Path(scratch)
        for seed in range(a.seeds):
            artifacts, model_repo, manifest, build_s = _build(data, work / f"seed-{seed}", seed, a)
            if seed == 0 and not a.no_same_seed_check:
                check = same_seed_check(manifest, _build(data, work / "seed-0-again", 0, a)[2])
                print(f"same seed twice: {'identical' if check['identical'] else 'differ: ' + ', '.join(check['differ'])}",
                      flush=True)
            started = time.monotonic()
            report = evaluate(EvalOptions(artifacts=artifacts, model_repo=model_repo, out=work / f"seed-{seed}" / "report",
                                          data=data, max_users=a.max_users, progress=not a.no_progress,
                                          insecure_dev=a.insecure_dev))
            quality = json.loads((report / "quality.json").read_text())
            rows.append(seed_result(seed, quality, manifest, build_s, time.monotonic() - started))
            print(f"seed {seed}: full pipeline nDCG@10 {rows[-1]['full_pipeline_ndcg@10']:.4f}", flush=True)
            # Written after every seed ("complete": false until the last): a long run cut short keeps its rows.
            out, summary = _write(a, data, manifest["dataset"], rows, check, complete=seed == a.seeds - 1)
    print(render(summary))
    print(f"written: {out}")
    return 0


def _write(a: argparse.Namespace, data: str, dataset: str, rows: list[dict[str, Any]],
           check: dict[str, Any] | None, complete: bool) -> tuple[Path, dict[str, Any]]:
    summary = {"dataset": dataset, "data_spec": data, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "complete": complete, "seeds_asked": a.seeds, "max_users": a.max_users,
               "build_max_items": a.build_max_items, "build_max_users": a.build_max_users,
               "per_seed": rows, "aggregate": aggregate(rows), "same_seed": check}
    out = a.out or Path("reports") / dataset / "seeds.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_json_safe(summary), indent=2, allow_nan=False) + "\n")
    return out, summary


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
