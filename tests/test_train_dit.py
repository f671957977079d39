"""train_dit.py end to end on small fake data in the real file formats: outputs, resume, DDP, bad input."""
import hashlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_DIT, ema_grid, label_rows_trained, run, run_here
from model import DiT_Llama, load_checkpoint, load_dataset


def read_log(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, 'log.jsonl'))]


def grid_size(n_rows, n_cols, side, pad=2):
    return n_cols * side + (n_cols + 1) * pad, n_rows * side + (n_rows + 1) * pad


def test_dit_run_loss_decreases(dit_run):
    out, p = dit_run
    rows = read_log(out)
    assert [r['iter'] for r in rows] == list(range(1, 41))
    first, last = np.mean([r['loss'] for r in rows[:5]]), np.mean([r['loss'] for r in rows[-5:]])
    assert last < 0.8 * first, (first, last)
    assert 'img/s' in p.stdout and 'ETA' in p.stdout


def test_dit_run_outputs_decode(dit_run):
    out, _ = dit_run
    for name in ('samples.png', 'samples_000020.png', 'samples_000040.png'):
        img = Image.open(os.path.join(out, name))
        assert img.size == grid_size(10, 8, 28)  # rows = classes 0..9, 8 samples each
        assert np.asarray(img).std() > 5  # not a blank image
    # samples.png is the EMA's samples from the seeded noise, row k = class k at cfg 2 (not the raw weights: 1.1 grey
    # levels off; not rows of mixed classes: 0.4)
    z = torch.randn(80, 1, 28, 28, generator=torch.Generator().manual_seed(1337))
    want = ema_grid(out, z, torch.arange(10).repeat_interleave(8), steps=2, cfg=2.0, nrow=8)
    assert np.abs(np.asarray(Image.open(os.path.join(out, 'samples.png')).convert('L')) - want.astype(float)).mean() < 0.2
    for name in ('loss.png', 'loss_vs_t.png'):
        img = Image.open(os.path.join(out, name))
        img.load()
        assert img.size[0] > 300 and img.size[1] > 200
    ckpt = load_checkpoint(os.path.join(out, 'ckpt.pt'))
    assert ckpt['iter_num'] == 40 and ckpt['model_args']['input_size'] == 28 and ckpt['model_args']['dim'] == 32
    assert {'model', 'ema', 'optimizer', 'epoch', 'config', 'rng'} <= set(ckpt)
    assert (label_rows_trained(out) > 0).all()  # every class and the null class reached the loss
    assert not any(f.endswith('.tmp') for f in os.listdir(out))


def test_dit_run_ema_moved_and_lags(dit_run):
    """Catches a run whose EMA is never updated (it would keep the zero-initialised final layer) or is a plain copy."""
    ckpt = load_checkpoint(os.path.join(dit_run[0], 'ckpt.pt'))
    ema, model = ckpt['ema'], ckpt['model']
    for name in ('final_layer.linear.weight', 'blocks.0.adaLN_modulation.1.weight'):  # zero at init (AdaLN-Zero)
        assert ema[name].abs().max() > 0.1 * model[name].abs().max() > 0, name
    diff = max((ema[k] - model[k]).abs().max().item() for k in model)
    assert 1e-5 < diff < 0.1  # behind the trained weights, but close after 40 iterations


def test_cifar10_pickle_run(cifar_dir, tmp_path):
    out = str(tmp_path / 'out')
    run('train_dit.py', '--dataset=cifar10', f'--data_dir={cifar_dir}', f'--out_dir={out}', '--batch_size=16',
        '--max_iters=3', '--hflip=True', *TINY_DIT)
    rgb = np.asarray(Image.open(os.path.join(out, 'samples.png')).convert('RGB')).astype(int)
    assert rgb.shape == grid_size(10, 8, 32)[::-1] + (3,)
    assert (rgb[..., 0] != rgb[..., 1]).mean() > 0.5  # colour samples, not grey
    assert load_checkpoint(os.path.join(out, 'ckpt.pt'))['model_args']['in_channels'] == 3
    assert len(read_log(out)) == 3


def test_folder_dataset(tmp_path):
    for k in range(3):
        os.makedirs(tmp_path / 'imgs' / f'class{k}')
        for i in range(6):
            Image.fromarray(np.full((40, 48, 3), 40 * k + i, np.uint8)).save(tmp_path / 'imgs' / f'class{k}' / f'{i}.png')
    out = str(tmp_path / 'out')
    run('train_dit.py', '--dataset=folder', f'--data_dir={tmp_path / "imgs"}', '--image_size=16', f'--out_dir={out}',
        '--batch_size=6', '--max_iters=2', *TINY_DIT)
    assert Image.open(os.path.join(out, 'samples.png')).size == grid_size(3, 8, 16)
    assert load_checkpoint(os.path.join(out, 'ckpt.pt'))['model_args']['in_channels'] == 3


def write_folder(root, mode, n=4):
    """3 classes of n flat images in `mode`, 24x20, grey value 60 class + 10 index."""
    for k in range(3):
        os.makedirs(root / f'class{k}', exist_ok=True)
        for i in range(n):
            v = 60 * k + 10 * i
            if mode == 'I;16':
                img = Image.fromarray(np.full((20, 24), v * 257, np.uint16))
            elif mode == '1':
                img = Image.fromarray(np.full((20, 24), k > 0, bool))
            else:
                img = Image.fromarray(np.full((20, 24, 3), (v, 255 - v, 0), np.uint8)).convert(mode)
            img.save(root / f'class{k}' / f'{i}.png')


def test_folder_keeps_greyscale(tmp_path):
    write_folder(tmp_path / 'grey', 'L')
    out = tmp_path / 'out'
    run('train_dit.py', '--dataset=folder', f'--data_dir={tmp_path / "grey"}', '--image_size=16', f'--out_dir={out}',
        '--batch_size=4', '--max_iters=2', *TINY_DIT)
    assert load_checkpoint(str(out / 'ckpt.pt'))['model_args']['in_channels'] == 1
    x, y = load_dataset('folder', str(tmp_path / 'grey'), image_size=16)
    grey = np.asarray(Image.open(tmp_path / 'grey' / 'class1' / '2.png'))
    assert x.shape == (12, 1, 16, 16) and y.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and x[6, 0, 8, 8] == int(grey[10, 12])
    for mode, value in (('I;16', 60 + 20), ('1', 255)):  # 16-bit greys scaled to 8 bits, 1-bit to 0 / 255
        write_folder(tmp_path / mode.replace(';', ''), mode)
        x, _ = load_dataset('folder', str(tmp_path / mode.replace(';', '')), image_size=16)
        assert x.shape == (12, 1, 16, 16) and x[6].min() == x[6].max() == value, (mode, x[6].unique())
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(tmp_path / 'grey' / 'class0' / 'colour.png')  # one RGB image
    x, _ = load_dataset('folder', str(tmp_path / 'grey'), image_size=16)
    assert x.shape == (13, 3, 16, 16) and torch.equal(x[7, 0], x[7, 1])  # all in RGB, the greys as equal channels


def test_resume_equals_uninterrupted_run(mnist_dir, tmp_path):
    common = [f'--data_dir={mnist_dir}', '--batch_size=32', '--lr_decay_iters=12', '--ckpt_interval=100', *TINY_DIT]
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    run('train_dit.py', f'--out_dir={a}', '--max_iters=12', *common)  # 12 iters = 1.5 epochs of 256 images
    run('train_dit.py', f'--out_dir={b}', '--max_iters=5', *common)
    run('train_dit.py', f'--out_dir={b}', '--max_iters=12', '--init_from=resume', *common)
    ca, cb = load_checkpoint(os.path.join(a, 'ckpt.pt')), load_checkpoint(os.path.join(b, 'ckpt.pt'))
    assert cb['iter_num'] == 12
    for key in ('model', 'ema'):
        for name, w in ca[key].items():
            assert torch.equal(w, cb[key][name]), (key, name)
    assert [r['iter'] for r in read_log(b)] == list(range(1, 13))


def test_compiled_default_trains_as_eager_and_falls_back_without_a_compiler(mnist_dir, tmp_path):
    """train_dit.py compiles by default: in fp32 its losses over 4 steps are eager's (the kernels' attention runs eager
    inside the compiled model; Adam turns the rounding noise of gradients that are zero in exact arithmetic, such as a
    bias before a per-channel GroupNorm, into lr-sized steps, so not every weight is compared) and the checkpoint loads
    into a plain model; with no C++ compiler the run is eager."""
    common = [f'--data_dir={mnist_dir}', '--batch_size=32', '--max_iters=4', '--dtype=float32', '--attention=kernels',
              '--compile=True', '--p_uncond=0', *TINY_DIT]  # no label dropout: compiled code draws its own random numbers
    a, b = str(tmp_path / 'compiled'), str(tmp_path / 'no_cxx')
    pa = run('train_dit.py', f'--out_dir={a}', *common)
    pb = run('train_dit.py', f'--out_dir={b}', *common, env=dict(CXX=str(tmp_path / 'no-such-compiler')))
    assert 'needs a C++ compiler' not in pa.stdout and 'needs a C++ compiler' in pb.stdout
    assert 'CUDA' not in pa.stdout + pa.stderr  # inductor's 'No CUDA runtime is found' means nothing on a CPU
    ca, cb = load_checkpoint(os.path.join(a, 'ckpt.pt')), load_checkpoint(os.path.join(b, 'ckpt.pt'))
    model = DiT_Llama(**ca['model_args'])
    model.load_state_dict(ca['model'])  # strict: no '_orig_mod.' prefixes from torch.compile
    la, lb = [r['loss'] for r in read_log(a)], [r['loss'] for r in read_log(b)]
    assert len(la) == 4 and la == pytest.approx(lb, rel=1e-5) and la[0] != pytest.approx(la[-1], rel=1e-3)
    w = ca['model']['final_layer.linear.weight']  # zero at init (AdaLN-Zero): moved by the 4 steps, alike in both runs
    assert w.abs().max() > 1e-3 and torch.allclose(w, cb['model']['final_layer.linear.weight'], atol=2e-5)


def test_ddp_two_processes_gloo(mnist_dir, tmp_path):
    out = str(tmp_path / 'ddp')
    p = run('train_dit.py', f'--data_dir={mnist_dir}', f'--out_dir={out}', '--batch_size=32', '--max_iters=6',
            *TINY_DIT, torchrun=2)
    assert p.stdout.count('iter 6/6') == 1  # only rank 0 logs
    assert '2 process(es) on cpu' in p.stdout
    ckpt = load_checkpoint(os.path.join(out, 'ckpt.pt'))
    assert ckpt['iter_num'] == 6 and len(ckpt['rng']) == 2
    assert not torch.equal(ckpt['rng'][0]['cpu'], ckpt['rng'][1]['cpu'])  # each rank draws its own noise
    # DDP keeps the weights equal on both processes (each starts from its own seed and sees other data): catches a
    # run without the DDP wrapper; rank 0's checksum is the checkpoint's
    head = 'DDP: parameter checksums per process: '
    line = [line[len(head):] for line in p.stdout.splitlines() if line.startswith(head)]
    sums = [tuple(map(float, s.split())) for s in line[0].split(', ')]
    w = torch.cat([v.double().flatten() for v in ckpt['model'].values()])
    assert len(sums) == 2 and sums[0] == sums[1]
    assert sums[0] == pytest.approx((w.sum().item(), w.square().sum().item()), rel=1e-12)
    assert len(read_log(out)) == 6 and Image.open(os.path.join(out, 'samples.png')).size == grid_size(10, 8, 28)


def one_line_error(p, *words):
    assert p.returncode != 0
    assert 'Traceback' not in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.startswith('error:')]
    assert len(lines) == 1, p.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_bad_input_errors(mnist_dir, tmp_path):
    out = str(tmp_path / 'never')
    one_line_error(run_here('train_dit.py', '--dataset=imagenet', f'--out_dir={out}'), "unknown dataset 'imagenet'")
    one_line_error(run_here('train_dit.py', f'--data_dir={tmp_path / "empty"}', f'--out_dir={out}', '--download=False'),
                   'mnist not found', 'train-images-idx3-ubyte', '--data_dir')
    one_line_error(run_here('train_dit.py', f'--data_dir={mnist_dir}', f'--out_dir={out}', '--init_from=resume'),
                   'no checkpoint', '--init_from=scratch')
    one_line_error(run('train_dit.py', f'--data_dir={mnist_dir}', f'--out_dir={out}', '--batch_size=33', check=False,
                       env=dict(RANK='0', LOCAL_RANK='0', WORLD_SIZE='2')), 'not divisible by 2')
    assert not os.path.exists(out) and not os.path.exists(tmp_path / 'empty')  # nothing left behind
    bad = tmp_path / 'bad'
    bad.mkdir()
    (bad / 'ckpt.pt').write_bytes(b'not a checkpoint')
    one_line_error(run_here('train_dit.py', f'--data_dir={mnist_dir}', f'--out_dir={bad}', '--init_from=resume'),
                   'cannot read checkpoint')
    assert (bad / 'ckpt.pt').read_bytes() == b'not a checkpoint' and os.listdir(bad) == ['ckpt.pt']


def test_nan_loss_stops_and_keeps_last_checkpoint(mnist_dir, tmp_path):
    out = str(tmp_path / 'nan')
    run('train_dit.py', f'--data_dir={mnist_dir}', f'--out_dir={out}', '--batch_size=32', '--max_iters=2', *TINY_DIT)
    digest = hashlib.sha256(open(os.path.join(out, 'ckpt.pt'), 'rb').read()).hexdigest()
    p = run('train_dit.py', f'--data_dir={mnist_dir}', f'--out_dir={out}', '--batch_size=32', '--max_iters=30',
            '--init_from=resume', '--learning_rate=10', '--grad_clip=100', '--ckpt_interval=1000', *TINY_DIT, check=False)
    one_line_error(p, 'loss is', 'last good checkpoint')
    assert hashlib.sha256(open(os.path.join(out, 'ckpt.pt'), 'rb').read()).hexdigest() == digest


def test_in_training_evaluation_logs_quality_against_minutes(mnist_dir, tmp_path):
    """eval_interval runs evaluate.py on the EMA weights: eval.jsonl rows with accuracy, classifier-FID and the
    training minutes (evaluation time excluded), the same numbers evaluate.py gives by hand on those weights."""
    out, clf = str(tmp_path / 'eval'), str(tmp_path / 'clf.pt')
    p = run('train_dit.py', f'--data_dir={mnist_dir}', f'--out_dir={out}', '--batch_size=32', '--max_iters=40',
            '--eval_interval=20', '--eval_samples=60', f'--classifier_path={clf}', '--sample_interval=0', *TINY_DIT)
    rows = [json.loads(line) for line in open(os.path.join(out, 'eval.jsonl'))]
    assert [r['iter'] for r in rows] == [20, 40] and all(r['samples'] == 60 for r in rows)
    assert 0 < rows[0]['minutes'] < rows[1]['minutes'] < load_checkpoint(os.path.join(out, 'ckpt.pt'))['train_seconds'] / 60
    assert 'eval at iter 40' in p.stdout and not os.path.exists(os.path.join(out, 'eval_ckpt.pt'))
    Image.open(os.path.join(out, 'eval.png')).load()
    # the final evaluation saw the weights of the final checkpoint: evaluate.py by hand agrees to the digit
    by_hand = str(tmp_path / 'by_hand.json')
    run_here('evaluate.py', f'--ckpt={os.path.join(out, "ckpt.pt")}', f'--data_dir={mnist_dir}', '--num_samples=60',
             '--cfg=2.0', '--steps=2', '--inception=off', f'--classifier_path={clf}', f'--out_json={by_hand}', check=True)
    r = json.load(open(by_hand))['rows'][0]
    assert (r['acc'], round(r['fid_cls'], 6)) == (rows[1]['acc'], round(rows[1]['fid_cls'], 6))
    assert json.load(open(by_hand))['classifier_test_acc'] >= 0.95  # the judge itself knows the bars
    never = str(tmp_path / 'never')  # a folder has no judge of its own: one line before anything is read or written
    one_line_error(run_here('train_dit.py', '--dataset=folder', '--eval_interval=5', f'--out_dir={never}'),
                   '--eval_interval', '--judge=cifar10')
    assert not os.path.exists(never)


def planted_dit(shift):
    """A DiT whose velocity is a constant per class: v(x, t, y) = -5 T_(y + shift), T_k the bar of fake class k in
    [-1, 1], and 0 for the null class. Any sampler then ends on clamp(z + 5 cfg T) = T: a known-good generator
    (shift 0) or a known-wrong one (shift 1: every sample is the next class's bar)."""
    from model import DiT_Llama
    net = DiT_Llama(in_channels=1, input_size=28, patch_size=28, dim=16, n_layers=1, n_heads=1, num_classes=10,
                    stem_channels=8)
    templates = torch.full((10, 28 * 28), -0.8)  # the fake background (uint8 0..40 is about -0.84 .. -0.69)
    for k in range(10):
        templates[k].view(28, 28)[2 + 2 * k:5 + 2 * k, 3:25] = 1.0
    with torch.no_grad():
        for p in net.t_embedder.mlp[2].parameters():
            p.zero_()  # no time
        net.y_embedder.embedding.weight.zero_()
        net.y_embedder.embedding.weight[:10, :10] = 10 * torch.eye(10)  # class k -> 10 e_k, the null class -> 0
        mod = net.final_layer.adaLN_modulation[-1]
        mod.weight.zero_()
        mod.weight[:10, :10] = torch.eye(10)  # shift = silu(c), about 10 e_y
        mod.bias[16:] = -1.0  # scale = -1: the normalised tokens are multiplied by 1 + scale = 0
        net.final_layer.linear.weight.zero_()
        net.final_layer.linear.weight[:, :10] = -0.5 * templates.roll(-shift, 0).T
        net.final_layer.linear.bias.zero_()
    return net


@pytest.mark.parametrize('shift,expect', [(0, lambda acc: acc >= 0.95), (1, lambda acc: acc <= 0.15)])
def test_in_training_evaluation_judges_a_planted_checkpoint(mnist_dir, tmp_path, shift, expect):
    """The in-training evaluation of a checkpoint whose samples are known: the right bars score high, the bars of
    the next class score low (the judge looks at what was drawn, not at the label asked for)."""
    out = tmp_path / 'out'
    out.mkdir()
    net = planted_dit(shift)
    opt = torch.optim.AdamW(net.parameters())
    torch.save(dict(model_args=dict(in_channels=1, input_size=28, patch_size=28, dim=16, n_layers=1, n_heads=1,
                                    num_classes=10, p_uncond=0.1, qk_norm=True, stem_channels=8),
                    model=net.state_dict(), ema=net.state_dict(), optimizer=opt.state_dict(), iter_num=1000, epoch=0,
                    config={}, rng=[dict(cpu=torch.get_rng_state(), cuda=None)], train_seconds=60.0), out / 'ckpt.pt')
    # one step at a negligible learning rate from iteration 1000, so the final evaluation sees the planted weights
    run('train_dit.py', f'--data_dir={mnist_dir}', f'--out_dir={out}', '--init_from=resume', '--max_iters=1001',
        '--learning_rate=1e-9', '--batch_size=32', '--eval_interval=1000', '--eval_samples=100', '--sample_interval=0',
        f'--classifier_path={tmp_path.parent / "planted_clf.pt"}', '--sample_steps=2', '--download=False')
    rows = [json.loads(line) for line in open(out / 'eval.jsonl')]
    assert [r['iter'] for r in rows] == [1001] and rows[0]['samples'] == 100
    assert 1.0 <= rows[0]['minutes'] < 1.5  # the checkpoint's 60 s of training carry over
    assert expect(rows[0]['acc']), rows[0]


def test_the_design_cards_commands_as_typed(tmp_path):
    """`python train_dit.py --dataset=mnist`, then `python sample.py --steps=50 --cfg=2.0 --gif`, from a folder whose
    data/ holds MNIST: the first trains the device's preset (here the CPU's) into out/dit_mnist, and its first line
    says so; the second samples that model with no --out_dir. Only the length of training (and compile) is cut."""
    import subprocess
    import sys
    from conftest import ROOT, write_mnist
    write_mnist(str(tmp_path / 'data'))
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}
    train = subprocess.run([sys.executable, os.path.join(ROOT, 'train_dit.py'), '--dataset=mnist', '--max_iters=3',
                            '--compile=False'], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert train.returncode == 0, train.stderr
    assert train.stdout.startswith('preset: config/dit_mnist_cpu.py (no GPU found; --preset=gpu')
    ckpt = load_checkpoint(str(tmp_path / 'out' / 'dit_mnist' / 'ckpt.pt'))
    assert (ckpt['model_args']['patch_size'], ckpt['model_args']['stem_channels']) == (7, 16)  # the CPU preset's net
    assert ckpt['config']['max_iters'] == 3 and ckpt['config']['batch_size'] == 64
    assert 'Warning' not in train.stderr and 'CUDA' not in train.stdout + train.stderr
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'sample.py'), '--steps=50', '--cfg=2.0', '--gif'],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    out = tmp_path / 'out' / 'dit_mnist'
    assert Image.open(out / 'samples_euler50_cfg2.png').size == grid_size(10, 8, 28)
    assert Image.open(out / 'trajectory.gif').n_frames > 1
