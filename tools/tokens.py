"""Mint a bearer token for the gateway's public API (`fusionrec tokens`).

  fusionrec tokens --file run/tokens.json --name web-frontend --scopes recommend
  fusionrec tokens --file run/tokens.json --name ingest --scopes events items --rate-per-s 200 --burst 400
  fusionrec tokens --file run/tokens.json --list

Appends the token's sha256, name, scopes and optional rate limit to the tokens file (created 0600
if missing; the gateway reads it with --tokens) and prints the token once, on stdout: it is stored
nowhere, so keep it. Scopes: recommend (Recommend), events (ReportEvents, ReportEventBatch), items
(UpsertItems, DeleteItems), admin (DeleteUserData; implies no other scope). Restart the gateway to
load a new token. --list shows names, scopes and limits (never a token: the file holds none).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gateway.auth import SCOPES, TokenFileError, add_token, load_tokens


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--file", type=Path, required=True, help="tokens file (the gateway's --tokens)")
    parser.add_argument("--name", help="the token's name (shown in logs and metrics; not secret; unique)")
    parser.add_argument("--scopes", nargs="+", choices=SCOPES, metavar="SCOPE",
                        help=f"one or more of {', '.join(SCOPES)}")
    parser.add_argument("--rate-per-s", type=float, default=None,
                        help="calls/s for this token at each gateway process (default: the gateway's "
                             "--token-rate-per-s; 0 = no limit)")
    parser.add_argument("--burst", type=float, default=None,
                        help="token bucket size (default: the gateway's --token-burst)")
    parser.add_argument("--list", action="store_true", help="list the tokens in the file and exit")


def run(args: argparse.Namespace) -> int:
    try:
        if args.list:
            for e in load_tokens(args.file):
                limit = "default" if e.rate_per_s is None else (f"{e.rate_per_s:g}/s" if e.rate_per_s else "none")
                burst = "" if e.burst is None else f" burst {e.burst:g}"
                print(f"{e.name}\tscopes={','.join(sorted(e.scopes))}\trate={limit}{burst}")
            return 0
        if not args.name or not args.scopes:
            print("fusionrec tokens: --name and --scopes are required to add a token", file=sys.stderr)
            return 2
        token = add_token(args.file, args.name, args.scopes, args.rate_per_s, args.burst)
    except TokenFileError as e:
        print(f"fusionrec tokens: {e}", file=sys.stderr)
        return 1
    print(token)
    print(f"added token {args.name!r} ({' '.join(sorted(set(args.scopes)))}) to {args.file}; "
          "it is shown only now. Restart the gateway to load it.", file=sys.stderr)
    return 0
