"""Shapes and identities of every DiT-LLaMA piece."""
import math

import pytest
import torch
import torch.nn.functional as F

from model import (Attention, DiT_Llama, FinalLayer, LabelEmbedder, TransformerBlock, apply_rope, modulate, patchify,
                   rope_angles, rope_grid, timestep_embedding, unpatchify, update_ema, UNet)


def test_modulate_is_scale_then_shift_per_sample():
    x = torch.randn(3, 5, 8)
    shift, scale = torch.randn(3, 1, 8), torch.randn(3, 1, 8)  # one per sample, broadcast over the 5 tokens
    out = modulate(x, shift, scale)
    for b in range(3):
        assert torch.allclose(out[b], x[b] * (1 + scale[b]) + shift[b])
    assert torch.equal(modulate(x, torch.zeros(3, 1, 8), torch.zeros(3, 1, 8)), x)


def test_token_drop_uses_null_class():
    emb = LabelEmbedder(num_classes=10, dim=4, p_uncond=0.5)
    labels = torch.arange(10)
    torch.manual_seed(0)
    many = emb.token_drop(torch.zeros(20000, dtype=torch.long))
    assert set(many.unique().tolist()) == {0, 10}
    assert abs((many == 10).float().mean().item() - 0.5) < 0.02  # drops with probability p_uncond
    assert torch.equal(LabelEmbedder(10, 4, p_uncond=0.0).token_drop(labels), labels)


def test_timestep_embedding_uses_t_scale():
    t = torch.tensor([0.0, 0.5, 1.0])
    e = timestep_embedding(t, 16)
    assert e.shape == (3, 16)
    assert torch.allclose(e[0], torch.cat([torch.ones(8), torch.zeros(8)]))
    # t is multiplied by 1000: the fastest frequency (1) sees angle 500 at t = 0.5
    assert math.isclose(e[1, 0].item(), math.cos(500.0), abs_tol=1e-4)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    hd = 16
    q, k = torch.randn(hd), torch.randn(hd)

    def score(pq, pk):
        a = rope_angles(torch.tensor([pq[0], pk[0]]), torch.tensor([pq[1], pk[1]]), hd)
        rq, rk = apply_rope(torch.stack([q, k]), a)
        return (rq * rk).sum().item()

    base = score((1, 2), (4, 7))
    assert math.isclose(score((5, 5), (8, 10)), base, rel_tol=1e-4)  # same (3, 5) offset
    assert math.isclose(score((0, 0), (3, 5)), base, rel_tol=1e-4)
    assert not math.isclose(score((0, 0), (5, 3)), base, rel_tol=1e-3)  # rows and columns are distinct
    # along one row or one column only: catches a RoPE that uses the row (or the column) for both halves
    for off in ((0, 3), (3, 0)):
        along = score((2, 1), (2 + off[0], 1 + off[1]))
        assert math.isclose(score((5, 4), (5 + off[0], 4 + off[1])), along, rel_tol=1e-4)
        assert not math.isclose(score((2, 1), (2, 1)), along, rel_tol=1e-3)  # an offset of 3 is not no offset
    assert not math.isclose(score((0, 0), (0, 3)), score((0, 0), (3, 0)), rel_tol=1e-3)
    g = rope_grid(3, 4, hd)  # token k is (row k // 4, column k % 4), patchify's row-major order
    assert torch.equal(g, rope_angles(torch.arange(12) // 4, torch.arange(12) % 4, hd))
    # rotation keeps norms
    a = rope_grid(4, 4, hd)
    x = torch.randn(2, 16, hd)
    assert torch.allclose(apply_rope(x, a).norm(dim=-1), x.norm(dim=-1), atol=1e-5)


@pytest.mark.parametrize('norm_weight', [1.0, 20.0])  # 20: scores up to ~1000, past 2^128 without the row max
def test_attention_is_the_textbook_softmax_of_scaled_scores(norm_weight):
    """Every path against softmax(q k^T / sqrt(d)) v written out here, RMSNorm by hand: 1/sqrt(d) applied exactly
    once (SDPA's own default scale; the kernels fold it into q's rotation), and the kernels' exponentials without
    the row max taken only where the norms' weights bound the scores (else they overflow)."""
    torch.manual_seed(0)
    att = Attention(32, 4)
    with torch.no_grad():
        att.q_norm.weight.uniform_(0.5, 1.5).mul_(norm_weight)
        att.k_norm.weight.uniform_(0.5, 1.5).mul_(norm_weight)
    x, angles = torch.randn(2, 16, 32), rope_grid(4, 4, 8)
    q, k, v = att.qkv(x).view(2, 16, 3, 4, 8).permute(2, 0, 3, 1, 4)
    rms = lambda t, w: t / (t.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * w
    q, k = apply_rope(rms(q, att.q_norm.weight), angles), apply_rope(rms(k, att.k_norm.weight), angles)
    y = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1) @ v
    ref = att.proj(y.transpose(1, 2).reshape(2, 16, 32))
    for attention in ('math', 'sdpa', 'kernels'):
        att.attention = attention
        assert torch.allclose(att(x, angles), ref, atol=1e-5 * norm_weight), attention


def test_attention_gradients_agree_between_sdpa_and_math():
    """SDPA and the written-out softmax give the same gradients for the input and every weight (the kernels against
    the written-out form: test_kernels.py)."""
    torch.manual_seed(0)
    att, angles = Attention(32, 4), rope_grid(4, 4, 8)
    with torch.no_grad():
        att.q_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(5, 16, 32, requires_grad=True)
    grads = []
    for attention in ('math', 'sdpa'):
        att.attention, x.grad = attention, None
        att.zero_grad()
        att(x, angles).square().sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in att.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_block_is_its_equations():
    """x + gate_msa * attn(modulate(norm1(x), shift_msa, scale_msa)), then the same with the MLP, the six vectors
    from c in DiT's order, the norms LayerNorm without weights; written out here from the block's layers."""
    torch.manual_seed(0)
    block, angles = TransformerBlock(32, 4, attention='math'), rope_grid(4, 4, 8)
    with torch.no_grad():
        for p in block.adaLN_modulation.parameters():  # away from AdaLN-Zero's init (the identity)
            p.normal_(std=0.3)
    x, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        u[:, None] for u in block.adaLN_modulation[1](F.silu(c)).chunk(6, dim=-1))
    ln = lambda h: F.layer_norm(h, (32,), eps=1e-6)
    h = x + gate_msa * block.attn(ln(x) * (1 + scale_msa) + shift_msa, angles)
    out = h + gate_mlp * block.mlp(ln(h) * (1 + scale_mlp) + shift_mlp)
    assert (out - x).abs().mean() > 0.1
    assert torch.allclose(block(x, c, angles), out, atol=1e-6)


def test_dit_weights_keep_their_checkpoint_names_on_every_path():
    """Checkpoints name the attention's weights qkv, proj, q_norm and k_norm (qk_norm=False: no norm weights); every
    attention path has the same state_dict, so a checkpoint trained on one loads into any other."""
    for qk_norm in (True, False):
        names = [set(DiT_Llama(1, 8, 2, 32, 1, 4, 10, qk_norm=qk_norm, stem_channels=8, attention=a).state_dict())
                 for a in ('sdpa', 'math', 'kernels')]
        attn = {n for n in names[0] if '.attn.' in n}
        norms = {'blocks.0.attn.q_norm.weight', 'blocks.0.attn.k_norm.weight'} if qk_norm else set()
        assert attn == {'blocks.0.attn.qkv.weight', 'blocks.0.attn.proj.weight'} | norms
        assert names[0] == names[1] == names[2]


def test_adaln_zero_block_is_identity_at_init():
    torch.manual_seed(0)
    block = TransformerBlock(32, 4)
    x, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    assert torch.equal(block(x, c, rope_grid(4, 4, 8)), x)
    final = FinalLayer(32, 2, 3)
    assert torch.equal(final(x, c), torch.zeros(2, 16, 12))


def test_unpatchify_inverts_patchify():
    x = torch.randn(2, 3, 32, 32)
    p = patchify(x, 2)
    assert p.shape == (2, 256, 12)
    assert torch.equal(p[0, 1], x[0, :, 0:2, 2:4].permute(1, 2, 0).reshape(-1))  # token 1 = row 0, column 1
    assert torch.equal(unpatchify(p, 2, 3, 32, 32), x)
    assert torch.equal(unpatchify(patchify(x, 4), 4, 3, 32, 32), x)


@pytest.mark.parametrize('C,S,p', [(1, 28, 2), (3, 32, 2), (1, 28, 4)])
def test_dit_output_shape_and_gradients(C, S, p):
    torch.manual_seed(0)
    model = DiT_Llama(in_channels=C, input_size=S, patch_size=p, dim=32, n_layers=2, n_heads=2, stem_channels=8)
    x, t, y = torch.randn(4, C, S, S), torch.rand(4), torch.randint(0, 10, (4,))
    out = model(x, t, y)
    assert out.shape == (4, C, S, S)
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised final layer
    out.square().add(out).sum().backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0
    assert model(x, t).shape == (4, C, S, S)  # no labels: the null class


def test_dit_conditioning_changes_output_once_trained():
    torch.manual_seed(0)
    model = DiT_Llama(in_channels=1, input_size=8, patch_size=2, dim=32, n_layers=2, n_heads=2, stem_channels=8, p_uncond=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        x, t, y = torch.randn(8, 1, 8, 8), torch.rand(8), torch.randint(0, 10, (8,))
        opt.zero_grad()
        (model(x, t, y) - y.view(-1, 1, 1, 1).float() * t.view(-1, 1, 1, 1)).square().mean().backward()
        opt.step()
    model.eval()
    x = torch.randn(2, 1, 8, 8)
    t = torch.full((2,), 0.5)
    out = lambda tt, yy: model(x, tt, torch.full((2,), yy))
    assert (out(t, 3) - out(t, 7)).abs().max() > 1e-3
    assert (out(t, 3) - out(torch.full((2,), 0.9), 3)).abs().max() > 1e-3
    assert (out(t, 3) - out(t, 10)).abs().max() > 1e-3  # the null class is a class of its own


@pytest.mark.parametrize('net', ['dit', 'unet'])
def test_label_dropout_through_forward(net):
    """p_uncond = 1: in training every label is the null class (the label changes nothing), in eval it is kept.
    Catches a forward that ignores the training flag or never (or always) drops labels."""
    torch.manual_seed(0)
    model = (DiT_Llama(in_channels=1, input_size=8, dim=32, n_layers=2, n_heads=2, stem_channels=8, p_uncond=1.0)
             if net == 'dit' else UNet(base_channels=8, channel_mult=(1, 2), input_size=8, num_classes=10, p_uncond=1.0))
    for p in model.parameters():  # give the zero-initialised (AdaLN-Zero) layers weights, so the output is not 0
        if not p.abs().any():
            torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 0.5)
    out = lambda yy: model(x, t, torch.full((2,), yy))
    model.train()
    assert torch.equal(out(3), out(7)) and torch.equal(out(3), out(10))
    model.eval()
    assert (out(3) - out(7)).abs().max() > 1e-3 and (out(3) - out(10)).abs().max() > 1e-3


@pytest.mark.parametrize('S', [28, 32])
@pytest.mark.parametrize('kind', ['none', 'time', 'class'])
def test_unet_shapes_for_each_conditioning(kind, S):
    torch.manual_seed(0)
    model = UNet(in_channels=1, base_channels=16, channel_mult=(1, 2, 2), time_cond=kind != 'none',
                 num_classes=10 if kind == 'class' else 0)
    x = torch.randn(3, 1, S, S)
    t = torch.rand(3) if kind != 'none' else None
    y = torch.tensor([0, 9, 10]) if kind == 'class' else None  # 10 = the null class
    assert model(x, t, y).shape == (3, 1, S, S)
    assert model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t, y).shape == (3, 1, S, S)


def test_unet_conditioning_changes_output_once_trained():
    torch.manual_seed(0)
    model = UNet(in_channels=1, base_channels=16, channel_mult=(1, 2), attn_levels=(1,), num_classes=10, p_uncond=0.0)
    torch.nn.init.zeros_(model.out[-1].weight)  # a zero output at init, so what differs below was learned
    torch.nn.init.zeros_(model.out[-1].bias)
    x_test, t_test = torch.randn(2, 1, 16, 16), torch.full((2,), 0.5)
    assert torch.equal(model(x_test, t_test, torch.full((2,), 3)), model(x_test, torch.full((2,), 0.9), torch.full((2,), 7)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(5):
        x, t, y = torch.randn(8, 1, 16, 16), torch.rand(8), torch.randint(0, 10, (8,))
        opt.zero_grad()
        (model(x, t, y) - y.view(-1, 1, 1, 1).float() * t.view(-1, 1, 1, 1)).square().mean().backward()
        opt.step()
    model.eval()
    out = lambda tt, yy: model(x_test, tt, torch.full((2,), yy))
    assert (out(t_test, 3) - out(t_test, 7)).abs().max() > 1e-3
    assert (out(t_test, 3) - out(torch.full((2,), 0.9), 3)).abs().max() > 1e-3
    assert (out(t_test, 3) - out(t_test, 10)).abs().max() > 1e-3


def test_update_ema_rule_on_numbers():
    """Catches a swapped EMA rule (lerp by decay instead of 1 - decay) or an EMA that copies the weights."""
    ema, w = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    for p, q in zip(ema.parameters(), w.parameters()):
        p.data.fill_(0.0)
        q.data.fill_(1.0)
    update_ema(ema, w, 0.9)  # ema <- 0.9 * 0 + 0.1 * 1
    assert all(torch.allclose(p, torch.full_like(p, 0.1)) for p in ema.parameters())
    update_ema(ema, w, 0.5)  # 0.5 * 0.1 + 0.5 * 1
    assert all(torch.allclose(p, torch.full_like(p, 0.55)) for p in ema.parameters())
    assert all(torch.equal(q, torch.ones_like(q)) for q in w.parameters())  # the trained weights are not touched


@pytest.mark.parametrize('attention', ['kernels', 'math', 'sdpa'])
def test_compiled_dit_trains_like_eager(attention):
    """torch.compile (train_dit.py --compile=True) gives eager's output and gradients; the kernels' attention layer runs
    eager inside the compiled model, the written-out and SDPA paths are compiled through."""
    torch.manual_seed(0)
    model = DiT_Llama(1, 8, 2, 32, 2, 4, 10, stem_channels=8, attention=attention).eval()  # eval: no label dropout
    with torch.no_grad():
        for p in model.parameters():  # away from AdaLN-Zero's init, where most gradients are exactly zero
            p.add_(0.05 * torch.randn_like(p))
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.tensor([0, 3, 7, 10])
    results = []
    for m in (model, torch.compile(model, dynamic=False)):
        model.zero_grad()
        out = m(x, t, y)
        out.square().sum().backward()
        results.append([out.detach()] + [p.grad.clone() for p in model.parameters()])
    assert results[0][0].abs().mean() > 0.1
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
