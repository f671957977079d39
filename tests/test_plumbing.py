"""What the scripts share (model.py's last section): the resize-once data path, device-side loss bookkeeping, the
CPU-pinned test environment."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import Batches, Progress, load_dataset, load_training_set


def test_resize_once_gives_the_batches_of_resizing_every_batch(mnist_dir):
    """The training set is resized once at load (as uint8): batch k equals the old per-batch float resize of the same
    images, to within the uint8 rounding (half a grey level), in the same order."""
    x, y = load_training_set('mnist', mnist_dir, 32, False, False, 0, 'cpu')
    assert x.dtype == torch.uint8 and x.shape[1:] == (1, 32, 32)
    raw, raw_y = load_dataset('mnist', mnist_dir, download=False)
    new, old = Batches(x, y, 32, seed=3), Batches(raw, raw_y, 32, seed=3)
    for it in (0, 5, 8, 13):  # across an epoch boundary (8 iterations per epoch)
        xb, yb = new.get(it)
        xo, yo = old.get(it)
        xo = F.interpolate(xo, size=(32, 32), mode='bilinear', antialias=True)
        assert torch.equal(yb, yo)
        assert (xb - xo).abs().max() <= 0.5 / 127.5 + 1e-6
        assert (xb - xo).abs().mean() < 0.5 / 127.5


def test_batches_flip_on_the_device_where_the_images_live(mnist_dir):
    x, y = load_training_set('mnist', mnist_dir, 0, False, False, 0, 'cpu')
    torch.manual_seed(0)
    xb, _ = Batches(x, y, 64, seed=1, hflip=True).get(0)
    plain, _ = Batches(x, y, 64, seed=1).get(0)
    flipped = [torch.equal(a, b.flip(2)) and not torch.equal(a, b) for a, b in zip(xb, plain)]
    same = [torch.equal(a, b) for a, b in zip(xb, plain)]
    assert all(f or s for f, s in zip(flipped, same)) and 15 < sum(flipped) < 49  # about half, each exactly mirrored


def test_progress_sums_on_the_device_and_stops_on_nan(capsys):
    """No host sync per iteration: loss and a finite flag are summed as tensors; check() reads the mean once and
    stops with one line when any loss or gradient norm of the interval was not finite."""
    p = Progress(0, 10, 8, 5, False, 1, 'out/x/ckpt.pt')
    for v in (1.0, 2.0, 3.0):
        p.add(torch.tensor(v), torch.tensor(1.0))
    assert isinstance(p.loss_sum, torch.Tensor) and p.check(3) == pytest.approx(2.0)
    row, line = p.report(3, 1e-3)
    assert row['loss'] == pytest.approx(2.0) and 'loss 2.0000' in line and p.n == 0
    p.add(torch.tensor(1.0), torch.tensor(float('inf')))  # a finite loss, an infinite gradient norm
    with pytest.raises(SystemExit) as e:
        p.check(4)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count('\n') == 1 and 'last good checkpoint (out/x/ckpt.pt) is untouched' in err


def test_the_suite_and_its_scripts_run_on_the_cpu(monkeypatch):
    """Pinned in conftest: on a GPU machine too, the tests and every script they start see no GPU."""
    assert os.environ.get('CUDA_VISIBLE_DEVICES') == '' and not torch.cuda.is_available()
    import conftest
    seen = {}
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '0')  # as if the outer shell exposed a GPU
    monkeypatch.setattr(conftest.subprocess, 'run', lambda cmd, **kw: seen.update(kw) or subprocess.CompletedProcess(cmd, 0, '', ''))
    conftest.run('train_dit.py', '--help')
    assert seen['env']['CUDA_VISIBLE_DEVICES'] == ''


@pytest.mark.skipif(not os.path.exists('/proc/self/statm'), reason='reads resident memory from /proc (Linux)')
@pytest.mark.parametrize('setup,keeps', [(False, False), (True, True)])
def test_cpu_setup_keeps_freed_memory_for_the_next_tensor(setup, keeps):
    """glibc returns a freed 12 MB tensor to the system (its pages fault in again on the next one) unless
    setup_precision('cpu', ...) asked it to keep freed memory: resident memory after `del` tells which."""
    code = f'''
import os, torch
from model import setup_precision
if {setup}:
    setup_precision('cpu', 'bfloat16')
rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 20
a = torch.ones(3 * 2 ** 20)  # 12 MB, touched
before = rss()
del a
print(before - rss())'''
    from conftest import ROOT
    env = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')}  # glibc's defaults as the control
    p = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    freed_mb = float(p.stdout.split()[-1])
    assert (freed_mb < 2) if keeps else (freed_mb > 10)


@pytest.mark.parametrize('native', [True, False])
def test_bf16_only_on_a_cpu_with_a_bf16_matrix_unit(monkeypatch, native):
    """Without AVX-512 or AMX PyTorch's bf16 matmul is a scalar loop: setup_precision then trains in fp32, with a note."""
    from model import setup_precision
    monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: native)
    notes = []
    ctx, dtype = setup_precision('cpu', 'bfloat16', notes.append)
    assert dtype == ('bfloat16' if native else 'float32') and len(notes) == (0 if native else 1)
    with ctx:
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == (torch.bfloat16 if native else torch.float32)
    assert setup_precision('cpu', 'float32', notes.append)[1] == 'float32' and len(notes) == (0 if native else 1)


def test_cifar10_batches_read_as_written_and_one_line_for_a_missing_or_damaged_one(tmp_path, capsys):
    """CIFAR-10's python batches (torchvision's layout and names) come back as written, in order, as uint8 [N, 3, 32,
    32] and int64 labels; a missing or cut-short batch is one line naming it, no traceback."""
    from conftest import fake_images, write_cifar10
    data = write_cifar10(str(tmp_path), n_per_batch=6)
    x, y = load_dataset('cifar10', data)
    want = [fake_images(6, 32, 3, seed=i) for i in range(5)]  # data_batch_1..5 as write_cifar10 made them
    assert x.dtype == torch.uint8 and x.shape == (30, 3, 32, 32) and y.dtype == torch.int64
    assert torch.equal(x, torch.as_tensor(np.concatenate([w[0] for w in want])))
    assert y.tolist() == np.concatenate([w[1] for w in want]).tolist()
    xt, yt = load_dataset('cifar10', data, train=False)
    assert torch.equal(xt, torch.as_tensor(fake_images(6, 32, 3, seed=5)[0])) and len(yt) == 6
    root = os.path.join(data, 'cifar-10-batches-py')
    with open(os.path.join(root, 'data_batch_2'), 'r+b') as f:
        f.truncate(100)  # a cut-short copy
    for damage, words in (('', ['data_batch_2 is not a CIFAR-10 python batch', '--download=True']),
                          ('data_batch_4', ['cifar10 not found', 'download is off', 'data_batch_4'])):
        if damage:
            os.remove(os.path.join(root, damage))
        with pytest.raises(SystemExit) as e:
            load_dataset('cifar10', data)
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.count('\n') == 1 and 'Traceback' not in err, err
        assert all(w in err for w in words), err
