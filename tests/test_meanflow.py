"""MeanFlow: its loss at r = t, its jvp target, its sampler on fields whose average velocity is known, its checkpoints
in sample.py and evaluate.py, DDP's averaged gradients, and train_dit.py --objective=meanflow end to end."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from conftest import TINY_DIT, run, run_here
from model import (Batches, DiT_Llama, MeanFlow, RectifiedFlow, build_model, load_checkpoint, load_dataset,
                   load_flow_model, pick_attention, sample, sample_mean_flow, to_uint8)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def small_net(attention='math', seed=0):
    """A small MeanFlow DiT-LLaMA on 8x8 images, its weights moved away from AdaLN-Zero's init (output 0)."""
    torch.manual_seed(seed)
    net = DiT_Llama(1, 8, 2, 32, 2, 4, 10, stem_channels=8, attention=attention, mean_flow=True)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def test_mean_flow_network_embeds_the_interval_and_defaults_to_r_equal_t():
    """u(x, r, t) depends on r through t - r; with no r it is u(x, t, t), the velocity; the flag adds only the interval
    embedder's weights, and its network leaves label dropout to the loss."""
    net = small_net()
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([0.9, 0.5, 0.3]), torch.tensor([1, 4, 10])
    with torch.no_grad():
        assert torch.equal(net(x, t, y), net(x, t, y, t))
        assert (net(x, t, y, 0.5 * t) - net(x, t, y, t)).abs().max() > 1e-3
    extra = set(net.state_dict()) - set(DiT_Llama(1, 8, 2, 32, 2, 4, 10, stem_channels=8).state_dict())
    assert extra == {f'interval_embedder.mlp.{i}.{w}' for i in (0, 2) for w in ('weight', 'bias')}
    assert net.y_embedder.p_uncond == 0 and DiT_Llama(1, 8, 2, 32, 2, 4, 10, stem_channels=8).y_embedder.p_uncond == 0.1


def test_mean_flow_network_changes_slowly_in_t():
    """MeanFlow's target holds -(t - r) d_t u: a network that embeds 1000 t (the flow's embedding) has a d_t u many
    times u's own size from its fastest frequency, and the target runs away (seen: the squared error rose from 5 to
    6,000 in 300 iterations on MNIST). The MeanFlow network embeds t and t - r unscaled; the flow's keeps 1000 t."""
    net = small_net()
    z, y = torch.randn(8, 1, 8, 8), torch.arange(8)
    t = 0.3 + 0.6 * torch.rand(8)
    with torch.no_grad():
        u, dtu = torch.func.jvp(lambda t: net(z, t, y, 0.5 * t), (t,), (torch.ones_like(t),))
    assert dtu.norm() < 0.2 * u.norm(), (dtu.norm(), u.norm())
    assert net.t_embedder.scale == net.interval_embedder.scale == 1
    assert DiT_Llama(1, 8, 2, 32, 2, 4, 10, stem_channels=8).t_embedder.scale == 1000


def test_t_and_r_draws():
    """t >= r; r = t on a share 1 - ratio; with t_dist and r_dist each is sigmoid of its own normal (the larger and the
    smaller of the pair). Catches a distribution ignored, a ratio read the wrong way."""
    torch.manual_seed(0)
    t, r = MeanFlow(None, ratio=0.25).sample_tr(20000)
    assert (t >= r).all() and abs((r < t).float().mean().item() - 0.25) < 0.02
    t, r = MeanFlow(None, ratio=1.0, t_dist=(1.0, 0.2), r_dist=(-3.0, 0.2)).sample_tr(20000)
    logit = lambda x: torch.log(x / (1 - x))
    assert abs(logit(t).mean() - 1.0) < 0.02 and abs(logit(t).std() - 0.2) < 0.02
    assert abs(logit(r).mean() + 3.0) < 0.02 and abs(logit(r).std() - 0.2) < 0.02


def test_at_r_equal_t_the_loss_is_flow_matching(monkeypatch):
    """With no share of r != t every r is t: the target is v = eps - x0 and the loss is RectifiedFlow's on the same
    x0, eps, t and labels (weight power 0), or its adaptively weighted mean (power 1). Catches a target that is not
    v at r = t, an x_t built with r, a t that is not max(t, r)."""
    net = small_net()
    x0, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 3, 5, 7, 9, 2])
    a, b, eps = torch.rand(6), torch.rand(6), torch.randn(6, 1, 8, 8)
    monkeypatch.setattr(torch, 'randn_like', lambda x: eps)
    rf = RectifiedFlow()
    monkeypatch.setattr(rf, 'sample_t', lambda n, device='cpu': torch.maximum(a, b))
    l_rf, (t_rf, per_rf) = rf.loss(net, x0, y)
    for p in (0.0, 1.0):
        mf = MeanFlow(net, ratio=0.0, p_uncond=0.0, omega=1.0, kappa=0.0, weight_p=p)
        draws = iter([a, b])
        monkeypatch.setattr(mf, 'sample_t', lambda n, device='cpu': next(draws))
        l_mf, (t_mf, per_mf) = mf.loss(net, x0, y)
        assert torch.equal(t_mf, t_rf) and torch.allclose(per_mf, per_rf, rtol=1e-6)
        want = l_rf if p == 0 else (per_rf / (per_rf + 1e-3)).mean()
        assert l_mf.item() == pytest.approx(want.item(), rel=1e-6)
    assert l_rf.item() > 0.1  # a real error, not a trivially zero one


@pytest.mark.parametrize('attention', ['kernels', 'sdpa', 'math'])
def test_jvp_target_is_a_central_difference_along_the_path(attention):
    """u_tgt = v - (t - r) du/dt, du/dt the derivative of u(z + h v, r, t + h) at h = 0, against a central difference
    (step 1e-4, small enough for the network's fastest frequency). Called as train_dit.py calls it, under bf16 autocast, on a
    network on each attention path: the jvp runs in fp32, through the CPU kernels' own jvp, or on the written-out
    softmax in place of SDPA (which has none), and the network's path is restored afterwards. Catches a tangent on r instead of t, a target without the
    d_t u term, a sign error."""
    net = small_net(attention)
    with torch.no_grad():  # a network that changes fast in t and r, so that the d_t u term counts
        for embedder in (net.t_embedder, net.interval_embedder):
            embedder.mlp[0].weight.mul_(50)
    torch.manual_seed(1)
    z, v, y = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8), torch.tensor([0, 3, 7, 10])
    t = 0.5 + 0.5 * torch.rand(4)
    r = t * torch.rand(4)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        u_tgt = MeanFlow(net).target(z, r, t, v, y)
    assert u_tgt.dtype == torch.float32 and [b.attn.attention for b in net.blocks] == [attention] * 2
    h, span = 1e-4, (t - r).view(-1, 1, 1, 1)
    with torch.no_grad():
        dudt = (net(z + h * v, t + h, y, r) - net(z - h * v, t - h, y, r)) / (2 * h)
        along_r = (net(z + h * v, t, y, r + h) - net(z - h * v, t, y, r - h)) / (2 * h)
        along_z = (net(z + h * v, t, y, r) - net(z - h * v, t, y, r)) / (2 * h)
    want = v - span * dudt
    assert rel_err(u_tgt, want) < 5e-3
    assert rel_err(v - span * along_r, want) > 0.05 and rel_err(v - span * along_z, want) > 0.05  # d_t u matters here


class ExponentialField(nn.Module):
    """The flow dz/dt = a_y z: z_r = e^(-a (t - r)) z_t, so u(z, r, t) = z (1 - e^(-a (t - r))) / (t - r), a z at r = t;
    one step lands on x0 = e^(-a) eps, Euler's on (1 - a) eps."""
    num_classes = 10

    def __init__(self):
        super().__init__()
        self.a = 0.5 + torch.arange(11) / 10

    def forward(self, z, t, y=None, r=None):
        a = self.a[y].view(-1, 1, 1, 1)
        h = (t - (t if r is None else r)).view(-1, 1, 1, 1)
        return z * torch.where(h > 0, -torch.expm1(-a * h) / h.clamp(min=1e-12), a)


class TimeField(nn.Module):
    """The flow dz/dt = b_y t: z_r = z_t - b (t^2 - r^2) / 2, so u(z, r, t) = b (t + r) / 2; every jump lands on
    x0 = eps - b / 2, Euler's first step on eps - b."""
    num_classes = 10

    def __init__(self):
        super().__init__()
        self.b = torch.randn(11, 1, 4, 4)

    def forward(self, z, t, y=None, r=None):
        r = t if r is None else r
        return self.b[y] * ((t + r) / 2).view(-1, 1, 1, 1) + 0 * z


@pytest.mark.parametrize('field', [ExponentialField, TimeField])
def test_known_average_velocity_lands_every_jump_on_the_exact_path(field):
    """One, two and five jumps of sample_mean_flow land on the exact solution at every grid time, where Euler on
    the same network's velocity u(z, t, t) does not; and MeanFlow's target for the exact u along its own velocity is u
    itself (the MeanFlow identity). Catches a jump by (t + r), an r and t swapped, a grid from 0 to 1."""
    torch.manual_seed(0)
    m = field()
    z, y = torch.randn(4, 1, 4, 4), torch.tensor([0, 3, 6, 9])

    def exact(s):  # z at time s on the path from z at t = 1
        if field is ExponentialField:
            return z * torch.exp(-m.a[y].view(-1, 1, 1, 1) * (1 - s))
        return z - m.b[y] * (1 - s ** 2) / 2

    for steps in (1, 2, 5):
        x, traj = sample_mean_flow(m, z, y, steps=steps, return_traj=True)
        assert len(traj) == steps + 1 and torch.equal(traj[0], z)
        for k, xk in enumerate(traj):
            assert torch.allclose(xk, exact(1 - k / steps), atol=1e-5), (steps, k)
    assert (sample(m, z, y, steps=1) - exact(0)).abs().max() > 0.05
    t = 0.2 + 0.8 * torch.rand(4)
    r = torch.cat([t[:1], t[1:] * torch.rand(3)])  # one r = t
    flow = MeanFlow(m)
    assert torch.allclose(flow.target(z, r, t, m(z, t, y), y), m(z, t, y, r), atol=1e-5)


def test_loss_targets_every_row_by_the_identity(monkeypatch):
    """MeanFlow.loss runs the jvp on the rows with r < t only; every row's error must still be |u - u_tgt|^2 with
    u_tgt = v - (t - r) du/dt, v the guided velocity 2 (eps - x0) - u(z, t, t | null) and du/dt a central difference
    along it of a field with a known u (rows with r = t: u_tgt = v). Catches a jvp skipped or misplaced on some rows, a
    target left at v where r < t, a jvp along the unguided eps - x0."""
    m = ExponentialField()
    x0, y, eps = torch.randn(6, 1, 4, 4), torch.tensor([1, 2, 3, 4, 5, 6]), torch.randn(6, 1, 4, 4)
    t = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    r = torch.tensor([0.1, 0.8, 0.3, 0.6, 0.0, 0.2])  # rows 1 and 3: r = t
    monkeypatch.setattr(torch, 'randn_like', lambda x: eps)
    flow = MeanFlow(m, p_uncond=0.0, omega=2.0, weight_p=0.0)
    monkeypatch.setattr(flow, 'sample_tr', lambda n, device='cpu': (t, r))
    _, (_, per_sample) = flow.loss(m, x0, y)
    tb, span = t.view(-1, 1, 1, 1), (t - r).view(-1, 1, 1, 1)
    z, h = (1 - tb) * x0 + tb * eps, 1e-3
    v = 2 * (eps - x0) - m(z, t, torch.full_like(y, 10))  # the guided velocity: the target's v and the jvp's tangent
    dudt = (m(z + h * v, t + h, y, r) - m(z - h * v, t - h, y, r)) / (2 * h)
    want = ((m(z, t, y, r) - (v - span * dudt)) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(per_sample, want, rtol=1e-4), (per_sample, want)
    assert (want - ((m(z, t, y, r) - v) ** 2).mean(dim=(1, 2, 3))).abs()[[0, 2, 4, 5]].min() > 1e-3


def test_perfect_average_velocity_has_zero_loss():
    """For data on one point x*, z_t = (1 - t) x* + t eps moves on straight lines: v = u = (z - x*) / t. MeanFlow's
    loss of that exact network is 0 for every (t, r), guidance and dropped labels included (x* is every class's)."""
    x_star = torch.randn(1, 1, 4, 4)

    class PointMass(nn.Module):
        num_classes = 10

        def forward(self, z, t, y=None, r=None):
            return (z - x_star) / t.view(-1, 1, 1, 1)

    m = PointMass()
    torch.manual_seed(0)
    flow = MeanFlow(m, ratio=0.5, p_uncond=0.3, omega=0.5, kappa=0.3, weight_p=0.0)
    loss, (t, per_sample) = flow.loss(m, x_star.expand(64, -1, -1, -1), torch.arange(64) % 10)
    assert per_sample.max() < 1e-9 and t.min() > 0
    x_star2 = x_star + 0.1
    loss, _ = flow.loss(m, x_star2.expand(64, -1, -1, -1), torch.arange(64) % 10)
    assert loss > 1e-3  # other data: not the network's average velocity


def test_guided_target_is_the_papers_combination(monkeypatch):
    """Trained-in guidance: for t in cfg_t, v~ = omega v + kappa u(z, t, t | y) + (1 - omega - kappa) u(z, t, t | null),
    v elsewhere and for dropped labels (the null class learns the plain v). Catches omega and kappa swapped, a
    guided dropped label, guidance outside cfg_t."""
    class Labelled(nn.Module):  # u(z, r, t | y) = c_y, a constant per class (the null class 10 included)
        num_classes = 10

        def __init__(self):
            super().__init__()
            self.c = torch.randn(11, 1, 4, 4)

        def forward(self, z, t, y=None, r=None):
            return self.c[y] + 0 * z

    m = Labelled()
    torch.manual_seed(0)
    x0, y, eps = torch.randn(8, 1, 4, 4), torch.arange(8), torch.randn(8, 1, 4, 4)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 0.2, 0.6, 0.8])
    monkeypatch.setattr(torch, 'randn_like', lambda x: eps)
    drop = torch.tensor([False] * 6 + [True] * 2)
    rands = iter([torch.ones(8), drop.float() * -1 + 0.5])  # r = t everywhere; the last two labels dropped
    monkeypatch.setattr(torch, 'rand', lambda n, device=None: next(rands))
    flow = MeanFlow(m, ratio=0.0, p_uncond=0.25, omega=0.6, kappa=0.3, cfg_t=(0.25, 0.75), weight_p=0.0)
    monkeypatch.setattr(flow, 'sample_t', lambda n, device='cpu': t)
    _, (_, per_sample) = flow.loss(m, x0, y)
    v = eps - x0
    inside = ((t >= 0.25) & (t <= 0.75) & ~drop).view(-1, 1, 1, 1)
    v_cfg = torch.where(inside, 0.6 * v + 0.3 * m.c[y] + 0.1 * m.c[10], v)
    u = torch.where(drop.view(-1, 1, 1, 1), m.c[10], m.c[y])  # dropped labels reach the network as the null class
    assert torch.allclose(per_sample, ((u - v_cfg) ** 2).mean(dim=(1, 2, 3)), rtol=1e-5)


def one_line_error(p, *words):
    assert p.returncode != 0 and 'Traceback' not in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.startswith('error:')]
    assert len(lines) == 1, p.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def noise(n, seed, side=8):
    """sample.py's noise for its samples from `seed`."""
    return torch.randn(n, 1, side, side, generator=torch.Generator().manual_seed(seed))


def test_checkpoint_round_trip_and_sample_py_defaults_to_one_step(tmp_path):
    """A MeanFlow checkpoint rebuilds from its model_args alone (the interval embedder included, a strict load, the
    same u(x, r, t)); sample.py samples it by the jump, 1 step by default and --steps=N on request, reports the NFE and
    that guidance is trained in, and refuses other solvers and a cfg with one line."""
    args = dict(in_channels=1, input_size=8, patch_size=2, dim=32, n_layers=2, n_heads=4, num_classes=10, p_uncond=0.1,
                qk_norm=True, stem_channels=8, mean_flow=True)
    net = small_net(seed=3).eval()
    torch.save(dict(model_args=args, model=net.state_dict(), ema=net.state_dict(), config={'dataset': 'mnist'}),
               tmp_path / 'ckpt.pt')
    model, _ = load_flow_model(str(tmp_path / 'ckpt.pt'), attention='kernels')
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1.0, 0.6, 0.3]), torch.tensor([2, 5, 10])
    with torch.no_grad():
        assert torch.allclose(model(x, t, y, 0.4 * t), net(x, t, y, 0.4 * t), atol=1e-5)
    y10 = torch.arange(10)
    for steps, flag in ((1, []), (3, ['--steps=3'])):
        npz = str(tmp_path / f'{steps}.npz')
        p = run_here('sample.py', f'--out_dir={tmp_path}', '--dtype=float32', '--num_samples=10', f'--save_npz={npz}',
                     *flag, check=True)
        assert f'meanflow {steps} steps = {steps} NFE (guidance trained in: no doubled batch)' in p.stdout
        assert Image.open(tmp_path / f'samples_meanflow{steps}.png').size == (8 * 8 + 9 * 2, 10 * 8 + 11 * 2)
        want = to_uint8(sample_mean_flow(net, noise(10, 1000), y10, steps=steps)).astype(float)
        assert np.abs(np.load(npz)['arr_0'] - want).mean() < 0.1, steps
    one_step = to_uint8(sample_mean_flow(net, noise(10, 1000), y10, steps=1)).astype(float)
    assert np.abs(np.load(str(tmp_path / '3.npz'))['arr_0'] - one_step).mean() > 1  # --steps is used
    for flag, words in (('--solver=heun', ('MeanFlow model', 'heun')), ('--cfg=2.0', ('trained in', 'cfg')),
                        ('--sweep=cfg', ('trained in', '--sweep=cfg'))):
        one_line_error(run_here('sample.py', f'--out_dir={tmp_path}', flag), *words)


MEANFLOW = [a for a in TINY_DIT if not a.startswith('--sample_steps')] + ['--objective=meanflow', '--dtype=float32']


def read_log(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, 'log.jsonl'))]


def test_train_resume_sample_and_evaluate_end_to_end(mnist_dir, tmp_path):
    """train_dit.py --objective=meanflow: a resumed run equals an uninterrupted one; the checkpoint says mean_flow, its
    closing samples are 1-step jumps of the EMA weights; sample.py's defaults draw its grid in 1 NFE and evaluate.py's
    table has one meanflow row of 1 NFE without cfg; resuming it as a flow run stops with one line. The resumed run
    is not given the MeanFlow settings it started with: it keeps the checkpoint's (the defaults would train another
    target)."""
    common = [f'--data_dir={mnist_dir}', '--batch_size=32', '--lr_decay_iters=12', '--ckpt_interval=100',
              '--learning_rate=2e-3', *MEANFLOW]
    own = ['--mf_omega=1.5', '--mf_kappa=0.2', '--mf_ratio=0.5', '--mf_r=(-2.0,1.0)']
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    p = run('train_dit.py', f'--out_dir={a}', '--max_iters=12', *common, *own, env={'PYTHONWARNINGS': 'default'})
    assert 'FutureWarning' not in p.stderr, p.stderr  # torch's own jvp set-up warns once, which a user cannot act on
    run('train_dit.py', f'--out_dir={b}', '--max_iters=5', *common, *own)
    run('train_dit.py', f'--out_dir={b}', '--max_iters=12', '--init_from=resume', *common)
    ca, cb = load_checkpoint(os.path.join(a, 'ckpt.pt')), load_checkpoint(os.path.join(b, 'ckpt.pt'))
    for key in ('model', 'ema'):
        for name, w in ca[key].items():
            assert torch.equal(w, cb[key][name]), (key, name)
    assert ca['model_args']['mean_flow'] is True and [r['iter'] for r in read_log(b)] == list(range(1, 13))
    assert max(abs(r['loss'] - 1) for r in read_log(a)) > 0.05  # the squared error, not the weighted loss (about 1)
    # samples.png: one jump of the EMA weights from the seeded noise, class k in row k (two jumps draw another grid)
    model = build_model(ca['model_args'], attention='math')
    model.load_state_dict(ca['ema'])
    model.eval()
    z, y = noise(80, 1337, side=28), torch.arange(10).repeat_interleave(8)
    grid = np.asarray(Image.open(os.path.join(a, 'samples.png')).convert('L')).astype(float)
    gap = lambda steps: np.abs(grid - grey_grid(sample_mean_flow(model, z, y, steps=steps))).mean()
    assert gap(1) < 0.05 and gap(2) > 0.1  # grey levels
    p = run_here('sample.py', f'--out_dir={a}', '--dtype=float32', check=True)
    assert 'samples_meanflow1.png: 80 samples, meanflow 1 steps = 1 NFE' in p.stdout
    js, clf = str(tmp_path / 'eval.json'), str(tmp_path / 'clf.pt')
    p = run_here('evaluate.py', f'--out_dir={a}', f'--data_dir={mnist_dir}', f'--classifier_path={clf}',
                 '--classifier_epochs=2', '--num_samples=20', '--inception=off', f'--out_json={js}', '--dtype=float32',
                 check=True)
    rows = json.load(open(js))['rows']
    assert [(r['solver'], r['steps'], r['nfe'], r['cfg']) for r in rows] == [('meanflow', 1, 1, None)]
    assert 'no doubled batch' in p.stdout
    one_line_error(run_here('evaluate.py', f'--out_dir={a}', f'--data_dir={mnist_dir}', '--runs=euler:2:2'), 'MeanFlow model')
    one_line_error(run_here('train_dit.py', f'--out_dir={a}', '--max_iters=14', '--init_from=resume',
                            *[c for c in common if c != '--objective=meanflow']), '--objective=meanflow')


def grey_grid(x):
    """save_grid's 8-column grey uint8 grid of images in [-1, 1]."""
    from torchvision.utils import make_grid
    g = make_grid((x.float().clamp(-1, 1) + 1) / 2, nrow=8, padding=2, pad_value=1.0)
    return (g[0] * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy().astype(float)


def replay(ckpt, mnist_dir, iters, lr, ratio, average=True):
    """train_dit.py's DDP steps for 2 processes, in this one process: rank 0's initial weights (DDP broadcasts them),
    each rank's half of the global batch and its own random draws (seed + rank, after building the model, on the
    attention path auto picks), MeanFlow's loss per half, the two gradients averaged (average=False: rank 0's alone),
    clipped, one fused AdamW step. Returns the weights and each rank's RNG state."""
    seed, nets, states = 1337, [], []
    for rank in (0, 1):  # each process seeds seed + rank, then builds its model
        torch.manual_seed(seed + rank)
        nets.append(DiT_Llama(**ckpt['model_args'], attention=pick_attention('auto', 'cpu', 'float32')))
        states.append(torch.get_rng_state())
    net = nets[0]
    x, y = load_dataset('mnist', mnist_dir)
    batches = [Batches(x, y, 32, 2, rank, seed) for rank in (0, 1)]
    opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0, fused=True)
    flow = MeanFlow(net, 'logit_normal', ratio, 0.1, 1.0, 0.5, weight_p=1.0)
    for it in range(iters):
        grads = []
        for rank in (0, 1):
            torch.set_rng_state(states[rank])
            x0, y0 = batches[rank].get(it)
            loss, _ = flow.loss(net, x0, y0)
            grads.append(torch.autograd.grad(loss, list(net.parameters())))
            states[rank] = torch.get_rng_state()
        for p, g0, g1 in zip(net.parameters(), *grads):
            p.grad = (g0 + g1) / 2 if average else g0
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
    return net.state_dict(), states


def test_ddp_two_processes_average_the_meanflow_gradients(mnist_dir, tmp_path):
    """2 gloo processes: every process ends with the same weights, and those are the weights of one process that
    averages the gradients of the two halves of each global batch, each with its rank's own draws of t, r, eps and
    dropped labels (replayed here from the same seeds: the checkpoint's RNG states agree). Taking rank 0's gradient
    alone lands far from them. Catches a loss whose u comes from the plain model (model.module), which trains without
    an error and without the all-reduce."""
    out = str(tmp_path / 'ddp')
    p = run('train_dit.py', f'--data_dir={mnist_dir}', f'--out_dir={out}', '--batch_size=32', '--max_iters=3',
            '--warmup_iters=0', '--lr_decay_iters=-1', '--learning_rate=2e-3', '--mf_ratio=0.5', '--ckpt_interval=100',
            '--sample_interval=0', *MEANFLOW, torchrun=2)
    head = 'DDP: parameter checksums per process: '
    line = [line[len(head):] for line in p.stdout.splitlines() if line.startswith(head)]
    sums = [tuple(map(float, s.split())) for s in line[0].split(', ')]
    assert len(sums) == 2 and sums[0] == sums[1]
    ckpt = load_checkpoint(os.path.join(out, 'ckpt.pt'))
    assert ckpt['iter_num'] == 3 and ckpt['model_args']['mean_flow']
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each process of the run
    try:
        averaged, states = replay(ckpt, mnist_dir, 3, 2e-3, 0.5)
        alone, _ = replay(ckpt, mnist_dir, 3, 2e-3, 0.5, average=False)
    finally:
        torch.set_num_threads(threads)
    for rank in (0, 1):
        assert torch.equal(states[rank], ckpt['rng'][rank]['cpu'])  # the replay drew exactly the run's numbers
    gap = lambda w: max((w[k] - ckpt['model'][k]).abs().max().item() for k in w)
    assert gap(averaged) < 1e-6 and gap(alone) > 1e-4, (gap(averaged), gap(alone))
