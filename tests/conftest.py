"""Shared helpers: small fake datasets in the real file formats, and running a script as a user would."""
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest

os.environ['CUDA_VISIBLE_DEVICES'] = ''  # the suite runs on the CPU, also on a GPU machine (set before torch starts CUDA)
if int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1')) > 1:  # pytest -n N: share the cores among the N workers
    import torch
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ['PYTEST_XDIST_WORKER_COUNT'])))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a tiny DiT so each end-to-end run takes seconds
TINY_DIT = ['--dim=32', '--n_layers=2', '--n_heads=2', '--stem_channels=8', '--sample_steps=2', '--warmup_iters=0',
            '--download=False', '--log_interval=1']
TINY_UNET = ['--base_channels=8', '--channel_mult=(1,2)', '--sample_steps=2', '--warmup_iters=0', '--download=False',
             '--log_interval=1', '--batch_size=32']


def fake_images(n, size, channels, seed=0):
    """Class k is a bright bar at a class-dependent row on a dark noisy background: easy to learn."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    x = rng.integers(0, 40, size=(n, channels, size, size), dtype=np.uint8)
    for i, k in enumerate(labels):
        r = 2 + 2 * k
        x[i, :, r:r + 3, 3:size - 3] = 255
    return x, labels.astype(np.uint8)


def fake_colour_images(n, size, channels, seed=0):
    """Class k is a flat colour, hue k / 10, under noise: crops and flips (the CIFAR-10 judge's augmentation) keep it."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    hue = 2 * np.pi * (labels[:, None] / 10 + np.arange(channels) / 3)  # R, G, B a third of a turn apart
    x = 128 + 90 * np.cos(hue)[:, :, None, None] + rng.integers(-30, 31, size=(n, channels, size, size))
    return x.round().clip(0, 255).astype(np.uint8), labels.astype(np.uint8)


CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')


def write_image_folder(root, classes=CIFAR10_CLASSES, n_train=500, n_test=100):
    """The CIFAR-10 JPEG stand-in's layout: root/train/<class>/<i>.jpg and root/test/..., JPEG quality 75."""
    from PIL import Image
    for split, n, seed in (('train', n_train, 10), ('test', n_test, 11)):
        x, y = fake_colour_images(n, 32, 3, seed)
        for i, (img, k) in enumerate(zip(x, y)):
            os.makedirs(os.path.join(root, split, classes[k]), exist_ok=True)
            Image.fromarray(img.transpose(1, 2, 0)).save(os.path.join(root, split, classes[k], f'{i:04d}.jpg'), quality=75)
    return root


def write_mnist(data_dir, n=256, folder='MNIST'):
    """MNIST's IDX files: magic 2051 / 2049, big-endian sizes, then raw uint8."""
    raw = os.path.join(data_dir, folder, 'raw')
    os.makedirs(raw, exist_ok=True)
    for split, count in (('train', n), ('t10k', 64)):
        x, y = fake_images(count, 28, 1, seed=len(split))
        with open(os.path.join(raw, f'{split}-images-idx3-ubyte'), 'wb') as f:
            f.write(struct.pack('>IIII', 2051, count, 28, 28) + x[:, 0].tobytes())
        with open(os.path.join(raw, f'{split}-labels-idx1-ubyte'), 'wb') as f:
            f.write(struct.pack('>II', 2049, count) + y.tobytes())
    return data_dir


def write_cifar10(data_dir, n_per_batch=40, images=fake_images):
    """CIFAR-10's python format: pickled dicts with 'data' uint8 [N, 3072] (R, G, B planes) and 'labels'."""
    root = os.path.join(data_dir, 'cifar-10-batches-py')
    os.makedirs(root, exist_ok=True)
    for i, name in enumerate([f'data_batch_{j}' for j in range(1, 6)] + ['test_batch']):
        x, y = images(n_per_batch, 32, 3, seed=i)
        with open(os.path.join(root, name), 'wb') as f:
            pickle.dump({'batch_label': name, 'labels': y.tolist(), 'data': x.reshape(n_per_batch, -1),
                         'filenames': [f'{j}.png' for j in range(n_per_batch)]}, f)
    with open(os.path.join(root, 'batches.meta'), 'wb') as f:
        pickle.dump({'label_names': [f'class{k}' for k in range(10)], 'num_vis': 3072}, f)
    return data_dir


def with_test_defaults(script, args):
    """train_dit.py runs eager unless the test passes --compile (its default compiles, slow to start; test_train_dit
    checks that path), and without the dataset's preset unless the test passes --preset."""
    if script == 'train_dit.py' and not any(a.startswith('--compile') for a in args):
        args = (*args, '--compile=False')
    if script == 'train_dit.py' and not any(a.startswith('--preset') for a in args):
        args = (*args, '--preset=none')  # the script's own defaults under the tests' settings (test_presets: the presets)
    return args


def run(script, *args, env=None, check=True, torchrun=0):
    """Run a script from the repo root in a fresh process, as with_test_defaults says; returns the CompletedProcess."""
    args = with_test_defaults(script, args)
    cmd = [sys.executable, os.path.join(ROOT, script), *args]
    if torchrun:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={torchrun}',
               os.path.join(ROOT, script), *args]
    full_env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore', 'CUDA_VISIBLE_DEVICES': '', **(env or {})}
    p = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=900)
    if check and p.returncode != 0:
        raise AssertionError(f'{" ".join(cmd)} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}')
    return p


def run_here(script, *args, check=False, defaults=True, propagate=False):
    """`python script *args` run in this process: no fresh interpreter to start and no torch to import for each run
    (run() stays for what needs a process of its own: training, torchrun, the first-run output of a command as
    typed). Returns a CompletedProcess as run() does. An exception is handed to sys.excepthook as the interpreter
    would (exit code 1), so a traceback shows in stderr as it would in a fresh process; propagate=True raises it in
    the test instead (the configuration checks and fault tests, where any traceback is the bug). defaults=False: the
    script's own defaults, without with_test_defaults. What a script sets for itself (argv, cwd, RNG, grad mode,
    excepthook, signal handlers, warning filters) is put back after it. check=True: a nonzero exit fails the test
    with the script's output, as run() does."""
    import contextlib
    import io
    import runpy
    import signal
    import warnings
    import torch
    out, err, code, args = io.StringIO(), io.StringIO(), 0, with_test_defaults(script, args) if defaults else args
    argv, cwd, hook, grad = sys.argv, os.getcwd(), sys.excepthook, torch.is_grad_enabled()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        sys.argv = [os.path.join(ROOT, script), *args]
        os.chdir(ROOT)
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings(), contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            try:
                runpy.run_path(os.path.join(ROOT, script), run_name='__main__')
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
            except Exception as e:
                if propagate:
                    raise
                sys.excepthook(type(e), e, e.__traceback__)
                code = 1
    finally:
        sys.argv, sys.excepthook = argv, hook
        os.chdir(cwd)
        torch.set_grad_enabled(grad)
        for s, h in handlers.items():
            signal.signal(s, h)
    p = subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f'{script} {" ".join(args)} exited {code}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}')
    return p


def label_rows_trained(out_dir):
    """Adam's second moment of each label-embedding row (classes 0..K-1, then the null class) in a run's checkpoint:
    above 0 exactly when that row got a gradient, i.e. its label reached the loss."""
    from model import build_model, load_checkpoint
    ckpt = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))
    names = [n for n, _ in build_model(ckpt['model_args']).named_parameters()]
    return ckpt['optimizer']['state'][names.index('y_embedder.embedding.weight')]['exp_avg_sq'].sum(1)


def ema_grid(out_dir, z, y, steps, cfg, nrow):
    """The grey uint8 grid save_grid writes for a run's EMA samples from z, sampled as the training scripts do (bf16
    autocast where this CPU has bf16 units, else fp32, as setup_precision decides; DiT: the attention auto picks for
    that dtype; UNet: channels-last), on one thread so the numbers repeat."""
    import torch
    from torchvision.utils import make_grid
    from model import build_model, load_checkpoint, pick_attention, sample, setup_precision
    ckpt = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))
    dit = 'dim' in ckpt['model_args']
    ctx, dtype = setup_precision('cpu', 'bfloat16', lambda *a: None)
    model = build_model(ckpt['model_args'], attention=pick_attention('auto', 'cpu', dtype))
    model.load_state_dict(ckpt['ema'])
    fmt = torch.contiguous_format if dit else torch.channels_last
    model = model.eval().to(memory_format=fmt)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with ctx:
        x = sample(model, z.contiguous(memory_format=fmt), y, steps=steps, cfg=cfg)
    torch.set_num_threads(threads)
    g = make_grid((x.float().clamp(-1, 1) + 1) / 2, nrow=nrow, padding=2, pad_value=1.0)
    return (g[0] * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy()


def repo_files():
    """Every file of the repository tree (outside .git and Python's caches) with its modification time."""
    files = {}
    for d, dirs, names in os.walk(ROOT):
        dirs[:] = [x for x in dirs if x not in ('.git', '__pycache__', '.pytest_cache')]
        for n in names:
            files[os.path.join(d, n)] = os.stat(os.path.join(d, n)).st_mtime_ns
    return files


@pytest.fixture(scope='session', autouse=True)
def repo_untouched():
    """Catches a test that writes into the repository (e.g. evaluate.py's default out/ caches): nothing may appear
    or change there during the run."""
    before = repo_files()
    yield
    after = repo_files()
    changed = sorted(f for f in after if before.get(f) != after[f])
    assert not changed, f'the tests wrote into the repository: {changed}'


@pytest.fixture(scope='session')
def mnist_dir(tmp_path_factory):
    return write_mnist(str(tmp_path_factory.mktemp('mnist_data')))


@pytest.fixture(scope='session')
def cifar_dir(tmp_path_factory):
    return write_cifar10(str(tmp_path_factory.mktemp('cifar_data')))


@pytest.fixture(scope='session')
def dit_run(mnist_dir, tmp_path_factory):
    """A tiny DiT trained for 40 iterations: (out_dir, completed process)."""
    out = str(tmp_path_factory.mktemp('dit_mnist'))
    p = run('train_dit.py', f'--data_dir={mnist_dir}', f'--out_dir={out}', '--batch_size=32', '--max_iters=40',
            '--learning_rate=2e-3', '--ckpt_interval=20', '--sample_interval=20', *TINY_DIT)
    return out, p


def unet_run(script, mnist_dir, tmp_path_factory):
    """A tiny UNet of train_flow_unet.py or train_class_cfg.py, 2 epochs of 8 iterations: (out_dir, completed process)."""
    out = str(tmp_path_factory.mktemp(script[:-3]))
    p = run(script, f'--data_dir={mnist_dir}', f'--out_dir={out}', '--epochs=2', '--sample_epochs=(1,2)',
            '--learning_rate=3e-3', *TINY_UNET)
    return out, p


@pytest.fixture(scope='session')
def flow_run(mnist_dir, tmp_path_factory):
    return unet_run('train_flow_unet.py', mnist_dir, tmp_path_factory)


@pytest.fixture(scope='session')
def cfg_run(mnist_dir, tmp_path_factory):
    return unet_run('train_class_cfg.py', mnist_dir, tmp_path_factory)
