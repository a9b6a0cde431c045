"""Build the stand-in Command R7B: a tiny Cohere2 model trained on public-domain text.

Reproducible from scratch (`make fixture`): fetches the Debian text packages, trains a byte-level BPE
tokenizer with Command-R's pre-tokenization and special tokens, trains a 4-layer Cohere2 model on
English and Spanish text mixed with chat-formatted samples (so it learns the turn structure, tool
calls and citations), and writes a Hugging Face snapshot laid out like CohereForAI/c4ai-command-r7b-12-2024.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

sys.path.insert(0, str(Path(__file__).parent))
import corpus  # noqa: E402

SEED = 1234
VOCAB_SIZE = 8000
SEQ_LEN = 256
BATCH = 16
HELD_OUT_CHARS = {"austen": 160_000, "web": 160_000, "rv1909": 300_000}
HEAD_TOKENS = ["<PAD>", "<UNK>", "<CLS>", "<SEP>", "<MASK_TOKEN>", "<BOS_TOKEN>", "<EOS_TOKEN>", "<EOP_TOKEN>"]
TAIL_TOKENS = (
    ["<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|YES_TOKEN|>", "<|NO_TOKEN|>", "<|GOOD_TOKEN|>",
     "<|BAD_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>"]
    + [f"<|USER_{i}_TOKEN|>" for i in range(10)]
    + ["<|EXTRA_8_TOKEN|>", "<|NEW_FILE|>", "<|BEGINNING_OF_PREFIX_FIM_TOKEN|>",
       "<|BEGINNING_OF_MIDDLE_FIM_TOKEN|>", "<|BEGINNING_OF_SUFFIX_FIM_TOKEN|>", "<|END_OF_MIDDLE_FIM_TOKEN|>",
       "<|START_THINKING|>", "<|END_THINKING|>", "<|START_RESPONSE|>", "<|END_RESPONSE|>",
       "<|START_ACTION|>", "<|END_ACTION|>", "<|START_TOOL_RESULT|>", "<|END_TOOL_RESULT|>"]
)
CONFIG = {
    "architectures": ["Cohere2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 5,
    "eos_token_id": VOCAB_SIZE - len(TAIL_TOKENS) + 1,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 256,
    "initializer_range": 0.02,
    "intermediate_size": 768,
    "layer_norm_eps": 1e-05,
    "logit_scale": 0.25,
    "max_position_embeddings": 8192,
    "model_type": "cohere2",
    "num_attention_heads": 4,
    "num_hidden_layers": 4,
    "num_key_value_heads": 2,
    "order_of_interleaved_layers": "local_attn_first",
    "pad_token_id": 0,
    "position_embedding_type": "rope_gptj",
    "rope_scaling": None,
    "rope_theta": 50000.0,
    "rotary_pct": 1.0,
    "sliding_window": 64,
    "sliding_window_pattern": 4,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_embedding_sharing": True,
    "use_gated_activation": True,
    "vocab_size": VOCAB_SIZE,
}
BOS, SOT, EOT = "<BOS_TOKEN>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>"


# --- tokenizer --------------------------------------------------------------------------------

def train_tokenizer(texts: list[str]) -> Tokenizer:
    """Byte-level BPE with Command-R's pipeline: NFC, single digits, then the GPT-2 byte-level regex."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(TAIL_TOKENS),
        special_tokens=HEAD_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(TAIL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
        special_tokens=[(BOS, tok.token_to_id(BOS))],
    )
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    return tok


# --- chat-shaped samples ----------------------------------------------------------------------

def _turn(role: str, body: str) -> str:
    return f"{SOT}<|{role}_TOKEN|>{body}{EOT}"


def _first_sentence(text: str, limit: int = 240) -> str:
    cut = min((i for i in (text.find(". "), text.find("? "), text.find("! ")) if i > 0), default=-1)
    sentence = text[: cut + 1] if 0 < cut < limit else text[:limit].rsplit(" ", 1)[0]
    return sentence.strip()


def _tool_result(call_id: str, results: list[dict]) -> str:
    lines = ",\n".join(f'            "{i}": {json.dumps(r, ensure_ascii=False)}' for i, r in enumerate(results))
    block = (f'    {{\n        "tool_call_id": "{call_id}",\n        "results": {{\n{lines}\n        }},\n'
             f'        "is_error": null\n    }}')
    return _turn("SYSTEM", f"<|START_TOOL_RESULT|>[\n{block}\n]<|END_TOOL_RESULT|>")


def chat_sample(rng: random.Random, paras: list[str]) -> str:
    """One conversation in the template's shape: plain answer, tool call, or cited answer."""
    a, b = rng.sample(paras, 2)
    kind = rng.random()
    head = BOS + _turn("SYSTEM", "")
    if kind < 0.4:
        return (head + _turn("USER", _first_sentence(a)) + SOT + "<|CHATBOT_TOKEN|><|START_RESPONSE|>"
                + _first_sentence(b) + "<|END_RESPONSE|>" + EOT)
    words = [w.strip(".,;:!?\"'") for w in a.split() if len(w) > 5]
    topic = rng.choice(words) if words else "grace"
    tool = rng.choice(["search", "lookup", "find_passage"])
    ask = _turn("USER", f"What does the text say about {topic}?")
    call = (SOT + "<|CHATBOT_TOKEN|><|START_THINKING|>I will use " + tool + " to find passages about " + topic
            + ".<|END_THINKING|><|START_ACTION|>[\n    " + json.dumps(
                {"tool_call_id": "0", "tool_name": tool, "parameters": {"query": topic}}) + "\n]<|END_ACTION|>"
            + EOT)
    if kind < 0.7:
        return head + ask + call
    quote = _first_sentence(a)
    answer = f"<co>{quote}</co: 0:[0]>"
    return (head + ask + call + _tool_result("0", [{"text": quote}]) + SOT
            + "<|CHATBOT_TOKEN|><|START_RESPONSE|>" + answer + "<|END_RESPONSE|>" + EOT)


# --- data -------------------------------------------------------------------------------------

def token_stream(tok: Tokenizer, docs: list[str]) -> np.ndarray:
    """Documents as one stream of ids, each starting with BOS."""
    ids = [e.ids for e in tok.encode_batch(docs)]  # post-processor adds BOS
    return np.fromiter((i for doc in ids for i in doc), dtype=np.int32)


def build_training_docs(texts: dict[str, str], rng: random.Random) -> list[str]:
    docs = []
    for text in texts.values():
        paras = text.split("\n\n")
        for i in range(0, len(paras), 8):
            docs.append("\n\n".join(paras[i:i + 8]))
    all_paras = [p for t in texts.values() for p in t.split("\n\n") if len(p) > 80]
    docs += [chat_sample(rng, all_paras) for _ in range(len(docs) // 2)]
    rng.shuffle(docs)
    return docs


# --- model ------------------------------------------------------------------------------------

def make_model():
    from transformers import Cohere2Config, Cohere2ForCausalLM
    config = Cohere2Config(**{k: v for k, v in CONFIG.items() if k not in ("torch_dtype",)})
    torch.manual_seed(SEED)
    return Cohere2ForCausalLM(config).float()


@torch.no_grad()
def held_out_ppl(model, ids: np.ndarray, max_windows: int = 64) -> float:
    """Mean per-token perplexity over non-overlapping BOS-led windows of SEQ_LEN tokens."""
    model.eval()
    nll, count = 0.0, 0
    n = min(len(ids) // SEQ_LEN, max_windows)
    for w in range(n):
        x = torch.from_numpy(ids[w * SEQ_LEN:(w + 1) * SEQ_LEN].astype(np.int64)).unsqueeze(0)
        x[0, 0] = 5
        logits = model(x).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
        nll += loss.item()
        count += SEQ_LEN - 1
    model.train()
    return math.exp(nll / count)


def train(model, stream: np.ndarray, held: np.ndarray, steps: int, log) -> None:
    rng = np.random.default_rng(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.05)
    warmup = 60
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    start = time.time()
    model.train()
    for step in range(1, steps + 1):
        offs = rng.integers(0, len(stream) - SEQ_LEN - 1, size=BATCH)
        x = torch.from_numpy(np.stack([stream[o:o + SEQ_LEN + 1] for o in offs]).astype(np.int64))
        x[:, 0] = 5
        out = model(x[:, :-1], labels=x[:, :-1].clone())  # HF shifts labels internally
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
        if step % 25 == 0:
            rate = step * BATCH * SEQ_LEN / (time.time() - start)
            log(f"step {step}/{steps} loss {out.loss.item():.3f} lr {sched.get_last_lr()[0]:.2e} {rate:.0f} tok/s")
        if step % 200 == 0 or step == steps:
            log(f"step {step} held-out ppl {held_out_ppl(model, held):.1f}")


# --- snapshot ---------------------------------------------------------------------------------

def write_snapshot(out: Path, model, tok: Tokenizer) -> None:
    """Write the folder exactly as a Hugging Face snapshot of Command R7B is laid out."""
    from safetensors.torch import save_file
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    tok.save(str(tmp / "tokenizer.json"))
    eos = TAIL_TOKENS[1]
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 5, "eos_token_id": tok.token_to_id(eos), "pad_token_id": 0}, indent=2) + "\n")
    (tmp / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": {"content": BOS, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
         "eos_token": {"content": eos, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
         "pad_token": {"content": "<PAD>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}},
        indent=2) + "\n")
    (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tok), indent=2, ensure_ascii=False) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def tokenizer_config(tok: Tokenizer) -> dict:
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                        "single_word": False, "special": True}
             for t in HEAD_TOKENS + TAIL_TOKENS}
    config = {
        "add_bos_token": True, "add_eos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": added, "bos_token": BOS, "eos_token": TAIL_TOKENS[1], "pad_token": "<PAD>",
        "unk_token": None, "clean_up_tokenization_spaces": False, "legacy": True, "merges_file": None,
        "model_max_length": 1000000000000000019884624838656, "sp_model_kwargs": {},
        "spaces_between_special_tokens": False, "tokenizer_class": "CohereTokenizer", "use_default_system_prompt": False,
        "vocab_file": None,
    }
    try:
        from r7b.templates import TEMPLATE_NAMES, template_source
        config["chat_template"] = [{"name": n, "template": template_source(n)} for n in TEMPLATE_NAMES]
    except ImportError:
        pass
    return config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/tiny-r7b"))
    ap.add_argument("--held-out-dir", type=Path, default=Path("tests/fixtures/held-out"))
    ap.add_argument("--work", type=Path, default=Path("build/corpus"))
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--max-extra-steps", type=int, default=600)
    args = ap.parse_args()
    torch.set_num_threads(2)
    random.seed(SEED)
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731

    root = corpus.fetch(args.work)
    texts = corpus.sources(root)
    train_texts, held_texts = {}, {}
    for name, text in texts.items():
        train_texts[name], held_texts[name] = corpus.split(text, HELD_OUT_CHARS[name])
    args.held_out_dir.mkdir(parents=True, exist_ok=True)
    (args.held_out_dir / "en.txt").write_text(held_texts["austen"] + "\n\n" + held_texts["web"] + "\n")
    (args.held_out_dir / "es.txt").write_text(held_texts["rv1909"] + "\n")
    log(f"corpus: {sum(map(len, train_texts.values())):,} training chars, held out "
        f"{sum(map(len, held_texts.values())):,}")

    tok = train_tokenizer(list(train_texts.values()))
    stream = token_stream(tok, build_training_docs(train_texts, random.Random(SEED)))
    held = np.concatenate([token_stream(tok, [held_texts["austen"][:60000], held_texts["rv1909"][:60000]])])
    log(f"tokens: {len(stream):,} training, {len(held):,} held out; vocab {tok.get_vocab_size()}")

    model = make_model()
    log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")
    train(model, stream, held, args.steps, log)
    target = VOCAB_SIZE / 40
    extra = 0
    while held_out_ppl(model.to(torch.bfloat16).float(), held) >= target and extra < args.max_extra_steps:
        train(model, stream, held, 100, log)  # short low-rate tail until under target
        extra += 100
    ppl = held_out_ppl(model.to(torch.bfloat16).float(), held)
    log(f"final held-out perplexity (bf16 weights): {ppl:.1f} (target < {target:.0f})")
    write_snapshot(args.out, model, tok)
    (args.out.parent / "tiny-r7b.TRAINING.json").write_text(json.dumps(
        {"held_out_ppl_bf16": round(ppl, 2), "target": target, "steps": args.steps + extra, "seed": SEED}, indent=2) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
