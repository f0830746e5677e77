"""The transformer in model/: causality, RoPE, GQA, KV cache, learning, presets."""

from __future__ import annotations

import pytest
import torch

from model import GPT, KVCache, ModelConfig
from model.gpt import apply_rope, generate_batch, rope_tables

TINY = dict(vocab_size=97, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, d_ff=64, max_seq_len=64)


def make(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**TINY, **kw})).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_future_tokens_do_not_change_earlier_logits(arch):
    m = make(arch=arch, n_kv_heads=None if arch == "gpt2" else 2)
    x = torch.randint(0, 97, (2, 16))
    y = x.clone()
    y[:, 10:] = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        a, b = m(x), m(y)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_rope_dot_product_depends_only_on_relative_position():
    hd = 16
    cos, sin = rope_tables(hd, 128, 10000.0)
    q, k = torch.randn(hd), torch.randn(hd)

    def rotated(v, pos):
        return apply_rope(v.view(1, 1, 1, hd), cos[pos : pos + 1], sin[pos : pos + 1]).view(hd)

    ref = rotated(q, 7) @ rotated(k, 3)
    for shift in (1, 20, 100):
        assert torch.allclose(rotated(q, 7 + shift) @ rotated(k, 3 + shift), ref, atol=1e-4)
    assert not torch.allclose(rotated(q, 9) @ rotated(k, 3), ref, atol=1e-4)  # other distance, other value
    assert torch.allclose(rotated(q, 5).norm(), q.norm(), atol=1e-5)  # a rotation keeps norms


def test_gqa_with_all_kv_heads_equals_mha():
    gqa = make(n_kv_heads=4)
    mha = make(n_kv_heads=None)
    mha.load_state_dict(gqa.state_dict())
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        assert torch.equal(gqa(x), mha(x))


def test_gqa_shares_kv_heads_as_repeat_interleave():
    """Grouped-query attention equals MHA whose k/v heads are repeated within each group."""
    gqa = make(n_kv_heads=2)
    mha = make(n_kv_heads=None)
    sd = gqa.state_dict()
    hd = gqa.cfg.head_dim
    for name in list(sd):
        if name.endswith(("attn.wk.weight", "attn.wv.weight")):
            sd[name] = sd[name].view(2, hd, -1).repeat_interleave(2, dim=0).reshape(4 * hd, -1)
    mha.load_state_dict(sd)
    x = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        assert torch.allclose(gqa(x), mha(x), atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_kv_cache_decoding_equals_full_forward(arch):
    m = make(arch=arch, n_kv_heads=None if arch == "gpt2" else 2)
    x = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full = m(x)
        cache = KVCache(m.cfg, 2, 20, "cpu", torch.float32)
        steps = [m(x[:, :8], cache=cache)]  # prefill 8 tokens
        steps.append(m(x[:, 8:11], cache=cache))  # a chunk of 3 (needs the offset causal mask)
        steps += [m(x[:, t : t + 1], cache=cache) for t in range(11, 20)]  # one at a time
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


def test_generate_greedy_matches_argmax_of_full_forward():
    m = make()
    prompt = torch.randint(0, 97, (1, 5))
    out = m.generate(prompt, 8, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, m(seq)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


def test_generate_stop_token_and_sampling_controls():
    m = make()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 97, (3, 4))
    out = m.generate(prompt, 30, temperature=1.0, top_k=5, top_p=0.9, generator=g)
    assert out.shape == (3, 34) and torch.equal(out[:, :4], prompt)
    greedy_first = m.generate(prompt[:1], 1, temperature=0)[0, -1].item()
    stopped = m.generate(prompt[:1], 30, temperature=0, stop_token=greedy_first)
    assert stopped.shape == (1, 5) and stopped[0, -1].item() == greedy_first
    # top_k=1 is greedy whatever the temperature
    assert torch.equal(m.generate(prompt, 6, temperature=5.0, top_k=1, generator=g), m.generate(prompt, 6, temperature=0))


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    m = GPT(ModelConfig(**TINY)).train()
    x = torch.randint(0, 97, (4, 33))
    opt = torch.optim.AdamW(m.optim_groups(0.0), lr=1e-2)
    for _ in range(150):
        _, loss = m(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_activation_checkpointing_gives_same_gradients():
    x = torch.randint(0, 97, (2, 16))
    grads = []
    for ckpt in (False, True):
        m = make(activation_checkpointing=ckpt).train()
        _, loss = m(x[:, :-1], x[:, 1:])
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("name", ["tiny", "gpt2-124m", "llama-1b", "llama-7b", "llama-70b"])
def test_presets_parameter_counts(name):
    cfg = ModelConfig.preset(name)
    published = {"gpt2-124m": 124.4e6, "llama-1b": 1.236e9, "llama-7b": 6.74e9, "llama-70b": 68.98e9}
    if name == "tiny":
        assert 1e6 <= cfg.num_params() <= 5e6
        assert cfg.num_params() == GPT(cfg).num_params()
    else:
        assert abs(cfg.num_params() - published[name]) / published[name] < 0.01
    assert cfg.flops_per_token() > 6 * cfg.num_params(non_embedding=True)


def test_counts_match_built_model_for_every_variant():
    for kw in (dict(arch="gpt2", n_kv_heads=None), dict(tie_embeddings=False), dict(n_kv_heads=1)):
        cfg = ModelConfig(**{**TINY, **kw})
        m = GPT(cfg)
        assert cfg.num_params() == m.num_params()
        assert cfg.num_params(non_embedding=True) == m.num_params(non_embedding=True)


def test_residual_projections_get_scaled_init():
    m = GPT(ModelConfig(**{**TINY, "n_layers": 8, "d_model": 256, "n_heads": 4, "d_ff": 512}))
    std_o = m.blocks[0].attn.wo.weight.std().item()
    std_q = m.blocks[0].attn.wq.weight.std().item()
    assert abs(std_q - 0.02) < 0.002 and abs(std_o - 0.02 / 4) < 0.001


def test_no_weight_decay_on_norms_or_embeddings():
    m = make(arch="gpt2", n_kv_heads=None)
    decay, no_decay = m.optim_groups(0.1)
    decayed = {id(p) for p in decay["params"]}
    assert id(m.tok_emb.weight) not in decayed and id(m.pos_emb.weight) not in decayed
    assert id(m.norm.weight) not in decayed and id(m.blocks[0].attn.wq.bias) not in decayed
    assert id(m.blocks[0].attn.wq.weight) in decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


def test_bad_configs_are_rejected_with_the_key():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(**{**TINY, "n_kv_heads": 3})
    with pytest.raises(ValueError, match="preset"):
        ModelConfig(preset="nope")
    with pytest.raises(ValueError, match="n_layer"):
        ModelConfig(**{**TINY, "n_layer": 3})
    with pytest.raises(ValueError, match="max_seq_len"):
        make()(torch.zeros(1, 65, dtype=torch.long))


# ----------------------------------------------------------------------------- padding and batched decoding

MIXED = [[5, 17, 3], [9] * 2 + list(range(20, 31)), [42], list(range(60, 67)), list(range(1, 21))]


@pytest.mark.parametrize("arch,kv", [("llama", 2), ("llama", None), ("gpt2", None)])
def test_batched_left_padded_greedy_equals_one_by_one(arch, kv):
    m = make(arch=arch, n_kv_heads=kv)
    batched = generate_batch(m, MIXED, 12, temperature=0)
    for p, got in zip(MIXED, batched):
        alone = m.generate(torch.tensor([p]), 12, temperature=0)[0, len(p):].tolist()  # no padding, no mask
        assert got == alone
    # stop ids: a row ends with the first one it emits, the others run on unchanged
    stop = batched[1][4]
    stopped = generate_batch(m, MIXED, 12, stop_ids=[stop], temperature=0)
    for full, got in zip(batched, stopped):
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert got == full[:cut]
    assert stopped[1][-1] == stop and len(stopped[1]) <= 5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_padding_mask_makes_padded_rows_compute_what_they_would_alone(arch):
    m = make(arch=arch, n_kv_heads=2 if arch == "llama" else None)
    row = torch.randint(0, 97, (1, 9))
    junk = torch.randint(0, 97, (1, 5))
    left = torch.cat([junk, row], dim=1)  # (1, 14)
    right = torch.cat([row, junk], dim=1)
    real_left = torch.tensor([[False] * 5 + [True] * 9])
    with torch.no_grad():
        alone = m(row)
        batch = m(torch.cat([left, right]), mask=torch.cat([real_left, real_left.flip(1)]))
        unmasked = m(left)
    assert (batch[0, 5:] - alone[0]).abs().max().item() <= 1e-5
    assert (batch[1, :9] - alone[0]).abs().max().item() <= 1e-5
    assert (unmasked[0, 5:] - alone[0]).abs().max().item() > 1e-2  # without the mask the padding leaks in


def test_rollout_logprobs_equal_a_full_forward_over_prompt_and_completion():
    m = make()
    g = torch.Generator().manual_seed(1)
    for temperature in (1.0, 0.7, 0.0):
        tokens, lps = generate_batch(m, MIXED, 10, stop_ids=[3], temperature=temperature, top_k=20,
                                     generator=g, logprobs=True)
        assert [len(t) for t in tokens] == [len(x) for x in lps] and sum(map(len, tokens)) > len(MIXED)
        for p, t, lp in zip(MIXED, tokens, lps):  # each row alone: no padding, no mask
            with torch.no_grad():
                logp = (m(torch.tensor([p + t]))[0] / (temperature or 1.0)).log_softmax(-1)  # (T, V)
            pos = torch.arange(len(p) - 1, len(p) - 1 + len(t))  # logits at pos predict token pos + 1
            assert (logp[pos, torch.tensor(t)] - torch.tensor(lp)).abs().max().item() <= 1e-5
            if temperature == 0:  # greedy tokens are the most likely ones
                assert torch.equal(logp[pos].argmax(-1), torch.tensor(t))


def test_generate_batch_budgets_seeds_and_bad_prompts():
    m = make()  # max_seq_len 64
    long = list(range(1, 61))  # room for 4 new tokens only
    out = generate_batch(m, [long, [7, 8]], 10, temperature=0)
    assert len(out[0]) == 4 and len(out[1]) == 10
    assert out[0] == m.generate(torch.tensor([long]), 10, temperature=0)[0, 60:].tolist()
    a = generate_batch(m, MIXED, 8, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = generate_batch(m, MIXED, 8, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert a == b
    assert generate_batch(m, [], 5) == []
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_batch(m, [[1], []], 5)
    with pytest.raises(ValueError, match="prompt 0 has 64 tokens"):
        generate_batch(m, [list(range(64))], 5)


def test_activation_checkpointing_with_a_padding_mask():
    x = torch.randint(0, 97, (2, 12))
    real = torch.ones(2, 12, dtype=torch.bool)
    real[0, :4] = False
    out = []
    for ckpt in (False, True):
        m = make(activation_checkpointing=ckpt).train()
        out.append(m(x, mask=real))
    assert torch.allclose(out[0], out[1], atol=1e-6)
