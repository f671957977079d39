"""A user's own files and disk, and stops from outside: broken images, bad output folders, a full disk, resumes that
ask for another network, Ctrl-C and SIGTERM. Each ends with one line on stderr, no traceback, a non-zero exit, and
loses nothing the user had: the last checkpoint keeps its bytes and still loads, and a resumed run goes on exactly."""
import ctypes
import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import model
from conftest import ROOT, TINY_DIT, TINY_UNET, run
from model import load_checkpoint, load_dataset
from test_config_checks import run_bare

# lr_decay_iters: the learning rate does not depend on max_iters, so runs of any length compare
DIT = [*TINY_DIT, '--batch_size=32', '--dtype=float32', '--lr_decay_iters=12', '--ckpt_interval=100',
       '--sample_interval=0', '--compile=False']
UNET = [*TINY_UNET, '--dtype=float32', '--n_res=1', '--lr_decay_iters=12', '--ckpt_interval=100']


def tiny(script):
    """A script's tiny settings (the denoiser: one noise level in its figures, and no sampler)."""
    if script == 'train_denoiser.py':
        return [a for a in UNET if 'sample_steps' not in a] + ['--sigmas=(0.5,)']
    return DIT if script == 'train_dit.py' else UNET


def one_line(code, err, status, *words):
    """Exit status `status`, exactly one line on stderr holding `words`, no traceback."""
    assert code == status and err.count('\n') == 1 and 'Traceback' not in err, (code, err)
    for w in words:
        assert w in err, (w, err)


def kept(out_dir, before):
    """The checkpoint in out_dir has the bytes it had, loads, and left no temporary file beside it."""
    path = os.path.join(out_dir, 'ckpt.pt')
    assert open(path, 'rb').read() == before and not os.path.exists(path + '.tmp')
    return load_checkpoint(path)


def weights(out_dir):
    ckpt = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))
    return ckpt['iter_num'], {f'{k}.{n}': w for k in ('model', 'ema') for n, w in ckpt[k].items()}


def losses(out_dir):
    return [(r['iter'], r['loss']) for r in map(json.loads, open(os.path.join(out_dir, 'log.jsonl')))]


def same_run(a, b):
    """b's checkpoint and loss log are a's, to the bit."""
    (ia, wa), (ib, wb) = weights(a), weights(b)
    assert ia == ib and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert losses(a) == losses(b)


@pytest.fixture()
def here():
    """Run a script in this process: (exit code, stdout, stderr); the signal handlers and the excepthook a script
    installs are put back after it (conftest.run_here)."""
    return lambda script, *args: run_bare(script, list(args))


@pytest.fixture(scope='module')
def runs(mnist_dir, tmp_path_factory):
    """A tiny DiT trained 12 iterations without a stop, and the user's run: the same, checkpointed after 4."""
    ref, user = str(tmp_path_factory.mktemp('reference')), str(tmp_path_factory.mktemp('user'))
    run('train_dit.py', f'--data_dir={mnist_dir}', f'--out_dir={ref}', '--max_iters=12', *DIT)
    run('train_dit.py', f'--data_dir={mnist_dir}', f'--out_dir={user}', '--max_iters=4', *DIT)
    return ref, user, open(os.path.join(user, 'ckpt.pt'), 'rb').read()


def users_run(runs, tmp_path, name):
    """A copy of the user's run to break."""
    return str(shutil.copytree(runs[1], tmp_path / name))


# 1. reading: broken images, folders without images, mixed sizes, an npz without samples, a noise file of another shape

def image_folder(root, sizes=((20, 24),) * 4):
    for k in range(2):
        os.makedirs(root / f'class{k}', exist_ok=True)
        for i, (h, w) in enumerate(sizes):
            Image.fromarray(np.full((h, w, 3), 60 * k + 10 * i, np.uint8)).save(root / f'class{k}' / f'{i}.png')
    return root


def test_a_broken_image_is_named_before_training(runs, tmp_path, here):
    imgs, out = image_folder(tmp_path / 'imgs'), users_run(runs, tmp_path, 'out')
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(tmp_path / 'big.png')
    whole = open(tmp_path / 'big.png', 'rb').read()
    cases = {'cut.png': (whole[:len(whole) // 2], 'image file is truncated'), 'empty.png': (b'', 'not an image'),
             'notes.jpg': (b'not an image\n', 'not an image')}
    for name, (data, why) in cases.items():
        (imgs / 'class1' / name).write_bytes(data)
        code, out_, err = here('train_dit.py', '--dataset=folder', f'--data_dir={imgs}', f'--out_dir={out}',
                               '--init_from=resume', '--image_size=16', *DIT)
        one_line(code, err, 1, f'{imgs / "class1" / name}: {why}', '--skip_bad_images')
        assert 'iter' not in out_ and kept(out, runs[2])['iter_num'] == 4
        (imgs / 'class1' / name).unlink()


def test_skip_bad_images_counts_what_it_left_out(tmp_path, capsys):
    imgs = image_folder(tmp_path / 'imgs')
    (imgs / 'class0' / 'empty.png').write_bytes(b'')
    (imgs / 'class1' / 'text.png').write_bytes(b'hello')
    x, y = load_dataset('folder', str(imgs), image_size=16, skip_bad=True)
    out = capsys.readouterr().out
    assert x.shape == (8, 3, 16, 16) and y.tolist() == [0] * 4 + [1] * 4
    assert out.count('\n') == 1 and out.startswith('note: left out 2 unreadable file(s) of 10 in')
    (imgs / 'class0' / 'empty.png').unlink()
    (imgs / 'class1' / 'text.png').unlink()
    assert torch.equal(x, load_dataset('folder', str(imgs), image_size=16)[0])  # the good ones, as without the bad


@pytest.mark.parametrize('case,words', [
    ('no_images', ['class0, class1']),  # class folders, and not one image in them
    ('one_empty_class', ['class2']),
    ('no_classes', ['class folder']),  # images, but not in class folders
    ('mixed_sizes', ['mixes image sizes', '2 image(s) are smaller than image_size 16', '6x5', '--image_size=5']),
])
def test_folders_that_give_no_dataset(case, words, tmp_path, capsys):
    root = tmp_path / 'imgs'
    if case == 'no_images':
        os.makedirs(root / 'class0'), os.makedirs(root / 'class1')
        (root / 'class0' / 'README.txt').write_text('my images')
    elif case == 'one_empty_class':
        image_folder(root)
        os.makedirs(root / 'class2')
    elif case == 'no_classes':
        os.makedirs(root)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / 'a.png')
    else:  # mixed sizes, some below image_size: only those would be blurred up
        image_folder(root, sizes=[(20, 24), (5, 6), (40, 40)])
    with pytest.raises(SystemExit) as e:
        load_dataset('folder', str(root), image_size=16)
    err = capsys.readouterr().err
    one_line(e.value.code, err, 1, *words)
    assert os.path.isdir(root)
    if case == 'mixed_sizes':  # one size for all is scaled alike (as MNIST's 28 to 32): no error
        shutil.rmtree(root)
        image_folder(root, sizes=[(5, 6)] * 3)
        assert load_dataset('folder', str(root), image_size=16)[0].shape == (6, 3, 16, 16)


def test_evaluate_an_npz_without_samples(tmp_path, here):
    np.savez(tmp_path / 'stats.npz', mu=np.zeros(4), sigma=np.eye(4))
    np.savez(tmp_path / 'few_labels.npz', arr_0=np.zeros((6, 8, 8, 1), np.uint8), arr_1=np.arange(4))
    common = ['--inception=off', f'--classifier_path={tmp_path / "clf.pt"}', f'--data_dir={tmp_path / "none"}']
    code, _, err = here('evaluate.py', f'--npz={tmp_path / "stats.npz"}', *common)
    one_line(code, err, 1, 'holds no arr_0', 'mu, sigma')
    code, _, err = here('evaluate.py', f'--npz={tmp_path / "few_labels.npz"}', *common)
    one_line(code, err, 1, 'arr_1 must hold one class label', '(4,) for 6 samples')
    assert sorted(os.listdir(tmp_path)) == ['few_labels.npz', 'stats.npz']  # no cache, no json


def test_ideal_machines_noise_file_of_another_shape_or_dtype(mnist_dir, tmp_path, here):
    args = dict(in_channels=1, input_size=8, base_channels=8, channel_mult=(1, 2), attn_levels=(), n_res=1)
    net = model.UNet(**args)
    torch.save(dict(model_args=args, model=net.state_dict(), ema=net.state_dict(), config={'dataset': 'mnist'}),
               tmp_path / 'ckpt.pt')
    common = [f'--ckpt={tmp_path / "ckpt.pt"}', f'--data_dir={mnist_dir}', f'--out_dir={tmp_path / "ideal"}',
              '--num_noises=1', '--patch_size=3']
    for noise, words in ((torch.randn(1, 1, 28, 28), ['[1, 1, 8, 8]', 'shape [1, 1, 28, 28]']),
                         (torch.zeros(1, 1, 8, 8, dtype=torch.long), ['of floats', 'int64']),
                         (torch.full((1, 1, 8, 8), float('nan')), ['NaN'])):
        torch.save(noise, tmp_path / 'x_1.pt')
        code, _, err = here('ideal_machines.py', *common, f'--noise_file={tmp_path / "x_1.pt"}')
        one_line(code, err, 1, 'noise_file', *words)
    assert not os.path.exists(tmp_path / 'ideal')


# 2. writing: an out_dir that is a file, cannot be made or written; a disk that fills up while checkpointing

@pytest.mark.parametrize('script', ['train_dit.py', 'train_flow_unet.py', 'train_class_cfg.py', 'train_denoiser.py',
                                    'sample.py', 'evaluate.py', 'ideal_machines.py'])
def test_out_dir_that_is_a_file_or_under_one(script, tmp_path, here):
    (tmp_path / 'notes.txt').write_text('keep me')
    # no data and no checkpoint: a script that started work before the check would stop there, with another message
    where = [] if script == 'sample.py' else [f'--data_dir={tmp_path / "no_data"}'] + \
        (['--ckpt=nowhere.pt'] if script == 'ideal_machines.py' else [])
    for out, words in ((tmp_path / 'notes.txt', ['is a file, not a folder']),
                       (tmp_path / 'notes.txt' / 'run', ['cannot be made', 'notes.txt is a file'])):
        code, _, err = here(script, f'--out_dir={out}', *where)
        one_line(code, err, 1, f'--out_dir: {out}', *words)
    assert os.listdir(tmp_path) == ['notes.txt'] and (tmp_path / 'notes.txt').read_text() == 'keep me'


def no_override():
    """Take root's power to write anywhere from the child process (its bounding set, so after exec), so that a
    read-only folder is read-only for it as for any user (PR_CAPBSET_DROP, CAP_DAC_OVERRIDE)."""
    if ctypes.CDLL(None, use_errno=True).prctl(24, 1, 0, 0, 0):
        raise OSError(ctypes.get_errno(), 'prctl')


def test_read_only_out_dir_stops_before_work(runs, tmp_path):
    out = users_run(runs, tmp_path, 'out')
    os.chmod(out, 0o555)
    cmd = [sys.executable, os.path.join(ROOT, 'train_dit.py'), f'--out_dir={out}', '--init_from=resume',
           f'--data_dir={tmp_path / "no_data"}', *DIT]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore', 'CUDA_VISIBLE_DEVICES': ''}
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                           preexec_fn=no_override if os.geteuid() == 0 else None)
    finally:
        os.chmod(out, 0o755)
    one_line(p.returncode, p.stderr, 1, f'--out_dir: cannot write in {out} (Permission denied)')
    assert sorted(os.listdir(out)) == sorted(os.listdir(runs[1])) and kept(out, runs[2])['iter_num'] == 4


def test_full_disk_while_checkpointing_keeps_the_last_checkpoint(mnist_dir, runs, tmp_path, here, monkeypatch):
    out = users_run(runs, tmp_path, 'full')
    save = torch.save

    def full_disk(obj, f, *a, **k):  # the disk fills up halfway through the temporary file
        with open(f, 'wb') as fh:
            fh.write(b'half a checkpoint')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f)

    monkeypatch.setattr(torch, 'save', full_disk)
    code, stdout, err = here('train_dit.py', f'--data_dir={mnist_dir}', f'--out_dir={out}', '--init_from=resume',
                             '--max_iters=12', *DIT, '--ckpt_interval=2')
    one_line(code, err, 1, 'ckpt.pt.tmp (No space left on device)', 'ckpt.pt is kept as it was', '--init_from=resume')
    assert 'iter 6/12' in stdout and 'iter 7/12' not in stdout  # it stopped at the first checkpoint it could not write
    assert kept(out, runs[2])['iter_num'] == 4
    monkeypatch.setattr(torch, 'save', save)
    run('train_dit.py', f'--data_dir={mnist_dir}', f'--out_dir={out}', '--init_from=resume', '--max_iters=12', *DIT)
    same_run(runs[0], out)  # space freed, the resumed run is the uninterrupted one


# 3. a resume that asks for another network than its checkpoint's

def test_resume_that_asks_for_another_network(mnist_dir, runs, tmp_path, here):
    out = users_run(runs, tmp_path, 'out')
    resume = ['train_dit.py', f'--data_dir={mnist_dir}', f'--out_dir={out}', '--init_from=resume', *DIT]
    code, _, err = here(*resume, '--dim=64', '--n_layers=3')
    one_line(code, err, 1, '--dim=64 (the checkpoint: 32), --n_layers=3 (the checkpoint: 2);')
    (tmp_path / 'preset.py').write_text('n_heads = 4\nqk_norm = True\n')  # a config file counts; an equal value is fine
    code, _, err = here(resume[0], str(tmp_path / 'preset.py'), *[a for a in resume[1:] if '--n_heads' not in a])
    one_line(code, err, 1, '--n_heads=4 (the checkpoint: 2)')
    assert 'qk_norm' not in err
    code, _, err = here(*resume, '--patch_size=4', '--image_size=32')  # the data's size is the checkpoint's, too
    one_line(code, err, 1, 'input_size=28 there, 32 here')
    assert kept(out, runs[2])['iter_num'] == 4
    # what may change on resume still does: --dim=32 is the checkpoint's, the new max_iters and learning rate apply
    code, stdout, err = here(*resume, '--dim=32', '--max_iters=6', '--learning_rate=2e-3')
    assert code in (0, None) and 'iters 4 -> 6' in stdout, err
    lr = [r['lr'] for r in map(json.loads, open(os.path.join(out, 'log.jsonl')))]
    assert lr[4] == pytest.approx(model.cosine_lr(4, 2e-3, 5e-5, 0, 12)) and load_checkpoint(out + '/ckpt.pt')['iter_num'] == 6


@pytest.mark.parametrize('script,ckpt_args,flags,words', [
    ('train_flow_unet.py', {}, ['--base_channels=16'], ['--base_channels=16 (the checkpoint: 8)']),
    ('train_flow_unet.py', {}, ['--arch=resnet'], ['--arch=resnet (the checkpoint: unet)']),
    ('train_flow_unet.py', {}, ['--arch=resnet', '--n_layers=4'], ['--arch=resnet (the checkpoint: unet), --n_layers=4 '
                                                                  "(the checkpoint's unet has no n_layers)"]),
    ('train_class_cfg.py', dict(num_classes=10), ['--channel_mult=(1,2,2)'], ['--channel_mult=(1,2,2) (the checkpoint: (1,2))']),
    ('train_denoiser.py', dict(time_cond=False), ['--n_res=2'], ['--n_res=2 (the checkpoint: 1)']),
    ('train_class_cfg.py', {}, [], ['num_classes=0 there, 10 here']),  # a checkpoint of train_flow_unet.py
    ('train_dit.py', {}, ['--image_size=32'], ["arch='unet' there, 'dit' here"]),
])
def test_unet_resume_conflicts(script, ckpt_args, flags, words, mnist_dir, tmp_path, here):
    """A checkpoint made as TINY_UNET's settings make it, resumed with settings that ask for another network."""
    args = {**dict(in_channels=1, input_size=32, base_channels=8, channel_mult=(1, 2), n_res=1, time_cond=True,
                   num_classes=0), **ckpt_args}
    net = model.UNet(**args)
    os.makedirs(tmp_path / 'out')
    torch.save(dict(model_args=args, model=net.state_dict(), ema=net.state_dict(), optimizer={}, iter_num=8, rng=[]),
               tmp_path / 'out' / 'ckpt.pt')
    before = open(tmp_path / 'out' / 'ckpt.pt', 'rb').read()
    code, _, err = here(script, f'--data_dir={mnist_dir}', f'--out_dir={tmp_path / "out"}', '--init_from=resume',
                        *tiny(script), *flags)
    one_line(code, err, 1, *words)
    assert kept(tmp_path / 'out', before)['iter_num'] == 8


# 4. Ctrl-C and SIGTERM: a checkpoint at the iteration in progress, one line, and the resumed run is the uninterrupted one

def test_ctrl_c_writes_a_checkpoint_there_and_resume_goes_on_exactly(mnist_dir, runs, tmp_path):
    out = str(tmp_path / 'out')
    cmd = [sys.executable, os.path.join(ROOT, 'train_dit.py'), f'--data_dir={mnist_dir}', f'--out_dir={out}',
           '--max_iters=12', '--compile=False', '--preset=none', *DIT]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore', 'CUDA_VISIBLE_DEVICES': ''}
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith('iter 2/'):
            p.send_signal(signal.SIGINT)  # as Ctrl-C in a terminal
    stdout, err = ''.join(lines), p.stderr.read()
    p.wait(timeout=300)
    it = load_checkpoint(os.path.join(out, 'ckpt.pt'))['iter_num']
    assert 2 <= it < 12 and f'iter {it}/12' in stdout and f'iter {it + 1}/12' not in stdout
    one_line(p.returncode, err, 128 + signal.SIGINT, f'stopped by SIGINT at iter {it}', '--init_from=resume')
    assert [i for i, _ in losses(out)] == list(range(1, it + 1))
    run('train_dit.py', f'--data_dir={mnist_dir}', f'--out_dir={out}', '--max_iters=12', '--init_from=resume', *DIT)
    same_run(runs[0], out)


@pytest.mark.parametrize('script', ['train_flow_unet.py', 'train_class_cfg.py', 'train_denoiser.py'])
def test_sigterm_stops_every_train_script_the_same_way(script, mnist_dir, tmp_path, here, monkeypatch):
    """SIGTERM (what a scheduler sends) during iteration 4: the checkpoint at 4, one line, exit 143; resumed, the run
    is the uninterrupted one (all in this process, so the numbers compare)."""
    cosine_lr = model.cosine_lr

    def lr_then_sigterm(it, *a):  # called at the start of each iteration
        if it == 3:
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)  # else it would end pytest
            os.kill(os.getpid(), signal.SIGTERM)
        return cosine_lr(it, *a)

    common = [f'--data_dir={mnist_dir}', '--max_iters=6', *tiny(script)]
    code, _, err = here(script, f'--out_dir={tmp_path / "ref"}', *common)
    assert code in (0, None), err
    monkeypatch.setattr(model, 'cosine_lr', lr_then_sigterm)
    code, _, err = here(script, f'--out_dir={tmp_path / "out"}', *common)
    one_line(code, err, 128 + signal.SIGTERM, 'stopped by SIGTERM at iter 4', '--init_from=resume')
    assert load_checkpoint(str(tmp_path / 'out' / 'ckpt.pt'))['iter_num'] == 4
    monkeypatch.setattr(model, 'cosine_lr', cosine_lr)
    code, _, err = here(script, f'--out_dir={tmp_path / "out"}', '--init_from=resume', *common)
    assert code in (0, None), err
    same_run(str(tmp_path / 'ref'), str(tmp_path / 'out'))
