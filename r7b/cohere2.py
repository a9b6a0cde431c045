"""Command R7B (architecture `cohere2`) in one place: its sizes, tensor tables, control tokens, KV types.

Everything else reads the model's description from here: the converter (sizes from a Hugging Face
`config.json`, the HF → GGUF tensor names), the GGUF validator and the memory planner (sizes from
GGUF metadata, the GGUF shape table), the runtime (control tokens, KV-cache types).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from r7b.errors import R7BError

ARCH = "cohere2"
SWA_PATTERN = 4  # llama.cpp fixes Cohere2 at three sliding-window layers, then one global layer
PRE_TOKENIZER = "command-r"

# -- control tokens ---------------------------------------------------------------------------------

BOS_TOKEN = "<BOS_TOKEN>"
START_OF_TURN, END_OF_TURN = "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>"
START_THINKING, END_THINKING = "<|START_THINKING|>", "<|END_THINKING|>"
START_ACTION, END_ACTION = "<|START_ACTION|>", "<|END_ACTION|>"
START_RESPONSE, END_RESPONSE = "<|START_RESPONSE|>", "<|END_RESPONSE|>"
START_TOOL_RESULT, END_TOOL_RESULT = "<|START_TOOL_RESULT|>", "<|END_TOOL_RESULT|>"
USER_TOKEN, CHATBOT_TOKEN, SYSTEM_TOKEN = "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>"
STOP_TEXTS = (END_OF_TURN, END_RESPONSE)  # a turn's answer is over at either
# Command-R's control tokens that are not written `<|...|>` (ids 0-7 of its vocabulary).
PLAIN_CONTROL_TEXTS = ("<PAD>", "<UNK>", "<CLS>", "<SEP>", "<MASK_TOKEN>", BOS_TOKEN, "<EOS_TOKEN>", "<EOP_TOKEN>")


def is_chat_control(text: str) -> bool:
    """Tokens written `<|...|>` steer the chat format; llama.cpp's converter makes them all CONTROL."""
    return text.startswith("<|") and text.endswith("|>") and len(text) > 4


# -- KV cache types (ggml type ids llama.cpp's context takes) --------------------------------------

KV_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q5_1": 7, "q5_0": 6, "q4_1": 3, "q4_0": 2}


def kv_type_id(name: str) -> int:
    try:
        return KV_TYPES[name]
    except KeyError:
        raise R7BError(f"unknown KV cache type {name!r}; choose from {', '.join(KV_TYPES)}") from None


# -- tensor tables -----------------------------------------------------------------------------------

# Per-layer Hugging Face module → GGUF tensor kind.
HF_LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
HF_GLOBAL_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}


def block_shapes(hidden: int, q: int, kv: int, ffn: int) -> dict[str, tuple[int, ...]]:
    """ggml-order shapes (row length first) of one block's tensors, by GGUF kind."""
    return {"attn_norm": (hidden,), "attn_q": (hidden, q), "attn_k": (hidden, kv), "attn_v": (hidden, kv),
            "attn_output": (q, hidden), "ffn_gate": (hidden, ffn), "ffn_up": (hidden, ffn),
            "ffn_down": (ffn, hidden)}


def global_shapes(hidden: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """Tensors outside the blocks (tied embeddings: no output.weight)."""
    return {"token_embd.weight": (hidden, vocab), "output_norm.weight": (hidden,)}


def gguf_name(hf_name: str) -> str:
    if hf_name in HF_GLOBAL_TENSORS:
        return HF_GLOBAL_TENSORS[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{HF_LAYER_TENSORS[rest.removesuffix('.weight')]}.weight"


# -- the model's sizes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cohere2Dims:
    """The sizes of a Cohere2 model; tensor shapes, KV cache and memory derive from them."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    ffn: int
    vocab: int
    sliding_window: int
    context_length: int
    swa_pattern: int = SWA_PATTERN
    layer_norm_eps: float = 1e-5
    logit_scale: float = 1.0
    rope_theta: float = 10000.0
    rope_dim: int = 0  # 0: the whole head
    tied_embeddings: bool = True
    name: str = ARCH

    def weights(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """GGUF tensor names and ggml shapes, in file order."""
        glob = global_shapes(self.hidden, self.vocab)
        yield "token_embd.weight", glob["token_embd.weight"]
        blocks = block_shapes(self.hidden, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.ffn)
        for i in range(self.n_layers):
            for kind, shape in blocks.items():
                yield f"blk.{i}.{kind}.weight", shape
        yield "output_norm.weight", glob["output_norm.weight"]

    def hf_weights(self) -> dict[str, tuple[int, ...]]:
        """Hugging Face tensor names with their shapes as transformers stores them (rows first)."""
        by_kind = {kind: shape for kind, shape in
                   block_shapes(self.hidden, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim,
                                self.ffn).items()}
        out = {"model.embed_tokens.weight": (self.vocab, self.hidden), "model.norm.weight": (self.hidden,)}
        for i in range(self.n_layers):
            for module, kind in HF_LAYER_TENSORS.items():
                out[f"model.layers.{i}.{module}.weight"] = tuple(reversed(by_kind[kind]))
        return out

    @property
    def n_params(self) -> int:
        total = 0
        for _, shape in self.weights():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    @property
    def n_global_layers(self) -> int:
        return n_global_layers(self.n_layers, self.swa_pattern) if self.sliding_window else self.n_layers

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> "Cohere2Dims":
        """From config.json; accepts the published R7B keys and transformers 5's layer_types/rope_parameters."""
        if cfg.get("model_type") != ARCH:
            raise R7BError(f"not a Command R7B (Cohere2) checkpoint: model_type is {cfg.get('model_type')!r}, "
                           "expected 'cohere2'")
        hidden, heads = int(_require(cfg, "hidden_size")), int(_require(cfg, "num_attention_heads"))
        if hidden % heads:
            raise R7BError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise R7BError(f"num_attention_heads {heads} is not divisible by num_key_value_heads {kv_heads}")
        layers = int(_require(cfg, "num_hidden_layers"))
        _check_layer_pattern(cfg, layers)
        window = cfg.get("sliding_window")
        if not window or int(window) < 1:
            raise R7BError("config.json needs a positive sliding_window for Cohere2")
        head_dim = hidden // heads
        rotary = float(cfg.get("rotary_pct", (cfg.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0)))
        return cls(n_layers=layers, n_heads=heads, n_kv_heads=kv_heads, head_dim=head_dim, hidden=hidden,
                   ffn=int(_require(cfg, "intermediate_size")), vocab=int(_require(cfg, "vocab_size")),
                   sliding_window=int(window), context_length=int(cfg.get("max_position_embeddings", 8192)),
                   layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
                   logit_scale=float(cfg.get("logit_scale", 1.0)), rope_theta=_rope_theta(cfg),
                   rope_dim=int(rotary * head_dim),
                   tied_embeddings=bool(cfg.get("use_embedding_sharing", cfg.get("tie_word_embeddings", True))))

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], name: str | None = None) -> "Cohere2Dims":
        """From GGUF metadata (`cohere2.*` keys); `tokenizer.ggml.tokens` may be a list or a count."""
        arch = str(meta.get("general.architecture", ARCH))

        def get(key: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise ValueError(f"GGUF metadata lacks {arch}.{key}")
            return value

        tokens = meta.get("tokenizer.ggml.tokens")
        n_tokens = len(tokens) if isinstance(tokens, (list, tuple)) else tokens
        n_heads, hidden = int(get("attention.head_count")), int(get("embedding_length"))
        head_dim = int(get("attention.key_length", hidden // n_heads))
        return cls(n_layers=int(get("block_count")), n_heads=n_heads,
                   n_kv_heads=int(get("attention.head_count_kv", n_heads)), head_dim=head_dim, hidden=hidden,
                   ffn=int(get("feed_forward_length")), vocab=int(get("vocab_size", n_tokens)),
                   sliding_window=int(get("attention.sliding_window", 0)), context_length=int(get("context_length")),
                   layer_norm_eps=float(get("attention.layer_norm_epsilon", 1e-5)),
                   logit_scale=float(get("logit_scale", 1.0)), rope_theta=float(get("rope.freq_base", 10000.0)),
                   rope_dim=int(get("rope.dimension_count", head_dim)),
                   name=name or str(meta.get("general.name") or arch))


COMMAND_R7B = Cohere2Dims(n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden=4096, ffn=14336,
                          vocab=256000, sliding_window=4096, context_length=131072, logit_scale=0.25,
                          rope_theta=50000.0, rope_dim=128, name="Command R7B")


def n_global_layers(n_layers: int, swa_pattern: int) -> int:
    """Layers that attend to the whole context: llama.cpp makes layer i sliding unless i % p == p - 1."""
    if swa_pattern <= 0:
        return n_layers
    return sum(1 for i in range(n_layers) if i % swa_pattern == swa_pattern - 1)


def _require(cfg: Mapping[str, Any], key: str) -> Any:
    if key not in cfg:
        raise R7BError(f"config.json lacks {key!r}")
    return cfg[key]


def _rope_theta(cfg: Mapping[str, Any]) -> float:
    params = cfg.get("rope_parameters") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type not in (None, "default"):
        raise R7BError(f"unsupported RoPE scaling {rope_type!r}: llama.cpp runs Cohere2 with plain RoPE")
    return float(theta)


def _check_layer_pattern(cfg: Mapping[str, Any], num_layers: int) -> None:
    """Refuse checkpoints whose sliding/global layout differs from the one llama.cpp hard-codes."""
    expected = ["sliding_attention" if (i + 1) % SWA_PATTERN else "full_attention" for i in range(num_layers)]
    layer_types = cfg.get("layer_types")
    if layer_types is not None and list(layer_types) != expected:
        raise R7BError("layer_types must repeat 3 sliding-window layers then 1 global layer, as llama.cpp expects")
    pattern = cfg.get("sliding_window_pattern", SWA_PATTERN)
    if layer_types is None and pattern != SWA_PATTERN:
        raise R7BError(f"sliding_window_pattern {pattern} is not supported (llama.cpp expects {SWA_PATTERN})")
