"""
Quality numbers for a flow checkpoint (sampled here, with the given solver, steps and cfg) or an .npz of samples.

    python evaluate.py --out_dir=out/class_cfg --data_dir=../shared/data                  # euler 50, cfg 2
    python evaluate.py --out_dir=out/dit_mnist --runs=euler:50:2,euler:10:2,heun:10:2,rk4:5:2
    python evaluate.py --npz=out/dit_mnist/samples.npz --dataset=mnist

For MNIST-like data (mnist, fashion_mnist) a small CNN classifier is trained on the real training set the
first time and cached (out/classifier_<dataset>.pt, with the training set's feature statistics); it gives
  fid_cls  the Frechet distance between samples and the training set in its 128-d feature space,
  acc      the share of samples it recognises as the class they were asked for (class-conditional models).
fid_inception is the usual FID on Inception-v3 pool features (torchvision's ImageNet weights, so not the TF
weights papers use) when the weights file is on disk; offline, supply it with --inception_weights=PATH.
nfe counts network evaluations per sample (cfg evaluates them on a doubled batch); s/sample is wall time.
Writes out_json (default out_dir/eval.json) and prints one table.
"""
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

import torch.nn as nn

from model import (NFE_PER_STEP, check_choices, cosine_lr, die, load_dataset, load_flow_model, resize, sample,
                   setup_precision, to_model_range, to_uint8, use_sdpa)

# -----------------------------------------------------------------------------
out_dir = 'out/class_cfg'
ckpt = ''  # '' = out_dir/ckpt.pt
npz = ''  # evaluate these samples (arr_0 uint8 NxHxWxC, arr_1 labels) instead of sampling a checkpoint
dataset = ''  # '' = the checkpoint's dataset (mnist for an npz)
data_dir = 'data'
num_samples = 1000
solver = 'euler'
steps = 50
cfg = None  # guidance of the runs that name none; None: 2.0, or none at all for an unconditional model
shift = 1.0
runs = ''  # several settings in one table: 'solver:steps:cfg,...', e.g. 'euler:50:2,heun:10:2'
batch_size = 64  # samples per network call (x2 with cfg): small batches stay in the CPU's cache
seed = 0
use_ema = True
classifier_path = ''  # '' = out/classifier_<dataset>.pt (trained once, then reused)
classifier_epochs = 4
inception = 'auto'  # auto: Inception FID when the weights are found | on: required | off
inception_weights = ''  # '' = torchvision's cache (TORCH_HOME/hub/checkpoints/inception_v3_google-0cc3c7bd.pth)
num_ref = 10000  # training images for the Inception reference statistics
inception_stats = ''  # '' = out/inception_stats_<dataset>_<num_ref>.npz (computed once, then reused)
out_json = ''  # '' = out_dir/eval.json
device = 'auto'
dtype = 'bfloat16'  # bfloat16 (autocast) | float32
attention = 'auto'  # sdpa | math (explicit softmax) | auto: math for bf16 on a CPU, else sdpa (as train_dit.py)
config_domains = dict(  # each number's domain: a kind of configurator.py (count >= 1, count0 >= 0, ...) or a range
    num_samples='count', steps='count', cfg='nonneg', shift='positive', batch_size='count', seed='seed',
    classifier_epochs='count', num_ref='count')
config_keys = [k for k, v in globals().items()  # the settings configurator.py may change, as nanoGPT declares them
               if not k.startswith('_') and k.islower() and isinstance(v, (bool, int, float, str, tuple, list, type(None)))]
if __name__ == '__main__':  # imported (by the tests), this file gives the metrics below and reads no argv
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------

MNIST_LIKE = ('mnist', 'fashion_mnist')
INCEPTION_URL = 'https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth'


class MnistClassifier(nn.Module):
    """A small CNN for 1x32x32 images in [-1, 1]: its 128-d penultimate layer is the feature space of the
    classifier-FID, its logits score whether a sample shows the class it was asked for."""

    def __init__(self, num_classes=10):
        super().__init__()
        block = lambda c_in, c_out: [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*block(1, 32), *block(32, 64), *block(64, 128), nn.Flatten(),
                                      nn.Dropout(0.3), nn.Linear(128 * 4 * 4, 128), nn.ReLU())
        self.head = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


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
    """Train the CNN on the real training set, check it on the test set, cache it with the train feature stats."""
    x, y = load_real(True)
    x_test, y_test = load_real(False)
    x, x_test = resize(to_model_range(x), 32), resize(to_model_range(x_test), 32)
    torch.manual_seed(seed)
    net = MnistClassifier(int(y.max()) + 1).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    B = 128
    iters = classifier_epochs * (len(x) // B)
    t0 = time.time()
    for it in range(iters):
        if it % (len(x) // B) == 0:
            perm = torch.randperm(len(x))
        idx = perm[(it % (len(x) // B)) * B:(it % (len(x) // B) + 1) * B]
        for g in opt.param_groups:
            g['lr'] = cosine_lr(it, 2e-3, 1e-5, min(100, iters // 10), iters)
        loss = F.cross_entropy(net(x[idx].to(device)), y[idx].to(device))
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
    torch.save(dict(model=net.state_dict(), num_classes=net.head.out_features, test_acc=test_acc, dataset=dataset,
                    mu=mu, sigma=sigma), path)
    print(f'classifier: {test_acc * 100:.2f} % test accuracy on {dataset}, cached at {path}')
    return net, test_acc, mu, sigma


def get_classifier():
    path = classifier_path or os.path.join('out', f'classifier_{dataset}.pt')
    if not os.path.isfile(path):
        return train_classifier(path)
    c = torch.load(path, map_location='cpu', weights_only=False)
    if c.get('dataset') != dataset:
        die(f'{path} is a classifier of {c.get("dataset")!r}, not {dataset!r}: pass another --classifier_path')
    net = MnistClassifier(c['num_classes'])
    net.load_state_dict(c['model'])
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
        d = np.load(path)
        return d['mu'], d['sigma']
    x, _ = load_real(True)
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:num_ref]]
    mu, sigma = feature_stats(inception_features(net, x.permute(0, 2, 3, 1).numpy()))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, mu=mu, sigma=sigma)
    return mu, sigma


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
            x = sample(model, z, y, steps=n_steps, cfg=g if num_classes else 1.0, solver=s, shift=shift)
        xs.append(to_uint8(x.float()))
        ys.append(y.cpu().numpy() if y is not None else np.zeros(n, dtype=np.int64))
        done, el = i + n, time.time() - t0
        print(f'  {s} {n_steps} steps cfg {g:g}: {done}/{num_samples} samples | {done / el:.1f} samples/s | '
              f'ETA {(num_samples - done) * el / done:.0f}s', flush=True)
    return np.concatenate(xs), np.concatenate(ys), (time.time() - t0) / num_samples


if __name__ == '__main__':
    check_choices(dtype=(dtype, ('bfloat16', 'float32')), attention=(attention, ('auto', 'sdpa', 'math')),
                  device=(device, ('auto', 'cpu', 'cuda')), inception=(inception, ('auto', 'on', 'off')))
    device = ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device
    if device == 'cuda' and not torch.cuda.is_available():
        die('device=cuda but no GPU is visible: use --device=cpu (or auto)')
    ctx, dtype = setup_precision(device, dtype)  # TF32 on GPUs; bf16 autocast where the device has it

    settings = parse_runs()
    cfg_given = cfg is not None or any(g is not None for _, _, g in settings)
    settings = [(s, n, (2.0 if cfg is None else cfg) if g is None else g) for s, n, g in settings]
    for s, n, g in settings:
        if s not in NFE_PER_STEP:
            die(f"unknown solver {s!r}: choose one of {', '.join(NFE_PER_STEP)}")
        if not 1 <= n <= 10 ** 7:
            die(f'steps must be at least 1 (and at most 10000000), got {n}')
        if not 0 <= g <= 100:  # False for nan too
            die(f'cfg {g!r} in --runs: must be a number >= 0 (and <= 100)')

    # what to evaluate: a model to sample, or a fixed set of samples
    model, num_classes = None, 0
    if npz:
        if not os.path.isfile(npz):
            die(f'no .npz at {npz}')
        try:
            data = np.load(npz)
            x_npz, y_npz = data['arr_0'], data['arr_1'] if 'arr_1' in data else None
        except Exception as e:
            die(f'{npz} is not an .npz of samples with arr_0 (uint8 NxHxWxC): {type(e).__name__}')
        if x_npz.dtype != np.uint8 or x_npz.ndim != 4:
            die(f'{npz}: arr_0 must be uint8 NxHxWxC, got {x_npz.dtype} {x_npz.shape}')
        dataset = dataset or 'mnist'
        num_classes = int(y_npz.max()) + 1 if y_npz is not None and len(np.unique(y_npz)) > 1 else 0
        settings = [('npz', 0, float('nan'))]
    else:
        ckpt_path = ckpt or os.path.join(out_dir, 'ckpt.pt')
        model, checkpoint = load_flow_model(ckpt_path, device, use_ema,
                                            sdpa=use_sdpa(attention, device.split(':')[0], dtype))
        dataset = dataset or checkpoint.get('config', {}).get('dataset', 'mnist')
        num_classes = model.num_classes
        if not num_classes and cfg_given:
            die(f'{ckpt_path} is an unconditional model: guidance needs classes, drop cfg (--cfg, a config file, the cfg in --runs)')
        del checkpoint

    classifier = get_classifier() if dataset in MNIST_LIKE else None
    if classifier is None:
        print(f'note: no classifier metrics for {dataset} (they are defined for {", ".join(MNIST_LIKE)})')
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
        row = dict(solver=s, steps=n_steps, nfe=n_steps * NFE_PER_STEP.get(s, 0), cfg=g if num_classes else None,
                   num_samples=len(x), sec_per_sample=sec, fid_cls=None, acc=None, fid_inception=None)
        if classifier is not None:
            net, _, mu, sigma = classifier
            feats, logits = classifier_features(net, x)
            row['fid_cls'] = frechet_distance(*feature_stats(feats), mu, sigma)
            if num_classes and y is not None:
                row['acc'] = (logits.argmax(1).numpy() == y).mean().item()
        if inception_net is not None:
            row['fid_inception'] = frechet_distance(*feature_stats(inception_features(inception_net, x)), *inception_ref)
        rows.append(row)

    result = dict(source=npz or ckpt_path, dataset=dataset, classifier_test_acc=classifier[1] if classifier else None,
                  dtype=dtype, shift=shift, rows=rows)
    out_json = out_json or (os.path.splitext(npz)[0] + '_eval.json' if npz else os.path.join(out_dir, 'eval.json'))
    os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
    with open(out_json, 'w') as f:
        json.dump(result, f, indent=1)

    fmt = lambda v, p: '-' if v is None or v != v else f'{v:.{p}f}'
    print(f'\n{result["source"]} on {dataset}, {rows[0]["num_samples"]} samples' +
          (f'; classifier test accuracy {classifier[1] * 100:.2f} %' if classifier else ''))
    print(f'{"solver":>8} {"steps":>5} {"NFE":>4} {"cfg":>5} {"FID-cls":>8} {"acc %":>6} {"FID-incep":>9} {"s/sample":>9}')
    for r in rows:
        print(f'{r["solver"]:>8} {r["steps"]:>5} {r["nfe"]:>4} {fmt(r["cfg"], 1):>5} {fmt(r["fid_cls"], 3):>8} '
              f'{fmt(r["acc"] and r["acc"] * 100, 1):>6} {fmt(r["fid_inception"], 2):>9} {fmt(r["sec_per_sample"], 4):>9}')
    print(f'wrote {out_json}')
