"""model.py's CPU kernels compute what its networks section writes out: the same outputs, gradients and forward-mode
derivatives as the written-out ('math') path, in fp32 and bf16, in more than one chunk; where they sit in the file;
which path each device and dtype gets; and torch.func.jvp through the DiT on the default CPU path."""
import copy
import inspect
import math

import pytest
import torch
import torch.nn as nn

import model
from model import DiT_Llama, ExplicitAttention, NormRoPEFunction, TransformerBlock, pick_attention, rope_grid


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def output_and_derivatives(block, x, c, angles, w, tangents, bf16=False):
    """The block's output, the gradients of sum(w * output) for x, c and every parameter, and the output's forward-mode
    derivative (torch.func.jvp, under no_grad as MeanFlow takes it) along tangents of (x, c), in that order."""
    x, c = x.clone().requires_grad_(), c.clone().requires_grad_()
    block.zero_grad()
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
        out = block(x, c, angles)
        with torch.no_grad():
            jvp = torch.func.jvp(lambda x, c: block(x, c, angles), (x.detach(), c.detach()), tangents)[1]
    (out.double() * w).sum().backward()
    return [out.detach(), x.grad, c.grad] + [p.grad for p in block.parameters()] + [jvp]


# (dim, heads, grid side, batch, q/k norm weight). On a CPU the attention runs 2 ** 21 // (heads L^2) images at a time,
# the norm 2 ** 19 // (heads L head_dim): 128 and 256 images for the first shape (3 and 2 chunks of 300, the last ones
# short), 8 and 32 for the second (5 and 2 chunks of 40), whose norm weights of about 4 bound the scores above 100
# (base 2), so that its exponentials subtract the row max
SHAPES = [(32, 4, 8, 300, 1.0), (64, 4, 16, 40, 4.0)]


@pytest.mark.parametrize('bf16', [False, True])
@pytest.mark.parametrize('dim,heads,side,B,norm_weight', SHAPES)
def test_kernels_equal_the_written_out_block(dim, heads, side, B, norm_weight, bf16):
    """A TransformerBlock on the kernels against the same block written out (attention='math'): output, the
    gradients of x, c and every weight, and the forward-mode derivative. fp32: equal to rounding. bf16 autocast: both against the written-out block in
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
    d = dim // heads  # the kernels' bound on the base-2 scores, d (log2 e / sqrt(d)) max|w_q| max|w_k|: above 100 only here
    bound = d ** 0.5 * math.log2(math.e) * plain.attn.q_norm.weight.abs().max() * plain.attn.k_norm.weight.abs().max()
    assert (bound > 100) == (norm_weight > 1)
    x, c, angles = torch.randn(B, side * side, dim), torch.randn(B, dim), rope_grid(side, side, dim // heads)
    w, tangents = torch.randn(B, side * side, dim, dtype=torch.float64), (torch.randn_like(x), torch.randn_like(c))
    got = output_and_derivatives(kernels, x, c, angles, w, tangents, bf16)
    assert len(got) == 3 + 9 + 1 and all(g is not None for g in got)  # out, x, c; qkv, proj, q/k norms, SwiGLU, AdaLN; jvp
    if not bf16:
        want = output_and_derivatives(plain, x, c, angles, w, tangents)
        for i, (a, b) in enumerate(zip(got, want)):
            assert rel_err(a, b) < 1e-4, i
        return
    exact = output_and_derivatives(plain, x, c, angles, w, tangents)
    plain_bf16 = output_and_derivatives(plain, x, c, angles, w, tangents, bf16=True)
    for i, (a, b, e) in enumerate(zip(got, plain_bf16, exact)):
        assert rel_err(a, e) < 1.3 * rel_err(b, e) + 2e-3, i


def test_hand_written_derivatives_match_finite_differences():
    """The two autograd Functions' backward and jvp, checked in float64 against finite differences: the attention in
    chunks that do not divide the batch (3 images, 2 at a time), with and without the row max, and RMSNorm + RoPE with
    a factor of modulus 0.7, in chunks of 1 image. (Their backward is never asked for a gradient of y left undefined.)"""
    torch.manual_seed(0)
    check = lambda f, inputs: torch.autograd.gradcheck(f, inputs, check_forward_ad=True, check_undefined_grad=False)
    q, k, v = (torch.randn(3, 2, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    for sub_max in (False, True):
        assert check(lambda a, b, c: ExplicitAttention.apply(a, b, c, 2, sub_max)[0], (q, k, v))
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    rot = torch.polar(torch.full((6, 4), 0.7, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64))
    assert check(lambda a, b: NormRoPEFunction.apply(a, b, rot, 1e-6, 1)[0], (x, w))


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
    ('auto', 'cpu', 'float32', 'sdpa'),  # compiled fp32 on an AVX2 CPU: SDPA fastest, the kernels slowest
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


@pytest.mark.parametrize('attention', ['kernels', 'math'])
def test_jvp_through_the_dit_matches_finite_differences(attention):
    """torch.func.jvp through a small DiT-LLaMA in fp32 on the CPU kernels (what attention='auto' picks for bf16 on a
    CPU) and on the written-out softmax, along MeanFlow's tangent (a direction in x, 1 in t): d/dh f(x + h v, t + h) matches the
    central difference (step 1e-4, small enough for the embedding of 1000 t) and the adjoint identity
    <w, J v> = <J^T w, v> from reverse mode; under no_grad, as MeanFlow takes it, the same."""
    net = small_dit(attention)
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.tensor([0, 3, 7, 10])
    vx, vt = torch.randn_like(x), torch.ones(4)
    f = lambda x, t: net(x, t, y)
    out, dout = torch.func.jvp(f, (x, t), (vx, vt))
    assert torch.equal(out, f(x, t)) and dout.norm() > 1
    h = 1e-4
    with torch.no_grad():
        fd = (f(x + h * vx, t + h * vt) - f(x - h * vx, t - h * vt)) / (2 * h)
        assert torch.allclose(torch.func.jvp(f, (x, t), (vx, vt))[1], dout, rtol=1e-5, atol=1e-5)
    assert rel_err(dout, fd) < 5e-3
    w = torch.randn_like(out)
    xg, tg = x.clone().requires_grad_(), t.clone().requires_grad_()
    gx, gt = torch.autograd.grad((f(xg, tg) * w).sum(), (xg, tg))
    jtw_v = (gx * vx).sum() + (gt * vt).sum()
    assert abs((w * dout).sum().item() - jtw_v.item()) < 1e-4 * abs(jtw_v.item()) + 1e-4
