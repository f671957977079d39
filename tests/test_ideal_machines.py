"""The ideal machines: against a direct all-at-once softmax, their limits (IS copies, big patches = IS,
ELS equivariance), bounded blocks as N grows, and the comparison script's figure and JSON."""
import json
import os

import pytest
import torch
from PIL import Image

import ideal_machines as im
from conftest import run
from model import load_dataset, load_flow_model, resize, sample, to_model_range


def direct_els(xt, t, train, P):
    """ELS as this file computes it (zero-padded patches, every location): full squared distances, one softmax."""
    B, C, H, W = xt.shape
    r, a = P // 2, 1 - t
    pad = lambda x: torch.nn.functional.pad(x, (r, r, r, r))
    xq, xk = pad(xt), pad(train)
    patch = lambda x, i, j: x[:, :, i:i + P, j:j + P].flatten(1)
    locs = [(i, j) for i in range(H) for j in range(W)]
    out = torch.zeros_like(xt)
    k = torch.cat([patch(xk, u, v) for (u, v) in locs])  # [H * W * N, J], ordered by location then image
    centre = torch.cat([train[:, :, u, v] for (u, v) in locs])  # [H * W * N, C]
    for (i, j) in locs:
        d2 = ((patch(xq, i, j)[:, None] - a * k[None]) ** 2).sum(-1)
        out[:, :, i, j] = torch.softmax(-d2 / (2 * t * t), dim=1) @ centre
    return out


def by_definition(machine, xt, t, train, P):
    """IS, LS and bbELS from ideal_machines.md, one query pixel at a time: list the (image, location) pairs the
    definition allows as candidates, then one softmax of -||q - (1-t) k||^2 / (2 t^2) over them; the value is the
    centre pixel of k. Patches are read pixel by pixel, zero outside the image. bbELS's edge class of a location is
    written here as the set of its patch's pixels that fall inside the image: two patches share it exactly when
    they cross the same edges at the same depths (interior: the whole patch; a corner: the same corner)."""
    B, C, H, W = xt.shape
    r = P // 2
    offsets = [(di, dj) for di in range(-r, r + 1) for dj in range(-r, r + 1)]
    locs = [(i, j) for i in range(H) for j in range(W)]
    inside = {(i, j): frozenset((di, dj) for di, dj in offsets if 0 <= i + di < H and 0 <= j + dj < W) for i, j in locs}

    def patch(img, i, j):
        return torch.stack([img[:, i + di, j + dj] if (di, dj) in inside[i, j] else torch.zeros(C, dtype=img.dtype)
                            for di, dj in offsets])

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
                else:  # bbELS: every location whose patch has the same pixels inside the image
                    cands = [(mu, u, v) for mu in range(len(train)) for (u, v) in locs if inside[u, v] == inside[i, j]]
                q, k = patch(xt[b], i, j), torch.stack([train_patch[c] for c in cands])
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
@pytest.mark.parametrize('t', [0.9, 0.3])
def test_streaming_equals_direct(machine, t, C, monkeypatch):
    """Streamed machines equal the definitions (grey and colour); P = 5 on 8x8 has edge classes of depth 1 and 2."""
    monkeypatch.setattr(im, 'BLOCK', 300)  # force several logits blocks inside each chunk
    train, xt = digits(13, seed=1, C=C), digits(2, seed=2, C=C)
    for P in (3, 5):
        got = im.x0_hat(machine, xt, t, train, P, chunk=5, norms=im.patch_norms(train, P))
        if machine == 'ELS':
            want = direct_els(xt.double(), t, train.double(), P)
        else:
            want = by_definition(machine, xt.double(), t, train.double(), P)
        assert torch.allclose(got.double(), want, atol=1e-5), (P, (got.double() - want).abs().max())


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
    # the table's numbers, recomputed here for the two rows that need no patch schedule: IS and the nearest image
    unet, _ = load_flow_model(ckpt)
    x, _ = load_dataset('mnist', mnist_dir, download=False)
    train = resize(to_model_range(x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:24]]), 32)
    z = torch.cat([torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)), torch.load(noise)])
    x_unet = sample(unet, z, steps=3)
    for name, x_m in (('IS', sample(im.Machine('IS', train, 3), z, steps=3)), ('nearest training image', im.nearest(x_unet, train)[0])):
        row = r['agreement_with_unet'][name]
        assert row['r2'] == pytest.approx(im.r2(x_m, x_unet).median().item(), abs=1e-4), name
        assert row['mse'] == pytest.approx((x_m - x_unet).pow(2).flatten(1).mean(1).median().item(), rel=1e-3), name
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
