"""Settings are wired, not only echoed: each training setting that changes the maths reaches the code that uses it, in
every train script that has it. Each script runs in this process for a few iterations of a tiny network, with the
functions and classes it hands its settings to wrapped to record what they receive; every setting is given a value
other than the script's default, so a script that drops one (and uses a default or a literal) fails."""
import os
import shutil

import pytest
import torch

import model
from conftest import TINY_DIT, TINY_UNET
from model import cosine_lr
from test_config_checks import run_bare

SCRIPTS = ['train_dit.py', 'train_flow_unet.py', 'train_class_cfg.py', 'train_denoiser.py']
TINY = {'train_dit.py': [*TINY_DIT, '--batch_size=32', '--compile=False', '--preset=none', '--sample_interval=0'],
        'train_denoiser.py': [*[a for a in TINY_UNET if 'sample_steps' not in a], '--n_res=1', '--sigmas=(0.5,)']}
# a value other than every script's default for each setting (ema_decay below the early-EMA ramp's (1 + it) / (10 + it))
GIVEN = dict(learning_rate=2e-3, min_lr=1e-5, warmup_iters=7, lr_decay_iters=9, beta1=0.8, beta2=0.95,
             weight_decay=0.03, grad_clip=0.7, ema_decay=0.05, hflip=True, t_sampling='mode', p_uncond=0.3)
FLOW = {'train_dit.py', 'train_flow_unet.py', 'train_class_cfg.py'}  # the scripts with t_sampling
LABELS = {'train_dit.py', 'train_class_cfg.py'}  # the scripts with p_uncond


def settings(script):
    return {k: v for k, v in GIVEN.items() if (k != 't_sampling' or script in FLOW) and (k != 'p_uncond' or script in LABELS)}


@pytest.fixture()
def received(monkeypatch):
    """What the training code is handed, recorded by wrappers around it."""
    got = {'lr_args': [], 'ema_decay': [], 'clip': [], 'step': []}

    class Flow(model.RectifiedFlow):
        def __init__(self, t_sampling='logit_normal'):
            got['t_sampling'] = t_sampling
            super().__init__(t_sampling)

    class Batches(model.Batches):
        def __init__(self, *a, hflip=False, **k):
            got['hflip'] = hflip
            super().__init__(*a, hflip=hflip, **k)

    class AdamW(torch.optim.AdamW):
        def step(self, *a, **k):  # what each update uses: its group's settings and the state it starts from
            g, p = self.param_groups[0], self.param_groups[0]['params'][0]
            got['step'].append(dict(lr=g['lr'], betas=g['betas'], weight_decay=g['weight_decay'],
                                    state_step=float(self.state[p]['step']) if self.state.get(p) else 0.0))
            return super().step(*a, **k)

    def networks(cls):
        class Net(cls):
            def __init__(self, *a, **k):
                got.setdefault('net_args', k)
                super().__init__(*a, **k)
        return Net

    cosine_lr, update_ema, clip = model.cosine_lr, model.update_ema, torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(model, 'RectifiedFlow', Flow)
    monkeypatch.setattr(model, 'Batches', Batches)
    monkeypatch.setattr(model, 'DiT_Llama', networks(model.DiT_Llama))
    monkeypatch.setattr(model, 'UNet', networks(model.UNet))
    monkeypatch.setattr(torch.optim, 'AdamW', AdamW)
    monkeypatch.setattr(model, 'cosine_lr', lambda *a: got['lr_args'].append(a) or cosine_lr(*a))
    monkeypatch.setattr(model, 'update_ema', lambda e, m, decay: got['ema_decay'].append(decay) or update_ema(e, m, decay))
    monkeypatch.setattr(torch.nn.utils, 'clip_grad_norm_', lambda p, max_norm: got['clip'].append(max_norm) or clip(p, max_norm))
    return got


def train(script, mnist_dir, out, *args):
    code, stdout, err = run_bare(script, [f'--data_dir={mnist_dir}', f'--out_dir={out}', *TINY.get(script, TINY_UNET),
                                     '--dtype=float32', *args])
    assert code in (0, None), err
    return stdout


def defaults(script):
    src = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), script)).read()
    ns = {}
    for line in src.splitlines():  # the config block's plain `key = value` lines
        key = line.split('=')[0].strip()
        if key in GIVEN and line.startswith(key + ' ='):
            exec(line, ns)
    return ns


@pytest.mark.parametrize('script', SCRIPTS)
def test_every_training_setting_reaches_the_code_that_uses_it(script, mnist_dir, tmp_path, received):
    given = settings(script)
    mine = defaults(script)
    assert set(given) <= set(mine) and all(mine[k] != v for k, v in given.items()), mine  # each a non-default value
    train(script, mnist_dir, tmp_path / 'out', '--max_iters=3', *[f'--{k}={v}' for k, v in given.items()])
    got = received
    want = dict(lr_args=[(it, 2e-3, 1e-5, 7, 9) for it in range(3)], ema_decay=[0.05] * 3, clip=[0.7] * 3,
                hflip=True, betas=[(0.8, 0.95)] * 3, weight_decay=[0.03] * 3,
                lr=[cosine_lr(it, 2e-3, 1e-5, 7, 9) for it in range(3)])
    have = dict(lr_args=got['lr_args'], ema_decay=got['ema_decay'], clip=got['clip'], hflip=got.get('hflip'),
                betas=[s['betas'] for s in got['step']], weight_decay=[s['weight_decay'] for s in got['step']],
                lr=[s['lr'] for s in got['step']])
    if 't_sampling' in given:
        want['t_sampling'], have['t_sampling'] = 'mode', got.get('t_sampling')
    if 'p_uncond' in given:
        want['p_uncond'], have['p_uncond'] = 0.3, got['net_args'].get('p_uncond')
    wrong = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
    assert not wrong, f'{script}: settings that did not reach their code (received, given): {wrong}'


@pytest.mark.parametrize('script', SCRIPTS)
def test_resume_hands_the_optimizer_its_state_and_this_runs_betas(script, mnist_dir, tmp_path, received):
    """A resumed run's first update starts from the checkpoint's Adam state (2 steps taken), with the betas and weight
    decay given to the resumed run (README: every setting but the network's takes the new value)."""
    train(script, mnist_dir, tmp_path / 'out', '--max_iters=2')
    assert [s['state_step'] for s in received['step']] == [0.0, 1.0]
    received['step'].clear()
    train(script, mnist_dir, tmp_path / 'out', '--max_iters=3', '--init_from=resume', '--beta1=0.8',
          '--beta2=0.95', '--weight_decay=0.03')
    (s,) = received['step']
    assert s['state_step'] == 2.0 and s['betas'] == (0.8, 0.95) and s['weight_decay'] == 0.03, s


@pytest.mark.parametrize('script', SCRIPTS)
def test_compile_reaches_torch_compile_and_falls_back_alike(script, mnist_dir, tmp_path, monkeypatch):
    """--compile=True compiles the training model; with no C++ compiler on a CPU every script runs eager, with one note."""
    compiled = []
    monkeypatch.setattr(torch, 'compile', lambda m, *a, **k: compiled.append(type(m).__name__) or m)
    if shutil.which(os.environ.get('CXX') or 'g++'):
        stdout = train(script, mnist_dir, tmp_path / 'a', '--max_iters=1', '--compile=True')
        assert len(compiled) == 1 and 'needs a C++ compiler' not in stdout
    compiled.clear()
    monkeypatch.setenv('CXX', str(tmp_path / 'no-such-compiler'))
    stdout = train(script, mnist_dir, tmp_path / 'b', '--max_iters=1', '--compile=True')
    assert compiled == [] and stdout.count('torch.compile on a CPU needs a C++ compiler') == 1, stdout
