"""The rectified-flow loss, time grids and samplers."""
import math

import pytest
import torch
import torch.nn as nn

from model import NFE_PER_STEP, RectifiedFlow, guided_velocity, sample, time_grid


class Recorder(nn.Module):
    """Returns a fixed output and remembers what it was called with."""

    num_classes = 10

    def __init__(self, out=None):
        super().__init__()
        self.out = out

    def forward(self, x, t, y=None):
        self.x, self.t, self.y = x, t, y
        return torch.zeros_like(x) if self.out is None else self.out


class ConstantVelocity(nn.Module):
    """v(x, t, y) = a constant per class (the null class 10 included)."""

    num_classes = 10

    def __init__(self):
        super().__init__()
        self.v = torch.randn(11, 1, 4, 4)

    def forward(self, x, t, y=None):
        y = torch.full((x.shape[0],), 10) if y is None else y
        return self.v[y].expand_as(x).clone()


@pytest.mark.parametrize('t_value', [0.0, 1.0, 0.3])
def test_x_t_interpolates_data_and_noise(t_value, monkeypatch):
    flow = RectifiedFlow('uniform')
    monkeypatch.setattr(flow, 'sample_t', lambda n, device='cpu': torch.full((n,), t_value))
    torch.manual_seed(0)
    x0 = torch.randn(3, 1, 4, 4)
    m = Recorder()
    loss, (t, per_sample) = flow.loss(m, x0)
    torch.manual_seed(0)
    torch.randn(3, 1, 4, 4)  # x0
    eps = torch.randn(3, 1, 4, 4)  # the same draw as inside the loss
    assert torch.allclose(m.x, (1 - t_value) * x0 + t_value * eps, atol=1e-6)
    # a zero prediction leaves the target v = eps - x0 as the error
    assert torch.allclose(per_sample, (eps - x0).square().mean(dim=(1, 2, 3)), atol=1e-6)
    assert math.isclose(loss.item(), per_sample.mean().item(), rel_tol=1e-6)
    assert torch.equal(t, torch.full((3,), t_value))


def test_loss_builds_x_t_with_the_t_the_model_sees(monkeypatch):
    """Catches a loss that calls model(x_t, 1 - t, y) or builds x_t with another t than it hands over."""
    torch.manual_seed(2)
    x0, eps = torch.randn(6, 2, 4, 4), torch.randn(6, 2, 4, 4)
    monkeypatch.setattr(torch, 'randn_like', lambda x: eps)
    m = Recorder()
    _, (t, _) = RectifiedFlow('uniform').loss(m, x0)
    tb = m.t.view(-1, 1, 1, 1)
    assert torch.allclose(m.x, (1 - tb) * x0 + tb * eps, atol=1e-6)  # x_t recovered with the t the model received
    assert torch.equal(m.t, t) and (t - 0.5).abs().min() > 0.01  # random t, none at the symmetric point 1/2


def test_loss_passes_the_labels():
    """Catches a loss that drops y (the class-conditional models would train unconditionally)."""
    m, y = Recorder(), torch.tensor([3, 1, 4])
    RectifiedFlow().loss(m, torch.randn(3, 1, 4, 4), y)
    assert torch.equal(m.y, y)


def test_perfect_velocity_has_zero_loss(monkeypatch):
    torch.manual_seed(1)
    x0, eps = torch.randn(5, 2, 4, 4), torch.randn(5, 2, 4, 4)
    monkeypatch.setattr(torch, 'randn_like', lambda x: eps)
    loss, _ = RectifiedFlow().loss(Recorder(out=eps - x0), x0)
    assert loss.item() < 1e-12


@pytest.mark.parametrize('kind', ['logit_normal', 'uniform', 'mode'])
def test_t_sampling_in_unit_interval(kind):
    torch.manual_seed(0)
    t = RectifiedFlow(kind).sample_t(20000)
    assert t.min() >= 0 and t.max() <= 1
    assert abs(t.mean().item() - 0.5) < 0.02  # all three are symmetric about 1/2
    if kind == 'logit_normal':  # sigmoid(N(0, 1)) puts more mass in the middle than uniform
        assert ((t > 0.25) & (t < 0.75)).float().mean() > 0.6


def test_time_grid_and_shift():
    g = time_grid(4)
    assert torch.allclose(g, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    s = time_grid(4, shift=3.0)
    assert s[0] == 1 and s[-1] == 0 and torch.all(s[1:-1] > g[1:-1])  # shift > 1 stays nearer noise
    assert math.isclose(time_grid(2, shift=3.0)[1].item(), 0.75)  # t' = s t / (1 + (s - 1) t) at t = 1/2


@pytest.mark.parametrize('solver', list(NFE_PER_STEP))
def test_solvers_exact_on_constant_velocity(solver):
    torch.manual_seed(0)
    m = ConstantVelocity()
    z, y = torch.randn(3, 1, 4, 4), torch.tensor([1, 2, 3])
    for steps in (1, 7):
        x, traj = sample(m, z, y, steps=steps, solver=solver, return_traj=True)
        assert torch.allclose(x, z - m.v[y], atol=1e-5)  # x0 = x1 - v for dx/dt = v from t = 1 to 0
        assert len(traj) == steps + 1 and torch.equal(traj[0], z)


@pytest.mark.parametrize('solver,times', [
    ('euler', [1, 0.75, 0.5, 0.25]),
    ('heun', [1, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25, 0]),
    ('midpoint', [1, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]),
    ('rk4', [1, 0.875, 0.875, 0.75, 0.75, 0.625, 0.625, 0.5, 0.5, 0.375, 0.375, 0.25, 0.25, 0.125, 0.125, 0]),
])
def test_samplers_hand_the_network_the_right_t(solver, times):
    """Catches a sampler that passes 1 - t (or t + dt) to the network: 4 steps from t = 1 (noise) to 0."""
    seen = []

    class Times(Recorder):
        def forward(self, x, t, y=None):
            seen.append(t[0].item())
            assert torch.equal(t, torch.full((len(x),), t[0].item()))  # one t for the whole batch
            return torch.zeros_like(x)

    sample(Times(), torch.randn(2, 1, 4, 4), steps=4, solver=solver)
    assert seen == pytest.approx(times)


@pytest.mark.parametrize('solver,order', [('euler', 1), ('midpoint', 2), ('heun', 2), ('rk4', 4)])
def test_solvers_converge_at_their_order(solver, order):
    class Linear(nn.Module):  # dx/dt = x + t, x(1) = 1: x(t) = 3 e^(t-1) - t - 1, x(0) = 3/e - 1
        num_classes = 10  # not symmetric in t: with 1 - t in place of t the answer would be x(0) = 0

        def forward(self, x, t, y=None):
            return x.double() + t.view(-1, 1).double()

    z = torch.ones(1, 1, dtype=torch.float64)
    exact = 3 / math.e - 1
    err = lambda n: abs(sample(Linear(), z, steps=n, solver=solver).item() - exact)
    ratio = err(32) / err(64)
    assert abs(math.log2(ratio) - order) < 0.3, (solver, ratio)


def test_cfg_identities_and_doubled_batch():
    torch.manual_seed(0)
    m = ConstantVelocity()
    x, y = torch.randn(3, 1, 4, 4), torch.tensor([0, 4, 9])
    v_cond, v_uncond = m.v[y], m.v[10].expand(3, 1, 4, 4)
    assert torch.allclose(guided_velocity(m, x, 0.5, y, cfg=1.0), v_cond)
    assert torch.allclose(guided_velocity(m, x, 0.5, y, cfg=0.0), v_uncond)
    assert torch.allclose(guided_velocity(m, x, 0.5, y, cfg=3.0), v_uncond + 3 * (v_cond - v_uncond), atol=1e-6)
    rec = Recorder()
    guided_velocity(rec, x, 0.5, y, cfg=2.0)
    assert rec.x.shape[0] == 6 and torch.equal(rec.y, torch.tensor([0, 4, 9, 10, 10, 10]))
    assert torch.equal(rec.t, torch.full((6,), 0.5))
