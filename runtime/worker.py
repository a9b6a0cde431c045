"""`r7b worker`: lend this machine's CPU (and RAM) to a model loaded on another machine.

It runs llama.cpp's RPC server (`ggml_backend_rpc_start_server`, the server of llama.cpp's own
`rpc-server`) on this machine's CPU device. The machine that runs `r7b chat/generate/serve/eval/bench
--rpc HOST:PORT,...` sends the weights of its share of the layers at load time, then runs each
token through them. A worker serves one client at a time.

The RPC protocol has no authentication and no encryption: anyone who can reach the port can use
the machine's memory and CPU. The worker listens on loopback unless told otherwise, and a
non-loopback address needs `--allow-remote`: use it on a trusted network only.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading

from r7b import rpc
from r7b.errors import R7BError
from r7b.llama import default_threads

from .options import is_loopback

WARNING = ("r7b worker: WARNING: llama.cpp's RPC protocol has no authentication or encryption; anyone who can reach "
           "{endpoint} can use this machine's memory and CPU. Use a trusted network only.")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("worker", help="lend this machine's CPU to another machine's model (llama.cpp RPC)",
                              description=__doc__.partition("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=rpc.DEFAULT_PORT, help=f"port (default {rpc.DEFAULT_PORT})")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: cores, up to 8)")
    p.add_argument("--cache", metavar="DIR", help="keep received weights here (hash-keyed), so a reload is quicker")
    p.add_argument("--allow-remote", action="store_true",
                   help="listen on a non-loopback address (the protocol has no authentication or encryption)")
    p.set_defaults(func=_main)


def check_args(args: argparse.Namespace) -> str:
    """The endpoint to serve, or one R7BError line."""
    if not is_loopback(args.host) and not args.allow_remote:
        raise R7BError(f"refusing to listen on {args.host}: the RPC protocol has no authentication or encryption; "
                       "pass --allow-remote to serve a trusted network")
    if not 0 < args.port < 65536:
        raise R7BError(f"--port must be between 1 and 65535, not {args.port}")
    if args.threads is not None and args.threads < 1:
        raise R7BError("--threads must be at least 1")
    if args.cache:
        try:
            os.makedirs(args.cache, exist_ok=True)
        except OSError as exc:
            raise R7BError(f"cannot use --cache {args.cache}: {exc.strerror or exc}") from None
    _check_port(args.host, args.port)
    return f"{args.host}:{args.port}"


def _check_port(host: str, port: int) -> None:
    """Fail with one line if the address cannot be bound (llama.cpp would only print and return)."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise R7BError(f"cannot listen on {host}: {exc.strerror or exc}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            raise R7BError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _main(args: argparse.Namespace) -> int:
    endpoint = check_args(args)
    rpc._require()
    if not is_loopback(args.host):
        print(WARNING.format(endpoint=endpoint), file=sys.stderr)
    threads = args.threads or default_threads()
    free, total = rpc.device_memory(rpc.cpu_device())
    print(f"r7b worker: serving this machine's CPU ({threads} threads, {free / 2**30:.1f} of {total / 2**30:.1f} GiB "
          f"free) on {endpoint}; Ctrl-C stops", file=sys.stderr, flush=True)
    # The C call blocks for good and would ignore Ctrl-C, so it runs in a thread; the main thread
    # stays in Python, where SIGINT raises KeyboardInterrupt.
    server = threading.Thread(target=rpc.start_server, args=(endpoint,),
                              kwargs={"n_threads": threads, "cache_dir": args.cache}, daemon=True, name="rpc-server")
    # Ctrl-C and `kill` stop it with a message, even when started where SIGINT was ignored (`r7b worker &`).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    server.start()
    try:
        while server.is_alive():
            server.join(0.5)
    except KeyboardInterrupt:
        print("r7b worker: stopped", file=sys.stderr, flush=True)
        _exit(0)
    print(f"r7b worker: error: llama.cpp's RPC server on {endpoint} stopped (see its message above)",
          file=sys.stderr, flush=True)
    _exit(1)
    return 1


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _exit(code: int) -> None:
    """Leave without running library destructors under the server thread's feet."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
