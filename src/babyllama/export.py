"""Export a checkpoint for other tools: a plain Hugging Face `LlamaForCausalLM` directory, or GGUF.

    babyllama export runs/demo/sft/final --format hf --out runs/demo/hf
    # then: AutoModelForCausalLM.from_pretrained("runs/demo/hf"), AutoTokenizer.from_pretrained(...)
    babyllama export runs/demo/sft/final --format gguf --out runs/demo/demo.gguf    # llama.cpp, fp32
    babyllama export runs/lora/final --format hf --adapter --out runs/lora/hf   # base + peft adapter in hf/adapter

Our weights are Meta's layout with two fused projections; Hugging Face wants them split and the
q/k rows permuted, since its RoPE rotates (first half, second half) of each head where Meta's
rotates interleaved pairs. generation_config.json carries bos, eos and pad, so other tools stop
generating at <eos>. A LoRA checkpoint exports merged into its base, or with --adapter as the HF
export of its base plus a peft adapter for it (`PeftModel.from_pretrained(model, "OUT/adapter")`).
Two exports of one checkpoint to one --out are the same bytes, in any process (nothing hangs on hash order).
An export replaces an earlier one of its format at --out whole: the files of the earlier one that it does not
write go too (an adapter/ left beside merged weights would be applied twice), files of the user's stay.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from babyllama.chat_format import CHAT_TEMPLATE
from babyllama.checkpoint import (
    checked_tokenizer,
    load_checkpoint,
    lora_base,
    model_name,
    read_config,
    remove_stale_temporaries,
)
from babyllama.errors import UserError, check_out_dir, require, signals_held, writing
from babyllama.lora import ADAPTER_CONFIG, ADAPTER_FILE, PREFIX, adapter_config, is_adapter, save_lora_config
from babyllama.model import ModelConfig
from babyllama.tokenizer import BYTE_PIECE
from babyllama.weights_file import read_safetensors, save_safetensors


def interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a q or k projection (n_heads * head_dim, dim) from RoPE pairs to halves."""
    rows, dim = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def llama_weights(model) -> dict[str, torch.Tensor]:
    """Meta's unfused LLaMA weights under Meta's names (`layers.0.attention.wq.weight` ...), in float32."""
    cfg: ModelConfig = model.cfg
    q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    out = {"tok_embeddings": model.tok_embeddings.weight, "norm": model.norm.weight}
    if not cfg.tie_embeddings:
        out["output"] = model.output.weight
    for i, block in enumerate(model.layers):
        wq, wk, wv = block.attention.wqkv.weight.split([q_rows, kv_rows, kv_rows])
        w1, w3 = block.feed_forward.w13.weight.chunk(2)
        parts = {"attention.wq": wq, "attention.wk": wk, "attention.wv": wv, "attention.wo": block.attention.wo.weight,
                 "feed_forward.w1": w1, "feed_forward.w2": block.feed_forward.w2.weight, "feed_forward.w3": w3,
                 "attention_norm": block.attention_norm.weight, "ffn_norm": block.ffn_norm.weight}
        out |= {f"layers.{i}.{k}": v for k, v in parts.items()}
    return {f"{k}.weight": v.detach().float().contiguous().cpu() for k, v in out.items()}


def renamed(weights: dict[str, torch.Tensor], top: dict[str, str], layer: dict[str, str], prefix: str) -> dict:
    """Meta's names -> another tool's: `top` maps whole names, `layer` the part after `layers.N.`."""
    out = {}
    for name, w in weights.items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            out[prefix.format(i=i) + layer[rest]] = w
        else:
            out[top[name]] = w
    return out


HF_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
          "output.weight": "lm_head.weight"}
HF_LAYER = {"attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
            "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
            "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
            "feed_forward.w2.weight": "mlp.down_proj.weight", "attention_norm.weight": "input_layernorm.weight",
            "ffn_norm.weight": "post_attention_layernorm.weight"}
GGUF_TOP = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
            "output.weight": "output.weight"}
GGUF_LAYER = {"attention.wq.weight": "attn_q.weight", "attention.wk.weight": "attn_k.weight",
              "attention.wv.weight": "attn_v.weight", "attention.wo.weight": "attn_output.weight",
              "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w3.weight": "ffn_up.weight",
              "feed_forward.w2.weight": "ffn_down.weight", "attention_norm.weight": "attn_norm.weight",
              "ffn_norm.weight": "ffn_norm.weight"}


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    out = renamed(llama_weights(model), HF_TOP, HF_LAYER, "model.layers.{i}.")
    for name in out:
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = model.cfg.n_heads if "q_proj" in name else model.cfg.kv_heads
            out[name] = interleaved_to_halves(out[name], heads)
    return out


def hf_config(cfg: ModelConfig, tokenizer) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02, "torch_dtype": "float32",
        "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id,
    }


def export_tokenizer(tokenizer, out: Path, max_len: int) -> None:
    """tokenizer.json (fast) or tokenizer.model (SentencePiece) plus tokenizer_config.json, no bos added."""
    from babyllama.tokenizer import HFTokenizer

    if isinstance(tokenizer, HFTokenizer):
        tokenizer.save(out)
        (out / "babyllama_tokenizer.json").unlink()
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    else:
        shutil.copyfile(tokenizer.path, out / "tokenizer.model")
        config = {"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_dummy_prefix_space": True}
    config |= tokenizer.special_tokens()
    config |= {"add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
               "model_max_length": max_len, "chat_template": CHAT_TEMPLATE,
               "split_special_tokens": False}  # transformers' default: apply_chat_template's <s> is bos
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    if not isinstance(tokenizer, HFTokenizer) and _sentencepiece_as_fast(tokenizer, out):
        config["tokenizer_class"] = "PreTrainedTokenizerFast"  # read tokenizer.json as written
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps(tokenizer.special_tokens(), indent=2, ensure_ascii=False) + "\n")


PROBES = ["  two leading spaces", " ", "\t tab", "a  b ", "</s> spelled", "\u3000全角", "𠀀😀",
          "床前明月光，疑是地上霜。"]


def _sentencepiece_as_fast(tokenizer, out: Path) -> bool:
    """Write out/tokenizer.json for a SentencePiece model when it then encodes PROBES as sentencepiece
    does. transformers' conversion adds the dummy prefix "▁" only when the text does not start with a
    space ("  a" -> ▁▁ a, where sentencepiece gives ▁▁ ▁a); a normalizer that always prepends it, then
    turns spaces into "▁", matches sentencepiece for models that keep extra whitespace (ChatGLM2's)."""
    transformers = require("transformers", "export")
    from tokenizers import normalizers

    fast = transformers.AutoTokenizer.from_pretrained(out).backend_tokenizer
    fast.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    fast.pre_tokenizer = None
    fast.encode_special_tokens = True  # probes that spell "</s>" are text, as sentencepiece reads them
    if any(fast.encode(t, add_special_tokens=False).ids != tokenizer.encode(t) for t in PROBES):
        return False  # another normalisation (e.g. extra whitespace removed): keep transformers' conversion
    # not fast.save, whose error of a full disk is no OSError ("No space left on device (os error 28)")
    (out / "tokenizer.json").write_text(fast.to_str(pretty=True), encoding="utf-8")
    return True


def export_hf(checkpoint: str | Path, out: str | Path) -> Path:
    out = Path(out)
    model, tokenizer, _ = load_checkpoint(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(hf_state_dict(model), out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(hf_config(model.cfg, tokenizer), indent=2) + "\n")
    generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                  "pad_token_id": tokenizer.pad_id, "do_sample": False,
                  "suppress_tokens": list(tokenizer.suppress_tokens(model.cfg.vocab_size))}  # as babyllama masks
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    export_tokenizer(tokenizer, out, model.cfg.max_seq_len)
    return out


HF_LORA = {"attention.wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           "attention.wo": ("self_attn.o_proj",), "feed_forward.w13": ("mlp.gate_proj", "mlp.up_proj"),
           "feed_forward.w2": ("mlp.down_proj",)}


def hf_adapter_tensors(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our LoRA adapter as peft's for LlamaForCausalLM. A fused layer's parts share its lora_A and take
    their rows of lora_B (B A split by rows is each part's B_part A), q/k rows permuted as the weights are."""
    rows = {"attention.wqkv": [cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim],
            "feed_forward.w13": [cfg.ffn_dim, cfg.ffn_dim]}
    heads = {"self_attn.q_proj": cfg.n_heads, "self_attn.k_proj": cfg.kv_heads}
    pattern = re.escape(PREFIX) + r"layers\.(\d+)\.(\w+\.\w+)\.(lora_[AB])\.weight"  # layers.0.attention.wqkv.lora_A
    out = {}
    for name, w in tensors.items():
        i, layer, ab = re.fullmatch(pattern, name).groups()
        parts = HF_LORA[layer]
        pieces = [w] * len(parts) if ab == "lora_A" else w.split(rows.get(layer, [w.size(0)]))
        for part, piece in zip(parts, pieces, strict=True):
            if ab == "lora_B" and part in heads:
                piece = interleaved_to_halves(piece, heads[part])
            out[f"{PREFIX}model.layers.{i}.{part}.{ab}.weight"] = piece.float().clone()  # a copy each
    return out


def export_hf_adapter(checkpoint: str | Path, out: str | Path, final: Path | None = None) -> Path:
    """The HF export of a LoRA checkpoint's base in out/, and its adapter as peft's for it in out/adapter; final:
    where out is moved to afterwards, the base's path that the adapter records (default out).
    Raises UserError, before writing, for a folder that is no checkpoint (read_config), a checkpoint that is no
    LoRA one, tokenizer files in it that are not
    the ones its config.json records (checked_tokenizer, as every load checks them), an adapter whose weights are
    not finite (read_safetensors), or a missing base."""
    peft = require("peft", "lora")
    if not is_adapter(checkpoint):
        read_config(checkpoint)  # a folder that is no checkpoint (a training run) is named as what it is
        raise UserError(f"{checkpoint} is not a LoRA checkpoint; --adapter exports the adapter of one "
                        "(leave it out to export the model).")
    _, cfg, _ = checked_tokenizer(checkpoint)  # its own tokenizer files, if any, must be the ones it records
    tensors = hf_adapter_tensors(read_safetensors(Path(checkpoint) / ADAPTER_FILE), cfg)
    out = export_hf(lora_base(checkpoint), out)
    config = adapter_config(checkpoint)
    targets = sorted({name.split(".")[-3] for name in tensors})
    hf = peft.LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                         target_modules=targets, task_type="CAUSAL_LM",
                         base_model_name_or_path=str((final or out).resolve()))
    save_lora_config(hf, out / "adapter")
    save_safetensors(tensors, out / "adapter" / ADAPTER_FILE)
    return out


def gguf_tensors(model) -> dict[str, torch.Tensor]:
    """llama.cpp's tensor names; its llama RoPE rotates interleaved pairs, so q/k keep our row order."""
    return renamed(llama_weights(model), GGUF_TOP, GGUF_LAYER, "blk.{i}.")


def gguf_vocab(tokenizer, vocab_size: int) -> dict:
    """Token strings, types and the merges (GPT-2's BPE) or scores (SentencePiece), padded to the model's vocab.

    A SentencePiece .model gives llama.cpp's "llama" vocabulary; a tokenizer.json gives what tokenizer_json_vocab
    finds it to be, or raises UserError. The ids that generation suppresses (Tokenizer.suppress_tokens) are typed as
    llama.cpp expects: the control ids and eos CONTROL (an unknown id UNKNOWN), whether or not the tokenizer file
    flags them special (bos and pad may come from babyllama_tokenizer.json or tokenizer_config.json), and the
    model's ids beyond the tokenizer's UNUSED, as llama.cpp's convert_hf_to_gguf.py pads a vocabulary."""
    import gguf

    from babyllama.tokenizer import HFTokenizer

    if isinstance(tokenizer, HFTokenizer):
        vocab = tokenizer_json_vocab(tokenizer)
    else:
        sp = tokenizer.sp
        tokens = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
        types = [gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.CONTROL if sp.is_control(i) else
                 gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.NORMAL for i in range(len(tokens))]
        vocab = {"model": "llama", "tokens": tokens, "types": types,
                 "scores": [sp.get_score(i) for i in range(len(tokens))]}
    tokens, types = vocab["tokens"], vocab["types"]
    for i in {*tokenizer.control_ids(), tokenizer.eos_id}:  # what generation suppresses, and eos: CONTROL, so
        if types[i] == gguf.TokenType.NORMAL:  # llama.cpp neither prints them nor reads their text as them
            types[i] = gguf.TokenType.CONTROL  # (an unknown id stays UNKNOWN)
    pad = vocab_size - len(tokens)  # ids the model has and the tokenizer never makes
    tokens += [f"[PAD{i}]" for i in range(pad)]
    types += [gguf.TokenType.UNUSED] * pad
    if "scores" in vocab:
        vocab["scores"] += [0.0] * pad
    return vocab


SENTENCEPIECE_SPACES = {"type": "Sequence", "normalizers": [  # "▁" before the text and for each space
    {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
GPT2_SPLIT = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}  # GPT-2's regex, then bytes


def tokenizer_json_vocab(tokenizer) -> dict:
    """The GGUF vocabulary (model, tokens, types, and merges or scores) of an HFTokenizer's tokenizer.json.

    llama.cpp splits text as a tokenizer.json does in two cases, and GGUF can say no other: a byte-level BPE with
    GPT-2's pre-tokenizer ("gpt2", pre "gpt-2", its merges: what `tokenizer train` makes), and a BPE with byte
    fallback over the text with "▁" before it and for each space ("llama", SentencePiece's: transformers'
    conversion of a SentencePiece BPE model, such as export --format hf of ChatGLM2's tokenizer.model). llama.cpp
    reads the second as SentencePiece does: neighbouring pieces that make a token merge, the highest score first,
    what stays no token becomes its bytes' <0xXX>. A token's score is minus the rank of the first merge that makes
    it, which merges as BPE does when those are all such pairs (sentencepiece_order). Raises UserError, one
    sentence naming what llama.cpp would split otherwise, for anything else (a Unigram or WordPiece model, a
    Metaspace pre-tokenizer, Llama 3's or Qwen's pre-tokenizer, ...)."""
    import gguf

    data = json.loads(tokenizer.tok.to_str())
    model = data["model"]
    tokens = [tokenizer.tok.id_to_token(i) for i in range(tokenizer.vocab_size)]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    kind = gguf_model(data, tokens, merges)
    types = [gguf.TokenType.UNKNOWN if t == model.get("unk_token") else gguf.TokenType.NORMAL for t in tokens]
    if kind == "gpt2":
        return {"model": "gpt2", "pre": "gpt-2", "tokens": tokens, "types": types,
                "merges": [" ".join(m) for m in merges]}
    types = [gguf.TokenType.BYTE if BYTE_PIECE.fullmatch(t) else k for t, k in zip(tokens, types, strict=True)]
    first: dict[str, float] = {}
    for rank, (left, right) in enumerate(merges):
        first.setdefault(left + right, -float(rank))
    return {"model": "llama", "tokens": tokens, "types": types, "scores": [first.get(t, 0.0) for t in tokens]}


def gguf_model(data: dict, tokens: list[str], merges: list[tuple[str, str]]) -> str:
    """llama.cpp's tokenizer model that splits text as tokenizer.json `data` does: "gpt2" or "llama" (see
    tokenizer_json_vocab); UserError naming what it would split otherwise."""
    model, normalizer, pre = data["model"], data.get("normalizer"), data.get("pre_tokenizer")
    decoder = data.get("decoder") or {}
    if model["type"] != "BPE":
        why = f"a {model['type']} model"
    elif any(model.get(k) for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "ignore_merges")):
        why = "BPE with dropout, subword affixes or ignore_merges"
    elif normalizer is None and (pre or {}).items() >= GPT2_SPLIT.items() and not model.get("byte_fallback"):
        return "gpt2"
    elif decoder.get("type") == "ByteLevel":
        why = "a byte-level BPE that splits text otherwise than GPT-2's pre-tokenizer"
    elif pre is not None and pre.get("type") == "Metaspace":
        why = ("a Metaspace pre-tokenizer, which puts no \u2581 before a text that starts with a space, where "
               "llama.cpp always puts one")
    elif normalizer != SENTENCEPIECE_SPACES or pre is not None or not model.get("byte_fallback"):
        why = "a BPE that is neither GPT-2's byte level nor SentencePiece's \u2581 for spaces with byte fallback"
    elif pair := sentencepiece_order(tokens, merges):
        why = f"merges that SentencePiece's scores cannot order: {pair[0]!r} + {pair[1]!r}"
    else:
        return "llama"
    raise UserError(f"GGUF cannot express this checkpoint's tokenizer.json ({why}): llama.cpp would split text into "
                    "other ids; export it with --format hf, which keeps the tokenizer.json.")


def sentencepiece_order(tokens: list[str], merges: list[tuple[str, str]]) -> tuple[str, str] | None:
    """A pair of pieces that llama.cpp's SentencePiece tokenizer would merge otherwise than BPE with these merges,
    None when there is none. SentencePiece merges any two neighbours (pieces, or characters) that make a token,
    by that token's score; BPE merges only the pairs listed, by rank. They agree when every such pair is a merge
    and the merges that make one token have neighbouring ranks (its score: minus the first), as transformers'
    conversion of a SentencePiece model lists them. 90,061 merges of 64,789 tokens: 0.4 s."""
    vocab, merged = set(tokens), set(merges)
    ranks: dict[str, list[int]] = {}
    for rank, (left, right) in enumerate(merges):
        ranks.setdefault(left + right, []).append(rank)
    for r in ranks.values():
        if r[-1] - r[0] + 1 != len(r):  # another token's merge between two of this one's
            return merges[r[-1]]
    for token in tokens:
        for cut in range(1, len(token)):
            pair = token[:cut], token[cut:]
            if all(p in vocab or len(p) == 1 for p in pair) and pair not in merged:  # characters: SentencePiece's start
                return pair
    return None


def export_gguf(checkpoint: str | Path, out: str | Path) -> Path:
    gguf = require("gguf", "export")
    model, tokenizer, _ = load_checkpoint(checkpoint)
    cfg: ModelConfig = model.cfg
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    vocab = gguf_vocab(tokenizer, cfg.vocab_size)  # UserError for a tokenizer that GGUF cannot express
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(model_name(checkpoint))  # "sft/final", as serve names it
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model(vocab["model"])
    if vocab["model"] == "gpt2":
        w.add_tokenizer_pre(vocab["pre"])
        w.add_token_merges(vocab["merges"])
    else:
        w.add_token_scores(vocab["scores"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_bos_token_id(tokenizer.bos_id)
    w.add_eos_token_id(tokenizer.eos_id)
    w.add_pad_token_id(tokenizer.pad_id)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)  # llama.cpp and transformers' GGUF reader parse its <s> and </s>
    for name, tensor in gguf_tensors(model).items():
        w.add_tensor(name, tensor.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@contextmanager
def quiet(logger: str):
    """The logger's INFO (and DEBUG) lines dropped for the body; its level put back after."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def export(checkpoint: str | Path, out: str | Path, format: str = "hf", adapter: bool = False) -> Path:
    """Write checkpoint as format (hf: a directory, gguf: one file) to out; UserError for an out that
    holds babyllama's own files (the export would overwrite them), a folder that holds files and is not an
    earlier hf export, a file that is not an earlier GGUF, or an out that cannot be written."""
    if adapter and format != "hf":
        raise UserError("--adapter writes a peft adapter for the Hugging Face export; use it with --format hf.")
    if format not in ("hf", "gguf"):
        raise UserError(f"export format {format!r} is not supported; use --format hf or gguf.")
    spelled, out = str(out), Path(out)  # Path drops a trailing slash
    check_out_dir(out, "--out", folder=False)  # a file above out: found before the checkpoint is loaded
    if format == "gguf" and (out.is_dir() or spelled.endswith(("/", os.sep))):  # a file beside it, not in it: one
        named = out if out.name else out.resolve()  # inside a checkpoint would change that checkpoint
        what = "is a directory" if out.is_dir() else "ends with a slash, so it names a folder"
        example = named.with_name(named.name + ".gguf") if named.name else named / "model.gguf"
        raise UserError(f"{spelled} {what}; --format gguf writes one file, e.g. --out {example}.")
    if format == "hf" and out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; --format hf writes a directory, so choose another --out.")
    if out.is_dir() and any((out / name).exists() for name in BABYLLAMA_FILES):
        raise UserError(f"{out} holds a babyllama checkpoint or run, which the export would overwrite; "
                        "choose another --out.")
    if out.is_dir() and any(not f.name.startswith(".") for f in out.iterdir()) and not is_hf_export(out):
        raise UserError(f"{out} holds files and is not an earlier --format hf export; choose a new or empty --out "
                        "(the export's model.safetensors would make that folder read as a checkpoint).")
    if format == "gguf" and out.is_file() and not is_gguf(out):
        raise UserError(f"{out} exists and is not a GGUF file, which the export would overwrite; choose another --out.")
    named = out.resolve()  # "." has no name of its own
    tmp = named.parent / f".{named.name}.tmp-{os.getpid()}"  # written whole, then moved to out
    remove_stale_temporaries(named.parent, name=named.name)  # of an export killed by kill -9
    try:
        named.parent.mkdir(parents=True, exist_ok=True)
        with writing(out, tmp):  # CannotWrite where the disk refuses it; on any failure tmp is removed
            if format == "gguf":
                with quiet("gguf"):  # its INFO lines name the temporary file; the CLI says `exported: OUT`, as for hf
                    export_gguf(checkpoint, tmp)
                with signals_held(complete=out):  # the file is whole: a stop as it is renamed in says so
                    tmp.replace(out)
            else:
                export_hf_adapter(checkpoint, tmp, out) if adapter else export_hf(checkpoint, tmp)
                move_into(tmp, out)
        return out
    except OSError as e:
        raise UserError(f"cannot write the export to {out}: {e.strerror or e}.") from None


def move_into(tmp: Path, out: Path) -> None:
    """The export in tmp into out (out made if missing), in place of an earlier export there, then tmp removed:
    each file and folder of tmp replaces its namesake, and every other file of an earlier export (HF_FILES: the
    adapter/ of an --adapter export under merged weights, which peft would apply a second time, a tokenizer.model
    under a tokenizer.json) is removed first. Renames and removals only, so a full disk cannot stop it halfway;
    SIGINT and SIGTERM wait until it is done, then raise Completed (the export is). out's other files stay."""
    with signals_held(complete=out):
        if not out.exists():
            tmp.rename(out)
            return
        for name in HF_FILES:
            if not (tmp / name).exists() and (out / name).exists():
                remove_export_file(out / name)
        for f in tmp.iterdir():
            if f.is_dir() and (out / f.name).is_dir():  # adapter/: its files replace theirs, the user's stay
                for g in f.iterdir():
                    g.replace(out / f.name / g.name)
                f.rmdir()
            else:
                f.replace(out / f.name)
        tmp.rmdir()


def remove_export_file(path: Path) -> None:
    """An earlier export's file, or its adapter/ folder's files (ADAPTER_FILES) and then the folder if they were
    all it held: a file of the user's own there stays."""
    if not path.is_dir():
        path.unlink()
        return
    for name in ADAPTER_FILES:
        (path / name).unlink(missing_ok=True)
    if not any(path.iterdir()):
        path.rmdir()


HF_FILES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
            "tokenizer_config.json", "special_tokens_map.json", "adapter")  # every file an hf export may write
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_FILE)  # what an --adapter export writes in adapter/

BABYLLAMA_FILES = ("babyllama_tokenizer.json", "trainer_state.pt", "checkpoints", "metrics.jsonl", "final")


def is_hf_export(folder: Path) -> bool:
    """Whether folder holds what export_hf writes: model.safetensors and a LlamaForCausalLM config.json."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (folder / "model.safetensors").is_file() and isinstance(config, dict) and \
        config.get("architectures") == ["LlamaForCausalLM"]


def is_gguf(path: Path) -> bool:
    """Whether the file starts with GGUF's magic bytes (False when it cannot be read)."""
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
