"""The convolution-only networks the ideal machines are about: the UNet without attention or norm, and the
8-layer ResNet; circular padding makes them exactly equivariant to circular shifts, zero padding does not."""
import json
import os

import pytest
import torch
import torch.nn as nn

from conftest import TINY_UNET, run
from model import ResNet, UNet, load_checkpoint, load_flow_model


def modules(model):
    return {type(m).__name__ for m in model.modules()}


def test_unet_defaults_unchanged_and_conv_only_drops_attention_and_norm():
    default = UNet(base_channels=16)
    assert {'AttnBlock', 'GroupNorm'} <= modules(default)
    assert sum(isinstance(m, type(default.mid[1])) for m in default.mid) == 1  # attention in the middle block
    # the default's parameters are those of the UNet before these options existed (16-channel, 3 levels, n_res 2)
    assert sum(p.numel() for p in default.parameters()) == 438_801
    conv_only = UNet(base_channels=16, attn_levels=(), norm=False)
    assert not {'AttnBlock', 'GroupNorm'} & modules(conv_only) and len(conv_only.mid) == 2
    assert all(m.padding_mode == 'zeros' for m in conv_only.modules() if isinstance(m, nn.Conv2d))


def shift_error(model, x, t, shift=(5, -3)):
    """max |f(roll(x)) - roll(f(x))|"""
    with torch.no_grad():
        return (model(torch.roll(x, shift, (2, 3)), t) - torch.roll(model(x, t), shift, (2, 3))).abs().max().item()


@pytest.mark.parametrize('make', [lambda p: ResNet(width=16, padding_mode=p),
                                  lambda p: UNet(base_channels=8, channel_mult=(1, 2), attn_levels=(), norm=False,
                                                 padding_mode=p)])
def test_circular_padding_is_exactly_shift_equivariant(make):
    torch.manual_seed(0)
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([0.3, 0.8])
    circ, zeros = make('circular').eval(), make('zeros').eval()
    zeros.load_state_dict(circ.state_dict())  # the same weights, only the padding differs
    assert shift_error(circ, x, t, (4, -2)) < 1e-5  # even shifts: the UNet's stride-2 grid stays aligned
    assert shift_error(zeros, x, t, (4, -2)) > 1e-3


def test_resnet_sees_a_17x17_window():
    """8 layers of 3x3 convolutions: an output pixel depends on the inputs within 8 pixels of it, and on those."""
    torch.manual_seed(0)
    model = ResNet(width=16, n_layers=8)
    x = torch.randn(1, 1, 32, 32, requires_grad=True)
    model(x, torch.tensor([0.5]))[0, 0, 16, 16].backward()
    rows, cols = x.grad[0, 0].abs().gt(0).nonzero().unbind(1)
    assert (rows.min().item(), rows.max().item(), cols.min().item(), cols.max().item()) == (8, 24, 8, 24)
    assert not {'AttnBlock', 'GroupNorm'} & modules(model)


def test_resnet_trains_and_checkpoint_rebuilds(mnist_dir, tmp_path):
    out = str(tmp_path / 'resnet')
    run('train_flow_unet.py', f'--data_dir={mnist_dir}', f'--out_dir={out}', '--arch=resnet', '--width=16',
        '--padding_mode=circular', '--epochs=2', '--sample_epochs=(2,)', '--learning_rate=3e-3', *TINY_UNET)
    ckpt = load_checkpoint(os.path.join(out, 'ckpt.pt'))
    assert ckpt['model_args'] == dict(in_channels=1, input_size=32, width=16, n_layers=8, padding_mode='circular')
    model, _ = load_flow_model(os.path.join(out, 'ckpt.pt'))
    assert isinstance(model, ResNet) and shift_error(model, torch.randn(1, 1, 32, 32), torch.tensor([0.5])) < 1e-5
    losses = [json.loads(line)['loss'] for line in open(os.path.join(out, 'log.jsonl'))]
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4])


def test_conv_only_unet_from_the_script(mnist_dir, tmp_path):
    out = str(tmp_path / 'conv')
    run('train_flow_unet.py', f'--data_dir={mnist_dir}', f'--out_dir={out}', '--attn_levels=()', '--norm=False',
        '--max_iters=2', '--sample_epochs=(9,)', *TINY_UNET)
    model, ckpt = load_flow_model(os.path.join(out, 'ckpt.pt'))
    assert ckpt['model_args']['attn_levels'] == () and ckpt['model_args']['norm'] is False
    assert not {'AttnBlock', 'GroupNorm'} & modules(model)
    p = run('train_flow_unet.py', f'--data_dir={mnist_dir}', f'--out_dir={tmp_path / "x"}', '--padding_mode=reflect',
            *TINY_UNET, check=False)
    assert p.returncode != 0 and 'padding_mode' in p.stderr and 'Traceback' not in p.stderr
