"""`fusionrec loadtest --selfcheck`: can one client process offer 500 rps here?

Starts a trivial Recommender in a separate process (so server work does not steal the client's
event loop), drives it open-loop and prints achieved rate and the client's scheduling lag.
"""
from __future__ import annotations

import asyncio
import subprocess
import sys

import grpc

from protos import fusionrec_pb2, fusionrec_pb2_grpc

SELFCHECK_RATE = 500.0


class TrivialRecommender(fusionrec_pb2_grpc.RecommenderServicer):
    """Answers at once with k fixed items: measures the client and the gRPC stack, nothing else."""

    async def Recommend(self, request, context):
        k = max(1, min(request.k or 10, 100))
        items = [fusionrec_pb2.RecommendedItem(item_id=str(i), score=1.0 / (i + 1), rank=i + 1,
                                               channels=["popular"]) for i in range(k)]
        return fusionrec_pb2.RecommendResponse(items=items, request_id=request.request_id,
                                               stage_ms={"retrieve": 0.0, "rank": 0.0})


async def serve_trivial() -> None:
    """Bind a free loopback port, print it on stdout, serve until killed."""
    server = grpc.aio.server()
    fusionrec_pb2_grpc.add_RecommenderServicer_to_server(TrivialRecommender(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


def selfcheck(rate: float = SELFCHECK_RATE, duration: float = 5.0, warmup: float = 1.0) -> int:
    from tools import loadtest_report as report
    from tools.loadtest_engine import load_users, request_factory, run_open_loop

    proc = subprocess.Popen([sys.executable, "-m", "tools.loadtest_selfcheck"],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            print("selfcheck: the trivial server did not start", file=sys.stderr)
            return 2
        target = f"127.0.0.1:{int(line)}"
        make = request_factory(load_users(None), k=10, surface="home")
        result = asyncio.run(run_open_loop(target, rate, duration, make, warmup, deadline_s=1.0))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()
    s = report.summarize(result)
    lag = s["schedule_lag_ms"]
    ok = (s["not_sent"] == 0 and s["error_rate"] == 0 and s["achieved_rps"] >= 0.95 * rate)
    print(f"selfcheck {target}: offered {s['offered_rps']:.1f} rps, achieved {s['achieved_rps']:.1f} "
          f"rps ({s['answered']}/{s['scheduled']} answered, errors {s['errors'] or 'none'})")
    print(f"  latency ms p50={s['latency_ms']['p50']} p99={s['latency_ms']['p99']}; "
          f"schedule lag ms p50={lag['p50']} p99={lag['p99']} max={lag['max']}")
    print(f"selfcheck: {'PASS' if ok else 'FAIL'} at {rate:g} rps")
    return 0 if ok else 1


if __name__ == "__main__":
    asyncio.run(serve_trivial())
