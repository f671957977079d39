"""configurator.py: config files, --key=value overrides and their errors."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, run

SCRIPT = f"""
import json
batch_size = 64
learning_rate = 1e-3
dataset = 'mnist'
compile = False
channel_mult = (1, 2, 2)
exec(open({os.path.join(ROOT, 'configurator.py')!r}).read())
print(json.dumps(dict(batch_size=batch_size, learning_rate=learning_rate, dataset=dataset, compile=compile,
                      channel_mult=channel_mult)))
"""


@pytest.fixture()
def script(tmp_path):
    path = tmp_path / 'script.py'
    path.write_text(SCRIPT)
    return path


def call(script, *args):
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=script.parent)


def test_overrides_are_parsed_as_literals(script):
    p = call(script, '--batch_size=32', '--learning_rate=3', '--dataset=cifar10', '--compile=True', '--channel_mult=[1,2]')
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1]) == dict(batch_size=32, learning_rate=3.0, dataset='cifar10',
                                                                  compile=True, channel_mult=[1, 2])


def test_config_file_then_override(script, tmp_path):
    (tmp_path / 'preset.py').write_text("batch_size = 256\ndataset = 'fashion_mnist'\n")
    p = call(script, 'preset.py', '--batch_size=8')
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])['batch_size'] == 8
    assert json.loads(p.stdout.strip().splitlines()[-1])['dataset'] == 'fashion_mnist'


def test_unknown_key_names_closest(script):
    p = call(script, '--batch_sise=32')
    assert p.returncode == 2
    assert p.stderr.count('\n') == 1 and 'Traceback' not in p.stderr
    assert "unknown config key 'batch_sise'" in p.stderr and 'did you mean --batch_size' in p.stderr


def test_wrong_type_names_key_type_and_value(script):
    p = call(script, '--batch_size=abc')
    assert p.returncode == 2 and 'Traceback' not in p.stderr
    assert '--batch_size expects int' in p.stderr and "'abc'" in p.stderr
    p = call(script, '--compile=1')
    assert p.returncode == 2 and '--compile expects bool' in p.stderr


def test_missing_config_file_and_missing_value(script):
    p = call(script, 'nope.py')
    assert p.returncode == 2 and "config file 'nope.py' not found" in p.stderr
    p = call(script, '--batch_size')
    assert p.returncode == 2 and 'no value' in p.stderr


def test_bare_flag_sets_boolean(script):
    p = call(script, '--compile')
    assert p.returncode == 0 and json.loads(p.stdout.strip().splitlines()[-1])['compile'] is True


def test_presets_run_with_train_dit():
    for preset in ('config/dit_mnist.py', 'config/dit_cifar10.py'):
        assert os.path.isfile(os.path.join(ROOT, preset))
    p = run('train_dit.py', 'config/dit_mnist.py', '--n_layer=3', check=False)
    assert p.returncode == 2 and 'did you mean --n_layers' in p.stderr
