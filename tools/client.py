"""Call a running gateway's Recommend and print the slate (`fusionrec recommend`).

  fusionrec recommend --target 127.0.0.1:50050 --user 1 --k 10
  fusionrec recommend --target 127.0.0.1:50050 --history 1 260 1196 --k 5 --json
"""
from __future__ import annotations

import argparse
import json
import sys

import grpc

from protos import fusionrec_pb2 as pb
from protos import fusionrec_pb2_grpc as pb_grpc


def recommend(target: str, request: pb.RecommendRequest, timeout_s: float = 1.0) -> pb.RecommendResponse:
    with grpc.insecure_channel(target) as channel:
        return pb_grpc.RecommenderStub(channel).Recommend(request, timeout=timeout_s)


def format_response(response: pb.RecommendResponse) -> str:
    lines = [f"request {response.request_id}  versions {dict(sorted(response.versions.items()))}"
             + (f"  DEGRADED: {', '.join(response.degraded_reasons)}" if response.degraded else "")]
    for item in response.items:
        lines.append(f"  {item.rank:>3}. {item.title[:60]:<60} [{item.category or '-'}] "
                     f"id={item.item_id} score={item.score:.3f} via {'+'.join(item.channels)}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="gateway address host:port")
    parser.add_argument("--user", default="", help="user id (optional when --history is given)")
    parser.add_argument("--k", type=int, default=10, help="items to return, 1..100 (default: %(default)s)")
    parser.add_argument("--history", nargs="*", default=[], help="explicit history item ids, oldest first")
    parser.add_argument("--exclude", nargs="*", default=[], help="item ids never to return")
    parser.add_argument("--surface", default="", help="scenario name, e.g. home")
    parser.add_argument("--deadline-ms", type=float, default=1000.0, help="call deadline (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the response as JSON")


def run(args: argparse.Namespace) -> int:
    request = pb.RecommendRequest(user_id=args.user, k=args.k, history_item_ids=args.history,
                                  exclude_item_ids=args.exclude, surface=args.surface)
    try:
        response = recommend(args.target, request, args.deadline_ms / 1000.0)
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    if args.json:
        from google.protobuf.json_format import MessageToDict
        print(json.dumps(MessageToDict(response), indent=2))
    else:
        print(format_response(response))
    return 0
