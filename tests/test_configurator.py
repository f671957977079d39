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


SCRIPT2 = f"""
import json
batch_size = 64  # images per step
cfg = None  # guidance; None: not set
channel_mult = (1, 2)
hidden = 1
config_domains = dict(batch_size='count', cfg='nonneg', channel_mult='size')
config_keys = ['batch_size', 'cfg', 'channel_mult']
exec(open({os.path.join(ROOT, 'configurator.py')!r}).read())
print(json.dumps(dict(batch_size=batch_size, cfg=cfg, channel_mult=channel_mult)))
"""


@pytest.fixture()
def script2(tmp_path):
    path = tmp_path / 'script2.py'
    path.write_text(SCRIPT2)
    return path


def last_json(p):
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_config_file_errors_are_one_line(script, tmp_path):
    (tmp_path / 'typo.py').write_text("batch_size = 32\nlearning_rat = 1e-3\n")
    p = call(script, 'typo.py')
    assert p.returncode == 2 and p.stderr.count('\n') == 1 and 'Traceback' not in p.stderr
    assert p.stderr.startswith("error: typo.py: unknown config key 'learning_rat'; did you mean learning_rate?")
    (tmp_path / 'syntax.py').write_text("batch_size = 32\n\nchannel_mult = (1, 2\n")
    p = call(script, 'syntax.py')
    assert (p.returncode, p.stderr) == (2, "error: syntax.py line 3: SyntaxError: '(' was never closed\n")
    (tmp_path / 'raises.py').write_text("import math\nbatch_size = 32\nlearning_rate = math.log(0)\n")
    p = call(script, 'raises.py')
    assert (p.returncode, p.stderr) == (2, 'error: raises.py line 3: ValueError: math domain error\n')
    (tmp_path / 'wrong_type.py').write_text("import math\nbatch_size = math.sqrt(64)\n")
    p = call(script, 'wrong_type.py')
    assert (p.returncode, p.stderr) == (2, 'error: wrong_type.py: batch_size expects int (default 64), got float 8.0\n')
    (tmp_path / 'computed.py').write_text("import math\nbatch_size = 2 ** 5\nlearning_rate = batch_size * 1e-4\n")
    assert last_json(call(script, 'computed.py'))['learning_rate'] == pytest.approx(3.2e-3)  # the settings are in scope


def test_declared_config_keys_none_defaults_and_domains(script2, tmp_path):
    p = call(script2, '--hidden=2')  # not a declared config key
    assert p.returncode == 2 and "unknown config key 'hidden'" in p.stderr
    assert last_json(call(script2))['cfg'] is None
    assert last_json(call(script2, '--cfg=0'))['cfg'] == 0 and last_json(call(script2, '--cfg=1.5'))['cfg'] == 1.5
    (tmp_path / 'c.py').write_text('cfg = 3\n')
    assert last_json(call(script2, 'c.py'))['cfg'] == 3
    assert last_json(call(script2, 'c.py', '--cfg=0.5'))['cfg'] == 0.5  # types are checked against the default
    (tmp_path / 'bad.py').write_text("cfg = 'strong'\n")
    for args, msg in ((['bad.py'], 'error: --cfg=strong: must be a number >= 0 (and <= 100)\n'),
                      (['--cfg=-1'], 'error: --cfg=-1: must be a number >= 0 (and <= 100)\n'),
                      (['--batch_size=0'], 'error: --batch_size=0: must be an integer >= 1 (and <= 10000000)\n'),
                      (['--channel_mult=(1,9999)'], 'error: --channel_mult=(1,9999): each element must be an integer '
                                                    '>= 1 (and <= 4096)\n')):
        p = call(script2, *args)
        assert (p.returncode, p.stderr) == (2, msg)


def test_help(script2):
    for flag in ('--help', '-h'):
        p = call(script2, '--batch_size=32', flag)  # the values in effect
        assert p.returncode == 0 and p.stderr == ''
        lines = p.stdout.splitlines()
        assert [line.split() for line in lines if line.startswith('  --')] == [
            ['--batch_size=32', '[1,', '10000000]', 'images', 'per', 'step'],
            ['--cfg=None', '[0,', '100]', 'guidance;', 'None:', 'not', 'set'],
            ['--channel_mult=(1,2)', 'each', 'in', '[1,', '4096]']]
