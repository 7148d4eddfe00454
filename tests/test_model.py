"""The Transformer: KV cache parity, masked loss, parameter count, sampling, bad configs."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from babyllama.errors import UserError
from babyllama.model import (
    PRESETS,
    KVCache,
    ModelConfig,
    Transformer,
    apply_rope,
    linear_cross_entropy,
    rope_tables,
    sample_next,
)
from babyllama.sampling import Sampling
from tests.conftest import favours_control_ids, sharp_model, tiny_config


@pytest.mark.parametrize("n_kv_heads", [None, 2], ids=["mha", "gqa"])
def test_incremental_logits_equal_full_forward(n_kv_heads):
    cfg = tiny_config(n_kv_heads=n_kv_heads)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()  # the training init: logits of order 1
    idx = torch.randint(0, cfg.vocab_size, (2, 24))
    full, _ = model(idx)  # (2, 24, V)
    cache = KVCache(cfg, 2, cfg.max_seq_len, "cpu", torch.float32)
    chunks = [model(idx[:, :9], cache=cache)[0], model(idx[:, 9:15], cache=cache)[0]]  # prefill, then a chunk
    chunks += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(15, 24)]  # one token at a time
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=0)
    assert cache.pos == 24


@pytest.mark.parametrize("n_kv_heads", [None, 2], ids=["mha", "gqa"])
def test_greedy_with_cache_equals_recompute(n_kv_heads):
    model = sharp_model(tiny_config(n_kv_heads=n_kv_heads))
    prompt = [5, 17, 42, 7]
    cached = model.generate(prompt, max_new_tokens=40)
    recomputed = model.generate(prompt, max_new_tokens=40, use_cache=False)
    assert cached == recomputed
    assert len(cached) == 40 and len(set(cached)) > 5  # a real sequence, not one repeated id
    # the reference by hand: argmax of a full forward over the growing sequence
    ids = list(prompt)
    for _ in range(10):
        ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    assert cached[:10] == ids[len(prompt) :]


def test_generation_stops_on_eos_and_at_context_end():
    model = sharp_model(tiny_config())
    free = model.generate([3, 4], max_new_tokens=20)
    eos = free[5]
    first = free.index(eos)
    assert model.generate([3, 4], max_new_tokens=20, eos_id=eos) == free[:first]
    long = model.generate([3] * 60, max_new_tokens=50)  # 64-token context: 4 more fit
    assert len(long) == 4
    assert list(model.stream([3, 4], max_new_tokens=20)) == free


def test_suppressed_tokens_are_never_generated(bpe_tokenizer):
    model = favours_control_ids(sharp_model(tiny_config(vocab_size=604)), {1: 100.0, 0: 90.0, 602: 80.0})
    assert model.generate([3, 4], max_new_tokens=6) == [1] * 6  # what an SFT model did on a held-out item
    suppress = bpe_tokenizer.suppress_tokens(604)
    assert suppress == (0, 1, 600, 601, 602, 603)  # pad, bos, and the rows beyond the tokenizer's 600 ids
    for kw in ({}, {"temperature": 1.0, "top_k": 5}, {"temperature": 1.0, "top_p": 0.9}, {"repetition_penalty": 1.3}):
        ids = model.generate([3, 4], max_new_tokens=30, suppress_tokens=suppress, **kw)
        assert len(ids) == 30 and not set(ids) & set(suppress), kw


def test_rope_paths_agree_and_rotate_pairs(monkeypatch):
    cos, sin = rope_tables(8, 5, 10000.0)
    x = torch.randn(2, 5, 3, 8)
    eager = apply_rope(x, cos, sin)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(apply_rope(x, cos, sin), eager)
    t, pair = 3, 1  # position 3, second pair: (x2, x3) rotated by angle 3 * theta^(-2/8)
    a = 3 * 10000.0 ** (-2 / 8)
    x2, x3 = x[0, t, 0, 2], x[0, t, 0, 3]
    expected = torch.stack([x2 * math.cos(a) - x3 * math.sin(a), x2 * math.sin(a) + x3 * math.cos(a)])
    torch.testing.assert_close(eager[0, t, 0, 2 * pair : 2 * pair + 2], expected)


def test_last_only_logits_are_the_last_row():
    model = sharp_model(tiny_config())
    idx = torch.randint(0, 300, (2, 10))
    full, _ = model(idx)
    last, loss = model(idx, last_only=True)
    assert last.shape == (2, 1, 300) and loss is None
    torch.testing.assert_close(last[:, 0], full[:, -1])


def test_masked_loss_equals_hand_computation():
    model = sharp_model(tiny_config())
    idx = torch.randint(0, 300, (2, 12))
    targets = torch.randint(0, 300, (2, 12))
    targets[1, :3] = -1  # a prompt: no loss
    targets[(torch.rand(2, 12) < 0.4)] = -1  # and scattered positions
    logits, _ = model(idx)
    _, loss = model(idx, targets)
    keep = targets != -1
    by_hand = torch.stack(
        [-F.log_softmax(logits[b, t], -1)[targets[b, t]] for b in range(2) for t in range(12) if keep[b, t]]
    ).mean()
    torch.testing.assert_close(loss, by_hand)
    _, unmasked = model(idx, targets.clamp(min=0))
    torch.testing.assert_close(unmasked, F.cross_entropy(logits.flatten(0, 1), targets.clamp(min=0).flatten()))
    with torch.no_grad():  # the evaluation path gives the same number
        torch.testing.assert_close(model(idx, targets)[1], loss)


@pytest.mark.parametrize("chunk", [5, 4096])
def test_fused_head_loss_gradients_equal_plain_autograd(chunk):
    torch.manual_seed(0)
    h = torch.randn(3, 7, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (3, 7))
    targets[0, 2] = -1
    targets[torch.rand(3, 7) < 0.3] = -1
    fused = linear_cross_entropy(h, weight, targets, chunk=chunk)
    (fused * 2.5).backward()
    fused_grads = h.grad.clone(), weight.grad.clone()
    h.grad = weight.grad = None
    losses = F.cross_entropy((h @ weight.t()).flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none")
    keep = (targets != -1).flatten().float()
    plain = (losses * keep).sum() / keep.sum()
    (plain * 2.5).backward()
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(fused_grads, (h.grad, weight.grad))


def test_all_masked_batch_is_finite_and_trainable():
    model = sharp_model(tiny_config())
    idx = torch.randint(0, 300, (2, 8))
    _, loss = model(idx, torch.full_like(idx, -1))
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_baby_92m_parameter_count_matches_formula():
    dim, layers, vocab = 512, 8, 64793
    hidden = 32 * ((int(2 * 4 * dim / 3) + 31) // 32)  # 1376: LLaMA's SwiGLU size, multiple_of 32
    per_layer = 4 * dim * dim + 3 * dim * hidden + 2 * dim  # wq wk wv wo, w1 w2 w3, two norms
    expected = vocab * dim + layers * per_layer + dim  # tied embedding, final norm
    with torch.device("meta"):
        model = Transformer(PRESETS["baby-92m"])
    assert model.num_params() == expected == 58_479_616 == PRESETS["baby-92m"].num_params
    for cfg in (tiny_config(n_kv_heads=2, tie_embeddings=False), tiny_config(hidden_dim=100), PRESETS["demo"]):
        assert Transformer(cfg).num_params() == cfg.num_params  # the shapes' count is the built model's
    assert expected + vocab * dim == 91_653_632  # the recipe's "92M" counts the tied head twice
    assert model.flops_per_token(512) == 6 * expected + 12 * layers * dim * 512


def test_residual_projections_get_depth_scaled_init():
    torch.manual_seed(0)
    model = Transformer(tiny_config(dim=256, n_layers=8, vocab_size=64))
    std = 0.02 / (2 * 8) ** 0.5
    assert model.layers[3].attention.wo.weight.std().item() == pytest.approx(std, rel=0.05)
    assert model.layers[3].feed_forward.w2.weight.std().item() == pytest.approx(std, rel=0.05)
    assert model.layers[3].attention.wqkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.output.weight is model.tok_embeddings.weight


def test_gqa_has_fewer_kv_weights():
    model = Transformer(tiny_config(n_kv_heads=1))
    assert model.layers[0].attention.wqkv.weight.shape == ((4 + 2 * 1) * 16, 64)  # 4 q heads, 1 k, 1 v
    untied = Transformer(tiny_config(tie_embeddings=False))
    assert untied.output.weight is not untied.tok_embeddings.weight


def test_sampling_controls():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    assert sample_next(logits, [], 0.0, 0, 1.0, 1.0) == 1
    assert sample_next(logits, [1], 0.0, 0, 1.0, 2.0) == 2  # penalised 3.0 -> 1.5 < 2.0
    g = torch.Generator().manual_seed(0)
    assert {sample_next(logits, [], 1.0, 1, 1.0, 1.0, g) for _ in range(20)} == {1}  # top-k 1
    assert {sample_next(logits, [], 1.0, 0, 0.5, 1.0, g) for _ in range(20)} == {1}  # p(1) = 0.66 > 0.5
    assert {sample_next(logits, [], 1.0, 2, 1.0, 1.0, g) for _ in range(200)} == {1, 2}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dim=100, n_heads=3), "dim 100 is not divisible by n_heads 3"),
        (dict(dim=64, n_heads=4, n_kv_heads=3), "n_heads 4 is not divisible by n_kv_heads 3"),
    ],
)
def test_bad_config_fails_with_one_sentence(kwargs, message):
    with pytest.raises(UserError, match=message):
        ModelConfig(**kwargs)


def test_config_dict_roundtrip_and_unknown_keys():
    cfg = tiny_config(n_kv_heads=2)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(UserError, match="unknown model settings"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_layer": 3})


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_sdpa_gqa_equals_repeated_kv_heads(n_kv_heads, monkeypatch):
    model = sharp_model(tiny_config(n_kv_heads=n_kv_heads))
    idx = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        shared = model(idx)[0]
        monkeypatch.setattr("babyllama.model.SDPA_GQA", False)  # PyTorch < 2.5: copy each kv head
        torch.testing.assert_close(model(idx)[0], shared, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_document_mask_keeps_documents_apart(backend, monkeypatch):
    """Changing a token of document 1 leaves the logits of document 2 in the same row unchanged,
    and document 1's logits equal those of running it alone."""
    if backend == "flex":
        pytest.importorskip("torch.nn.attention.flex_attention")
        monkeypatch.setattr("babyllama.model.FLEX_DEVICES", {"cpu"})
    model = sharp_model(tiny_config(n_kv_heads=2))
    eos = 2
    idx = torch.randint(3, 300, (1, 40))
    idx[0, 15] = eos  # document 1: positions 0..14; document 2 starts at its <eos> (15..39)
    segments = torch.cumsum(idx == eos, dim=1)
    changed = idx.clone()
    changed[0, 3] = (idx[0, 3] + 1) % 300 or 3
    with torch.no_grad():
        a, b = model(idx, segments=segments)[0], model(changed, segments=segments)[0]
        torch.testing.assert_close(a[0, 15:], b[0, 15:], atol=1e-5, rtol=0)
        assert not torch.allclose(a[0, 3:15], b[0, 3:15])
        torch.testing.assert_close(a[0, :15], model(idx[:, :15])[0][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(a[0, 15:], model(idx[:, 15:])[0][0], atol=1e-4, rtol=0)  # RoPE: relative


def test_activation_checkpointing_gives_equal_gradients():
    model = sharp_model(tiny_config(n_kv_heads=2)).train()
    idx, targets = torch.randint(0, 300, (2, 32)), torch.randint(0, 300, (2, 32))
    grads, saved = [], []
    for checkpointing in (False, True):
        model.zero_grad()
        model.activation_checkpointing = checkpointing
        numel = []  # what autograd keeps for the backward pass

        def keep(t, numel=numel):
            numel.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss = model(idx, targets)[1]
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        saved.append(sum(numel))
    assert saved[1] < saved[0] / 2  # only each block's input is kept
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(recomputed, plain, atol=1e-6, rtol=0)


def test_generate_takes_a_prompt_tensor_of_one_sequence():
    """The README's `model.generate(torch.tensor([2, 5, 6]), ...)` raised torch's "Boolean value of Tensor with more
    than one value is ambiguous" (`if not prompt`): a (T,) or (1, T) integer tensor is that list of ids, and another
    tensor is a TypeError naming what it takes."""
    model = sharp_model(tiny_config())
    want = model.generate([2, 5, 6], max_new_tokens=5)
    assert model.generate(torch.tensor([2, 5, 6]), max_new_tokens=5) == want
    assert model.generate(torch.tensor([[2, 5, 6]]), max_new_tokens=5) == want
    for bad in (torch.tensor([[2, 5], [6, 7]]), torch.tensor([2.0, 5.0]), torch.tensor([True, False])):
        with pytest.raises(TypeError, match=r"a list of ints or an integer tensor of shape \(T,\) or \(1, T\), not a"):
            model.generate(bad, max_new_tokens=5)
    with pytest.raises(ValueError, match="at least one token"):
        model.generate(torch.tensor([], dtype=torch.long))


def test_generate_refuses_an_id_out_of_the_vocabulary():
    """An id >= vocab_size, or a negative one, was the embedding's IndexError ("index out of range in self"):
    it is a ValueError naming the id, where it is and the vocabulary, raised at the call."""
    model = sharp_model(tiny_config())  # 300 ids
    cases = (([2, 300, 6], r"prompt id 300 \(at position 1\)"), ([-1, 5], r"prompt id -1 \(at position 0\)"),
             (torch.tensor([4, 1000]), r"prompt id 1000 \(at position 1\)"))
    for prompt, bad in cases:
        with pytest.raises(ValueError, match=f"^{bad} is not in the vocabulary of 300 ids \\(0 to 299\\)$"):
            model.stream(prompt)  # at the call, not at the first next()
    assert len(model.generate([0, 299], max_new_tokens=2)) == 2  # the ends of the range


def test_generate_refuses_a_prompt_that_leaves_no_room():
    """A prompt of max_seq_len tokens or more was cut to its last max_seq_len - 1 without a word, so that a long
    prompt gave 1 new token: it is a ValueError, as chat and serve refuse a question that leaves no room."""
    model = sharp_model(tiny_config())  # a context of 64
    assert len(model.generate([3] * 63, max_new_tokens=5)) == 1  # the context's last position
    for n in (64, 100):
        with pytest.raises(ValueError, match=f"^the prompt \\({n} tokens\\) leaves no room in the context of 64 "
                                             r"tokens: give at most 63, e.g. its last 63 \(prompt\[-63:\]\)$"):
            model.generate([3] * n, max_new_tokens=5)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": -1}, "max_new_tokens = -1 is out of range (max_new_tokens >= 1)."),
    ({"max_new_tokens": 0}, "max_new_tokens = 0 is out of range (max_new_tokens >= 1)."),
    ({"temperature": -1}, "temperature = -1 is out of range (temperature in [0, 2])."),
    ({"temperature": float("nan")}, "temperature = nan is out of range (temperature in [0, 2])."),
    ({"top_p": 0.0}, "top_p = 0.0 is out of range (top_p in (0, 1])."),
    ({"top_p": 1.5}, "top_p = 1.5 is out of range (top_p in (0, 1])."),
    ({"top_k": -1}, "top_k = -1 is out of range (top_k >= 0)."),
    ({"repetition_penalty": 0}, "repetition_penalty = 0 is out of range (repetition_penalty in (0, 100])."),
])
def test_generate_refuses_sampling_out_of_range(kwargs, message):
    """max_new_tokens=-1 gave [] and temperature=-1 or NaN, top_p outside (0, 1] and top_k < 0 sampled something:
    each is the ValueError with the sentence that chat's, eval's and serve's flags give (sampling.RANGES)."""
    model = sharp_model(tiny_config())
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        model.stream([3, 4], **kwargs)
    with pytest.raises(UserError, match="^" + re.escape(message) + "$"):
        Sampling(**kwargs)  # the same sentence


def test_generate_refuses_a_prompt_holding_what_is_no_int():
    """`model.generate([1.5, 2])` raised torch's RuntimeError from the embedding ("Expected tensor for argument #1
    'indices' to have one of the following scalar types: Long, Int"): a float, bool or str in the prompt is a
    TypeError naming it and where it is, as a float tensor is; numpy's ints and integer tensors are ids."""
    import numpy as np

    model = sharp_model(tiny_config())
    cases = (([1.5, 2], "float 1.5 (at position 0)"), ([2, True], "bool True (at position 1)"),
             ([2, 5, "6"], "str '6' (at position 2)"), ("ab", "str 'a' (at position 0)"),
             ([torch.tensor(True), 3], "Tensor tensor(True) (at position 0)"))  # was taken for id 1
    for prompt, bad in cases:
        with pytest.raises(TypeError, match=f"^generate takes a prompt of int token ids, not {re.escape(bad)}$"):
            model.stream(prompt)  # at the call, not at the first next()
    want = model.generate([2, 5, 6], max_new_tokens=5)
    assert model.generate([np.int64(2), torch.tensor(5), 6], max_new_tokens=5) == want
