"""sample.py on a checkpoint of each training script: grid, trajectory GIF, npz, sweeps, seeds, bad input."""
import os

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import make_grid

from conftest import run, run_here
from model import load_flow_model, pick_attention, sample, setup_precision, to_uint8


def grid_size(n_rows, n_cols, side, pad=2):
    return n_cols * side + (n_cols + 1) * pad, n_rows * side + (n_rows + 1) * pad


@pytest.mark.parametrize('which,side,rows', [('dit_run', 28, 10), ('flow_run', 32, 8), ('cfg_run', 32, 10)])
def test_sample_every_flow_checkpoint(which, side, rows, request, tmp_path):
    out, _ = request.getfixturevalue(which)
    npz = str(tmp_path / 'samples.npz')
    cfg = ['--cfg=2.0'] if which != 'flow_run' else []
    p = run_here('sample.py', f'--out_dir={out}', '--steps=3', *cfg, '--gif', '--num_samples=23', '--batch_size=10',
                 f'--save_npz={npz}', '--solver=heun', check=True)
    tag = 'heun3_cfg2' if which != 'flow_run' else 'heun3'
    assert Image.open(os.path.join(out, f'samples_{tag}.png')).size == grid_size(rows, 8, side)
    assert '6 NFE' in p.stdout  # heun: 2 evaluations a step
    frames = imageio.mimread(os.path.join(out, 'trajectory.gif'))
    assert len(frames) == 4  # steps + 1: from noise to the sample
    assert frames[0].shape[:2] == grid_size(rows, 8, side)[::-1]
    # the GIF runs from the seeded noise to the grid's samples
    z = torch.randn(rows * 8, 1, side, side, generator=torch.Generator().manual_seed(0))
    noise = (make_grid((z.clamp(-1, 1) + 1) / 2, nrow=8, padding=2, pad_value=1.0) * 255).round()[0].numpy()
    assert np.abs(frames[0][..., 0] - noise).mean() < 0.1
    grid = np.asarray(Image.open(os.path.join(out, f'samples_{tag}.png')).convert('L')).astype(float)
    assert np.abs(frames[-1][..., 0] - grid).mean() < 0.1 and np.abs(frames[-1][..., 0] - noise).mean() > 10
    d = np.load(npz)
    assert d['arr_0'].shape == (23, side, side, 1) and d['arr_0'].dtype == np.uint8
    assert d['arr_1'].shape == (23,) and d['arr_1'].dtype == np.int64
    if which != 'flow_run':
        assert d['arr_1'].tolist() == [i % 10 for i in range(23)]
    # the npz holds the model's samples: its first batch of 10, recomputed from sample.py's seeded noise as sample.py
    # draws them by default (bf16 autocast, attention auto), on one thread like the script under test
    dtype = setup_precision('cpu', 'bfloat16', lambda *a: None)[1]
    model, _ = load_flow_model(os.path.join(out, 'ckpt.pt'), attention=pick_attention('auto', 'cpu', dtype))
    z = torch.randn(10, 1, side, side, generator=torch.Generator().manual_seed(1000))
    y = torch.arange(10) if which != 'flow_run' else None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with setup_precision('cpu', 'bfloat16', lambda *a: None)[0]:  # bf16 autocast where this CPU has bf16 units
        x = to_uint8(sample(model, z, y, steps=3, cfg=2.0 if y is not None else 1.0, solver='heun')).astype(float)
    torch.set_num_threads(threads)
    assert np.abs(x - d['arr_0'][:10]).mean() < 0.1


def test_same_seed_same_samples_and_settings_are_used(cfg_run, tmp_path):
    """Same seed = same samples; another seed, solver, step count or cfg = other samples (catches settings that
    are echoed in the output names but not passed to the sampler)."""
    out, _ = cfg_run
    runs = dict(a=['--seed=3'], b=['--seed=3'], seed=['--seed=4'], heun=['--seed=3', '--solver=heun'],
                steps=['--seed=3', '--steps=3'], cfg0=['--seed=3', '--cfg=0.0'])
    x = {}
    for name, args in runs.items():
        path = str(tmp_path / f'{name}.npz')
        run_here('sample.py', f'--out_dir={out}', '--steps=2', '--num_samples=6', f'--save_npz={path}', *args, check=True)
        x[name] = np.load(path)['arr_0'].astype(float)
    assert np.array_equal(x['a'], x['b'])
    for name in ('seed', 'heun', 'steps', 'cfg0'):
        assert np.abs(x[name] - x['a']).mean() > 0.5, name  # grey levels (3 to 76 here)


@pytest.mark.parametrize('sweep,labels', [('steps', 4), ('cfg', 4)])
def test_sweeps_write_one_figure(dit_run, sweep, labels):
    out, _ = dit_run
    run_here('sample.py', f'--out_dir={out}', '--steps=2', f'--sweep={sweep}', check=True)
    w, h = Image.open(os.path.join(out, f'sweep_{sweep}.png')).size
    assert h > 3 * 60 and w > 10 * 60  # 4 rows of 10 classes


def test_sample_bad_input(dit_run, flow_run, mnist_dir, tmp_path):
    def error(*args):
        p = run_here('sample.py', *args)
        assert p.returncode != 0 and 'Traceback' not in p.stderr
        return p.stderr
    (tmp_path / 'junk.pt').write_text('junk')
    assert 'cannot read checkpoint' in error(f'--ckpt={tmp_path / "junk.pt"}')
    assert 'no checkpoint' in error(f'--out_dir={tmp_path / "none"}')
    assert 'error: --steps=0: must be an integer >= 1' in error(f'--out_dir={dit_run[0]}', '--steps=0')
    assert 'out of range' in error(f'--out_dir={dit_run[0]}', '--class_label=10')
    assert 'unconditional model' in error(f'--out_dir={flow_run[0]}', '--cfg=3.0')
    den = str(tmp_path / 'den')
    run('train_denoiser.py', f'--data_dir={mnist_dir}', f'--out_dir={den}', '--max_iters=1', '--base_channels=8',
        '--channel_mult=(1,2)', '--batch_size=32', '--download=False')
    assert 'one-step denoiser' in error(f'--out_dir={den}')
