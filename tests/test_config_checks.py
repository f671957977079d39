"""Configuration a person can discover and cannot break, on every script: --help, the domain of every number, config
files with a typo, a syntax error or a cfg. Most cases run in this process (runpy) to stay fast; a few run as a user
does, in a fresh process."""
import ast
import os
import re

import numpy as np
import pytest
import torch

from conftest import ROOT, run, run_here
from model import UNet

SCRIPTS = ['train_dit.py', 'train_flow_unet.py', 'train_class_cfg.py', 'train_denoiser.py', 'sample.py', 'evaluate.py',
           'ideal_machines.py', 'bench.py']
TRAIN_ZERO_OK = {'image_size', 'beta1', 'beta2', 'max_iters', 'warmup_iters', 'lr_decay_iters', 'min_lr', 'weight_decay', 'ema_decay', 'seed'}
ZERO_OK = {  # the numbers for which 0 is a legal value ("off", "the default", a class, a seed, a decay...)
    'train_dit.py': TRAIN_ZERO_OK | {'sample_interval', 'eval_interval', 'p_uncond', 'sample_cfg', 'mf_ratio', 'mf_omega',
                                     'mf_kappa', 'mf_weight_p'},
    'train_flow_unet.py': TRAIN_ZERO_OK | {'attn_levels'},  # level 0: attention at full resolution
    'train_class_cfg.py': TRAIN_ZERO_OK | {'p_uncond', 'sample_cfg'},
    'train_denoiser.py': TRAIN_ZERO_OK | {'sigma', 'sigmas'},
    'sample.py': {'cfg', 'class_label', 'num_samples', 'seed'},
    'evaluate.py': {'cfg', 'classifier_epochs', 'seed'},
    'ideal_machines.py': {'num_noises', 'num_train', 'patch_size', 'seed'},
    'bench.py': {'batch_size', 'warmup', 'seed'},
}


def config_block(script):
    """[(name, default, source line)] of the script's config globals: the assignments between the '# ---' line and the
    exec of configurator.py, read from the source."""
    lines = open(os.path.join(ROOT, script)).read().splitlines()
    end = next(i for i, line in enumerate(lines) if 'configurator.py' in line and 'exec(' in line)
    start = max(i for i in range(end) if lines[i].strip().startswith('# ---'))
    out = []
    tree = ast.parse('\n'.join(lines))
    local = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) for n in ast.walk(f)}
    for node in (n for n in ast.walk(tree) if id(n) not in local):  # settings: not a function's locals, nor CONSTANTS
        if isinstance(node, ast.Assign) and start < node.lineno - 1 < end and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in ('config_domains', 'config_keys') or not name.islower():
                continue
            out.append((name, ast.literal_eval(node.value), lines[node.lineno - 1]))
    return sorted(out, key=lambda r: lines.index(r[2]))


def numbers(script):
    """{name: default} of the script's numeric globals (numbers, tuples of numbers, and cfg's None)."""
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    return {k: v for k, v, _ in config_block(script)
            if num(v) or v is None or isinstance(v, tuple) and v and all(num(e) for e in v)}


def bad_values(script, key, default):
    """0, a negative and a huge value of the default's type (each element of a tuple); 0 skipped where it is legal."""
    typ = type(default[0]) if isinstance(default, tuple) else float if default is None else type(default)
    values = [typ(0), typ(-4) if typ is int else -0.5, typ(10 ** 12)]
    values = values[1:] if key in ZERO_OK[script] else values
    return [(v,) if isinstance(default, tuple) else v for v in values]


@pytest.fixture()
def dirs(tmp_path):
    """An empty data_dir, and an out_dir holding a dummy checkpoint that no case may touch."""
    data, out = tmp_path / 'data', tmp_path / 'out'
    data.mkdir()
    out.mkdir()
    (out / 'ckpt.pt').write_bytes(b'a checkpoint nobody may touch')
    os.utime(out / 'ckpt.pt', ns=(10 ** 18, 10 ** 18))
    return data, out


def untouched(data, out):
    ckpt = out / 'ckpt.pt'
    return (os.listdir(data) == [] and os.listdir(out) == ['ckpt.pt'] and ckpt.read_bytes() == b'a checkpoint nobody may touch'
            and ckpt.stat().st_mtime_ns == 10 ** 18)


def where(script, data, out):
    """Flags that point every script at the empty data_dir and the dummy checkpoint, so a bad value that slipped
    through would stop at loading with another message, never start a run."""
    return {'sample.py': [f'--out_dir={out}'],
            'ideal_machines.py': [f'--ckpt={out / "ckpt.pt"}', f'--out_dir={out}', f'--data_dir={data}'],
            'bench.py': [f'--curves={data / "no_run"}', f'--out_json={out / "bench.json"}']
            }.get(script, [f'--out_dir={out}', f'--data_dir={data}'] + (['--download=False'] if 'train' in script else []))


def run_bare(script, args):
    """Run a script in this process as `python script *args`: (exit code, stdout, stderr). Bare: the script's own
    defaults (no test defaults added), and an exception propagates to the test, which is what these checks and the
    fault tests rely on."""
    p = run_here(script, *args, defaults=False, propagate=True)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.parametrize('script', SCRIPTS)
def test_every_number_is_checked_before_anything_is_touched(script, dirs):
    data, out = dirs
    nums = numbers(script)
    assert len(nums) >= 6 and 'seed' in nums
    for key, default in nums.items():
        for value in bad_values(script, key, default):
            code, stdout, err = run_bare(script, [*where(script, data, out), f'--{key}={value!r}'])
            assert code == 2 and stdout == '', (key, value, code, stdout, err)
            assert err.count('\n') == 1 and err.startswith(f'error: --{key}=') and 'must be' in err, (key, value, err)
            assert 'Traceback' not in err and untouched(data, out), (key, value)


@pytest.mark.parametrize('script', SCRIPTS)
def test_defaults_and_legal_zeros_pass_the_checks(script, dirs):
    """The other side: the defaults and every legal 0 get past the checks (and stop at the missing data or the dummy
    checkpoint, with a message that is not about the setting)."""
    data, out = dirs
    zero = lambda d: (type(d[0])(0),) if isinstance(d, tuple) else 0.0 if d is None else type(d)(0)
    for extra in [[]] + [[f'--{k}={zero(d)!r}'] for k, d in numbers(script).items() if k in ZERO_OK[script]]:
        try:
            code, _, err = run_bare(script, [*where(script, data, out), *extra])
        except FileNotFoundError as e:  # bench.py with --curves of a directory without a run: got past the checks
            assert script == 'bench.py' and 'log.jsonl' in str(e)
            continue
        assert code == 1 and err.startswith('error: ') and not err.startswith('error: --'), (extra, err)
        assert untouched(data, out)


@pytest.mark.parametrize('script', SCRIPTS)
def test_help_lists_every_setting_with_its_default_and_comment(script):
    for flag in ('--help', '-h'):
        code, out, err = run_bare(script, [flag])
        assert code == 0 and err == ''
        lines = out.splitlines()
        block = config_block(script)
        positions = []
        for name, default, source in block:
            hits = [i for i, line in enumerate(lines) if line.startswith(f'  --{name}=')]
            assert len(hits) == 1, (name, hits)
            comment = source.split('  # ', 1)[1] if '  # ' in source else ''
            assert lines[hits[0]].rstrip().endswith(comment), (name, lines[hits[0]], comment)
            if name in numbers(script):  # and the domain of a number, e.g. [1, 10000000] or (0, 10]
                assert re.search(r'[\[(]-?\d+, \d+[\])]', lines[hits[0]]), lines[hits[0]]
            positions.append(hits[0])
        assert positions == sorted(positions)  # in the order of the file
        code, _, err = run_bare(script, ['--no_such_key=1'])  # the keys are the block's, no more
        assert code == 2 and err.split('(valid keys: ')[1].rstrip(')\n').split(', ') == [k for k, _, _ in block]
        headings = [s.strip() for s in open(os.path.join(ROOT, script)).read().splitlines()
                    if s.strip() in ('# I/O', '# training', '# flow', '# model', '# system')]
        assert [line for line in lines if line in headings] == headings


def test_help_of_train_dit_reads_as_documented():
    code, out, _ = run_bare('train_dit.py', ['--preset=none', '--help'])  # the defaults
    assert code == 0 and out.startswith('DiT-LLaMA rectified flow on MNIST')
    lines = out.splitlines()
    i = lines.index('# training')
    assert lines[i + 1].split() == ['--batch_size=128', '[1,', '10000000]', 'global:', 'split', 'across', 'DDP', 'processes']
    assert ['--ckpt_interval=1000', '[1,', '10000000]'] in [line.split() for line in lines[lines.index('# I/O'):i]]
    assert '--ema_decay=0.999 [0, 1)' in ' '.join(out.split()) and '--learning_rate=0.0008 (0, 10]' in ' '.join(out.split())
    assert "--ckpt=''" in run_bare('sample.py', ['-h'])[1]
    assert '--cfg=None' in run_bare('sample.py', ['-h'])[1]


def test_one_line_errors_end_to_end(tmp_path):
    """In a fresh process, as a user types them: no traceback, exit 2, nothing written."""
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'ckpt.pt').write_bytes(b'keep me')
    for flag, msg in (('--batch_size=0', 'error: --batch_size=0: must be an integer >= 1 (and <= 10000000)\n'),
                      ('--batch_size=-4', 'error: --batch_size=-4: must be an integer >= 1 (and <= 10000000)\n')):
        p = run('train_dit.py', flag, f'--out_dir={out}', check=False)
        assert (p.returncode, p.stderr, p.stdout) == (2, msg, '')
    (tmp_path / 'broken.py').write_text("batch_size = 64\nlearning_rate = (1e-3\n")
    p = run('train_dit.py', str(tmp_path / 'broken.py'), f'--out_dir={out}', check=False)
    assert p.returncode == 2 and p.stderr == f"error: {tmp_path / 'broken.py'} line 2: SyntaxError: '(' was never closed\n"
    (tmp_path / 'typo.py').write_text("dim = 64\nn_layer = 3\n")
    p = run('train_dit.py', str(tmp_path / 'typo.py'), f'--out_dir={out}', check=False)
    assert p.returncode == 2 and p.stderr.count('\n') == 1
    assert p.stderr.startswith(f"error: {tmp_path / 'typo.py'}: unknown config key 'n_layer'; did you mean n_layers")
    p = run('train_dit.py', '--help', check=False)
    assert p.returncode == 0 and '  --n_layers=6' in p.stdout and p.stderr == ''
    assert os.listdir(out) == ['ckpt.pt'] and (out / 'ckpt.pt').read_bytes() == b'keep me'


def tiny_checkpoint(path, num_classes):
    torch.manual_seed(0)
    args = dict(in_channels=1, input_size=8, base_channels=8, channel_mult=(1, 2), attn_levels=(), n_res=1,
                num_classes=num_classes)
    model = UNet(**args)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(dict(model_args=args, model=model.state_dict(), ema=model.state_dict(), config={'dataset': 'mnist'}), path)


def test_cfg_in_a_config_file(tmp_path):
    uncond, cond = tmp_path / 'uncond', tmp_path / 'cond'
    tiny_checkpoint(str(uncond / 'ckpt.pt'), 0)
    tiny_checkpoint(str(cond / 'ckpt.pt'), 3)
    (tmp_path / 'cfg2.py').write_text('cfg = 2.0\n')
    (tmp_path / 'cfg0.py').write_text('cfg = 0\n')
    for script in ('sample.py', 'evaluate.py'):  # an unconditional model refuses guidance from a config file
        code, _, err = run_bare(script, [str(tmp_path / 'cfg2.py'), f'--out_dir={uncond}'])
        assert code == 1 and err.count('\n') == 1 and 'is an unconditional model: guidance needs classes' in err, err
    empty = tmp_path / 'no_data'  # evaluate.py without cfg gets past the check (and stops at the missing data)
    code, _, err = run_bare('evaluate.py', [f'--out_dir={uncond}', f'--data_dir={empty}', '--inception=off',
                                            f'--classifier_path={tmp_path / "clf.pt"}'])
    assert code == 1 and err.startswith('error: mnist not found'), err
    code, out, err = run_bare('sample.py', [f'--out_dir={uncond}', '--steps=2', '--per_class=1'])
    assert code == 0 and 'euler 2 steps = 2 NFE' in out and os.path.isfile(uncond / 'samples_euler2.png'), err
    common = [f'--out_dir={cond}', '--steps=2', '--per_class=1', '--num_samples=6', '--device=cpu']
    npz = {}
    for name, args in (('file0', [str(tmp_path / 'cfg0.py')]), ('flag0', ['--cfg=0']), ('default', []), ('flag2', ['--cfg=2.0'])):
        code, out, err = run_bare('sample.py', [*args, *common, f'--save_npz={tmp_path / name}.npz'])
        assert code == 0, err
        npz[name] = np.load(tmp_path / f'{name}.npz')['arr_0']
    assert np.array_equal(npz['file0'], npz['flag0']) and np.array_equal(npz['default'], npz['flag2'])
    assert not np.array_equal(npz['file0'], npz['default'])  # the config file's cfg = 0 was used
    assert os.path.isfile(cond / 'samples_euler2_cfg0.png') and os.path.isfile(cond / 'samples_euler2_cfg2.png')
    code, _, err = run_bare('evaluate.py', [f'--out_dir={cond}', '--runs=euler:2:-1'])
    assert code == 1 and err == 'error: cfg -1.0 in --runs: must be a number >= 0 (and <= 100)\n'

