"""tools/bench.py's store seeding plan: exactly the deletions and online items asked for."""
from tools.bench import format_comparison, plan_seed


def test_deletes_beyond_the_catalog_go_to_extra_online_items():
    catalog = [str(i) for i in range(9742)]   # ml-latest-small
    plan = plan_seed(catalog, deleted=10_000, online=1000, keep_catalog=500)
    assert len(plan.deleted) == len(set(plan.deleted)) == 10_000
    assert len(plan.catalog_deleted) == 9242 and set(plan.catalog_deleted) <= set(catalog)
    assert len(plan.online) == 1000 and not set(plan.online) & set(plan.deleted)
    assert plan.describe()["deleted_online_items"] == 758


def test_a_large_catalog_gives_every_deletion():
    plan = plan_seed([str(i) for i in range(50_000)], deleted=10_000, online=0, keep_catalog=500)
    assert len(plan.catalog_deleted) == 10_000 and not plan.extra


def test_comparison_names_both_rows():
    row = {"latency_ms": {"p50": 11.0, "p99": 30.0}, "achieved_rps": 50.0, "error_rate": 0.0,
           "degraded_share": 0.0, "cpu_ms_per_request": {"gateway": 2.0, "retrieval": 3.0}}
    text = format_comparison(row, {**row, "latency_ms": {"p50": 12.5, "p99": 31.0}})
    assert "empty store" in text and "seeded store" in text and "12.5" in text
