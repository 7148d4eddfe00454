"""The LLaMA-2 Transformer: RMSNorm, RoPE, grouped-query attention, SwiGLU, a KV cache, generate.

    from babyllama.model import ModelConfig, Transformer, PRESETS
    model = Transformer(PRESETS["demo"])
    _, loss = model(idx, targets)                      # training: idx, targets (B, T), -1: no loss
    ids = model.generate([1, 2, 3], max_new_tokens=32) # inference with the KV cache

The weights are Meta's / llama2.c's LLaMA (interleaved RoPE pairs, as the baby-llama2-chinese
recipe) with two projections fused for speed: `wqkv` is wq, wk, wv stacked and `w13` is w1
(gate) and w3 (up) stacked; export.py splits them and permutes q/k for Hugging Face.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from babyllama.errors import UserError
from babyllama.sampling import out_of_range

try:  # FlexAttention (PyTorch >= 2.5): a document mask as block sparsity, never a (T, T) tensor
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # older PyTorch: the dense mask below
    BlockMask = create_block_mask = flex_attention = None

FLEX_DEVICES = {"cuda"}  # PyTorch 2.13 has no FlexAttention backward on a CPU (its forward runs: tests use it)
SDPA_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)  # SDPA shares kv heads itself
MAX_SEQ_LEN = 1 << 16  # positions: the RoPE tables and each KV cache are allocated for max_seq_len of them


def whole(v) -> bool:
    """Whether a value read from JSON is a whole number (true and false are not)."""
    return isinstance(v, int) and not isinstance(v, bool)


def real(v) -> bool:
    """Whether a value read from JSON is a finite number (true and false, NaN and Infinity are not)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int | None = None  # None: as many as n_heads (plain multi-head attention)
    vocab_size: int = 64793
    hidden_dim: int | None = None  # None: LLaMA's 2/3 * 4 * dim, rounded up to multiple_of
    multiple_of: int = 32
    norm_eps: float = 1e-5
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    dropout: float = 0.0
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        """Every value checked, types and ranges, before anything is built from it: a config.json read
        from a checkpoint is as trusted as the user's flags. Raises UserError naming the setting."""
        checks = {
            "dim": (whole(self.dim) and self.dim >= 1, "a whole number >= 1"),
            "n_layers": (whole(self.n_layers) and self.n_layers >= 1, "a whole number >= 1"),
            "n_heads": (whole(self.n_heads) and self.n_heads >= 1, "a whole number >= 1"),
            "n_kv_heads": (self.n_kv_heads is None or whole(self.n_kv_heads) and self.n_kv_heads >= 1,
                           "null or a whole number >= 1"),
            "vocab_size": (whole(self.vocab_size) and self.vocab_size >= 1, "a whole number >= 1"),
            "hidden_dim": (self.hidden_dim is None or whole(self.hidden_dim) and self.hidden_dim >= 1,
                           "null or a whole number >= 1"),
            "multiple_of": (whole(self.multiple_of) and self.multiple_of >= 1, "a whole number >= 1"),
            "norm_eps": (real(self.norm_eps) and self.norm_eps > 0, "a number > 0"),
            "max_seq_len": (whole(self.max_seq_len) and 2 <= self.max_seq_len <= MAX_SEQ_LEN,
                            f"a whole number in [2, {MAX_SEQ_LEN}]"),
            "rope_theta": (real(self.rope_theta) and self.rope_theta > 0, "a number > 0"),
            "dropout": (real(self.dropout) and 0 <= self.dropout < 1, "a number in [0, 1)"),
            "tie_embeddings": (isinstance(self.tie_embeddings, bool), "true or false"),
        }
        for name, (ok, wanted) in checks.items():
            if not ok:
                raise UserError(f"model setting {name} must be {wanted}, not {getattr(self, name)!r}.")
        if self.dim % self.n_heads:
            raise UserError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}.")
        if self.n_heads % self.kv_heads:
            raise UserError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.kv_heads}.")
        if self.head_dim % 2:
            raise UserError(f"head size dim/n_heads = {self.head_dim} must be even for RoPE.")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def num_params(self) -> int:
        """Unique parameters, from the shapes alone (Transformer.num_params counts the built model)."""
        heads = self.n_heads * self.head_dim
        attention = self.dim * (heads + 2 * self.kv_heads * self.head_dim) + heads * self.dim
        per_layer = attention + 3 * self.dim * self.ffn_dim + 2 * self.dim  # wqkv wo, w13 w2, two norms
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + head + self.n_layers * per_layer + self.dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise UserError(f"unknown model settings {unknown}; known: {sorted(cls.__dataclass_fields__)}.")
        return cls(**known)


PRESETS: dict[str, ModelConfig] = {
    # the recipe's two models: 58.5M and 218.2M unique parameters ("92M" counts the tied head twice)
    "baby-92m": ModelConfig(dim=512, n_layers=8, n_heads=8, max_seq_len=512, multiple_of=32),
    "baby-218m": ModelConfig(dim=1024, n_layers=12, n_heads=8, max_seq_len=1024, multiple_of=32),
    # trains on a laptop CPU in minutes (vocab set by the demo's 8k tokenizer)
    "demo": ModelConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=8192, max_seq_len=256),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}.")
    return replace(PRESETS[name], **overrides)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # normalise in fp32 even under autocast
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angle for every (position, pair), each (max_len, head_dim/2)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(max_len).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0,x1), (x2,x3)... of x (B, T, H, D) by cos/sin (T, D/2)."""
    if torch.compiler.is_compiling():  # inductor fuses these real ops; it has no complex kernels
        xr, xi = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, T, H, D/2) each
        cos, sin = cos[:, None, :], sin[:, None, :]
        out = torch.stack((xr * cos - xi * sin, xr * sin + xi * cos), dim=-1).flatten(-2)
    else:  # eager: each pair as a complex number, one multiply (4x faster on a CPU than six real ops)
        pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
        out = torch.view_as_real(pairs * torch.complex(cos, sin)[:, None, :]).flatten(-2)
    return out.type_as(x)


class KVCache:
    """Keys and values of every layer for one batch, preallocated to max_len positions."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.pos = 0  # number of positions already filled

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, D) at positions pos..pos+T; return all keys/values so far."""
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        # q, k and v in one matmul: rows [0, H*D) are wq, then wk, then wv (Hkv*D rows each)
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, cache: KVCache | None = None, mask=None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); mask: None (causal), (B, 1, T, T) bool or a FlexAttention BlockMask."""
        B, T, _ = x.shape
        qkv = self.wqkv(x).view(B, T, self.n_heads + 2 * self.n_kv, self.head_dim)
        q, k, v = qkv.split([self.n_heads, self.n_kv, self.n_kv], dim=2)  # (B, T, H|Hkv|Hkv, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        start = 0
        if cache is not None:
            start = cache.pos
            k, v = cache.update(self.layer, k, v)  # (B, Hkv, start+T, D)
        gqa = self.n_kv != self.n_heads  # grouped-query attention: each kv head serves n_heads/n_kv heads
        if BlockMask is not None and isinstance(mask, BlockMask):
            y = flex(q, k, v, mask, gqa)
        else:
            if gqa and not SDPA_GQA:
                k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
                v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            if mask is None and start > 0 and T > 1:  # a chunk after a cached prefix
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=mask is None and start == 0 and T > 1,
                **({"enable_gqa": True} if gqa and SDPA_GQA else {}),
            )  # (B, H, T, D)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, gqa: bool) -> torch.Tensor:
    """FlexAttention, compiled into one fused kernel on a GPU (inside a compiled model it already is).
    q (B, H, T, D), k and v (B, Hkv, T, D) -> (B, H, T, D)."""
    fn = flex_attention
    if q.device.type != "cpu" and not torch.compiler.is_compiling():
        fn = compiled_flex_attention()
    return fn(q, k, v, block_mask=block_mask, enable_gqa=gqa)


@functools.cache
def compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)


def document_mask(segments: torch.Tensor, use_flex: bool):
    """Causal attention within a document: position q sees k <= q where segments[b, k] == segments[b, q].

    segments (B, T) int64, a document (or packed sample) id per position; padding shares one id, so
    no row is empty. Returns a FlexAttention BlockMask (blocks of 128 x 128 that cross no boundary
    are skipped, nothing of size T x T is stored) or, for SDPA, a (B, 1, T, T) bool mask.
    """
    B, T = segments.shape
    if use_flex:
        def same_document_causal(b, h, q, k):
            return (segments[b, q] == segments[b, k]) & (q >= k)

        return create_block_mask(same_document_causal, B, None, T, T, device=segments.device)
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    return ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=False)  # LLaMA's w1 (gate) then w3 (up)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)  # (B, T, F) each
        return self.w2(F.silu(gate) * up)  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, cache=None, mask=None) -> torch.Tensor:
        x = x + self.drop(self.attention(self.attention_norm(x), cos, sin, cache, mask))
        return x + self.drop(self.feed_forward(self.ffn_norm(x)))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_rope()
        self.reset_parameters()
        self.activation_checkpointing = False  # recompute each block in the backward pass (a training setting)

    def tie_weights(self) -> None:
        """Share the output head with the embedding (again after `to_empty`, which unties them)."""
        if self.cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def init_rope(self) -> None:
        """(Re)compute the RoPE tables, e.g. after building the model on the meta device."""
        device = self.tok_embeddings.weight.device
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def reset_parameters(self) -> None:
        """N(0, 0.02) everywhere; the projections into the residual stream get 0.02/sqrt(2L)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        segments: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) -> (logits (B, T, V) or (B, 1, V) with last_only, None), or (None, loss) with targets.

        The loss is the mean cross-entropy over the target positions that are not -1 (PyTorch's
        ignore_index); it is 0, not NaN, when no position counts. With targets the logits are
        never materialised whole (see LinearCrossEntropy). reduction="none" gives the loss of
        every position instead, (B, T) fp32, 0 where the target is -1 (DPO sums it per answer).
        segments (B, T) int64, optional: a document id per position (packed samples, doc_mask);
        attention then stays within each document (document_mask).
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens is longer than max_seq_len {self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        mask = None if segments is None else document_mask(segments, self.use_flex(idx.device))
        h = self.tok_embeddings(idx)  # (B, T, C)
        for layer in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():  # keep only each block's input
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, cache, mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, cache, mask)
        if cache is not None:
            cache.pos += T
        h = self.norm(h)
        if targets is None:
            return self.output(h[:, -1:] if last_only else h), None
        if reduction == "none":
            return None, token_cross_entropy(h, self.output.weight, targets)
        return None, linear_cross_entropy(h, self.output.weight, targets)

    def use_flex(self, device: torch.device) -> bool:
        """FlexAttention for document masks where it trains (no attention dropout in it), else SDPA."""
        return (flex_attention is not None and device.type in FLEX_DEVICES
                and not (self.training and self.cfg.dropout > 0))

    def num_params(self) -> int:
        """Unique parameters: a tied embedding and output head count once."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs (forward + backward) per token, as in the PaLM paper's appendix B."""
        cfg, T = self.cfg, seq_len or self.cfg.max_seq_len
        n = self.num_params() - (0 if cfg.tie_embeddings else self.tok_embeddings.weight.numel())
        return 6 * n + 12 * cfg.n_layers * cfg.dim * T

    def stream(
        self,
        prompt: Sequence[int] | torch.Tensor,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        eos_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        suppress_tokens: Sequence[int] = (),
    ) -> Iterator[int]:
        """Yield new token ids one by one until eos (not yielded), max_new_tokens or a full context.

        prompt: token ids in [0, vocab_size), a sequence (list, tuple) or an integer tensor of shape (T,) or (1, T)
        (prompt_ids), of at most max_seq_len - 1 tokens, so that one new token fits. The sampling arguments are in
        sampling.RANGES (temperature 0: greedy). Raises, at the call: TypeError for another prompt type, ValueError
        for an empty prompt, an id out of the vocabulary, a prompt that leaves no room in the context, or a value out
        of range.
        use_cache=False recomputes the whole sequence at every step (for tests and benchmarks).
        suppress_tokens: ids whose logits are set to -inf, never produced (Tokenizer.suppress_tokens:
        bos, pad and ids beyond the tokenizer's vocabulary, as HF generate's `suppress_tokens`).
        """
        ids = self.checked_prompt(prompt)
        why = out_of_range(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           repetition_penalty=repetition_penalty)
        if why is not None:
            raise ValueError(why)
        return self.steps(ids, max_new_tokens, (temperature, top_k, top_p, repetition_penalty), eos_id, use_cache,
                          generator, suppress_tokens)

    def checked_prompt(self, prompt: Sequence[int] | torch.Tensor) -> list[int]:
        """prompt_ids(prompt), or ValueError for an id outside [0, vocab_size) (the embedding's IndexError) or for
        a prompt of max_seq_len tokens or more, which leaves no room for a new token (chat and serve refuse such a
        prompt too, rather than cut it)."""
        ids, V, ctx = prompt_ids(prompt), self.cfg.vocab_size, self.cfg.max_seq_len
        if (bad := next((i for i, t in enumerate(ids) if not 0 <= t < V), None)) is not None:
            raise ValueError(f"prompt id {ids[bad]} (at position {bad}) is not in the vocabulary of {V} ids "
                             f"(0 to {V - 1})")
        if len(ids) >= ctx:
            raise ValueError(f"the prompt ({len(ids)} tokens) leaves no room in the context of {ctx} tokens: "
                             f"give at most {ctx - 1}, e.g. its last {ctx - 1} (prompt[-{ctx - 1}:])")
        return ids

    @torch.inference_mode()
    def steps(self, ids: list[int], max_new_tokens: int, sampling: tuple[float, int, float, float],
              eos_id: int | None, use_cache: bool, generator: torch.Generator | None, suppress_tokens: Sequence[int]
              ) -> Iterator[int]:
        """stream's generator, for its checked prompt ids (extended in place) and sampling (temperature, top_k,
        top_p, repetition_penalty)."""
        device = self.rope_cos.device
        cache = None
        if use_cache:
            cache = KVCache(self.cfg, 1, self.cfg.max_seq_len, device, self.tok_embeddings.weight.dtype)
        x = torch.tensor([ids], device=device)  # (1, T): the whole prompt first
        suppress = torch.tensor(list(suppress_tokens), dtype=torch.long, device=device)
        for _ in range(max_new_tokens):
            logits, _ = self(x, cache=cache, last_only=True)
            logits[0, -1, suppress] = -float("inf")
            nxt = sample_next(logits[0, -1], ids, *sampling, generator)
            if nxt == eos_id:
                return
            ids.append(nxt)
            yield nxt
            if len(ids) >= self.cfg.max_seq_len:
                return
            x = torch.tensor([[nxt]] if use_cache else [ids], device=device)

    def generate(self, prompt: Sequence[int] | torch.Tensor, **kwargs) -> list[int]:
        """The new token ids of stream(), as a list."""
        return list(self.stream(prompt, **kwargs))


def prompt_ids(prompt: Sequence[int] | torch.Tensor) -> list[int]:
    """The ids of a prompt: a sequence of ints, or an integer tensor of shape (T,) or (1, T) (one sequence: the
    README's `idx` shape). Raises TypeError for another tensor (`if not prompt` raised torch's "Boolean value of
    Tensor with more than one value is ambiguous") or a sequence holding what is no int (a float, a bool, a str: the
    embedding's RuntimeError), ValueError for an empty prompt."""
    if isinstance(prompt, torch.Tensor):
        if prompt.is_floating_point() or prompt.is_complex() or prompt.dtype == torch.bool or not (
                prompt.dim() == 1 or (prompt.dim() == 2 and prompt.size(0) == 1)):
            raise TypeError(f"generate takes one prompt of token ids: a list of ints or an integer tensor of shape "
                            f"(T,) or (1, T), not a {prompt.dtype} tensor of shape {tuple(prompt.shape)}")
        prompt = prompt.reshape(-1).tolist()
    ids = [index_of(t, at) for at, t in enumerate(prompt)]
    if not ids:
        raise ValueError("generation needs a prompt of at least one token")
    return ids


def index_of(token, at: int) -> int:
    """token as an int id: an int, numpy's or an integer tensor's of one element (operator.index); TypeError naming
    it and its position at for another (1.5, True, torch.tensor(True), "2")."""
    if not isinstance(token, bool) and not (isinstance(token, torch.Tensor) and token.dtype == torch.bool):
        with contextlib.suppress(TypeError):
            return operator.index(token)
    raise TypeError(f"generate takes a prompt of int token ids, not {type(token).__name__} {token!r} (at position "
                    f"{at})")


class LinearCrossEntropy(torch.autograd.Function):
    """The output head and the cross-entropy in one pass over chunks of positions.

    The (N, V) logits never exist whole (2 GB in fp32 for 16 x 512 tokens of a 64793 vocab),
    and their gradient, softmax - onehot, is formed right away in the forward pass, which
    saves the backward pass over them. Softmax and loss are computed in fp32.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, weights, chunk: int):
        # h (N, C), weight (V, C), targets (N,) >= 0, weights (N,) fp32
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.size(0), chunk):
            hc, t, w = h[s : s + chunk], targets[s : s + chunk, None], weights[s : s + chunk, None]
            logits = (hc @ weight.t()).float()  # (n, V)
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (n, 1)
            loss += ((lse - logits.gather(1, t)) * w).sum()
            g = logits.sub_(lse).exp_()  # softmax, in place
            g.scatter_add_(1, t, -torch.ones_like(w)).mul_(w)  # d loss / d logits
            g = g.to(hc.dtype)
            grad_h[s : s + chunk] = g @ weight
            grad_w += (g.t() @ hc).float()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None, None, None


LOSS_CHUNK = 2048  # positions whose fp32 logits linear_cross_entropy forms at a time


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = LOSS_CHUNK
                         ) -> torch.Tensor:
    """F.cross_entropy(h @ weight.T, targets, ignore_index=-1) for h (B, T, C), without the logits.

    On a CPU only the positions that carry loss go through the head: in SFT, where the prompt has
    none, that skips most of the head's work. On a GPU, and under torch.compile, every position goes
    through: selecting them (nonzero) makes the host wait for the GPU on every micro-step, and a
    data-dependent shape would break a compiled graph.
    """
    h2, t = h.flatten(0, 1), targets.flatten().clamp(min=0)
    counted = (targets != -1).flatten().float()
    w = counted / counted.sum().clamp(min=1.0)  # (N,): 1 / count where there is loss, else 0
    if h.device.type == "cpu" and not torch.compiler.is_compiling():  # on a GPU this would wait for it
        keep = w.nonzero().squeeze(1)  # (n,) positions with loss
        if len(keep) < len(w):  # pretraining: every position counts, no copy of h or scatter back
            h2, t, w = h2[keep], t[keep], w[keep]
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(h2, weight, t, w, chunk)
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, h2.size(0), chunk):  # evaluation: the same sum, no gradient
        logits = (h2[s : s + chunk] @ weight.t()).float()
        loss += (F.cross_entropy(logits, t[s : s + chunk], reduction="none") * w[s : s + chunk]).sum()
    return loss


def token_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy(h @ weight.T, targets, reduction="none") (B, T) fp32, 0 where targets are -1, for h (B, T, C).

    Only the positions with a target go through the head, (n, V) logits at a time: the answers of DPO.
    """
    keep = targets != -1  # (B, T)
    logits = (h[keep] @ weight.t()).float()  # (n, V)
    nll = F.cross_entropy(logits, targets[keep], reduction="none")  # (n,)
    return torch.zeros(targets.shape, dtype=nll.dtype, device=h.device).masked_scatter(keep, nll)


MIN_TEMPERATURE = 1e-4  # sampling at a lower temperature is greedy decoding


def sample_next(
    logits: torch.Tensor,
    history: Sequence[int],
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    generator: torch.Generator | None = None,
) -> int:
    """Pick the next id from logits (V,): greedy when temperature is 0, else top-k / top-p sampling."""
    if temperature < MIN_TEMPERATURE and repetition_penalty == 1.0:
        return int(logits.argmax())
    logits = logits.float().clone()
    if repetition_penalty != 1.0 and history:
        seen = torch.tensor(sorted(set(history)), device=logits.device)
        prev = logits[seen]
        logits[seen] = torch.where(prev > 0, prev / repetition_penalty, prev * repetition_penalty)
    if temperature < MIN_TEMPERATURE:  # below it logits / temperature overflow fp32: the limit is greedy
        return int(logits.argmax())
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits[logits < kth] = -float("inf")
    probs = F.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        drop = sorted_p.cumsum(0) - sorted_p > top_p  # keep the smallest set reaching top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))
