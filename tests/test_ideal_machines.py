"""The ideal machines: against their definitions written out pixel by pixel, their limits (IS copies, big patches =
IS, ELS equivariance), bounded blocks as N grows, the calibration rule, the metric, and the script's figure and JSON."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import ideal_machines as im
from conftest import run, run_here
from model import load_dataset, load_flow_model, resize, sample, to_model_range


def by_definition(machine, xt, t, train, P):
    """The four machines from docs/ideal_machines.md, one query pixel at a time: list the (image, location) pairs the
    definition allows as candidates, then one softmax of -||q - (1-t) k||^2 / (2 t^2) over them; the value is the
    centre pixel of k. Training patches are read pixel by pixel, zero outside the image; the query too, except for ELS
    (circular: indices wrap around). bbELS's edge class of a location is written here as the set of its patch's pixels
    that fall inside the image: two patches share it exactly when they cross the same edges at the same depths
    (interior: the whole patch; a corner: the same corner). ELS's candidates are the patches fully inside."""
    B, C, H, W = xt.shape
    r = P // 2
    offsets = [(di, dj) for di in range(-r, r + 1) for dj in range(-r, r + 1)]
    locs = [(i, j) for i in range(H) for j in range(W)]
    inside = {(i, j): frozenset((di, dj) for di, dj in offsets if 0 <= i + di < H and 0 <= j + dj < W) for i, j in locs}

    def patch(img, i, j):
        return torch.stack([img[:, i + di, j + dj] if (di, dj) in inside[i, j] else torch.zeros(C, dtype=img.dtype)
                            for di, dj in offsets])

    def circular_patch(img, i, j):
        return torch.stack([img[:, (i + di) % H, (j + dj) % W] for di, dj in offsets])

    train_patch = {(mu, u, v): patch(train[mu], u, v) for mu in range(len(train)) for (u, v) in locs}
    out = torch.zeros_like(xt)
    for b in range(B):
        for (i, j) in locs:
            if machine == 'IS':  # the whole image; its pixel (i, j) is averaged
                q, k = xt[b], train
                values = train[:, :, i, j]
            else:
                if machine == 'LS':
                    cands = [(mu, i, j) for mu in range(len(train))]
                elif machine == 'ELS':  # every location whose patch lies fully inside
                    cands = [(mu, u, v) for mu in range(len(train)) for (u, v) in locs if len(inside[u, v]) == P * P]
                else:  # bbELS: every location whose patch has the same pixels inside the image
                    cands = [(mu, u, v) for mu in range(len(train)) for (u, v) in locs if inside[u, v] == inside[i, j]]
                q = circular_patch(xt[b], i, j) if machine == 'ELS' else patch(xt[b], i, j)
                k = torch.stack([train_patch[c] for c in cands])
                values = torch.stack([train[mu, :, u, v] for mu, u, v in cands])
            logits = -((q - (1 - t) * k) ** 2).flatten(1).sum(1) / (2 * t * t)
            out[b, :, i, j] = torch.softmax(logits, 0) @ values
    return out


def digits(n, size=8, seed=0, C=1):
    """MNIST-like: background exactly -1 (so blank patches repeat), a random blob of strokes in a sub-square
    (C = 3: a different blob in each colour channel)."""
    g = torch.Generator().manual_seed(seed)
    x = -torch.ones(n, C, size, size)
    for i in range(n):
        h = int(torch.randint(2, size // 2 + 1, (1,), generator=g))
        r, c = (int(v) for v in torch.randint(0, size - h + 1, (2,), generator=g))
        x[i, :, r:r + h, c:c + h] = torch.rand(C, h, h, generator=g) * 2 - 1
    return x


@pytest.mark.parametrize('C', [1, 3])
@pytest.mark.parametrize('machine', im.MACHINES)
@pytest.mark.parametrize('t', [0.9, 0.3, 0.1])
def test_streaming_equals_definition(machine, t, C, monkeypatch):
    """Streamed machines (small chunks, several logits blocks, blank patches counted once) equal the definitions, in
    grey and colour; P = 5 on 8x8 has edge classes of depth 1 and 2; t = 0.1: sharp weights, fp32 logits."""
    monkeypatch.setattr(im, 'BLOCK', 300)
    monkeypatch.setattr(im, 'QTILE', 16)
    train = digits(13, seed=1, C=C)
    xt = digits(2, seed=2, C=C) + 0.3 * torch.randn(2, C, 8, 8, generator=torch.Generator().manual_seed(3))
    for P in (3, 5):
        got = im.x0_hat(machine, xt, t, train, P, chunk=5)
        want = by_definition(machine, xt.double(), t, train.double(), P)
        tol = 2e-5 if t > 0.2 else 5e-4  # fp32 logits of size ~1/t^2: rounding shows in sharp weights
        assert torch.allclose(got.double(), want, atol=tol), (P, (got.double() - want).abs().max())


def test_streamed_equals_all_at_once():
    """One chunk and one block give the same numbers as many small ones (the online softmax's rescaling)."""
    train, xt = digits(40, seed=11), digits(3, seed=12)
    for machine in im.MACHINES:
        whole = im.x0_hat(machine, xt, 0.4, train, 5, chunk=1000)
        old = im.BLOCK, im.QTILE
        im.BLOCK, im.QTILE = 64, 4
        try:
            streamed = im.x0_hat(machine, xt, 0.4, train, 5, chunk=3)
        finally:
            im.BLOCK, im.QTILE = old
        assert torch.allclose(streamed, whole, atol=1e-5), machine


def test_is_ends_on_a_training_image():
    train = digits(30, size=8, seed=3)
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    x = sample(im.Machine('IS', train, 3), z, steps=50)
    _, d = im.nearest(x, train)
    pair = torch.cdist(train.flatten(1), train.flatten(1))
    typical = pair[~torch.eye(30, dtype=torch.bool)].median()
    assert d.max() < 0.01 * typical, (d, typical)


@pytest.mark.parametrize('C', [1, 3])
@pytest.mark.parametrize('t', [0.8, 0.2])
def test_whole_image_patches_reduce_to_is(t, C):
    train, xt = digits(9, seed=5, C=C), digits(3, seed=6, C=C)
    P = 2 * 8 - 1  # every patch holds the whole image wherever it is centred
    is_ = im.x0_hat('IS', xt, t, train, P)
    for machine in ('LS', 'bbELS'):
        assert torch.allclose(im.x0_hat(machine, xt, t, train, P, chunk=4), is_, atol=1e-5)


def test_els_is_exactly_equivariant_to_circular_shifts():
    """ELS (circular query) commutes with torch.roll everywhere, borders included; LS and bbELS (zero padding) do not."""
    train, xt = digits(6, size=12, seed=7), digits(2, size=12, seed=8) + 0.2 * torch.randn(2, 1, 12, 12)
    for shift in ((2, 1), (0, 5), (-3, -4)):
        roll = lambda x: torch.roll(x, shift, dims=(2, 3))
        out = im.x0_hat('ELS', xt, 0.5, train, 5)
        assert torch.allclose(im.x0_hat('ELS', roll(xt), 0.5, train, 5), roll(out), atol=1e-5), shift
        for machine in ('LS', 'bbELS'):
            other = im.x0_hat(machine, xt, 0.5, train, 5)
            assert not torch.allclose(im.x0_hat(machine, roll(xt), 0.5, train, 5), roll(other), atol=1e-3), machine


@pytest.mark.parametrize('machine', ['IS', 'LS', 'ELS', 'bbELS'])
def test_blocks_do_not_grow_with_n(machine, monkeypatch):
    monkeypatch.setattr(im, 'BLOCK', 4096)
    xt = digits(2, seed=9)
    peaks = []
    for n in (40, 400):
        im.peak['block'] = 0
        im.x0_hat(machine, xt, 0.5, digits(n, seed=10), 3, chunk=8)
        peaks.append(im.peak['block'])
    assert peaks[0] == peaks[1] and 0 < peaks[1] <= max(4096, 2 * 8 * 64), peaks


def test_calibration_picks_the_lower_median_of_each_samples_best_p():
    """A fake network that is LS with P = 5, 5, 9, 9 on its four samples: at each t < 1 each sample's best P is its
    own P (cosine 1), and the schedule takes the lower median, 5 (the mean would say 7, the upper median 9); t = 1
    takes the P of the next t (not the smallest). The cosine is between noise predictions eps = x_t + (1 - t) v."""
    train = digits(20, seed=13)
    own = [5, 5, 9, 9]

    class Net(torch.nn.Module):
        def forward(self, x, t, y=None):
            tt = float(t[0])
            x0 = torch.cat([im.x0_hat('LS', x[i:i + 1], tt, train, P) for i, P in enumerate(own)])
            return (x - x0) / tt

    net = Net()
    net.num_classes = 0
    path = im.network_path(net, torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(14)), 4, 'euler')
    ts, Ps, best = im.calibrate('LS', path, train, [3, 5, 7, 9], log=lambda s: None)
    assert ts == pytest.approx([1, 0.75, 0.5, 0.25]) and Ps[:3] == [5, 5, 5]
    assert best[0] is None and best[1] == best[2] == own, best  # (at t = 0.25 several P may tie: all copy)
    assert Ps[3] == sorted(best[3])[1]


def test_agreement_is_pearson_r():
    """r is the Pearson correlation (np.corrcoef) and invariant to scale and offset; 1 - SSE/SST is not."""
    import numpy as np
    x, ref = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.randn(3, 1, 8, 8, dtype=torch.float64)
    a = im.agreement(x, ref)
    for i in range(3):
        assert a['r'][i].item() == pytest.approx(np.corrcoef(x[i].flatten(), ref[i].flatten())[0, 1])
        assert a['one_minus_sse_sst'][i].item() == pytest.approx(
            1 - ((x[i] - ref[i]) ** 2).sum().item() / ((ref[i] - ref[i].mean()) ** 2).sum().item())
    b = im.agreement(2 * ref + 1, ref)
    assert torch.allclose(b['r'], torch.ones(3, dtype=torch.float64)) and (b['one_minus_sse_sst'] < 0.9).all()


def test_compare_script_writes_figure_and_json(flow_run, mnist_dir, tmp_path):
    ckpt = os.path.join(flow_run[0], 'ckpt.pt')
    noise = str(tmp_path / 'noise.pt')
    torch.save(torch.randn(1, 1, 32, 32), noise)
    out = str(tmp_path / 'ideal')
    p = run('ideal_machines.py', f'--ckpt={ckpt}', f'--data_dir={mnist_dir}', f'--out_dir={out}', '--num_train=24',
            '--num_noises=2', f'--noise_file={noise}', '--steps=3', '--calib_sizes=(3,5)', '--calib_noises=2',
            '--calib_train=10')
    r = json.load(open(os.path.join(out, 'compare.json')))
    assert r['num_noises'] == 3 and r['num_train'] == 24 and r['padding_mode'] == 'zeros'
    rows = r['median_over_noises']
    assert set(rows) == {'IS', 'LS', 'bbELS', 'nearest training image'}  # zero padding: bbELS, not ELS
    assert all(set(v) == {'r', 'one_minus_sse_sst', 'mse'} for v in rows.values())
    # the table's numbers, recomputed here for the two rows that need no patch schedule: IS and the nearest image
    net, _ = load_flow_model(ckpt)
    x, _ = load_dataset('mnist', mnist_dir, download=False)
    train = resize(to_model_range(x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:24]]), 32)
    z = torch.cat([torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)), torch.load(noise)])
    x_net = sample(net, z, steps=3)
    for name, x_m in (('IS', sample(im.Machine('IS', train, 0), z, steps=3)), ('nearest training image', im.nearest(x_net, train)[0])):
        pearson = [float(np.corrcoef(x_m[i].flatten(), x_net[i].flatten())[0, 1]) for i in range(3)]
        assert rows[name]['r'] == pytest.approx(float(np.median(pearson)), abs=1e-4), name
        assert r['r_per_noise'][name] == pytest.approx(pearson, abs=1e-4), name
        sst = ((x_net - x_net.mean((1, 2, 3), keepdim=True)) ** 2).flatten(1).sum(1)
        sse = ((x_m - x_net) ** 2).flatten(1).sum(1)
        assert rows[name]['one_minus_sse_sst'] == pytest.approx(float(np.median(1 - sse / sst)), abs=1e-4), name
        assert rows[name]['mse'] == pytest.approx(float(np.median(sse / 1024)), rel=1e-3), name
    sched = json.load(open(os.path.join(out, 'patch_schedule.json')))
    assert sched['num_train'] == 10 and sched['noises'] == 2 and set(sched['machines']) == {'LS', 'bbELS'}
    for m in ('LS', 'bbELS'):  # t = 1 is not calibrated (every P ties): it takes the next t's P
        s = sched['machines'][m]
        assert s['t'] == pytest.approx([1, 2 / 3, 1 / 3]) and set(s['P']) <= {3, 5} and s['P'][0] == s['P'][1]
        assert s['P'][1:] == [sorted(b)[(len(b) - 1) // 2] for b in s['best_P_per_noise'][1:]]  # the lower median
    w, h = Image.open(os.path.join(out, 'compare.png')).size
    assert h > w > 100  # 6 rows (noise, network, IS, LS, bbELS, nearest) x 3 columns (noises)
    assert os.path.getsize(os.path.join(out, 'schedule.png')) > 1000
    assert 'bbELS' in p.stdout and 'ETA' in p.stdout
    # the saved schedule is reused: no calibration, the same numbers
    p2 = run('ideal_machines.py', f'--ckpt={ckpt}', f'--data_dir={mnist_dir}', f'--out_dir={tmp_path / "again"}',
             '--num_train=24', '--num_noises=2', f'--noise_file={noise}', '--steps=3',
             f'--patch_schedule={os.path.join(out, "patch_schedule.json")}')
    assert 'calibrat' not in p2.stdout
    again = json.load(open(tmp_path / 'again' / 'compare.json'))['median_over_noises']
    assert all(again[k]['r'] == pytest.approx(rows[k]['r'], abs=1e-5) for k in rows)


@pytest.mark.parametrize('args,msg', [
    (['--patch_size=4'], 'patch_size must be odd'),
    (['--machines=IS,XYZ'], 'unknown machine'),
    (['--noise_file=NOISE'], 'must hold a tensor of shape [1, 1, 32, 32]'),
    (['--machines=ELS', '--patch_size=33'], 'does not fit'),
    (['--patch_schedule=NOISE'], 'cannot read patch_schedule'),
    (['--device=tpu'], 'unknown device'),
])
def test_bad_input(flow_run, mnist_dir, tmp_path, args, msg):
    noise = str(tmp_path / 'bad.pt')
    torch.save(torch.randn(2, 1, 32, 32), noise)
    args = [a.replace('NOISE', noise) for a in args]
    p = run_here('ideal_machines.py', f'--ckpt={os.path.join(flow_run[0], "ckpt.pt")}', f'--data_dir={mnist_dir}',
                 f'--out_dir={tmp_path}', '--num_train=8', '--steps=1', *args)
    assert p.returncode != 0 and msg in p.stderr and 'Traceback' not in p.stderr


def test_refuses_a_class_conditional_checkpoint(cfg_run, mnist_dir, tmp_path):
    p = run('ideal_machines.py', f'--ckpt={os.path.join(cfg_run[0], "ckpt.pt")}', f'--data_dir={mnist_dir}',
            f'--out_dir={tmp_path}', check=False)
    assert p.returncode != 0 and 'class-conditional' in p.stderr
