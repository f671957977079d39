"""
Quality numbers for a flow checkpoint (sampled here, with the given solver, steps and cfg) or an .npz of samples.

    python evaluate.py --out_dir=out/class_cfg --data_dir=DIR                             # euler 50, cfg 2
    python evaluate.py --out_dir=out/dit_mnist --runs=euler:50:2,euler:10:2,heun:10:2,rk4:5:2
    python evaluate.py --npz=out/dit_mnist/samples.npz --dataset=mnist
    python evaluate.py --out_dir=out/dit_cifar10 --judge=cifar10 --judge_data_dir=data/cifar10-jpeg  # DiT on a folder

The judge is a small CNN classifier trained on the real training set the first time and cached
(out/classifier_<judge>.pt, with the training set's feature statistics and its test accuracy): for mnist and
fashion_mnist three conv blocks; for cifar10 three stages of two 3x3 convs, trained with random crops and flips.
--judge='' takes the dataset's own; a model trained on a folder of CIFAR-10 images (the JPEG stand-in) names it,
--judge=cifar10, and --judge_data_dir=DIR holding either cifar-10-batches-py/ or train/ and test/ with one folder
per class. It gives
  fid_cls  the Frechet distance between samples and the training set in its 128-d feature space,
  acc      the share of samples it recognises as the class they were asked for (class-conditional models).
The last row, 'real', scores as many held-out real test images the same way: the floor a sample can reach.
fid_inception is the usual FID on Inception-v3 pool features (torchvision's ImageNet weights, so not the TF
weights papers use) when the weights file is on disk; offline, supply it with --inception_weights=PATH.
nfe counts network evaluations per sample (cfg evaluates them on a doubled batch); s/sample is wall time.
A MeanFlow checkpoint (train_dit.py --objective=meanflow) samples by its own jump, 1 step unless --steps says
otherwise (--runs=meanflow:1,meanflow:2), with its guidance trained in: no cfg, one evaluation a step.
Writes out_json (default out_dir/eval.json) and prints one table.
"""
import json
import os
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

import torch.nn as nn

from model import (NFE_PER_STEP, check_choices, check_out_dir, cosine_lr, die, load_dataset, load_flow_model,
                   pick_attention, resize, sample, sample_mean_flow, setup_precision, to_model_range, to_uint8)

# -----------------------------------------------------------------------------
out_dir = 'out/class_cfg'
ckpt = ''  # '' = out_dir/ckpt.pt
npz = ''  # evaluate these samples (arr_0 uint8 NxHxWxC, arr_1 labels) instead of sampling a checkpoint
dataset = ''  # '' = the checkpoint's dataset (for an npz: the judge's, else mnist)
data_dir = 'data'
num_samples = 1000
solver = ''  # euler | midpoint | heun | rk4 | meanflow (MeanFlow's jump); '': euler, or meanflow for a MeanFlow model
steps = None  # None: 50, or 1 for a MeanFlow model
cfg = None  # guidance of the runs that name none; None: 2.0, or none at all for an unconditional or MeanFlow model
shift = 1.0
runs = ''  # several settings in one table: 'solver:steps:cfg,...', e.g. 'euler:50:2,heun:10:2'
batch_size = 64  # samples per network call (x2 with cfg): small batches stay in the CPU's cache
seed = 0
use_ema = True
judge = ''  # the classifier of fid_cls and acc: '' = the dataset's own (none for a folder) | mnist | fashion_mnist | cifar10
judge_data_dir = ''  # '' = data_dir: the judge's train and test images (cifar10: the pickles, or train/ and test/ class folders)
classifier_path = ''  # '' = out/classifier_<judge>.pt (trained once, then reused)
classifier_epochs = 0  # 0: the judge's recipe (4 for mnist, fashion_mnist; 15 for cifar10)
inception = 'auto'  # auto: Inception FID when the weights are found | on: required | off
inception_weights = ''  # '' = torchvision's cache (TORCH_HOME/hub/checkpoints/inception_v3_google-0cc3c7bd.pth)
num_ref = 10000  # training images for the Inception reference statistics
inception_stats = ''  # '' = out/inception_stats_<dataset>_<num_ref>.npz (computed once, then reused)
out_json = ''  # '' = out_dir/eval.json
device = 'auto'
dtype = 'bfloat16'  # bfloat16 (autocast) | float32
attention = 'auto'  # sdpa | math (softmax written out) | kernels (CPU kernels) | auto: as model.pick_attention says
config_domains = dict(  # each number's domain: a kind of configurator.py (count >= 1, count0 >= 0, ...) or a range
    num_samples='count', steps='count', cfg='nonneg', shift='positive', batch_size='count', seed='seed',
    classifier_epochs='count0', num_ref='count')
config_keys = [k for k, v in globals().items()  # the settings configurator.py may change, as nanoGPT declares them
               if not k.startswith('_') and k.islower() and isinstance(v, (bool, int, float, str, tuple, list, type(None)))]
if __name__ == '__main__':  # imported (by the tests), this file gives the metrics below and reads no argv
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------

CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
INCEPTION_URL = 'https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth'


class Classifier(nn.Module):
    """A judge for 32x32 images in [-1, 1]: `features` end in the 128-d space of the classifier-FID, the head's logits
    score whether a sample shows the class it was asked for."""

    def __init__(self, features, num_classes):
        super().__init__()
        self.features, self.head = features, nn.Linear(128, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def mnist_classifier(num_classes):
    """1 channel: three conv-BN-ReLU-pool blocks (32, 64, 128 channels), then two dense layers."""
    block = lambda c_in, c_out: [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
    return Classifier(nn.Sequential(*block(1, 32), *block(32, 64), *block(64, 128), nn.Flatten(),
                                    nn.Dropout(0.3), nn.Linear(128 * 4 * 4, 128), nn.ReLU()), num_classes)


def cifar_classifier(num_classes):
    """3 channels: three stages of two 3x3 conv-BN-ReLU and a 2x2 max-pool (32, 64, 128 channels), a global average pool."""
    conv = lambda c_in, c_out: [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    stage = lambda c_in, c_out: [*conv(c_in, c_out), *conv(c_out, c_out), nn.MaxPool2d(2)]
    return Classifier(nn.Sequential(*stage(3, 32), *stage(32, 64), *stage(64, 128), nn.AdaptiveAvgPool2d(1),
                                    nn.Flatten()), num_classes)


# each judge's network and training: AdamW at lr 2e-3, batch 128, warm-up then cosine decay; cifar10 on random crops
# (zero padding 4) and flips, with label smoothing, under bf16 autocast (as --dtype), which trains it faster
RECIPES = {'mnist': dict(net=mnist_classifier, channels=1, epochs=4, weight_decay=1e-4, smoothing=0.0, augment=False,
                         autocast=False),
           'cifar10': dict(net=cifar_classifier, channels=3, epochs=15, weight_decay=5e-2, smoothing=0.1, augment=True,
                           autocast=True)}
RECIPES['fashion_mnist'] = RECIPES['mnist']


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), with Tr (S1 S2)^(1/2) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2)))."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    w, U = np.linalg.eigh(sigma1)
    sqrt1 = (U * np.sqrt(w.clip(min=0))) @ U.T
    tr_covmean = np.sqrt(np.linalg.eigvalsh(sqrt1 @ sigma2 @ sqrt1).clip(min=0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def feature_stats(f):
    """Mean and covariance of features [N, D] (the Gaussian that FID compares)."""
    f = np.asarray(f, dtype=np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def parse_runs():
    """[(solver, steps, cfg)] from --runs, or the one setting of --solver/--steps/--cfg."""
    if not runs:
        return [(solver, steps, cfg)]
    out = []
    for r in runs.split(','):
        parts = r.split(':')
        try:
            s, n, g = parts[0], int(parts[1]), float(parts[2]) if len(parts) > 2 else None
        except (IndexError, ValueError):
            die(f"bad run {r!r} in --runs: write solver:steps:cfg, e.g. heun:10:2")
        out.append((s, n, g))
    return out


def load_real(train):
    return load_dataset(dataset, data_dir, train,
                        hint=f': evaluate.py needs the real {dataset} data, pass --data_dir=DIR')


def judge_images(train):
    """The judge's training or test set, from judge_data_dir in its dataset's format; for cifar10 also from class
    folders train/ and test/ (the JPEG stand-in), whose sorted names are CIFAR-10's label order, as ImageFolder reads them."""
    root = judge_data_dir or data_dir
    hint = f': the {judge} judge trains and tests on them, pass --judge_data_dir=DIR (or --data_dir=DIR)'
    if judge != 'cifar10' or os.path.isdir(os.path.join(root, 'cifar-10-batches-py')):
        return load_dataset(judge, root, train, hint=hint)
    split = os.path.join(root, 'train' if train else 'test')
    if not os.path.isdir(split):
        die(f'no cifar-10-batches-py/ and no {"train" if train else "test"}/ class folders in {root}: the cifar10 '
            f'judge reads one of them, pass --judge_data_dir=DIR (e.g. the unpacked JPEG stand-in)')
    classes = tuple(sorted(e.name for e in os.scandir(split) if e.is_dir()))
    if classes != CIFAR10_CLASSES:
        die(f'{split} holds the class folders {", ".join(classes) or "(none)"}, not CIFAR-10\'s {", ".join(CIFAR10_CLASSES)}')
    x, y = load_dataset('folder', split, image_size=32, hint=hint)
    if x.shape[1] != 3:
        die(f'{split} holds greyscale images: the cifar10 judge reads RGB')
    return x, y


def crop_flip(x, pad=4):
    """A random crop of each image zero-padded by `pad` on every side, mirrored left-right half the time."""
    B, C, H, W = x.shape
    ar = lambda n: torch.arange(n, device=x.device)
    dy, dx = torch.randint(0, 2 * pad + 1, (2, B, 1), device=x.device)
    rows, cols = dy + ar(H), dx + ar(W)
    cols = torch.where(torch.rand(B, 1, device=x.device) < 0.5, cols.flip(1), cols)
    return F.pad(x, (pad,) * 4)[ar(B)[:, None, None, None], ar(C)[None, :, None, None], rows[:, None, :, None],
                                cols[:, None, None, :]]


@torch.no_grad()
def classifier_features(net, x_uint8_nhwc=None, x=None):
    """Penultimate features and logits of the classifier for uint8 NHWC images (or [-1, 1] NCHW x)."""
    if x is None:
        x = to_model_range(torch.from_numpy(x_uint8_nhwc).permute(0, 3, 1, 2))
    feats, logits = [], []
    for i in range(0, len(x), 1000):
        xb = resize(x[i:i + 1000].to(device).float(), 32)
        f = net.features(xb)
        feats.append(f.cpu())
        logits.append(net.head(f).cpu())
    return torch.cat(feats).numpy(), torch.cat(logits)


def train_classifier(path):
    """Train the judge on its real training set, check it on the test set, cache it with the train feature stats."""
    check_out_dir(os.path.dirname(os.path.abspath(path)), 'classifier_path')  # before the training, not after it
    r = RECIPES[judge]
    x, y = judge_images(True)
    x_test, y_test = judge_images(False)
    x, x_test = resize(to_model_range(x), 32), resize(to_model_range(x_test), 32)
    torch.manual_seed(seed)
    net = r['net'](int(y.max()) + 1).to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=r['weight_decay'])
    B, epochs = 128, classifier_epochs or r['epochs']
    iters = epochs * (len(x) // B)
    if iters == 0:
        die(f'the {judge} judge needs at least {B} training images, found {len(x)}')
    t0 = time.time()
    for it in range(iters):
        if it % (len(x) // B) == 0:
            perm = torch.randperm(len(x))
        idx = perm[(it % (len(x) // B)) * B:(it % (len(x) // B) + 1) * B]
        for g in opt.param_groups:
            g['lr'] = cosine_lr(it, 2e-3, 1e-5, min(100, iters // 10), iters)
        xb = x[idx].to(device)
        xb = (crop_flip(xb) if r['augment'] else xb).contiguous(memory_format=torch.channels_last)
        with ctx if r['autocast'] else nullcontext():
            loss = F.cross_entropy(net(xb), y[idx].to(device), label_smoothing=r['smoothing'])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (it + 1) % 200 == 0 or it + 1 == iters:
            el = time.time() - t0
            print(f'classifier iter {it + 1}/{iters} | loss {loss.item():.4f} | {(it + 1) * B / el:.0f} img/s | '
                  f'ETA {(iters - it - 1) * el / (it + 1):.0f}s', flush=True)
    net.eval()
    _, logits = classifier_features(net, x=x_test)
    test_acc = (logits.argmax(1) == y_test).float().mean().item()
    feats, _ = classifier_features(net, x=x)
    mu, sigma = feature_stats(feats)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(dict(model=net.state_dict(), num_classes=net.head.out_features, test_acc=test_acc, dataset=judge,
                    mu=mu, sigma=sigma), path)
    print(f'classifier: {test_acc * 100:.2f} % test accuracy on {judge}, cached at {path}')
    return net, test_acc, mu, sigma


def get_classifier():
    path = classifier_path or os.path.join('out', f'classifier_{judge}.pt')
    if not os.path.isfile(path):
        return train_classifier(path)
    try:
        c = torch.load(path, map_location='cpu', weights_only=False)
        if c.get('dataset') != judge:
            die(f'{path} is a classifier of {c.get("dataset")!r}, not {judge!r}: pass another --classifier_path')
        net = RECIPES[judge]['net'](c['num_classes'])
        net.load_state_dict(c['model'])
    except Exception as e:  # cut short, or not this script's cache
        die(f'cannot read the cached classifier {path} ({type(e).__name__}): delete it to train the judge again, or '
            f'pass another --classifier_path')
    return net.to(device).eval(), c['test_acc'], c['mu'], c['sigma']


def get_inception():
    """Inception-v3 up to its 2048-d pool features, or None (with a one-line note) when the weights are missing."""
    if inception == 'off':
        return None
    path = inception_weights or os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(INCEPTION_URL))
    if not os.path.isfile(path):
        msg = (f'no Inception-v3 weights at {path} (this machine cannot download them): fetch {INCEPTION_URL} '
               f'elsewhere and pass --inception_weights=PATH')
        if inception == 'on' or inception_weights:
            die(msg)
        print(f'note: Inception FID skipped; {msg}')
        return None
    from torchvision.models import inception_v3
    net = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)
    try:
        net.load_state_dict(torch.load(path, map_location='cpu', weights_only=True))
    except Exception as e:
        die(f'{path} is not torchvision Inception-v3 weights ({type(e).__name__})')
    net.fc = torch.nn.Identity()
    return net.to(device).eval()


@torch.no_grad()
def inception_features(net, x_uint8_nhwc):
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
    feats = []
    for i in range(0, len(x_uint8_nhwc), 200):  # converted and resized on the device
        x = torch.from_numpy(x_uint8_nhwc[i:i + 200]).to(device).permute(0, 3, 1, 2).float() / 255
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # grey -> RGB
        x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
        feats.append(net((x - mean) / std).float().cpu())
    return torch.cat(feats).numpy()


def inception_reference(net):
    """Inception statistics of num_ref training images, cached next to the classifier cache."""
    path = inception_stats or os.path.join('out', f'inception_stats_{dataset}_{num_ref}.npz')
    if os.path.isfile(path):
        try:
            d = np.load(path)
            return d['mu'], d['sigma']
        except Exception as e:  # cut short, or not this script's cache
            die(f'cannot read the cached Inception statistics {path} ({type(e).__name__}): delete it to compute them '
                f'again, or pass another --inception_stats')
    check_out_dir(os.path.dirname(os.path.abspath(path)), 'inception_stats')  # before the work, not after it
    x, _ = load_real(True)
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:num_ref]]
    mu, sigma = feature_stats(inception_features(net, x.permute(0, 2, 3, 1).numpy()))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, mu=mu, sigma=sigma)
    return mu, sigma


def score(x, y):
    """fid_cls, acc (given labels y) and fid_inception of uint8 NHWC images; None where there is no judge or Inception."""
    out = dict(fid_cls=None, acc=None, fid_inception=None)
    if classifier is not None:
        net, _, mu, sigma = classifier
        feats, logits = classifier_features(net, x)
        out['fid_cls'] = frechet_distance(*feature_stats(feats), mu, sigma)
        if y is not None:
            out['acc'] = (logits.argmax(1).numpy() == y).mean().item()
    if inception_net is not None:
        out['fid_inception'] = frechet_distance(*feature_stats(inception_features(inception_net, x)), *inception_ref)
    return out


@torch.no_grad()
def generate(s, n_steps, g):
    """num_samples samples in batches, classes 0..K-1 in turn; the same noise for every setting (seeded)."""
    C, S = model.in_channels, model.input_size
    xs, ys, t0 = [], [], time.time()
    for i in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - i)
        z = torch.randn(n, C, S, S, generator=torch.Generator().manual_seed(seed + 1000 + i)).to(device)
        y = (torch.arange(n, device=device) + i) % num_classes if num_classes else None
        with ctx:
            if mean_flow:
                x = sample_mean_flow(model, z, y, steps=n_steps, shift=shift)
            else:
                x = sample(model, z, y, steps=n_steps, cfg=g if num_classes else 1.0, solver=s, shift=shift)
        xs.append(to_uint8(x.float()))
        ys.append(y.cpu().numpy() if y is not None else np.zeros(n, dtype=np.int64))
        done, el = i + n, time.time() - t0
        print(f'  {s} {n_steps} steps{"" if mean_flow else f" cfg {g:g}"}: {done}/{num_samples} samples | {done / el:.1f} samples/s | '
              f'ETA {(num_samples - done) * el / done:.0f}s', flush=True)
    return np.concatenate(xs), np.concatenate(ys), (time.time() - t0) / num_samples


if __name__ == '__main__':
    check_choices(dtype=(dtype, ('bfloat16', 'float32')), attention=(attention, ('auto', 'sdpa', 'math', 'kernels')),
                  device=(device, ('auto', 'cpu', 'cuda')), inception=(inception, ('auto', 'on', 'off')),
                  judge=(judge, ('', *RECIPES)))
    device = ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device
    if device == 'cuda' and not torch.cuda.is_available():
        die('device=cuda but no GPU is visible: use --device=cpu (or auto)')
    ctx, dtype = setup_precision(device, dtype)  # TF32 on GPUs; bf16 autocast where the device has it

    out_json = out_json or (os.path.splitext(npz)[0] + '_eval.json' if npz else os.path.join(out_dir, 'eval.json'))
    check_out_dir(os.path.dirname(os.path.abspath(out_json)),  # before any work; named as the user set it
                  'out_json' if 'out_json' in config_given else 'npz' if npz else 'out_dir')
    settings = parse_runs()
    cfg_given = cfg is not None or any(g is not None for _, _, g in settings)
    settings = [(s, n, (2.0 if cfg is None else cfg) if g is None else g) for s, n, g in settings]
    for s, n, g in settings:
        if s not in ('', *NFE_PER_STEP, 'meanflow'):
            die(f"unknown solver {s!r}: choose one of {', '.join(NFE_PER_STEP)} or meanflow")
        if n is not None and not 1 <= n <= 10 ** 7:
            die(f'steps must be at least 1 (and at most 10000000), got {n}')
        if not 0 <= g <= 100:  # False for nan too
            die(f'cfg {g!r} in --runs: must be a number >= 0 (and <= 100)')

    # what to evaluate: a model to sample, or a fixed set of samples
    model, num_classes, mean_flow = None, 0, False
    if npz:
        if not os.path.isfile(npz):
            die(f'no .npz at {npz}')
        try:
            data = np.load(npz)
            names = list(data.keys())
        except Exception as e:
            die(f'{npz} is not an .npz of samples with arr_0 (uint8 NxHxWxC): {type(e).__name__}')
        if 'arr_0' not in names:
            die(f'{npz} holds no arr_0, the samples (uint8 NxHxWxC), but {", ".join(names) or "nothing"}: write it '
                f'with sample.py --save_npz')
        try:
            x_npz, y_npz = data['arr_0'], data['arr_1'] if 'arr_1' in names else None
        except Exception as e:  # a member cut short, or pickled objects
            die(f'cannot read arr_0 / arr_1 of {npz} ({type(e).__name__}): write it again with sample.py --save_npz')
        if x_npz.dtype != np.uint8 or x_npz.ndim != 4 or not len(x_npz):
            die(f'{npz}: arr_0 must be uint8 NxHxWxC with N >= 1, got {x_npz.dtype} {x_npz.shape}')
        if y_npz is not None and (y_npz.shape != x_npz.shape[:1] or y_npz.dtype.kind not in 'iu' or y_npz.min() < 0):
            die(f'{npz}: arr_1 must hold one class label (an integer >= 0) per sample of arr_0, got {y_npz.dtype} '
                f'{y_npz.shape} for {len(x_npz)} samples')
        dataset, channels = dataset or judge or 'mnist', x_npz.shape[3]
        num_classes = int(y_npz.max()) + 1 if y_npz is not None and len(np.unique(y_npz)) > 1 else 0
        settings = [('npz', None, None)]  # samples made elsewhere: no steps, NFE or cfg of ours to report
    else:
        ckpt_path = ckpt or os.path.join(out_dir, 'ckpt.pt')
        model, checkpoint = load_flow_model(ckpt_path, device, use_ema,
                                            attention=pick_attention(attention, device.split(':')[0], dtype))
        dataset = dataset or checkpoint.get('config', {}).get('dataset', 'mnist')
        num_classes, channels = model.num_classes, model.in_channels
        if not num_classes and cfg_given:
            die(f'{ckpt_path} is an unconditional model: guidance needs classes, drop cfg (--cfg, a config file, the cfg in --runs)')
        mean_flow = checkpoint['model_args'].get('mean_flow', False)  # MeanFlow: its own jump, one evaluation a step
        if mean_flow and (cfg_given or any(s not in ('', 'meanflow') for s, _, _ in settings)):
            die(f'{ckpt_path} is a MeanFlow model: it samples by its own jump with its guidance trained in; drop cfg and '
                f'solvers (--cfg, --solver, a config file, --runs=meanflow:STEPS)')
        if not mean_flow and any(s == 'meanflow' for s, _, _ in settings):
            die(f'{ckpt_path} is a flow model, not MeanFlow: choose the solver {" | ".join(NFE_PER_STEP)}')
        del checkpoint
    if not npz:
        settings = [(s or ('meanflow' if mean_flow else 'euler'), n or (1 if mean_flow else 50), g) for s, n, g in settings]

    judge = judge or (dataset if dataset in RECIPES else '')
    if not judge:
        print(f'note: no classifier metrics for {dataset}: name the judge of its images, --judge='
              f'{" | ".join(RECIPES)} (a folder of CIFAR-10 images: --judge=cifar10 --judge_data_dir=DIR)')
    elif channels != RECIPES[judge]['channels']:
        die(f'the {judge} judge reads {RECIPES[judge]["channels"]}-channel images, these samples have {channels}: '
            f'pass another --judge')
    classifier = get_classifier() if judge else None
    if classifier is not None and num_classes > classifier[0].head.out_features:
        die(f'the model draws {num_classes} classes, the {judge} judge knows {classifier[0].head.out_features}')
    inception_net = get_inception()
    inception_ref = inception_reference(inception_net) if inception_net is not None else None

    if model is not None:  # one untimed batch first: lazy initialisation (and any compile) stays out of s/sample
        with torch.no_grad(), ctx:
            z = torch.randn(min(batch_size, num_samples), model.in_channels, model.input_size, model.input_size, device=device)
            sample(model, z, torch.zeros(len(z), dtype=torch.long, device=device) if num_classes else None, steps=1)
    rows = []
    for s, n_steps, g in settings:
        if npz:
            x, y, sec = x_npz, y_npz, float('nan')
        else:
            x, y, sec = generate(s, n_steps, g)
        per_step = 1 if mean_flow else NFE_PER_STEP.get(s, 0)  # network evaluations a step
        rows.append(dict(solver=s, steps=n_steps, nfe=n_steps and n_steps * per_step,
                         cfg=g if num_classes and not mean_flow else None,
                         num_samples=len(x), sec_per_sample=sec, **score(x, y if num_classes else None)))
    real = None
    if classifier is not None:  # the floor: as many held-out real test images, scored the same way
        x_test, y_test = judge_images(False)
        idx = torch.randperm(len(x_test), generator=torch.Generator().manual_seed(seed))[:rows[0]['num_samples']]
        real = dict(solver='real', steps=None, nfe=None, cfg=None, num_samples=len(idx), sec_per_sample=None,
                    **score(x_test[idx].permute(0, 2, 3, 1).numpy(), y_test[idx].numpy()))

    result = dict(source=npz or ckpt_path, dataset=dataset, judge=judge or None,
                  classifier_test_acc=classifier[1] if classifier else None, dtype=dtype, shift=shift, rows=rows,
                  real_test=real)
    os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
    with open(out_json, 'w') as f:
        json.dump(result, f, indent=1)

    fmt = lambda v, p: '-' if v is None or v != v else f'{v:.{p}f}'
    print(f'\n{result["source"]} on {dataset}, {rows[0]["num_samples"]} samples' +
          (f'; classifier test accuracy {classifier[1] * 100:.2f} %' if classifier else ''))
    print(f'{"solver":>8} {"steps":>5} {"NFE":>4} {"cfg":>5} {"FID-cls":>8} {"acc %":>6} {"FID-incep":>9} {"s/sample":>9}')
    for r in rows + ([real] if real else []):
        print(f'{r["solver"]:>8} {fmt(r["steps"], 0):>5} {fmt(r["nfe"], 0):>4} {fmt(r["cfg"], 1):>5} '
              f'{fmt(r["fid_cls"], 3):>8} {fmt(r["acc"] and r["acc"] * 100, 1):>6} {fmt(r["fid_inception"], 2):>9} '
              f'{fmt(r["sec_per_sample"], 4):>9}')
    if real:
        print(f'real: {real["num_samples"]} held-out {judge} test images, the floor a sample can reach')
    if mean_flow:
        print('MeanFlow: one network evaluation a step, its guidance trained in (no doubled batch)')
    print(f'wrote {out_json}')
