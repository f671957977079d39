"""The UNet experiments end to end on small fake data in MNIST's real IDX format."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_UNET, ema_grid, label_rows_trained, run
from model import load_checkpoint, sample, UNet

def grid_size(n_rows, n_cols, side, pad=2):
    return n_cols * side + (n_cols + 1) * pad, n_rows * side + (n_rows + 1) * pad


def test_flow_unet_learns_and_writes_figures(flow_run):
    out, p = flow_run
    rows = [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]
    assert [r['iter'] for r in rows] == list(range(1, 17))  # 256 images / 32 = 8 iters per epoch
    assert np.mean([r['loss'] for r in rows[-4:]]) < 0.8 * np.mean([r['loss'] for r in rows[:4]])
    for name in ('samples_epoch01.png', 'samples_epoch02.png', 'samples.png'):
        assert Image.open(os.path.join(out, name)).size == grid_size(8, 8, 32)
    # samples.png is the EMA's samples from the seeded noise (the raw weights would be 1.1 grey levels off)
    want = ema_grid(out, torch.randn(64, 1, 32, 32, generator=torch.Generator().manual_seed(1337)), None, 2, 1.0, 8)
    assert np.abs(np.asarray(Image.open(os.path.join(out, 'samples.png')).convert('L')) - want.astype(float)).mean() < 0.2
    Image.open(os.path.join(out, 'loss.png')).load()
    assert 'img/s' in p.stdout and 'ETA' in p.stdout


def test_flow_unet_checkpoint_rebuilds_from_model_args(flow_run):
    out, _ = flow_run
    ckpt = load_checkpoint(os.path.join(out, 'ckpt.pt'))
    assert ckpt['model_args']['time_cond'] and ckpt['model_args']['num_classes'] == 0 and ckpt['iter_num'] == 16
    model = UNet(**ckpt['model_args'])
    model.load_state_dict(ckpt['ema'])
    x = sample(model.eval(), torch.randn(2, 1, 32, 32), steps=3)
    assert x.shape == (2, 1, 32, 32) and torch.isfinite(x).all()


def test_flow_unet_resume_and_errors(mnist_dir, flow_run, tmp_path):
    out = shutil.copytree(flow_run[0], tmp_path / 'resumed')
    p = run('train_flow_unet.py', f'--data_dir={mnist_dir}', f'--out_dir={out}', '--epochs=3', '--sample_epochs=(3,)',
            '--init_from=resume', *TINY_UNET)
    assert 'iters 16 -> 24' in p.stdout and os.path.isfile(os.path.join(out, 'samples_epoch03.png'))
    p = run('train_flow_unet.py', f'--data_dir={mnist_dir}', '--image_size=31', f'--out_dir={tmp_path / "x"}', *TINY_UNET, check=False)
    assert p.returncode == 1 and 'image_size 31 must be divisible by 2' in p.stderr and not os.path.exists(tmp_path / 'x')


@pytest.mark.parametrize('mode', ['denoise', 'pure_noise'])
def test_denoiser_writes_every_figure(mnist_dir, tmp_path, mode):
    out = str(tmp_path / mode)
    p = run('train_denoiser.py', f'--data_dir={mnist_dir}', f'--out_dir={out}', f'--mode={mode}', '--epochs=2',
            '--sample_epochs=(1,2)', '--learning_rate=3e-3', *[a for a in TINY_UNET if 'sample_steps' not in a])
    rows = [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]
    assert len(rows) == 16 and rows[-1]['loss'] < rows[0]['loss']
    names = ['noise_grid.png', 'loss.png'] + (['denoise_epoch01.png', 'denoise_epoch02.png', 'ood_sweep.png']
                                              if mode == 'denoise' else ['pure_noise_epoch01.png', 'pure_noise_epoch02.png'])
    sizes = {n: Image.open(os.path.join(out, n)).size for n in names}
    assert sizes['noise_grid.png'][1] > sizes['noise_grid.png'][0] * 0.6  # 7 sigma rows x 8 digits
    if mode == 'pure_noise':
        stats = json.load(open(os.path.join(out, 'pure_noise.json')))
        assert [s['epoch'] for s in stats] == [1, 2] and 'mse_outputs_to_mean' in p.stdout
        assert stats[1]['mse_outputs_to_mean'] < stats[0]['mse_outputs_to_mean']  # moving toward the mean image
    ckpt = load_checkpoint(os.path.join(out, 'ckpt.pt'))
    assert not ckpt['model_args']['time_cond'] and ckpt['iter_num'] == 16


def test_class_cfg_writes_class_rows(cfg_run):
    out, p = cfg_run
    rows = [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]
    assert np.mean([r['loss'] for r in rows[-4:]]) < 0.8 * np.mean([r['loss'] for r in rows[:4]])
    for name in ('samples_epoch01.png', 'samples_epoch02.png', 'samples.png'):
        assert Image.open(os.path.join(out, name)).size == grid_size(10, 4, 32)  # 4 of each class, row = class
    # row k is 4 EMA samples of class k at guidance 5 from the seeded noise (the raw weights: 1.9 grey levels off)
    z = torch.randn(40, 1, 32, 32, generator=torch.Generator().manual_seed(1337))
    want = ema_grid(out, z, torch.arange(10).repeat_interleave(4), steps=2, cfg=5.0, nrow=4)
    assert np.abs(np.asarray(Image.open(os.path.join(out, 'samples.png')).convert('L')) - want.astype(float)).mean() < 0.2
    ckpt = load_checkpoint(os.path.join(out, 'ckpt.pt'))
    assert ckpt['model_args']['num_classes'] == 10 and ckpt['model_args']['p_uncond'] == 0.1
    # every class and the null class (label dropout) reached the loss: catches a script that drops y or never drops
    assert (label_rows_trained(out) > 0).all()
    assert '10 classes' in p.stdout
