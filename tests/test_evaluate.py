"""evaluate.py: the Frechet distance against a direct computation, the classifier metrics end to end, bad input."""
import json
import os
import time

import numpy as np
import pytest

from conftest import run, run_here
from evaluate import feature_stats, frechet_distance


def sqrtm_psd(a):
    w, U = np.linalg.eigh(a)
    return (U * np.sqrt(w.clip(min=0))) @ U.T


def test_frechet_distance_of_two_gaussians():
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = A @ A.T + 0.1 * np.eye(6), B @ B.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    # the textbook form: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)
    r1 = sqrtm_psd(s1)
    direct = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * sqrtm_psd(r1 @ s2 @ r1))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-9)
    # commuting (diagonal) covariances: sum (sqrt(a) - sqrt(b))^2 over the diagonal
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 16.0])
    assert frechet_distance(np.zeros(3), np.diag(a), np.ones(3), np.diag(b)) == pytest.approx(3 + 1 + 1 + 1, rel=1e-9)
    # a sample against itself: 0; two samples of one Gaussian: small next to a shifted one
    f = rng.normal(size=(4000, 5))
    assert frechet_distance(*feature_stats(f), *feature_stats(f)) == pytest.approx(0, abs=1e-8)
    g, h = rng.normal(size=(4000, 5)), rng.normal(size=(4000, 5)) + 1.0
    assert frechet_distance(*feature_stats(f), *feature_stats(g)) < 0.05
    assert frechet_distance(*feature_stats(f), *feature_stats(h)) == pytest.approx(5.0, rel=0.1)


@pytest.fixture(scope='module')
def classifier(mnist_dir, tmp_path_factory):
    return str(tmp_path_factory.mktemp('clf') / 'classifier.pt')


def test_evaluate_checkpoint_table_and_json(cfg_run, mnist_dir, classifier, tmp_path):
    """Each row is sampled with its own solver and cfg (catches settings echoed into the row but not used)."""
    out, _ = cfg_run
    js = str(tmp_path / 'eval.json')
    t0 = time.time()
    p = run_here('evaluate.py', f'--out_dir={out}', f'--data_dir={mnist_dir}', f'--classifier_path={classifier}',
                 '--classifier_epochs=40', '--num_samples=30', '--batch_size=16',
                 '--runs=euler:2:2,heun:2:2,euler:2:0', '--inception=off', f'--out_json={js}', check=True)
    wall = time.time() - t0
    assert 'test accuracy' in p.stdout and os.path.isfile(classifier)
    r = json.load(open(js))
    assert r['classifier_test_acc'] > 0.9  # the fake classes (a bar per row) are easy
    rows = r['rows']
    assert [(row['solver'], row['nfe'], row['cfg']) for row in rows] == [('euler', 2, 2.0), ('heun', 4, 2.0), ('euler', 2, 0.0)]
    fid = [row['fid_cls'] for row in rows]
    assert abs(fid[0] - fid[1]) > 1e-6 * fid[0] and abs(fid[0] - fid[2]) > 1e-6 * fid[0]  # other samples, other FID
    assert all(row['num_samples'] == 30 and 30 * row['sec_per_sample'] < wall for row in rows)  # seconds, not ms
    assert 'FID-cls' in p.stdout and 'euler' in p.stdout


def test_evaluate_npz_of_real_images_scores_well(mnist_dir, classifier, cfg_run, tmp_path):
    """Real test images, labelled correctly, are recognised; the same images with shuffled labels are not. Their row
    reports no steps, NFE or cfg: the samples were not made here."""
    import torch
    from model import load_dataset, resize, to_model_range, to_uint8
    if not os.path.isfile(classifier):  # made by the test above; train it here when run alone
        run_here('evaluate.py', f'--out_dir={cfg_run[0]}', f'--data_dir={mnist_dir}', f'--classifier_path={classifier}',
                 '--classifier_epochs=40', '--num_samples=4', '--inception=off', f'--out_json={tmp_path / "x.json"}',
                 check=True)
    x, y = load_dataset('mnist', mnist_dir, train=False, download=False)
    imgs = to_uint8(resize(to_model_range(x), 32))
    for name, labels, ok in (('right', y.numpy(), True), ('wrong', (y.numpy() + 1) % 10, False)):
        path = str(tmp_path / f'{name}.npz')
        np.savez(path, arr_0=imgs, arr_1=labels)
        run_here('evaluate.py', f'--npz={path}', f'--data_dir={mnist_dir}', f'--classifier_path={classifier}',
                 '--inception=off', check=True)
        row = json.load(open(str(tmp_path / f'{name}_eval.json')))['rows'][0]
        assert (row['acc'] > 0.9) if ok else (row['acc'] < 0.1)
        assert (row['solver'], row['steps'], row['nfe'], row['cfg']) == ('npz', None, None, None)  # none of ours


@pytest.mark.parametrize('args,msg', [
    (['--inception=on', '--inception_weights=/nonexistent/inception.pth'], 'inception_weights=PATH'),
    (['--runs=euler:x'], 'bad run'),
    (['--solver=rk5'], 'unknown solver'),
    (['--steps=0'], 'error: --steps=0: must be an integer >= 1'),
    (['--runs=euler:0:2'], 'steps must be at least 1'),
])
def test_evaluate_bad_input(cfg_run, mnist_dir, classifier, args, msg):
    p = run_here('evaluate.py', f'--out_dir={cfg_run[0]}', f'--data_dir={mnist_dir}', f'--classifier_path={classifier}',
                 '--num_samples=4', '--classifier_epochs=1', '--inception=off', *args)
    assert p.returncode != 0 and msg in p.stderr and 'Traceback' not in p.stderr


def test_evaluate_refuses_the_denoiser(mnist_dir, tmp_path):
    out = str(tmp_path / 'den')
    run('train_denoiser.py', f'--data_dir={mnist_dir}', f'--out_dir={out}', '--max_iters=2', '--base_channels=8',
        '--channel_mult=(1,2)', '--download=False', '--batch_size=32', '--warmup_iters=0')
    p = run_here('evaluate.py', f'--out_dir={out}', f'--data_dir={mnist_dir}',
                 f'--classifier_path={tmp_path / "clf.pt"}', '--inception=off')
    assert p.returncode != 0 and 'not a flow model' in p.stderr


def test_inception_fid_from_a_local_weights_file(mnist_dir, classifier, tmp_path):
    """The weights file path works offline, and the FID is a distance: the reference images themselves score ~0,
    uniform noise far more (random weights here, so only that contrast means something)."""
    import torch
    from torchvision.models import inception_v3
    from model import load_dataset
    weights = str(tmp_path / 'inception.pth')
    torch.manual_seed(0)
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), weights)
    x, _ = load_dataset('mnist', mnist_dir, download=False)
    ref = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:4]]  # evaluate.py's reference draw
    noise = np.random.default_rng(0).integers(0, 256, size=(4, 28, 28, 1), dtype=np.uint8)
    fid = {}
    for name, imgs in (('real', ref.permute(0, 2, 3, 1).numpy()), ('noise', noise)):
        np.savez(tmp_path / f'{name}.npz', arr_0=imgs)
        run_here('evaluate.py', f'--npz={tmp_path / name}.npz', f'--data_dir={mnist_dir}',
                 f'--classifier_path={classifier}', '--classifier_epochs=1', f'--inception_weights={weights}',
                 '--num_ref=4', f'--inception_stats={tmp_path / "stats.npz"}', check=True)
        fid[name] = json.load(open(tmp_path / f'{name}_eval.json'))['rows'][0]['fid_inception']
    assert os.path.isfile(tmp_path / 'stats.npz')
    assert fid['noise'] > 0 and abs(fid['real']) < 1e-5 * fid['noise'], fid  # (random weights: tiny features)


def test_evaluate_unconditional_model(flow_run, mnist_dir, classifier, tmp_path):
    js = str(tmp_path / 'u.json')
    run_here('evaluate.py', f'--out_dir={flow_run[0]}', f'--data_dir={mnist_dir}', f'--classifier_path={classifier}',
             '--classifier_epochs=40', '--num_samples=8', '--runs=euler:2,midpoint:2', '--inception=off',
             f'--out_json={js}', check=True)
    rows = json.load(open(js))['rows']
    assert [(r['nfe'], r['cfg'], r['acc']) for r in rows] == [(2, None, None), (4, None, None)]
    assert abs(rows[0]['fid_cls'] - rows[1]['fid_cls']) > 1e-6 * rows[0]['fid_cls']  # the solver is used, not echoed
    p = run_here('evaluate.py', f'--out_dir={flow_run[0]}', f'--data_dir={mnist_dir}', f'--classifier_path={classifier}',
                 '--cfg=2')
    assert p.returncode != 0 and 'unconditional model' in p.stderr
