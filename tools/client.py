"""Call a running gateway's Recommend and print the slate (`fusionrec recommend`).

  fusionrec recommend --credentials run/credentials.json --user 1 --k 10
  fusionrec recommend --credentials run/credentials.json --history 1 260 1196 --k 5 --json
  fusionrec recommend --credentials run/credentials.json --user 1 --k 10 --explain   # why each item: a table
  fusionrec recommend --insecure-dev --target 127.0.0.1:50050 --user 1    # a stack run with --insecure-dev

TLS and the `recommend` token come from the credentials file `fusionrec run` writes; its gateway
address is used unless --target is given.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grpc

from protos import fusionrec_pb2 as pb
from protos import fusionrec_pb2_grpc as pb_grpc


def recommend(channel: grpc.Channel, request: pb.RecommendRequest, timeout_s: float = 1.0) -> pb.RecommendResponse:
    """One Recommend on an open channel (tools.credentials.client_channel, Stack.gateway_channel)."""
    return pb_grpc.RecommenderStub(channel).Recommend(request, timeout=timeout_s)


def format_response(response: pb.RecommendResponse) -> str:
    lines = [f"request {response.request_id}  versions {dict(sorted(response.versions.items()))}"
             + (f"  DEGRADED: {', '.join(response.degraded_reasons)}" if response.degraded else "")]
    for item in response.items:
        lines.append(f"  {item.rank:>3}. {item.title[:60]:<60} [{item.category or '-'}] "
                     f"id={item.item_id} score={item.score:.3f} via {'+'.join(item.channels)}")
    return "\n".join(lines)


def _figure(message, field: str) -> str:
    return f"{getattr(message, field):.3f}" if message.HasField(field) else "-"


def format_explanation(response: pb.RecommendResponse) -> str:
    """One row per item: channels (score #rank), fused score, re-ranker correction, diversity
    penalty, final score; "-" where the stage that ordered the slate did not produce the figure."""
    header = ("rank", "item", "channels (score #rank)", "fused", "correction", "penalty", "score")
    rows = []
    for item in response.items:
        e = item.explanation
        channels = " ".join(f"{c.channel} {c.score:.3f} #{c.rank}" for c in e.channels) or "-"
        rows.append((str(item.rank), item.item_id, channels, _figure(e, "fused_score"),
                     _figure(e, "rerank_correction"), _figure(e, "diversity_penalty"), f"{item.score:.3f}"))
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]
    stages = sorted({pb.ExplainedStage.Name(i.explanation.stage).removeprefix("EXPLAINED_STAGE_").lower()
                     for i in response.items})
    lines = [f"explained  versions {dict(sorted(response.versions.items()))}  ordered by {', '.join(stages) or '-'}"]
    lines += ["  ".join(cell.ljust(w) if j < 3 else cell.rjust(w) for j, (cell, w) in enumerate(zip(r, widths)))
              for r in [header, *rows]]
    if "reranker" in stages:
        lines.append("score = fused + correction - penalty, kept non-increasing down the slate")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=None,
                        help="gateway address host:port (default: the credentials file's gateway)")
    parser.add_argument("--credentials", type=Path, default=Path("run/credentials.json"),
                        help="CA, client cert and tokens written by `fusionrec run` (default: %(default)s)")
    parser.add_argument("--insecure-dev", action="store_true",
                        help="plaintext, no token: for a stack started with --insecure-dev (needs --target)")
    parser.add_argument("--user", default="", help="user id (optional when --history is given)")
    parser.add_argument("--k", type=int, default=10, help="items to return, 1..100 (default: %(default)s)")
    parser.add_argument("--history", nargs="*", default=[], help="explicit history item ids, oldest first")
    parser.add_argument("--exclude", nargs="*", default=[], help="item ids never to return")
    parser.add_argument("--surface", default="", help="scenario name, e.g. home")
    parser.add_argument("--deadline-ms", type=float, default=1000.0, help="call deadline (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the response as JSON")
    parser.add_argument("--explain", action="store_true",
                        help="ask for each item's explanation (channels, fused score, re-ranker correction, "
                             "diversity penalty) and print it as a table (in --json: items[].explanation)")


def run(args: argparse.Namespace) -> int:
    request = pb.RecommendRequest(user_id=args.user, k=args.k, history_item_ids=args.history,
                                  exclude_item_ids=args.exclude, surface=args.surface, explain=args.explain)
    from tools.credentials import CredentialsError, client_channel
    try:
        with client_channel(args.target, args.credentials, args.insecure_dev) as channel:
            response = recommend(channel, request, args.deadline_ms / 1000.0)
    except CredentialsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    if args.json:
        from google.protobuf.json_format import MessageToDict
        print(json.dumps(MessageToDict(response), indent=2))
    else:
        print(format_response(response))
        if args.explain:
            print(format_explanation(response))
    return 0
