"""
Speed of the DiT presets and the MNIST UNet on this machine: training images/s, sampling images/s
per network evaluation (NFE), and model FLOPs utilisation (MFU) against the matmul peak measured here.

    python bench.py                         # every preset, every variant, one table
    python bench.py --presets=dit_mnist --iters=5
    python bench.py --curves=out/curve_float32,out/curve_bfloat16   # overlay two training runs
    python bench.py --ideal        # seconds per sampling step of the ideal machines, N x patch size

FLOPs are counted by torch.utils.flop_counter on one real forward + backward (every matmul,
convolution and attention product, backward included), not guessed from parameter counts; always on
the written-out attention ('math') of the network, since the counter misses part of the CPU SDPA kernels.
The baseline is the same network in fp32, eager (for the DiT with an explicit softmax(q k^T / sqrt(d)) v,
for the UNet in the default NCHW memory format).
"""
import json
import os
import time
from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

from model import DiT_Llama, RectifiedFlow, UNet, setup_precision

# -----------------------------------------------------------------------------
presets = 'dit_mnist,dit_cifar10,unet_mnist,unet_mnist_small'  # config/<name>.py for the DiT; unet_* the course's UNet
batch_size = 0  # 0: the preset's batch for MNIST, 32 for CIFAR-10 (on a CPU a step of 256 takes over a minute)
iters = 4  # timed iterations (after `warmup` untimed ones)
warmup = 2
dit_variants = 'baseline,fp32_sdpa,bf16_sdpa,bf16_kernels,bf16_kernels_compile,bf16_sdpa_compile'
unet_variants = 'baseline,fp32_cl,bf16,bf16_cl,bf16_cl_compile'
device = 'auto'
out_json = 'bench.json'
seed = 0
data_dir = 'data'  # MNIST for --ideal
ideal = False  # instead: seconds per sampling step per noise of each ideal machine (ideal_machines.py) on MNIST
ideal_n = (10000, 60000)  # training images
ideal_p = (7, 27)  # patch sizes
ideal_batch = (1, 32)  # noises run together
ideal_machines = 'IS,LS,ELS,bbELS'
curves = ''  # 'out/a,out/b': instead of timing, overlay train_dit.py runs: quality vs minutes (eval.jsonl) or loss
minrf_dir = ''  # a checkout of cloneofsimo/minRF (kept outside this repo): instead, its DiT beside ours at its MNIST size
minrf_variants = 'default,bf16,fp32_compile,fp32,fp32_sdpa,bf16_sdpa,bf16_math'  # default: train_dit.py's; eager unless _compile
rounds = 5  # --minrf_dir: alternating timed rounds per implementation (the median is reported)
config_domains = dict(  # each number's domain: a kind of configurator.py (count >= 1, count0 >= 0, ...) or a range
    batch_size='count0', iters='count', rounds='count', warmup='count0', seed='seed', ideal_n='count', ideal_p='size',
    ideal_batch='count')
config_keys = [k for k, v in globals().items()  # the settings configurator.py may change, as nanoGPT declares them
               if not k.startswith('_') and k.islower() and isinstance(v, (bool, int, float, str, tuple, list, type(None)))]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------
device = ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
sync = torch.cuda.synchronize if device_type == 'cuda' else (lambda: None)
VARIANTS = {  # name: (dtype, DiT attention, torch.compile?, UNet in channels_last?)
    'baseline': ('float32', 'math', False, False), 'fp32_sdpa': ('float32', 'sdpa', False, False),
    'bf16_sdpa': ('bfloat16', 'sdpa', False, False), 'bf16_kernels': ('bfloat16', 'kernels', False, False),
    'bf16_kernels_compile': ('bfloat16', 'kernels', True, False), 'bf16_sdpa_compile': ('bfloat16', 'sdpa', True, False),
    'fp32_kernels': ('float32', 'kernels', False, False), 'fp32_kernels_compile': ('float32', 'kernels', True, False),
    'fp32_math_compile': ('float32', 'math', True, False), 'fp32_sdpa_compile': ('float32', 'sdpa', True, False),
    'fp32_cl': ('float32', 'math', False, True), 'bf16': ('bfloat16', 'math', False, False),
    'bf16_cl': ('bfloat16', 'math', False, True), 'bf16_cl_compile': ('bfloat16', 'math', True, True)}


def matmul_peak(dtype, n=2048, reps=10):
    """The best matmul FLOP/s this device reaches: the denominator of MFU."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def preset_config(name):
    if name.startswith('unet_mnist'):  # the class-conditional UNet of train_class_cfg.py: defaults / the CPU runs
        small = dict(base_channels=16, n_res=1) if name == 'unet_mnist_small' else dict(base_channels=32, n_res=2)
        return dict(dataset='mnist', batch_size=128, unet=dict(in_channels=1, input_size=32, channel_mult=(1, 2, 2),
                                                               num_classes=10, **small))
    cfg = {}
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config', f'{name}.py')).read(), {}, cfg)
    return cfg


def build(cfg, attention, channels_last):
    if 'unet' in cfg:
        model = UNet(**cfg['unet']).to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        return model, cfg['unet']['in_channels'], cfg['unet']['input_size']
    C, S = (3, 32) if cfg['dataset'] == 'cifar10' else (1, 28)
    args = dict(in_channels=C, input_size=S, patch_size=cfg.get('patch_size', 2), dim=cfg.get('dim', 128),
                n_layers=cfg.get('n_layers', 6), n_heads=cfg.get('n_heads', 4))
    return DiT_Llama(**args, attention=attention).to(device), C, S


def timed(fn, n):
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t0) / n


def bench(cfg, variant, B):
    dtype, attention, use_compile, channels_last = VARIANTS[variant]
    torch.manual_seed(seed)
    model, C, S = build(cfg, attention, channels_last)
    torch._dynamo.reset()  # a fresh compile per variant: shapes differ between presets
    run_model = torch.compile(model, dynamic=False) if use_compile else model
    ctx = torch.autocast(device_type, dtype=torch.bfloat16) if dtype == 'bfloat16' else nullcontext()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    flow = RectifiedFlow()
    x0, y = torch.randn(B, C, S, S, device=device), torch.randint(0, 10, (B,), device=device)
    if channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)

    def train_step():
        with ctx:
            loss, _ = flow.loss(run_model, x0, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def nfe():  # one network evaluation as the sampler makes it
        with torch.no_grad(), ctx:
            run_model(x0, torch.rand(B, device=device), y)

    # count on the written-out twin: the counter does not see inside the CPU SDPA kernels
    twin = build(cfg, 'math', channels_last)[0]
    with FlopCounterMode(display=False) as counter:  # eager forward + backward of the same step
        with ctx:
            loss, _ = flow.loss(twin, x0, y)
        loss.backward()
    train_flops = counter.get_total_flops()
    t_train = timed(train_step, iters)
    t_nfe = timed(nfe, iters)
    peak = peaks[dtype]
    return dict(preset=cfg['name'], variant=variant, dtype=dtype, attention=attention, compile=use_compile, channels_last=channels_last, batch=B,
                train_img_s=B / t_train, sample_img_s_per_nfe=B / t_nfe, train_gflop_per_img=train_flops / B / 1e9,
                train_tflops=train_flops / t_train / 1e12, mfu=train_flops / t_train / peak)


def compare_curves(out_dirs, path='curves.png'):
    """Overlay the log.jsonl loss curves of several runs; print each run's mean relative gap to the first."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    logs = {d: [json.loads(line) for line in open(os.path.join(d, 'log.jsonl'))] for d in out_dirs}
    fig, ax = plt.subplots(figsize=(6, 4))
    for d, rows in logs.items():
        cfg = torch.load(os.path.join(d, 'ckpt.pt'), map_location='cpu', weights_only=False)['config']
        ax.plot([r['iter'] for r in rows], [r['loss'] for r in rows], lw=1, label=f'{cfg["dtype"]} ({d})')
    ref = [r['loss'] for r in logs[out_dirs[0]]]
    for d in out_dirs[1:]:
        other = [r['loss'] for r in logs[d]]
        n = min(len(ref), len(other))
        gap = sum(abs(a - b) / a for a, b in zip(ref[:n], other[:n])) / n
        print(f'{d} vs {out_dirs[0]}: mean relative loss gap {100 * gap:.1f}% over {n} log points; final '
              f'{other[n - 1]:.4f} vs {ref[n - 1]:.4f}')
    ax.set(xlabel='iteration', ylabel='loss', yscale='log', title='same run, fp32 versus bf16 autocast')
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f'wrote {path}')


def bench_ideal():
    """Seconds per step per noise of each machine: one x0_hat (= one Euler step) on B noises at once, divided by B, at
    t = 0.5 on 32x32 MNIST, for N training images and patch size P (IS: no P)."""
    import ideal_machines as im
    from model import load_dataset, resize, to_model_range
    # real digits: the blank background patches they share are part of the cost
    x_mnist = load_dataset('mnist', data_dir, hint=': --ideal times the machines on real MNIST, pass --data_dir=DIR')[0]
    x_mnist = resize(to_model_range(x_mnist), 32).to(device)
    g = torch.Generator().manual_seed(seed)
    rows = []
    print(f'{"machine":<7} {"N":>6} {"P":>3} {"batch":>5} {"s/step/noise":>12}  (fp32, {torch.get_num_threads()} threads, {device})')
    for n in ideal_n:
        if len(x_mnist) < n:
            print(f'only {len(x_mnist)} MNIST training images: skipping N={n}')
            continue
        train = x_mnist[:n]
        for B in ideal_batch:  # test digits noised to t = 0.5
            xt = 0.5 * x_mnist[-B:] + 0.5 * torch.randn(B, 1, 32, 32, generator=g).to(device)
            for m in ideal_machines.split(','):
                for P in ideal_p[:1] if m == 'IS' else ideal_p:
                    sync()
                    t0 = time.perf_counter()
                    im.x0_hat(m, xt, 0.5, train, P)
                    sync()
                    rows.append(dict(machine=m, n=n, patch_size=None if m == 'IS' else P, batch=B,
                                     sec_per_step_per_noise=(time.perf_counter() - t0) / B))
                    print(f'{m:<7} {n:>6} {"-" if m == "IS" else P:>3} {B:>5} {rows[-1]["sec_per_step_per_noise"]:>12.3f}', flush=True)
    with open(out_json, 'w') as f:
        json.dump(dict(ideal=rows, device=device, threads=torch.get_num_threads()), f, indent=1)
    print(f'written {out_json}')


def script_defaults(script):
    """The literal config globals of one of our scripts (read, not restated, so the bench follows the script)."""
    import ast
    tree = ast.parse(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), script)).read())
    return {n.targets[0].id: ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
            and isinstance(n.targets[0], ast.Name) and isinstance(n.value, ast.Constant)}


def bench_minrf():
    """minRF's DiT_Llama + RF (its MNIST size: dim 64, 6 layers, 4 heads, patch 2, 1x32x32, Adam 5e-4, fp32 eager,
    as shipped) against ours at the same size and batch, in one process, timed in alternating rounds.
    Training: one optimizer step per batch (ours with its grad clipping and EMA update, as train_dit.py does).
    Sampling: one Euler step with CFG (2 NFE per image: minRF runs two forwards, ours one doubled batch)."""
    import copy
    import sys
    from model import guided_velocity, pick_attention, update_ema
    sys.path.insert(0, os.path.abspath(minrf_dir))
    try:
        from dit import DiT_Llama as MinRFDiT
        from rf import RF
    except ImportError as e:
        raise SystemExit(f'error: no minRF checkout at {minrf_dir} (dit.py, rf.py): {e}')
    B, d = batch_size or 128, script_defaults('train_dit.py')
    _, default_dtype = setup_precision(device, d['dtype'])  # as train_dit.py starts: its dtype here (fp32 on a CPU
    # without bf16 units), and on a CPU glibc keeps freed memory (minRF gains too)
    x0, y = torch.randn(B, 1, 32, 32, device=device), torch.randint(0, 10, (B,), device=device)
    null = torch.full_like(y, 10)

    def minrf():
        model = MinRFDiT(1, 32, dim=64, n_layers=6, n_heads=4, num_classes=10).to(device)
        emb = model.y_embedder  # its label dropout moves the mask to CUDA unconditionally: the same draw on our device
        emb.token_drop = lambda labels, force_drop_ids=None: torch.where(
            torch.rand(labels.shape[0], device=labels.device) < emb.dropout_prob, emb.num_classes, labels)
        rf, opt = RF(model), torch.optim.Adam(model.parameters(), lr=5e-4)

        def train():
            loss, _ = rf.forward(x0, y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        @torch.no_grad()
        def sample_step():
            vc, vu = model(x0, torch.full((B,), 0.5, device=device), y), model(x0, torch.full((B,), 0.5, device=device), null)
            return x0 - 0.02 * (vu + 2.0 * (vc - vu))
        return train, sample_step, sum(p.numel() for p in model.parameters())

    def ours(variant):
        dtype = {'fp32': 'float32', 'bf16': 'bfloat16'}.get(variant.split('_')[0], default_dtype)
        attention = variant.split('_')[1] if variant.count('_') and variant.split('_')[1] in ('sdpa', 'math', 'kernels') else d['attention']
        use_compile = variant.endswith('compile') or (variant.startswith('default') and d['compile'])
        model = DiT_Llama(1, 32, 2, 64, 6, 4, 10, attention=pick_attention(attention, device_type, dtype)).to(device)
        ema = copy.deepcopy(model).requires_grad_(False)
        sampler = DiT_Llama(1, 32, 2, 64, 6, 4, 10, attention=pick_attention(attention, device_type, dtype))
        sampler = sampler.to(device).eval().requires_grad_(False)  # as sample.py builds it (its own attention choice)
        run_model = torch.compile(model, dynamic=False) if use_compile else model
        run_sampler = torch.compile(sampler, dynamic=False) if variant.endswith('compile') else sampler  # as sample.py
        ctx = torch.autocast(device_type, dtype=torch.bfloat16) if dtype == 'bfloat16' else nullcontext()
        opt = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(d['beta1'], d['beta2']), fused=True)
        flow = RectifiedFlow()

        def train():
            with ctx:
                loss, _ = flow.loss(run_model, x0, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), d['grad_clip'])
            opt.step()
            update_ema(ema, model, 0.999)

        @torch.no_grad()
        def sample_step():
            with ctx:
                return x0 - 0.02 * guided_velocity(run_sampler, x0, 0.5, y, 2.0)
        return train, sample_step, sum(p.numel() for p in model.parameters())

    impls = {'minRF': minrf(), **{v: ours(v) for v in minrf_variants.split(',')}}
    times = {k: ([], []) for k in impls}
    for train, sample_step, _ in impls.values():  # warm-up (and compile) outside the timing
        for _ in range(warmup):
            train()
            sample_step()
    for _ in range(rounds):
        for k, (train, sample_step, _) in impls.items():
            times[k][0].append(timed(train, iters))
            times[k][1].append(timed(sample_step, iters))
    med = lambda xs: sorted(xs)[len(xs) // 2]
    rows = [dict(impl=k, params=impls[k][2], batch=B, train_img_s=B / med(times[k][0]), sample_img_s_per_cfg_step=B / med(times[k][1]))
            for k in impls]
    base_t, base_s = rows[0]['train_img_s'], rows[0]['sample_img_s_per_cfg_step']
    print(f'minRF vs nanoflow at dim 64, 6 layers, 4 heads, patch 2, 1x32x32, batch {B}, {torch.get_num_threads()} threads '
          f'on {device}; median of {rounds} alternating rounds of {iters} steps; train_dit.py defaults: dtype '
          f'{default_dtype} here, attention {d["attention"]}, compile {d["compile"]}')
    print(f'{"implementation":<18} {"params":>8} {"train img/s":>11} {"vs minRF":>8} {"sample img/s/step":>17} {"vs minRF":>8}')
    for r in rows:
        r['train_vs_minrf'], r['sample_vs_minrf'] = r['train_img_s'] / base_t, r['sample_img_s_per_cfg_step'] / base_s
        print(f'{r["impl"]:<18} {r["params"]:>8} {r["train_img_s"]:>11.1f} {r["train_vs_minrf"]:>7.2f}x '
              f'{r["sample_img_s_per_cfg_step"]:>17.1f} {r["sample_vs_minrf"]:>7.2f}x', flush=True)
    with open(out_json, 'w') as f:
        json.dump(dict(device=device, threads=torch.get_num_threads(), minrf=rows), f, indent=1)


def compare_quality(out_dirs, path='quality.png'):
    """Overlay the eval.jsonl of train_dit.py runs (eval_interval): class accuracy and classifier-FID against the
    minutes of training, one line per run."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for d in out_dirs:
        rows = [json.loads(line) for line in open(os.path.join(d, 'eval.jsonl'))]
        m, name = [r['minutes'] for r in rows], os.path.basename(os.path.normpath(d))
        a1.plot(m, [100 * r['acc'] for r in rows], 'o-', label=name)
        a2.plot(m, [r['fid_cls'] for r in rows], 'o-', label=name)
    a1.set(xlabel='training minutes', ylabel='class accuracy (%)', ylim=(0, 101))
    a2.set(xlabel='training minutes', ylabel='classifier-FID', yscale='log')
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f'wrote {path}')


if curves:
    dirs = curves.split(',')
    if all(os.path.isfile(os.path.join(d, 'eval.jsonl')) for d in dirs):
        compare_quality(dirs)
    else:
        compare_curves(dirs)
    raise SystemExit
if minrf_dir:
    bench_minrf()
    raise SystemExit
if ideal:
    bench_ideal()
    raise SystemExit
if device_type == 'cuda':  # as the train scripts run: TF32 for fp32 matmuls and convolutions alike; a GPU needs
    setup_precision(device, 'float32')  # large matmuls, many of them, and more timed steps for a stable number
    iters, peak_n, peak_reps = max(iters, 20), 8192, 50
else:
    torch.set_float32_matmul_precision('highest')
    peak_n, peak_reps = 2048, 10
names = [n for n in presets.split(',') if n]
used = {VARIANTS[v][0] for v in ((dit_variants if any(not n.startswith('unet') for n in names) else '') + ',' +
                                 (unet_variants if any(n.startswith('unet') for n in names) else '')).split(',') if v}
# the dtypes the variants use: a bf16 matmul peak takes minutes
peaks = {d: matmul_peak(getattr(torch, d), peak_n, peak_reps) for d in sorted(used)}  # on a CPU without bf16 units
print(f'device {device}, {torch.get_num_threads()} threads | measured matmul peak: '
      + ', '.join(f'{d} {p / 1e9:.0f} GFLOP/s' for d, p in peaks.items()), flush=True)
rows = []
header = f'{"preset":<12} {"variant":<18} {"batch":>5} {"train img/s":>11} {"speed-up":>8} {"sample img/s/NFE":>16} {"GFLOP/img":>9} {"MFU":>6}'
print(header)
print('-' * len(header))
for name in presets.split(','):
    cfg = dict(preset_config(name), name=name)
    B = batch_size or (cfg.get('batch_size', 128) if cfg['dataset'] != 'cifar10' else 32)
    base = None
    for variant in (unet_variants if 'unet' in cfg else dit_variants).split(','):
        r = bench(cfg, variant, B)
        base = base or (r['train_img_s'] if variant == 'baseline' else None)
        r['speedup_vs_baseline'] = r['train_img_s'] / base if base else None
        rows.append(r)
        speed = f'{r["speedup_vs_baseline"]:.2f}x' if base else '-'
        print(f'{name:<12} {variant:<18} {B:>5} {r["train_img_s"]:>11.1f} {speed:>8} {r["sample_img_s_per_nfe"]:>16.1f} '
              f'{r["train_gflop_per_img"]:>9.2f} {100 * r["mfu"]:>5.1f}%', flush=True)
with open(out_json, 'w') as f:
    json.dump(dict(device=device, threads=torch.get_num_threads(), peak_flops=peaks, rows=rows), f, indent=1)
print(f'MFU = counted training FLOP/s / measured matmul peak of the same dtype; written {out_json}')
