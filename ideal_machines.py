"""
The "ideal score machines" of Kamb & Ganguli (arXiv:2412.20292) beside a trained flow network (equations:
docs/ideal_machines.md). Each machine estimates x0_hat from the training set alone, hence v = (x_t - x0_hat) / t,
integrated with the network's solver and grid; weights ∝ exp(-||q - (1 - t) k||^2 / (2 t^2)) average k's centre pixel.
  IS     q = the whole image (it can only return a training image);  LS  q = the P x P patch (zero padding), k = the
  patch at the same place;  ELS  q circular, k = every patch fully inside an image (circular networks);  bbELS  zero
  padding, interior patches against all interior ones, border patches only against the same borders at the same depths.

    python ideal_machines.py --data_dir=DIR --ckpt=out/flow_unet/ckpt.pt              # calibrate P(t), then compare
    python ideal_machines.py --patch_schedule=out/ideal/patch_schedule.json            # reuse a calibration

P(t) is calibrated per machine as the paper does (cosine of eps_hat with the network's eps along its own sampler).
Writes under out_dir: patch_schedule.json, schedule.png, compare.png (rows: noise, network, machines, nearest training
image; a column per noise) and compare.json (median over noises of the Pearson r with the network, the paper's number;
1 - SSE/SST and MSE beside it). The training set streams through an online softmax: memory does not grow with N.
"""
import json
import os
import time

import torch
import torch.nn.functional as F

MACHINES = ('IS', 'LS', 'ELS', 'bbELS')
BLOCK = 2 ** 20  # the largest logits block formed at once (4 MB in fp32: stays in the L3 cache), whatever N is
QTILE = 1024  # queries per logits block, so a block is QTILE x (BLOCK / QTILE) candidates: a well-shaped matmul
peak = {'block': 0}  # the largest logits block formed so far (the tests check it does not grow with N)
LOG2E = 1.4426950408889634  # logits are kept in base 2: exp2 is faster than exp on a CPU


def softmax_update(m, acc, logits, V1t):
    """One block of G online softmaxes, in place. logits [G, Q, M] (base 2, overwritten), V1t [G, 1 + D, M] (row 0:
    ones, the normaliser; then the values); m [G, Q] the running max, acc [G, 1 + D, Q] the running sums
    sum_j 2^(logit_j - m) V1_j. A block that raises the max to m' first rescales acc by 2^(m - m')."""
    peak['block'] = max(peak['block'], logits.numel())
    m_new = torch.maximum(m, logits.amax(-1))
    acc.mul_(torch.exp2(m - m_new).unsqueeze(1))
    m.copy_(m_new)
    e = logits.sub_(m_new.unsqueeze(-1)).exp2_()
    acc.baddbmm_(V1t, e.transpose(1, 2))  # [1 + D, M] @ [M, Q]: on a CPU much faster than e @ V1 ([Q, M] @ [M, 1 + D])


def box(x, P):
    """Sum over the P x P window around each pixel, zero outside the image (separable: 2P operations per pixel)."""
    r = P // 2
    return F.avg_pool2d(F.avg_pool2d(x, (P, 1), 1, (r, 0)), (1, P), 1, (0, r)) * (P * P)


def same_place(xt, t, train, P, chunk):
    """IS (P = 0: the whole image) and LS: a softmax over images only, per location (IS: one location)."""
    B, C, H, W = xt.shape
    G, D = (1, C * H * W) if P == 0 else (H * W, C)
    m, acc = xt.new_full((G, B), -float('inf')), xt.new_zeros(G, 1 + D, B)
    n = max(1, min(chunk, 2 ** 22 // (B * C * H * W)))  # images per chunk: [B, n, C, H, W] stays ~16 MB
    for i in range(0, len(train), n):
        phi = train[i:i + n]
        d2 = (xt[:, None] - (1 - t) * phi[None]).pow(2).sum(2)  # [B, n, H, W]: ||x_t - (1 - t) phi||^2 per pixel
        d2 = d2.flatten(2).sum(2, keepdim=True) if P == 0 else box(d2, P).flatten(2)  # [B, n, G]: over image / patch
        logits = (d2 * (-LOG2E / (2 * t * t))).permute(2, 0, 1).contiguous()  # [G, B, n]
        V = phi.flatten(1).T[None] if P == 0 else phi.flatten(2).permute(2, 1, 0)  # [G, D, n]
        softmax_update(m, acc, logits, torch.cat([torch.ones_like(V[:, :1]), V], 1))
    x0 = acc[:, 1:] / acc[:, :1]  # [G, D, B]
    return x0[0].T.reshape(B, C, H, W) if P == 0 else x0.permute(2, 1, 0).reshape(B, C, H, W)


def groups(machine, H, W, P):
    """Which candidate locations each query location is compared with, as buckets of equal-size groups:
    [(ql [G, s], cl [G, s'])], flat locations; a query at ql[g, i] meets the candidates at cl[g] of every image.
    ELS: every location against every fully-inside one. bbELS: a group per border class (how far the patch sticks out
    on each side); classes of one location (corners) are LS there and are left to it."""
    r, L = P // 2, torch.arange(H * W)
    if machine == 'ELS':
        return [(L[None], L.view(H, W)[r:H - r, r:W - r].reshape(1, -1))]
    border = lambda i, n: (max(0, r - i), max(0, i + r - (n - 1)))  # rows (cols) of the patch outside the image
    classes, buckets = {}, {}
    for i in range(H):
        for j in range(W):
            classes.setdefault((border(i, H), border(j, W)), []).append(i * W + j)
    for g in classes.values():
        if len(g) > 1:
            buckets.setdefault(len(g), []).append(g)
    return [(torch.tensor(b), torch.tensor(b)) for b in buckets.values()]


def candidates(phi, cl, P, dedup):
    """The candidate patches of a chunk of images at locations cl [G, s']: ([k, ||k||^2] [G, M, J + 1],
    [1, centre pixel] [G, 1 + C, M], number of blank patches left out). dedup (one group only): patches that are
    blank (-1 wherever inside the image) are left out, to be counted once with their multiplicity."""
    n, C, H, W = phi.shape
    r, J = P // 2, C * P * P
    all_k = F.pad(phi, (r, r, r, r)).unfold(2, P, 1).unfold(3, P, 1).permute(0, 2, 3, 1, 4, 5)  # [n, H, W, C, P, P] view
    if dedup:
        keep = box((phi != -1).any(1, keepdim=True).float(), P).flatten(1)[:, cl[0]] > 0  # [n, s']: not blank
        mu, j = keep.nonzero(as_tuple=True)
        y = cl[0][j]
        k, v = all_k[mu, y // W, y % W].reshape(1, -1, J), phi[mu, :, y // W, y % W][None]  # gathered once per chunk
        skipped = keep.numel() - len(mu)
    else:
        k = all_k[:, cl // W, cl % W].transpose(0, 1).reshape(len(cl), -1, J)  # [G, n s', J]
        v, skipped = phi[:, :, cl // W, cl % W].permute(2, 0, 3, 1).reshape(len(cl), -1, C), 0
    ka = torch.cat([k, k.pow(2).sum(-1, keepdim=True)], -1)
    return ka, torch.cat([torch.ones_like(v[..., :1]), v], -1).transpose(1, 2).contiguous(), skipped


ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, '_linear_pointwise')


def stream(Q, K, V1t, m, acc):
    """The online softmax (m [Q], acc [1 + D, Q]) over candidates K [M, J + 1] (values V1t [1 + D, M]) for queries
    Q [Q, J + 1], in logits blocks of at most QTILE x (BLOCK / QTILE): a well-shaped matmul that stays in the cache.
    On a CPU the matmul is oneDNN's (faster than MKL's fp32 where MKL does not use AVX-512, as on AMD CPUs)."""
    cpu = ONEDNN and Q.device.type == 'cpu'
    qt = min(len(Q), QTILE)
    mt = max(1, BLOCK // qt)
    for j in range(0, len(K), mt):
        w = torch.ops.mkldnn._reorder_linear_weight(K[j:j + mt], qt) if cpu else K[j:j + mt].T  # packed once per block
        for q0 in range(0, len(Q), qt):
            logits = torch.ops.mkldnn._linear_pointwise(Q[q0:q0 + qt], w, None, 'none', [], '') if cpu else Q[q0:q0 + qt] @ w
            softmax_update(m[None, q0:q0 + qt], acc[None, :, q0:q0 + qt], logits[None], V1t[None, :, j:j + mt])


@torch.no_grad()
def x0_hat(machine, xt, t, train, P=7, chunk=256):
    """The machine's estimate of x0 for x_t [B, C, H, W] (all noises at once) at time t (0 < t <= 1) from train
    [N, C, H, W] (same device), with P x P patches."""
    B, C, H, W = xt.shape
    if machine == 'IS':
        return same_place(xt, t, train, 0, chunk)
    if machine == 'LS' or machine == 'bbELS':  # bbELS: LS is right at the locations alone in their class
        out = same_place(xt, t, train, P, chunk).flatten(2)
    if machine == 'ELS':
        if P > min(H, W):
            raise ValueError(f'ELS needs patches that fit inside the image: P = {P} > {min(H, W)}')
        out = xt.new_empty(B, C, H * W)
    elif machine == 'LS':
        return out.view(B, C, H, W)
    a, r = 1.0 - t, P // 2
    # logit = -||q - a k||^2 / (2 t^2) = [2 a q.k - a^2 ||k||^2] / (2 t^2) + const(q)
    #       = [q a / t^2, -a^2 / (2 t^2)] . [k, ||k||^2]: one matmul per block, times log2(e) (base-2 logits);
    # ||q||^2 is the same for every candidate and drops out of the softmax. fp32: bf16 logits are too coarse at small t
    bks = groups(machine, H, W, P)
    if not bks:  # bbELS with every location alone in its class: LS
        return out.view(B, C, H, W)
    q = F.unfold(F.pad(xt, (r, r, r, r), mode='circular' if machine == 'ELS' else 'constant'), P)  # [B, J, H W]
    Qa = [LOG2E * torch.cat([q[:, :, ql].permute(2, 0, 3, 1).reshape(len(ql), -1, q.shape[1]) * (a / t ** 2),
                             q.new_full((len(ql), B * ql.shape[1], 1), -a * a / (2 * t * t))], -1) for ql, _ in bks]
    ms = [q.new_full(Q.shape[:2], -float('inf')) for Q in Qa]  # [G, B s]: queries ordered by (noise, location)
    accs = [q.new_zeros(len(Q), 1 + C, Q.shape[1]) for Q in Qa]
    blanks = [0] * len(bks)
    per_image = sum(cl.numel() for _, cl in bks)  # candidates per training image
    n = max(1, min(chunk, 2 ** 24 // (per_image * (q.shape[1] + 1))))  # images per chunk: candidates <= 64 MB
    for i in range(0, len(train), n):
        for b, (ql, cl) in enumerate(bks):
            ka, V1t, skipped = candidates(train[i:i + n], cl, P, dedup=len(cl) == 1)  # gathered once per chunk
            blanks[b] += skipped
            for g in range(len(cl)):
                stream(Qa[b][g], ka[g], V1t[g], ms[b][g], accs[b][g])
    for b, (ql, cl) in enumerate(bks):
        if blanks[b]:  # the blank patch once, with logit + log2(count) and value -1
            kb = F.pad(-xt.new_ones(1, C, H, W), (r, r, r, r)).unfold(2, P, 1).unfold(3, P, 1)
            kb = kb[0, :, cl[0, 0] // W, cl[0, 0] % W].reshape(1, 1, -1)
            logits = torch.bmm(Qa[b], torch.cat([kb, kb.pow(2).sum(-1, keepdim=True)], -1).transpose(1, 2))
            V1t = torch.cat([xt.new_ones(1, 1, 1), -xt.new_ones(1, C, 1)], 1)
            softmax_update(ms[b], accs[b], logits + torch.log2(torch.tensor(float(blanks[b]))), V1t)
        x0 = accs[b][:, 1:] / accs[b][:, :1]  # [G, C, B s]
        out[:, :, ql] = x0.view(len(ql), C, B, -1).permute(2, 1, 0, 3)
    return out.view(B, C, H, W)


class Machine:
    """A machine as a velocity model for model.sample: v(x_t, t) = (x_t - x0_hat) / t. patch_size is an int or a
    function t -> P (a calibrated schedule). log: a progress line per evaluation, with speed and ETA."""
    num_classes = 0

    def __init__(self, machine, train, patch_size, chunk=256, calls=0):
        self.machine, self.train, self.patch_size, self.chunk = machine, train, patch_size, chunk
        self.calls, self.done, self.t_start = calls, 0, time.time()  # calls > 0: a progress line per evaluation

    def __call__(self, x, t, y=None):
        t = max(float(t.flatten()[0]), 1e-3)  # the last Euler step is taken from t = dt > 0
        P = self.patch_size(t) if callable(self.patch_size) else self.patch_size
        x0 = x0_hat(self.machine, x.float(), t, self.train, P, self.chunk)
        self.done += 1
        if self.calls:
            el = time.time() - self.t_start
            print(f'  {self.machine} {self.done}/{self.calls} t={t:.3f} P={P} | {el / self.done:.1f}s per step for '
                  f'{len(x)} noises | ETA {(self.calls - self.done) * el / self.done:.0f}s', flush=True)
        return (x - x0) / t


def network_path(net, z, steps, solver):
    """The network's own sampler from z: [(t, x_t, eps)] at each grid time t > 0, eps = x_t + (1 - t) v its noise
    prediction (x_t = (1 - t) x0 + t eps, v = eps - x0)."""
    from model import sample, time_grid
    _, traj = sample(net, z, steps=steps, solver=solver, return_traj=True)
    ts = time_grid(steps).tolist()[:-1]
    return [(t, x, x + (1 - t) * net(x, torch.full((len(x),), t, device=x.device))) for t, x in zip(ts, traj)]


@torch.no_grad()
def calibrate(machine, path, train, sizes, chunk=256, log=print):
    """The paper's calibration: at each t of the path, for each P, the cosine between the machine's
    eps_hat = (x_t - (1 - t) x0_hat) / t and the network's eps, per sample; each sample's best P, then the lower median
    over samples (an odd P). At t = 1 every P gives eps_hat = x_t: that t takes the P of the next t.
    Returns (t list, P list, [per t: each sample's best P])."""
    ts, Ps, best, t0 = [], [], [], time.time()
    todo = [(t, x, eps) for t, x, eps in path if t < 1]
    for k, (t, x, eps) in enumerate(todo):
        cos = torch.stack([F.cosine_similarity(((x - (1 - t) * x0_hat(machine, x, t, train, P, chunk)) / t).flatten(1),
                                               eps.flatten(1)) for P in sizes])  # [len(sizes), B]
        best.append([sizes[i] for i in cos.argmax(0).tolist()])
        ts.append(t)
        Ps.append(int(torch.tensor(best[-1]).median()))  # torch.median: the lower median
        el = time.time() - t0
        log(f'  calibrate {machine} t={t:.3f}: P {Ps[-1]} (per sample {best[-1]}) | {el:.0f}s, '
            f'ETA {el / (k + 1) * (len(todo) - k - 1):.0f}s')
    if len(todo) < len(path):  # t = 1
        ts, Ps, best = [1.0] + ts, Ps[:1] + Ps, [None] + best
    return ts, Ps, best


def schedule_fn(ts, Ps):
    """A patch-size schedule t -> P from calibrated pairs: the P of the nearest calibrated t."""
    ts = torch.tensor(ts)
    return lambda t: Ps[int((ts - t).abs().argmin())]


def agreement(x, ref):
    """Per image against ref: the Pearson r (mean-subtracted, normalised dot product over all pixels: the paper's
    number), 1 - SSE/SST (stricter, about 2r - 1 at equal variances) and the MSE."""
    x, ref = x.flatten(1).double(), ref.flatten(1).double()
    xc, rc = x - x.mean(1, keepdim=True), ref - ref.mean(1, keepdim=True)
    sse = (x - ref).pow(2).sum(1)
    return dict(r=(xc * rc).sum(1) / (xc.norm(dim=1) * rc.norm(dim=1)), one_minus_sse_sst=1 - sse / rc.pow(2).sum(1),
                mse=sse / x.shape[1])


@torch.no_grad()
def nearest(x, train):
    """The training image closest (L2) to each image of x, and the distance."""
    d, i = torch.cdist(x.flatten(1), train.flatten(1)).min(1)  # [B, N] distances: small beside the machines' blocks
    return train[i], d


if __name__ == '__main__':  # the experiment; importing this file gives only the machines above
    from model import (NFE_PER_STEP, check_choices, check_out_dir, die, load_dataset, load_flow_model, resize, sample,
                       save_labelled_grid, to_model_range)
    # -------------------------------------------------------------------------
    out_dir = 'out/ideal'
    ckpt = 'out/flow_unet/ckpt.pt'  # an unconditional flow network of train_flow_unet.py
    data_dir = 'data'
    dataset = ''  # '' = the checkpoint's dataset
    device = 'auto'  # auto | cpu | cuda (auto: cuda when available)
    machines = ''  # '' = IS,LS,bbELS for a zero-padded network, IS,LS,ELS for a circular one
    noise_file = ''  # a [1, C, H, W] tensor saved with torch.save: one more starting noise
    num_noises = 30
    num_train = 0  # training images the machines see (0 = all)
    steps = 20
    solver = 'euler'
    patch_size = 0  # 0 = a calibrated P(t) per machine; else this odd P for every machine and t
    patch_schedule = ''  # a patch_schedule.json to reuse ('' = calibrate now and write one)
    calib_sizes = ()  # odd P tried by the calibration (() = 3, 5, ... up to the image side - 1)
    calib_noises = 20  # noises the calibration samples the network from (the paper: 20)
    calib_train = 5000  # the calibration uses the first (at most) this many training images (the paper: 5000)
    chunk = 256  # training images per streamed chunk (at most)
    fig_noises = 12  # noises (columns) in compare.png
    seed = 0
    config_domains = dict(  # each number's domain: a kind of configurator.py (count >= 1, count0 >= 0, ...) or a range
        num_noises='count0', num_train='count0', steps='count', patch_size='count0', calib_sizes='size',
        calib_noises='count', calib_train='count', chunk='count', fig_noises='count', seed='seed')
    config_keys = [k for k, v in globals().items()  # the settings configurator.py may change, as nanoGPT declares them
                   if not k.startswith('_') and k.islower() and isinstance(v, (bool, int, float, str, tuple, list, type(None)))]
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    # -------------------------------------------------------------------------
    if device not in ('auto', 'cpu', 'cuda') and not device.startswith('cuda:'):
        die(f"unknown device {device!r}: choose auto, cpu or cuda")  # before anything is loaded
    device = ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device
    if patch_size % 2 == 0 and patch_size:
        die(f'patch_size must be odd (or 0 = calibrated), got {patch_size}')
    if any(p % 2 == 0 for p in calib_sizes):
        die(f'calib_sizes must be odd, got {calib_sizes}')
    check_choices(solver=(solver, NFE_PER_STEP))
    check_out_dir(out_dir)  # before any work: a file, a folder that cannot be made or written
    torch.set_grad_enabled(False)
    net, checkpoint = load_flow_model(ckpt, device)
    if net.num_classes:
        die(f'{ckpt} is class-conditional: the machines stand beside an unconditional network of train_flow_unet.py')
    padding = checkpoint['model_args'].get('padding_mode', 'zeros')
    names = (machines or ('IS,LS,ELS' if padding == 'circular' else 'IS,LS,bbELS')).split(',')
    for m in names:
        check_choices(machine=(m, MACHINES))
    dataset = dataset or checkpoint.get('config', {}).get('dataset', 'mnist')
    C, S = net.in_channels, net.input_size
    if patch_size > S and 'ELS' in names:
        die(f'patch_size {patch_size} does not fit inside a {S}x{S} image (ELS compares patches fully inside)')
    x_train, _ = load_dataset(dataset, data_dir, True, S, hint=f': pass --data_dir=DIR with the real {dataset}')
    if num_train:
        x_train = x_train[torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))[:num_train]]
    train = resize(to_model_range(x_train), S).contiguous().to(device)
    z = torch.randn(num_noises, C, S, S, generator=torch.Generator().manual_seed(seed))
    if noise_file:
        try:
            extra = torch.load(noise_file, map_location='cpu', weights_only=True)
        except Exception as e:
            die(f'cannot read noise_file {noise_file} ({type(e).__name__}): save a [1, {C}, {S}, {S}] tensor with torch.save')
        if not torch.is_tensor(extra) or tuple(extra.shape) != (1, C, S, S) or not extra.is_floating_point():
            got = f'a {str(extra.dtype)[6:]} tensor of shape {list(extra.shape)}' if torch.is_tensor(extra) else \
                f'a {type(extra).__name__}'
            die(f'noise_file {noise_file} must hold a tensor of shape [1, {C}, {S}, {S}] of floats (as this '
                f'network\'s images), not {got}')
        if not torch.isfinite(extra).all():
            die(f'noise_file {noise_file} holds NaN or infinite values')
        z = torch.cat([z, extra.float()])
    if not len(z):
        die('no noises: set num_noises >= 1 or pass a noise_file')
    z = z.to(device)
    os.makedirs(out_dir, exist_ok=True)
    print(f'{type(net).__name__} ({padding} padding) on {device}: {len(train)} training images of {dataset} at '
          f'{C}x{S}x{S}, {len(z)} noises, {solver} {steps} steps, machines {",".join(names)}', flush=True)

    # the patch size of each machine: fixed, reused, or calibrated now against the network
    patched = [m for m in names if m != 'IS']
    scheds = {}
    if patch_size == 0 and patched and patch_schedule:
        try:
            scheds = json.load(open(patch_schedule))['machines']
            scheds = {m: dict(t=[float(t) for t in s['t']], P=[int(P) for P in s['P']]) for m, s in scheds.items()}
        except (OSError, ValueError, KeyError, TypeError) as e:
            die(f'cannot read patch_schedule {patch_schedule} ({type(e).__name__}): pass a patch_schedule.json of this script')
        if any(m not in scheds for m in patched):
            die(f'patch_schedule {patch_schedule} has no schedule for {", ".join(m for m in patched if m not in scheds)}')
    elif patch_size == 0 and patched:
        sizes = list(calib_sizes or range(3, S, 2))
        if 'ELS' in names and max(sizes) > S:
            die(f'calib_sizes {tuple(sizes)} go beyond the {S}x{S} image (ELS compares patches fully inside)')
        calib = train[:calib_train]
        zc = torch.randn(calib_noises, C, S, S, generator=torch.Generator().manual_seed(seed + 1)).to(device)
        print(f'calibrating P in {sizes} on the first {len(calib)} training images, {calib_noises} noises', flush=True)
        path = network_path(net, zc, steps, solver)
        for m in patched:
            ts, Ps, best = calibrate(m, path, calib, sizes, chunk)
            scheds[m] = dict(t=ts, P=Ps, best_P_per_noise=best)
        json.dump(dict(ckpt=ckpt, num_train=len(calib), train=f'the first {len(calib)} of the {len(train)} training '
                       f'images the machines use', noises=calib_noises, noise_seed=seed + 1, steps=steps, solver=solver,
                       sizes=sizes, machines=scheds), open(os.path.join(out_dir, 'patch_schedule.json'), 'w'), indent=1)
    if scheds:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        for m in patched:
            plt.plot(scheds[m]['t'], scheds[m]['P'], 'o-', label=m)
        plt.gca().set(xlabel='t (1 = noise)', ylabel='patch size P', title=f'P(t) calibrated on the {type(net).__name__} ({padding} padding)')
        plt.legend(), plt.grid(alpha=0.3), plt.savefig(os.path.join(out_dir, 'schedule.png'), dpi=80), plt.close()

    # every machine from the same noises (all at once), with the network's solver and grid
    results = {'network': sample(net, z, steps=steps, solver=solver)}
    for m in names:
        t0 = time.time()
        P = schedule_fn(scheds[m]['t'], scheds[m]['P']) if m in scheds else patch_size or 0
        machine = Machine(m, train, P, chunk, calls=steps * NFE_PER_STEP[solver])
        results[m] = sample(machine, z, steps=steps, solver=solver)
        print(f'{m}: {time.time() - t0:.1f}s ({(time.time() - t0) / steps / len(z):.2f}s per step per noise)', flush=True)
    near, dist = nearest(results['network'], train)
    results['nearest training image'] = near
    per_noise = {k: agreement(x, results['network']) for k, x in results.items() if k != 'network'}
    median = lambda v: v.quantile(0.5).item()  # as numpy's median: the mean of the two middle values for an even count
    table = {k: {s: median(v) for s, v in a.items()} for k, a in per_noise.items()}
    cols = list(range(min(fig_noises, num_noises))) + ([len(z) - 1] if noise_file else [])
    rows = torch.stack([z[cols].clamp(-1, 1)] + [results[k][cols] for k in results]).cpu()
    save_labelled_grid(rows, os.path.join(out_dir, 'compare.png'), ['noise', type(net).__name__, *names, 'nearest train'],
                       f'{solver} {steps} steps, N={len(train)}, P {"calibrated" if scheds else patch_size or "-"}',
                       [f'noise {i}' if i < num_noises else 'noise_file' for i in cols])
    json.dump(dict(ckpt=ckpt, network=type(net).__name__, padding_mode=padding, num_train=len(train), steps=steps,
                   solver=solver, num_noises=len(z), patch_size=patch_size, patch_schedule=patch_schedule or (
                       os.path.join(out_dir, 'patch_schedule.json') if scheds else ''),
                   median_over_noises=table, r_per_noise={k: a['r'].tolist() for k, a in per_noise.items()}),
              open(os.path.join(out_dir, 'compare.json'), 'w'), indent=1)
    print(f'\nagreement with the {type(net).__name__} (median over {len(z)} noises; r = Pearson correlation, the '
          f'paper\'s number)\n{"":>24} {"r":>7} {"1-SSE/SST":>10} {"MSE":>7}')
    for k, row in table.items():
        print(f'{k:>24} {row["r"]:7.3f} {row["one_minus_sse_sst"]:10.3f} {row["mse"]:7.4f}')
    print(f'wrote {out_dir}/compare.png, compare.json' + (', patch_schedule.json, schedule.png' if scheds else ''))
