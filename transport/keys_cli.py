"""`run_pipeline.py keys`: make CurveZMQ key pairs for secure tcp links.

    run_pipeline.py keys --out keys/ --name server     # keys/server.key (public), keys/server.key_secret (0600)
    run_pipeline.py keys --out keys/ --name edge1      # copy keys/edge1.key into the server's --allowed-keys DIR

The server runs with ``--key keys/server.key_secret --allowed-keys keys/allowed/``; an edge with
``--key keys/edge1.key_secret --server-key keys/server.key``.
"""
from __future__ import annotations

import argparse
import re

from core.errors import UsageError

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="folder for NAME.key and NAME.key_secret")
    p.add_argument("--name", required=True, action="append", metavar="NAME",
                   help="key pair name (repeatable: --name server --name edge1)")
    p.add_argument("--allow", default=None, metavar="DIR",
                   help="also copy the public keys into DIR (the server's --allowed-keys folder)")
    p.add_argument("--force", action="store_true", help="replace existing key pairs")


def run(args) -> int:
    from pathlib import Path

    from transport.security import make_keypair
    for name in args.name:
        if not _NAME.match(name):
            raise UsageError(f"--name {name!r}: use letters, digits, _ . - (it becomes the file name)")
    if args.allow:
        allow = Path(args.allow)
        if allow.exists() and not allow.is_dir():
            raise UsageError(f"--allow {allow} is a file; give the folder the server reads with --allowed-keys "
                             f"(it is created if missing), e.g. --allow keys/allowed")
        try:
            allow.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--allow {allow}: cannot create the folder ({exc.strerror or exc}); pick a writable "
                             f"path, e.g. --allow keys/allowed") from None
    for name in args.name:
        pub, sec = make_keypair(args.out, name, force=args.force)
        print(f"wrote {pub} (public, 0644) and {sec} (secret, 0600)")
        if args.allow:
            d = Path(args.allow)
            (d / pub.name).write_bytes(pub.read_bytes())
            (d / pub.name).chmod(0o644)
            print(f"allowed {name}: {d / pub.name}")
    return 0
