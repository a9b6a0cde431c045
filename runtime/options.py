"""The model-loading options every command that runs a model shares, spelled the same everywhere."""

from __future__ import annotations

import argparse
import ipaddress
from typing import Any

from r7b.cohere2 import KV_TYPES
from r7b.llama import FLASH_ATTN

DEFAULT_N_CTX = 8192


def add_model_options(p: argparse.ArgumentParser, *, n_ctx: int = DEFAULT_N_CTX) -> None:
    """MODEL.gguf and how to load it: context, threads, offload, KV cache, attention, prompt format."""
    p.add_argument("model", metavar="MODEL.gguf")
    p.add_argument("--n-ctx", "--ctx", dest="n_ctx", type=int, metavar="N", default=n_ctx,
                   help=f"context size in tokens (default {n_ctx})")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: cores, up to 8)")
    p.add_argument("--gpu-layers", "--n-gpu-layers", dest="gpu_layers", type=int, metavar="N", default=0,
                   help="layers to offload (-1: all, on Metal/CUDA builds)")
    p.add_argument("--kv-type", default="f16", choices=list(KV_TYPES), metavar="TYPE",
                   help=f"KV cache type: {', '.join(KV_TYPES)} (default f16)")
    p.add_argument("--flash-attn", choices=list(FLASH_ATTN), default="auto",
                   help="flash attention: on, off, or auto (llama.cpp decides per backend; default auto)")
    add_chat_template_arg(p)
    add_rpc_options(p)


def add_rpc_options(p: argparse.ArgumentParser) -> None:
    """--rpc and --tensor-split: share the model's layers with `r7b worker`s on other machines."""
    p.add_argument("--rpc", metavar="HOST:PORT[,HOST:PORT...]",
                   help="put part of the model's layers on these `r7b worker`s (llama.cpp RPC; trusted networks "
                        "only: the protocol has no authentication or encryption)")
    p.add_argument("--tensor-split", metavar="P0,P1,...",
                   help="with --rpc: proportions of the layers for this machine, then each worker in --rpc order "
                        "(default: by each device's free memory)")


def rpc_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`rpc` and `tensor_split` keyword arguments from the options above (empty without --rpc)."""
    from r7b.errors import R7BError
    from r7b.rpc import parse_endpoints, parse_split

    endpoints = parse_endpoints(getattr(args, "rpc", None))
    split = parse_split(getattr(args, "tensor_split", None))
    if split is not None and not endpoints:
        raise R7BError("--tensor-split needs --rpc HOST:PORT,...")
    return {"rpc": endpoints, "tensor_split": split} if endpoints else {}


def add_chat_template_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chat-template", choices=("builtin", "gguf"), default="builtin",
                   help="prompt format: r7b-edge's Command R7B templates (default), or the GGUF's own "
                        "(rendered sandboxed, for fine-tunes that changed them)")


def load_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`Model.load` keyword arguments from the options above."""
    kwargs = {"n_ctx": args.n_ctx, "n_threads": args.threads, "n_gpu_layers": args.gpu_layers,
              "kv_type": args.kv_type, "flash_attn": args.flash_attn, "chat_template": args.chat_template}
    rpc = rpc_kwargs(args)
    if rpc and getattr(args, "command", None) in ("serve", "chat", "generate"):
        rpc["isolate"] = True  # a worker dropping mid-answer is one error line, and serve stays up
    return {**kwargs, **rpc}


def is_loopback(host: str) -> bool:
    """Whether listening on `host` keeps a service on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
