"""model.py's CPU kernels compute what its networks section writes out: the same outputs and gradients as the
written-out ('math') path, in fp32 and bf16, in more than one chunk; where they sit in the file; which path each
device and dtype gets; and forward-mode derivatives (torch.func.jvp) through the default CPU path."""
import copy
import inspect

import pytest
import torch
import torch.nn as nn

import model
from model import DiT_Llama, ExplicitAttention, NormRoPEFunction, TransformerBlock, pick_attention, rope_grid


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def output_and_grads(block, x, c, angles, w, bf16=False):
    """The block's output and the gradients of sum(w * output) for x, c and every parameter, in that order."""
    x, c = x.clone().requires_grad_(), c.clone().requires_grad_()
    block.zero_grad()
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
        out = block(x, c, angles)
    (out.double() * w).sum().backward()
    return [out.detach(), x.grad, c.grad] + [p.grad for p in block.parameters()]


# (dim, heads, grid side, batch, q/k norm weight). On a CPU the attention runs 2 ** 21 // (heads L^2) images at a time,
# the norm 2 ** 19 // (heads L head_dim): 128 and 256 images for the first shape (3 and 2 chunks of 300, the last ones
# short), 8 and 32 for the second (5 and 2 chunks of 40), whose norm weights of about 4 bound the scores above 100
# (base 2), so that its exponentials subtract the row max
SHAPES = [(32, 4, 8, 300, 1.0), (64, 4, 16, 40, 4.0)]


@pytest.mark.parametrize('bf16', [False, True])
@pytest.mark.parametrize('dim,heads,side,B,norm_weight', SHAPES)
def test_kernels_equal_the_written_out_block(dim, heads, side, B, norm_weight, bf16):
    """A TransformerBlock on the kernels against the same block written out (attention='math'): output and the
    gradients of x, c and every weight. fp32: equal to rounding. bf16 autocast: both against the written-out block in
    fp32, the kernels' error at most a little above the written-out block's own bf16 error."""
    torch.manual_seed(0)
    plain = TransformerBlock(dim, heads, attention='math')
    with torch.no_grad():
        for p in plain.parameters():  # away from AdaLN-Zero's init (zero gates) and the norms' unit weights
            p.add_(0.1 * torch.randn_like(p))
        plain.attn.q_norm.weight.mul_(norm_weight)
        plain.attn.k_norm.weight.mul_(norm_weight)
    kernels = copy.deepcopy(plain)
    kernels.attn.attention = 'kernels'
    x, c, angles = torch.randn(B, side * side, dim), torch.randn(B, dim), rope_grid(side, side, dim // heads)
    w = torch.randn(B, side * side, dim, dtype=torch.float64)
    got = output_and_grads(kernels, x, c, angles, w, bf16)
    assert len(got) == 3 + 9 and all(g is not None for g in got)  # out, x, c; qkv, proj, q/k norms, SwiGLU, AdaLN
    if not bf16:
        want = output_and_grads(plain, x, c, angles, w)
        for i, (a, b) in enumerate(zip(got, want)):
            assert rel_err(a, b) < 1e-4, i
        return
    exact = output_and_grads(plain, x, c, angles, w)
    plain_bf16 = output_and_grads(plain, x, c, angles, w, bf16=True)
    for i, (a, b, e) in enumerate(zip(got, plain_bf16, exact)):
        assert rel_err(a, e) < 1.3 * rel_err(b, e) + 2e-3, i


def test_hand_written_backwards_match_finite_differences():
    """The two autograd Functions, checked in float64 against finite differences: the attention in chunks that do not
    divide the batch (3 images, 2 at a time), with and without the row max, and RMSNorm + RoPE with a factor of
    modulus 0.7, in chunks of 1 image."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    for sub_max in (False, True):
        assert torch.autograd.gradcheck(lambda a, b, c: ExplicitAttention.apply(a, b, c, 2, sub_max), (q, k, v))
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    rot = torch.polar(torch.full((6, 4), 0.7, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda a, b: NormRoPEFunction.apply(a, b, rot, 1e-6, 1), (x, w))


def test_kernels_come_after_the_networks_and_the_flow():
    """model.py's order: every network (nn.Module), then the flow maths, then every autograd.Function and the
    kernels' functions, then the plumbing: a reader who stops after the flow has seen no kernel."""
    line = lambda obj: inspect.getsourcelines(obj)[1]
    members = [m for _, m in inspect.getmembers(model, inspect.isclass) if m.__module__ == 'model']
    networks = [line(m) for m in members if issubclass(m, nn.Module)]
    functions = [line(m) for m in members if issubclass(m, torch.autograd.Function)]
    kernels = functions + [line(f) for f in (model.pick_attention, model.kernel_block, model.kernel_attention,
                                             model.rotate, model.norm_rope)]
    assert len(networks) >= 10 and len(functions) == 2
    assert max(networks) < line(model.RectifiedFlow) < line(model.sample) < min(kernels)
    assert max(kernels) < line(model.die)


@pytest.mark.parametrize('attention,device,dtype,expect', [
    ('auto', 'cpu', 'bfloat16', 'kernels'),  # where the kernels train fastest
    ('auto', 'cpu', 'float32', 'math'),  # SDPA's CPU kernel has no forward-mode derivative (test below)
    ('auto', 'cuda', 'bfloat16', 'sdpa'),
    ('auto', 'cuda', 'float32', 'sdpa'),
    ('math', 'cuda', 'float32', 'math'),
    ('kernels', 'cpu', 'float32', 'kernels'),
    ('sdpa', 'cpu', 'bfloat16', 'sdpa')])
def test_attention_choice_per_device_and_dtype(attention, device, dtype, expect):
    assert pick_attention(attention, device, dtype) == expect


def small_dit(attention):
    torch.manual_seed(0)
    net = DiT_Llama(1, 8, 2, 32, 2, 4, 10, stem_channels=8, attention=attention).eval()  # eval: no label dropout
    with torch.no_grad():
        for p in net.parameters():  # away from AdaLN-Zero's init, whose output is 0 whatever the input
            p.add_(0.05 * torch.randn_like(p))
    return net


def test_jvp_through_the_default_fp32_cpu_path_matches_finite_differences():
    """torch.func.jvp through a small DiT-LLaMA in fp32 on the path attention='auto' picks on a CPU, along MeanFlow's
    tangent (a direction in x, 1 in t): its d/dh f(x + h v, t + h) matches the central difference (step 1e-4, small
    enough for the embedding of 1000 t) and the adjoint identity <w, J v> = <J^T w, v> from reverse mode. The SDPA and
    kernel paths have no forward-mode derivative: they raise, never return a wrong one; switched back to 'math' for the
    call (under no_grad, as MeanFlow's target needs no graph), the same model gives the same derivative."""
    net = small_dit(pick_attention('auto', 'cpu', 'float32'))
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.tensor([0, 3, 7, 10])
    vx, vt = torch.randn_like(x), torch.ones(4)
    f = lambda x, t: net(x, t, y)
    out, dout = torch.func.jvp(f, (x, t), (vx, vt))
    assert torch.equal(out, f(x, t)) and dout.norm() > 1
    h = 1e-4
    with torch.no_grad():
        fd = (f(x + h * vx, t + h * vt) - f(x - h * vx, t - h * vt)) / (2 * h)
    assert rel_err(dout, fd) < 5e-3
    w = torch.randn_like(out)
    xg, tg = x.clone().requires_grad_(), t.clone().requires_grad_()
    gx, gt = torch.autograd.grad((f(xg, tg) * w).sum(), (xg, tg))
    jtw_v = (gx * vx).sum() + (gt * vt).sum()
    assert abs((w * dout).sum().item() - jtw_v.item()) < 1e-4 * abs(jtw_v.item()) + 1e-4
    for attention in ('sdpa', 'kernels', 'math'):
        for block in net.blocks:
            block.attn.attention = attention
        if attention == 'math':
            with torch.no_grad():
                assert torch.allclose(torch.func.jvp(f, (x, t), (vx, vt))[1], dout, rtol=1e-5, atol=1e-5)
            continue
        with pytest.raises((NotImplementedError, RuntimeError)):
            torch.func.jvp(f, (x, t), (vx, vt))
