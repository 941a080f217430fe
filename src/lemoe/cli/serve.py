"""``lemoe serve STORE``: the HTTP editing service over one edit store (:mod:`lemoe.service`)."""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import threading
from pathlib import Path
from typing import Any

TOKEN_FILE = "serve.token"


def _token(args: argparse.Namespace, store_root: Path) -> str:
    if args.token_file:
        return Path(args.token_file).read_text().strip()
    if env := os.environ.get("LEMOE_SERVE_TOKEN"):
        return env.strip()
    path = store_root / TOKEN_FILE
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the store over HTTP until SIGINT/SIGTERM."""
    from lemoe.service import EditService, ServiceConfig
    from lemoe.service.replicas import replica_factory
    from lemoe.store import EditStore

    root = Path(args.store)
    if (args.ssl_certfile is None) != (args.ssl_keyfile is None):
        raise ValueError("--ssl-certfile and --ssl-keyfile go together")
    for tls_file in (args.ssl_certfile, args.ssl_keyfile):
        if tls_file is not None and not Path(tls_file).is_file():
            raise FileNotFoundError(f"no such TLS file: {tls_file}")
    store = EditStore.open(root, device=args.device)
    token = _token(args, root)
    config = ServiceConfig(
        token=token,
        host=args.host,
        port=args.port,
        max_body_bytes=args.max_body_bytes,
        max_requests_per_submit=args.max_requests,
        max_new_tokens=args.max_new_tokens,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
    )

    # adaptor methods (LEMoE): replicas share the writer's base weights; others load their own
    service = EditService(store, config, replica_factory(store, device=args.device))
    host, port = service.start()
    where = "LEMOE_SERVE_TOKEN" if os.environ.get("LEMOE_SERVE_TOKEN") else (args.token_file or root / TOKEN_FILE)
    print(f"serving {root} on {service.scheme}://{host}:{port} (token: {where}; console: /console/)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    service.stop()
    store.close()
    print("stopped", flush=True)
    return 0


def add_serve_command(subparsers: Any) -> None:
    """Add ``serve`` to the ``lemoe`` command line."""
    serve = subparsers.add_parser("serve", help="serve a store over HTTP", description=cmd_serve.__doc__)
    serve.add_argument("store", help="store directory")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument(
        "--token-file",
        default=None,
        help=f"file holding the token (default: $LEMOE_SERVE_TOKEN, else STORE/{TOKEN_FILE}, created on first use)",
    )
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20)
    serve.add_argument("--max-requests", type=int, default=64, help="requests per submission")
    serve.add_argument("--max-new-tokens", type=int, default=64)
    serve.add_argument("--device", default="cpu")
    serve.add_argument("--ssl-certfile", default=None, help="PEM certificate: serve HTTPS (with --ssl-keyfile)")
    serve.add_argument("--ssl-keyfile", default=None, help="PEM private key of --ssl-certfile")
    serve.set_defaults(func=cmd_serve)
