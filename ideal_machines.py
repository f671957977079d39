"""
The "ideal score machines" of Kamb & Ganguli (arXiv:2412.20292) beside the trained flow UNet, in this project's
convention x_t = (1 - t) x0 + t eps. Each machine turns x_t into an estimate x0_hat from the training set alone,
hence a velocity v = (x_t - x0_hat) / t, integrated with the UNet's solver and time grid. The softmax weights are
    w ∝ exp(-|| q - (1 - t) k ||^2 / (2 t^2))     (q: a piece of x_t, k: the matching piece of a training image)
  IS     q = the whole image: a posterior over training images, so it can only return one of them;
  LS     q = the P x P patch around each pixel, compared with the patch at the same place of every image;
  ELS    ... compared with the patches at every place of every image (translation equivariant);
  bbELS  ELS where a patch that crosses the border is compared only with patches that cross it the same way.

    python ideal_machines.py --data_dir=../shared/data --ckpt=out/flow_unet/ckpt.pt --num_train=0 --patch_size=7
    python ideal_machines.py --data_dir=../shared/data --calibrate   # P per t: the machine closest to the UNet

Writes under out_dir: compare.png (a row per noise: noise, UNet, IS, LS, ELS, bbELS, nearest training image to
the UNet's sample), compare.json (r^2 and MSE of each machine against the UNet, median over the noises) and,
with --calibrate, patch_schedule.json. The training set streams in chunks with a running log-sum-exp, so memory
does not grow with N beyond the images themselves and their patch norms.
"""
import json
import os
import time

import torch
import torch.nn.functional as F

MACHINES = ('IS', 'LS', 'ELS', 'bbELS')


def patches(x, P):
    """[B, C, H, W] -> [B, C*P*P, H*W]: the P x P patch around every pixel, zero outside the image."""
    return F.unfold(x, P, padding=P // 2)


def patch_norms(train, P):
    """||k||^2 of every training patch, [N, H*W]: a box filter over phi^2 (computed once per P, reused every step)."""
    sq = train.pow(2).sum(1, keepdim=True)
    return (F.avg_pool2d(sq, P, stride=1, padding=P // 2, count_include_pad=True) * P * P).flatten(1)


BLOCK = 2 ** 20  # the largest logits block ELS / bbELS form at once (4 MB in fp32, cache-sized), whatever N is
peak = {'block': 0}  # the largest logits block formed so far (the tests check it does not grow with N)
LOG2E = 1.4426950408889634  # logits are kept in base 2: exp2 is ~2x faster than exp on a CPU


def softmax_update(state, logits, V):
    """One block of an online softmax over the last dim of logits [..., Q, M] (base-2 logits) with values V [..., M, C].
    state (m, acc): the running max m [..., Q] and acc = sum_j 2^(logit_j - m) [1, V_j] [..., Q, 1 + C] (column 0 is
    the normaliser). A block that raises the max to m' rescales acc by 2^(m - m'). logits is overwritten."""
    peak['block'] = max(peak['block'], logits.numel())
    m_old, acc = state
    m = torch.maximum(m_old, logits.amax(-1))
    e = logits.sub_(m.unsqueeze(-1)).exp2_()
    return m, acc * torch.exp2(m_old - m).unsqueeze(-1) + torch.cat([e.sum(-1, keepdim=True), e @ V], -1)


def empty_state(*shape, C):
    """The online softmax before any block: max -inf, nothing accumulated."""
    return torch.full(shape, -float('inf')), torch.zeros(*shape, 1 + C)


def groups_for(machine, H, W, P):
    """Which candidate locations each query location is compared with: [(query_locs, candidate_locs)].
    ELS: one group, all with all. bbELS: a group per border class (how far a patch sticks out on each side)."""
    if machine == 'ELS':
        every = torch.arange(H * W)
        return [(every, every)]
    r = P // 2
    border = lambda i, n: (max(0, r - i), max(0, i + r - (n - 1)))  # rows (cols) of the patch outside the image
    classes = {}
    for i in range(H):
        for j in range(W):
            classes.setdefault((border(i, H), border(j, W)), []).append(i * W + j)
    return [(torch.tensor(g), torch.tensor(g)) for g in classes.values()]


@torch.no_grad()
def x0_hat(machine, xt, t, train, P=7, chunk=256, norms=None, matmul_dtype=torch.float32):
    """The machine's estimate of x0 for x_t [B, C, H, W] at time t (0 < t <= 1) from train [N, C, H, W]. norms:
    patch_norms(train, P), kept across calls by the caller (ELS and bbELS only; None = per chunk)."""
    B, C, H, W = xt.shape
    a = 1.0 - t
    if machine in ('IS', 'LS'):  # softmax over images only, per location (IS: one location, the whole image)
        L = 1 if machine == 'IS' else H * W
        state = empty_state(L, B, C=C * H * W if machine == 'IS' else C)
        for i in range(0, len(train), chunk):
            phi = train[i:i + chunk]
            d2 = (xt[:, None] - a * phi[None]).pow(2).sum(2)  # [B, n, H, W]: the squared distance per pixel
            if machine == 'IS':
                d2 = d2.flatten(2).sum(2, keepdim=True)  # [B, n, 1]
            else:  # ||q - a k||^2 of the P x P patches at the same place: a box filter (zero padding for both)
                d2 = (F.avg_pool2d(d2, P, 1, P // 2, count_include_pad=True) * (P * P)).flatten(2)  # [B, n, L]
            V = phi.flatten(1)[None] if machine == 'IS' else phi.flatten(2).permute(2, 0, 1)  # [L, n, C] (IS: [1, n, CHW])
            state = softmax_update(state, d2.permute(2, 0, 1) * (-LOG2E / (2 * t * t)), V)
        x0 = state[1][..., 1:] / state[1][..., :1]  # [L, B, C] (IS: [1, B, CHW])
        return x0[0].reshape(B, C, H, W) if machine == 'IS' else x0.permute(1, 2, 0).reshape(B, C, H, W)
    # ELS / bbELS: softmax over (image, location) within each group of locations. Blank patches (background -1
    # everywhere inside the image) repeat at each location in most images: each counts once, with its multiplicity.
    # logit = -||q - a k||^2 / (2 t^2) = [2 a q.k - a^2 ||k||^2] / (2 t^2) + const(q)
    #       = [q a / t^2, -a^2 / (2 t^2)] . [k, ||k||^2]: one matmul per block (times log2(e): base-2 logits);
    # ||q||^2 is the same for every candidate and drops out of the softmax
    aug_q = lambda q: LOG2E * torch.cat([q * (a / t ** 2), torch.full((len(q), 1), -a * a / (2 * t * t))], 1)
    q = patches(xt, P)
    J, r = q.shape[1], P // 2
    groups = groups_for(machine, H, W, P)
    Qs = [aug_q(q[:, :, ql].transpose(1, 2).reshape(-1, J)).to(matmul_dtype) for ql, _ in groups]  # [B*|q|, J+1]
    states = [empty_state(len(Q), C=C) for Q in Qs]
    blank = patches(-torch.ones(1, C, H, W), P)[0]  # [J, L]: the blank patch at every location
    blank_count = torch.zeros(H * W)
    for i in range(0, len(train), chunk):
        phi = train[i:i + chunk]
        # a patch is blank when sum |phi + 1| over it is 0 (a box filter, much cheaper than comparing patches)
        is_blank = (F.avg_pool2d((phi + 1).abs().sum(1, keepdim=True), P, 1, r) < 1e-7).flatten(1)  # [n, L]
        blank_count += is_blank.sum(0)
        kn = norms[i:i + chunk] if norms is not None else patch_norms(phi, P)  # [n, L]
        # every patch as a view [n, H, W, C, P, P] of the zero-padded chunk: the non-blank ones are gathered once
        all_k = F.pad(phi, (r, r, r, r)).unfold(2, P, 1).unfold(3, P, 1).permute(0, 2, 3, 1, 4, 5)
        for g, (ql, cl) in enumerate(groups):
            keep = torch.zeros_like(is_blank)
            keep[:, cl] = ~is_blank[:, cl]
            K = all_k[keep.view(-1, H, W)].reshape(-1, J)  # [M, J]: the non-blank candidates of this group
            K = torch.cat([K, kn[keep].unsqueeze(1)], 1).to(matmul_dtype)  # [M, J+1]
            V = phi.flatten(2).transpose(1, 2)[keep]  # [M, C]: their centre pixels
            step = max(1, BLOCK // len(Qs[g]))  # candidates per logits block, so the block stays <= BLOCK
            buf = torch.empty(len(Qs[g]) * step, dtype=matmul_dtype)  # the logits block, written in place each time
            for j in range(0, len(K), step):
                n = min(step, len(K) - j)
                logits = torch.mm(Qs[g], K[j:j + n].T, out=buf[:len(Qs[g]) * n].view(len(Qs[g]), n))
                states[g] = softmax_update(states[g], logits.float(), V[j:j + n])
    out = torch.empty(B, C, H * W)
    for g, (ql, cl) in enumerate(groups):
        cl = cl[blank_count[cl] > 0]
        if len(cl):  # the blank candidates: logit + log2(count), value -1
            Kb = torch.cat([blank[:, cl].T, blank[:, cl].T.pow(2).sum(1, keepdim=True)], 1).to(matmul_dtype)
            logits = (Qs[g] @ Kb.T).float() + blank_count[cl].log2()
            states[g] = softmax_update(states[g], logits, -torch.ones(len(cl), C))
        acc = states[g][1]
        out[:, :, ql] = (acc[:, 1:] / acc[:, :1]).reshape(B, len(ql), C).transpose(1, 2)
    return out.reshape(B, C, H, W)


class Machine:
    """A machine as a velocity model for model.sample: v(x_t, t) = (x_t - x0_hat) / t. patch_size is an int or a
    function t -> P (a calibrated schedule)."""
    num_classes = 0

    def __init__(self, machine, train, patch_size, chunk=256, matmul_dtype=torch.float32, calls=0):
        self.machine, self.train, self.patch_size, self.chunk, self.dtype = machine, train, patch_size, chunk, matmul_dtype
        self.norms = {}  # P -> training patch norms, reused across steps
        self.calls, self.done, self.t_start = calls, 0, time.time()  # calls > 0: a progress line per evaluation

    def __call__(self, x, t, y=None):
        t = max(float(t.flatten()[0]), 1e-3)  # the last Euler step is taken from t = dt > 0
        P = self.patch_size(t) if callable(self.patch_size) else self.patch_size
        if self.machine in ('ELS', 'bbELS') and P not in self.norms:
            self.norms[P] = patch_norms(self.train, P)
        x0 = x0_hat(self.machine, x.float(), t, self.train, P, self.chunk, self.norms.get(P), self.dtype)
        self.done += 1
        if self.calls:
            el = time.time() - self.t_start
            print(f'  {self.machine} {self.done}/{self.calls} t={t:.3f} P={P} | {el / self.done:.1f}s per evaluation | '
                  f'ETA {(self.calls - self.done) * el / self.done:.0f}s', flush=True)
        return (x - x0) / t


def nearest_t_schedule(ts, ps):
    """A patch-size schedule t -> P from calibrated pairs: the P of the nearest calibrated t."""
    ts = torch.tensor(ts)
    return lambda t: ps[int((ts - t).abs().argmin())]


def r2(pred, target):
    """Pixel-wise r^2 of pred against target, per image: 1 - SSE / total variance of the target."""
    sse = (pred - target).pow(2).flatten(1).sum(1)
    tot = (target - target.flatten(1).mean(1).view(-1, 1, 1, 1)).pow(2).flatten(1).sum(1)
    return 1 - sse / tot


@torch.no_grad()
def nearest(x, train, chunk=4096):
    """The training image closest (L2) to each image of x, and the distance."""
    best_d, best_i = torch.full((len(x),), float('inf')), torch.zeros(len(x), dtype=torch.long)
    xf = x.flatten(1)
    for i in range(0, len(train), chunk):
        d = torch.cdist(xf, train[i:i + chunk].flatten(1))
        m, j = d.min(1)
        better = m < best_d
        best_d, best_i = torch.where(better, m, best_d), torch.where(better, j + i, best_i)
    return train[best_i], best_d


if __name__ == '__main__':  # the experiment; importing this file gives only the machines above
    from model import (NFE_PER_STEP, die, load_flow_model, load_or_die, resize, sample, save_labelled_grid, time_grid,
                       to_model_range)
    # -------------------------------------------------------------------------
    out_dir = 'out/ideal'
    ckpt = 'out/flow_unet/ckpt.pt'  # the flow UNet of train_flow_unet.py
    data_dir = 'data'
    dataset = ''  # '' = the checkpoint's dataset
    noise_file = ''  # a [1, C, H, W] tensor saved with torch.save: one more starting noise
    num_noises = 5
    num_train = 0  # training images the machines see (0 = all)
    patch_size = 7  # odd
    machines = 'IS,LS,ELS,bbELS'
    steps = 20
    solver = 'euler'
    calibrate = False  # choose P per t against the UNet and save the schedule
    calib_sizes = (3, 5, 7, 9, 11, 15)
    patch_schedule = ''  # a patch_schedule.json from --calibrate: use its P per t instead of patch_size
    chunk = 256  # training images per streamed chunk
    matmul_dtype = 'float32'  # float32 | bfloat16 (faster dot products, but on a CPU the logits come out in bf16: coarse at small t)
    seed = 0
    config_domains = dict(  # each number's domain: a kind of configurator.py (count >= 1, count0 >= 0, ...) or a range
        num_noises='count0', num_train='count0', patch_size='size', steps='count', calib_sizes='size', chunk='count',
        seed='seed')
    config_keys = [k for k, v in globals().items()  # the settings configurator.py may change, as nanoGPT declares them
                   if not k.startswith('_') and k.islower() and isinstance(v, (bool, int, float, str, tuple, list, type(None)))]
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    # -------------------------------------------------------------------------
    names = machines.split(',')
    for m in names:
        if m not in MACHINES:
            die(f"unknown machine {m!r}: choose from {', '.join(MACHINES)}")
    if patch_size < 1 or patch_size % 2 == 0:
        die(f'patch_size must be odd and positive, got {patch_size}')
    if any(p < 1 or p % 2 == 0 for p in calib_sizes):
        die(f'calib_sizes must be odd and positive, got {calib_sizes}')
    if solver not in NFE_PER_STEP:
        die(f"unknown solver {solver!r}: choose one of {', '.join(NFE_PER_STEP)}")
    if steps < 1 or num_noises < 0 or num_train < 0:
        die(f'steps must be >= 1 and num_noises, num_train >= 0 (got {steps}, {num_noises}, {num_train})')
    if matmul_dtype not in ('float32', 'bfloat16'):
        die(f"unknown matmul_dtype {matmul_dtype!r}: choose float32 or bfloat16")
    mm_dtype = getattr(torch, matmul_dtype)
    torch.set_grad_enabled(False)
    unet, checkpoint = load_flow_model(ckpt, 'cpu')
    if unet.num_classes:
        die(f'{ckpt} is class-conditional: the machines stand beside the unconditional UNet of train_flow_unet.py')
    dataset = dataset or checkpoint.get('config', {}).get('dataset', 'mnist')
    C, S = unet.in_channels, unet.input_size
    x_train, _ = load_or_die(dataset, data_dir, True, S, hint=f': pass --data_dir=DIR with the real {dataset}')
    if num_train:
        x_train = x_train[torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))[:num_train]]
    train = resize(to_model_range(x_train), S).contiguous()
    z = torch.randn(num_noises, C, S, S, generator=torch.Generator().manual_seed(seed))
    if noise_file:
        try:
            extra = torch.load(noise_file, map_location='cpu', weights_only=True)
        except Exception as e:
            die(f'cannot read noise_file {noise_file} ({type(e).__name__}): save a [1, {C}, {S}, {S}] tensor with torch.save')
        if not torch.is_tensor(extra) or tuple(extra.shape) != (1, C, S, S):
            die(f'noise_file {noise_file} must hold a tensor of shape [1, {C}, {S}, {S}]')
        z = torch.cat([z, extra.float()])
    os.makedirs(out_dir, exist_ok=True)
    print(f'{len(train)} training images of {dataset} at {C}x{S}x{S}, {len(z)} noises, {solver} {steps} steps, P {patch_size}')

    schedule = None
    if patch_schedule:
        sched = json.load(open(patch_schedule))
        schedule = nearest_t_schedule(sched['t'], sched['P'])
    if calibrate:  # for each t of the grid: the P whose ELS x0_hat is closest (median r^2) to the UNet's on its own path
        ts = time_grid(steps).tolist()
        x, best = z.clone(), []
        calib_norms = {P: patch_norms(train, P) for P in calib_sizes}  # once, not at every t
        calib_ts = []
        for t, t_next in zip(ts[:-1], ts[1:]):
            v = unet(x, torch.full((len(x),), t))
            if t < 1:  # at t = 1 every P gives the same x0_hat (the mean pixel): it takes the P of the next t
                x0_unet = x - t * v  # the UNet's own x0 estimate on its own path
                t0 = time.time()
                scores = {P: r2(x0_hat('ELS', x, t, train, P, chunk, calib_norms[P], mm_dtype), x0_unet).median().item()
                          for P in calib_sizes}
                calib_ts.append(t)
                best.append(max(scores, key=scores.get))
                print(f'calibrate t={t:.3f}: ' + ', '.join(f'P{P} r2 {s:.3f}' for P, s in scores.items()) +
                      f' -> P {best[-1]} ({time.time() - t0:.0f}s)', flush=True)
            x = x + (t_next - t) * v  # Euler along the UNet's path
        ts = calib_ts
        json.dump(dict(t=ts, P=best), open(os.path.join(out_dir, 'patch_schedule.json'), 'w'))
        schedule = nearest_t_schedule(ts, best)

    # every machine from the same noises, with the UNet's solver and grid
    results = {'UNet': sample(unet, z, steps=steps, solver=solver)}
    for m in names:
        t0 = time.time()
        machine = Machine(m, train, schedule or patch_size, chunk, mm_dtype, calls=steps * NFE_PER_STEP[solver])
        results[m] = sample(machine, z, steps=steps, solver=solver)
        print(f'{m}: {time.time() - t0:.1f}s ({(time.time() - t0) / steps:.2f}s per step for {len(z)} noises)', flush=True)
    near, dist = nearest(results['UNet'], train)
    table = {}
    for m in names:
        table[m] = dict(r2=r2(results[m], results['UNet']).median().item(),
                        mse=(results[m] - results['UNet']).pow(2).flatten(1).mean(1).median().item())
    table['nearest training image'] = dict(r2=r2(near, results['UNet']).median().item(),
                                           mse=(near - results['UNet']).pow(2).flatten(1).mean(1).median().item())
    cols = ['noise', 'UNet', *names, 'nearest train']
    rows = torch.stack([torch.stack([z[i].clamp(-1, 1), results['UNet'][i], *[results[m][i] for m in names], near[i]])
                        for i in range(len(z))])
    labels = [f'noise {i}' for i in range(num_noises)] + (['noise_file'] if noise_file else [])
    save_labelled_grid(rows, os.path.join(out_dir, 'compare.png'), labels,
                       f'{solver} {steps} steps, N={len(train)}, P={"calibrated" if schedule else patch_size}', cols)
    json.dump(dict(ckpt=ckpt, num_train=len(train), patch_size=patch_size, calibrated=schedule is not None,
                   steps=steps, solver=solver, num_noises=len(z), agreement_with_unet=table),
              open(os.path.join(out_dir, 'compare.json'), 'w'), indent=1)
    print(f'\nagreement with the UNet (median over {len(z)} noises)\n{"machine":>24} {"r2":>7} {"MSE":>7}')
    for m, row in table.items():
        print(f'{m:>24} {row["r2"]:7.3f} {row["mse"]:7.4f}')
    print(f'wrote {out_dir}/compare.png, compare.json')
