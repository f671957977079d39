"""The ideal machines: against a direct all-at-once softmax, their limits (IS copies, big patches = IS,
ELS equivariance), bounded blocks as N grows, and the comparison script's figure and JSON."""
import json
import os

import pytest
import torch
from PIL import Image

import ideal_machines as im
from conftest import run
from model import sample


def direct_x0(machine, xt, t, train, P):
    """The definition, written out: explicit zero-padded patches, full squared distances, one softmax."""
    B, C, H, W = xt.shape
    r, a = P // 2, 1 - t
    if machine == 'IS':
        d2 = ((xt[:, None] - a * train[None]) ** 2).flatten(2).sum(-1)  # [B, N]
        w = torch.softmax(-d2 / (2 * t * t), dim=1)
        return torch.einsum('bn,nchw->bchw', w, train)
    pad = lambda x: torch.nn.functional.pad(x, (r, r, r, r))
    xq, xk = pad(xt), pad(train)
    patch = lambda x, i, j: x[:, :, i:i + P, j:j + P].flatten(1)
    border = lambda i, n: (max(0, r - i), max(0, i + r - (n - 1)))
    locs = [(i, j) for i in range(H) for j in range(W)]
    out = torch.zeros_like(xt)
    for (i, j) in locs:
        if machine == 'LS':
            cands = [(i, j)]
        elif machine == 'ELS':
            cands = locs
        else:  # bbELS
            cands = [(u, v) for (u, v) in locs if (border(u, H), border(v, W)) == (border(i, H), border(j, W))]
        k = torch.cat([patch(xk, u, v) for (u, v) in cands])  # [n_cands * N, J], ordered by location then image
        centre = torch.cat([train[:, :, u, v] for (u, v) in cands])  # [n_cands * N, C]
        d2 = ((patch(xq, i, j)[:, None] - a * k[None]) ** 2).sum(-1)
        out[:, :, i, j] = torch.softmax(-d2 / (2 * t * t), dim=1) @ centre
    return out


def digits(n, size=8, seed=0):
    """MNIST-like: background exactly -1 (so blank patches repeat), a random blob of strokes in a sub-square."""
    g = torch.Generator().manual_seed(seed)
    x = -torch.ones(n, 1, size, size)
    for i in range(n):
        h = int(torch.randint(2, size // 2 + 1, (1,), generator=g))
        r, c = (int(v) for v in torch.randint(0, size - h + 1, (2,), generator=g))
        x[i, :, r:r + h, c:c + h] = torch.rand(1, h, h, generator=g) * 2 - 1
    return x


@pytest.mark.parametrize('machine', im.MACHINES)
@pytest.mark.parametrize('t', [0.9, 0.3])
def test_streaming_equals_direct(machine, t, monkeypatch):
    monkeypatch.setattr(im, 'BLOCK', 300)  # force several logits blocks inside each chunk
    train, xt = digits(13, seed=1), digits(2, seed=2)
    P = 3
    got = im.x0_hat(machine, xt, t, train, P, chunk=5, norms=im.patch_norms(train, P))
    want = direct_x0(machine, xt.double(), t, train.double(), P)
    assert torch.allclose(got.double(), want, atol=1e-5), (got.double() - want).abs().max()


def test_is_ends_on_a_training_image():
    train = digits(30, size=8, seed=3)
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    x = sample(im.Machine('IS', train, 3), z, steps=50)
    _, d = im.nearest(x, train)
    pair = torch.cdist(train.flatten(1), train.flatten(1))
    typical = pair[~torch.eye(30, dtype=torch.bool)].median()
    assert d.max() < 0.01 * typical, (d, typical)


@pytest.mark.parametrize('t', [0.8, 0.2])
def test_whole_image_patches_reduce_to_is(t):
    train, xt = digits(9, seed=5), digits(3, seed=6)
    P = 2 * 8 - 1  # every patch holds the whole image wherever it is centred
    is_ = im.x0_hat('IS', xt, t, train, P)
    for machine in ('LS', 'bbELS'):
        assert torch.allclose(im.x0_hat(machine, xt, t, train, P, chunk=4), is_, atol=1e-5)


def test_els_is_translation_equivariant_in_the_interior():
    train, xt = digits(6, size=16, seed=7), digits(1, size=16, seed=8)
    P, (di, dj), t = 3, (2, 1), 0.5
    out = im.x0_hat('ELS', xt, t, train, P)
    out_shifted = im.x0_hat('ELS', torch.roll(xt, (di, dj), dims=(2, 3)), t, train, P)
    r = P // 2
    inner = out[:, :, r:16 - r - di, r:16 - r - dj]
    assert torch.allclose(out_shifted[:, :, r + di:16 - r, r + dj:16 - r], inner, atol=1e-5)
    # LS is not: it compares each place only with the same place of the training images
    ls, ls_shifted = im.x0_hat('LS', xt, t, train, P), im.x0_hat('LS', torch.roll(xt, (di, dj), dims=(2, 3)), t, train, P)
    assert not torch.allclose(ls_shifted[:, :, r + di:16 - r, r + dj:16 - r], ls[:, :, r:16 - r - di, r:16 - r - dj], atol=1e-3)


@pytest.mark.parametrize('machine', ['ELS', 'bbELS', 'LS'])
def test_blocks_do_not_grow_with_n(machine, monkeypatch):
    monkeypatch.setattr(im, 'BLOCK', 4096)
    xt = digits(1, seed=9)
    peaks = []
    for n in (40, 400):
        im.peak['block'] = 0
        im.x0_hat(machine, xt, 0.5, digits(n, seed=10), 3, chunk=8)
        peaks.append(im.peak['block'])
    assert peaks[0] == peaks[1] and peaks[1] <= max(4096, 8 * 64)


def test_compare_script_writes_figure_and_json(flow_run, mnist_dir, tmp_path):
    ckpt = os.path.join(flow_run[0], 'ckpt.pt')
    noise = str(tmp_path / 'noise.pt')
    torch.save(torch.randn(1, 1, 32, 32), noise)
    out = str(tmp_path / 'ideal')
    p = run('ideal_machines.py', f'--ckpt={ckpt}', f'--data_dir={mnist_dir}', f'--out_dir={out}', '--num_train=24',
            '--num_noises=2', f'--noise_file={noise}', '--steps=3', '--patch_size=3', '--calibrate', '--calib_sizes=(3,5)')
    r = json.load(open(os.path.join(out, 'compare.json')))
    assert r['num_noises'] == 3 and r['num_train'] == 24 and r['calibrated']
    assert set(r['agreement_with_unet']) == {'IS', 'LS', 'ELS', 'bbELS', 'nearest training image'}
    for row in r['agreement_with_unet'].values():
        assert row['r2'] <= 1 and row['mse'] >= 0
    sched = json.load(open(os.path.join(out, 'patch_schedule.json')))
    assert sched['t'] == pytest.approx([2 / 3, 1 / 3]) and set(sched['P']) <= {3, 5}  # t = 1 is not calibrated: every P ties
    w, h = Image.open(os.path.join(out, 'compare.png')).size
    assert w > h > 100  # 3 rows x 7 columns
    assert 'ELS' in p.stdout


@pytest.mark.parametrize('args,msg', [
    (['--patch_size=4'], 'patch_size must be odd'),
    (['--machines=IS,XYZ'], 'unknown machine'),
    (['--noise_file=NOISE'], 'must hold a tensor of shape [1, 1, 32, 32]'),
])
def test_bad_input(flow_run, mnist_dir, tmp_path, args, msg):
    noise = str(tmp_path / 'bad.pt')
    torch.save(torch.randn(2, 1, 32, 32), noise)
    args = [a.replace('NOISE', noise) for a in args]
    p = run('ideal_machines.py', f'--ckpt={os.path.join(flow_run[0], "ckpt.pt")}', f'--data_dir={mnist_dir}',
            f'--out_dir={tmp_path}', '--num_train=8', '--steps=1', *args, check=False)
    assert p.returncode != 0 and msg in p.stderr and 'Traceback' not in p.stderr


def test_refuses_a_class_conditional_checkpoint(cfg_run, mnist_dir, tmp_path):
    p = run('ideal_machines.py', f'--ckpt={os.path.join(cfg_run[0], "ckpt.pt")}', f'--data_dir={mnist_dir}',
            f'--out_dir={tmp_path}', check=False)
    assert p.returncode != 0 and 'class-conditional' in p.stderr
