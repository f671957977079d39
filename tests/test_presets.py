"""Presets in config/ set only keys their script has: configurator.py execs a preset as it is, so a typo there
(`n_layer = 3`) would be ignored without a word."""
import ast
import glob
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT


def config_keys(script):
    """The names a script assigns at the top level before it execs configurator.py: its config keys."""
    tree = ast.parse(open(os.path.join(ROOT, script)).read())
    keys = set()
    for node in tree.body:
        if isinstance(node, ast.Expr) and 'configurator.py' in ast.unparse(node):
            return keys
        if isinstance(node, ast.Assign):
            keys |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    raise AssertionError(f'{script} does not exec configurator.py')


@pytest.mark.parametrize('preset', sorted(glob.glob(os.path.join(ROOT, 'config', '*.py'))), ids=os.path.basename)
def test_preset_keys_exist_in_its_script(preset):
    """Catches a mistyped or stale key in a preset (the script named in its comment: `python train_dit.py config/...`)."""
    text = open(preset).read()
    script = re.search(r'(\w+\.py) config/', text).group(1)
    keys = config_keys(script)
    assert {'out_dir', 'batch_size', 'learning_rate'} <= keys  # the parse finds the script's config globals
    assigned = [t.id for node in ast.parse(text).body if isinstance(node, ast.Assign) for t in node.targets]
    assert assigned and all(isinstance(node, ast.Assign) for node in ast.parse(text).body)  # plain assignments only
    assert set(assigned) <= keys, f'{os.path.basename(preset)} sets keys {script} does not have: {set(assigned) - keys}'


def preset_values(name):
    ns = {}
    exec(open(os.path.join(ROOT, 'config', name)).read(), {}, ns)
    return ns


@pytest.mark.parametrize('family', ['dit_mnist', 'dit_cifar10'])
def test_a_datasets_two_presets_set_the_same_keys(family):
    """So a preset named as a config file replaces the device's preset whole, rather than mixing two recipes."""
    assert set(preset_values(f'{family}.py')) == set(preset_values(f'{family}_cpu.py'))


def settings_in_effect(*args, fake_gpu=False):
    """train_dit.py --help as a user runs it, parsed: {key: value} of the settings in effect, and the 'values in effect'
    line. fake_gpu: torch.cuda.is_available() answers True, as on a GPU machine."""
    code = ('import runpy, sys, torch\n'
            f'torch.cuda.is_available = lambda: {fake_gpu}\n'
            f'sys.argv = ["train_dit.py", *{list(args)!r}, "--help"]\n'
            f'runpy.run_path({os.path.join(ROOT, "train_dit.py")!r}, run_name="__main__")\n')
    p = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, 'CUDA_VISIBLE_DEVICES': ''})
    assert p.returncode == 0, p.stderr
    values = {}
    for line in p.stdout.splitlines():
        m = re.match(r'  --(\w+)=(\S*)', line)
        if m:
            values[m.group(1)] = ast.literal_eval(m.group(2)) if m.group(2)[:1] in "'([0123456789-" or \
                m.group(2) in ('True', 'False', 'None') else m.group(2)
    return values, next(line for line in p.stdout.splitlines() if line.startswith('values in effect'))


@pytest.mark.parametrize('dataset,fake_gpu,preset', [
    ('mnist', False, 'dit_mnist_cpu.py'), ('mnist', True, 'dit_mnist.py'), ('fashion_mnist', False, 'dit_mnist_cpu.py'),
    ('cifar10', False, 'dit_cifar10_cpu.py'), ('cifar10', True, 'dit_cifar10.py')])
def test_the_dataset_and_the_device_choose_the_preset(dataset, fake_gpu, preset):
    """`--dataset=X` alone gives the preset of X for this device: every key it sets is in effect (the design card's
    `torchrun ... train_dit.py --dataset=cifar10` on GPUs trains config/dit_cifar10.py's recipe)."""
    values, line = settings_in_effect(f'--dataset={dataset}', fake_gpu=fake_gpu)
    assert f'config/{preset}' in line
    expected = {**preset_values(preset), 'dataset': dataset}
    assert {k: values[k] for k in expected} == expected


def test_explicit_settings_win_over_the_preset(tmp_path):
    """Defaults < preset < config files < --key=value: a config file's value wins even where it equals the script's
    default (patch_size 2 against the CPU preset's 4), and --key=value wins over both."""
    (tmp_path / 'mine.py').write_text('patch_size = 2\nlearning_rate = 1e-3\n')
    values, line = settings_in_effect('--dataset=mnist', str(tmp_path / 'mine.py'), '--learning_rate=2e-3', '--dim=64')
    assert 'dit_mnist_cpu.py' in line
    assert (values['patch_size'], values['learning_rate'], values['dim']) == (2, 2e-3, 64)
    assert values['max_iters'] == preset_values('dit_mnist_cpu.py')['max_iters']  # the rest: the preset's
    gpu_file, _ = settings_in_effect(os.path.join(ROOT, 'config', 'dit_mnist.py'))  # on a CPU, naming the GPU recipe
    assert {k: gpu_file[k] for k in preset_values('dit_mnist.py')} == preset_values('dit_mnist.py')
    values, line = settings_in_effect('--dataset=mnist', '--preset=none')
    assert '(preset' not in line and values['patch_size'] == 2 and values['batch_size'] == 128  # the script's defaults
    values, line = settings_in_effect('--dataset=cifar10', '--preset=gpu')
    assert 'config/dit_cifar10.py' in line and values['dim'] == 256
