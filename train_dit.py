"""
DiT-LLaMA rectified flow on MNIST, Fashion-MNIST, CIFAR-10 or a folder of images.

    python train_dit.py --dataset=mnist                         # one process (CPU or one GPU)
    torchrun --nproc_per_node=4 train_dit.py --dataset=cifar10  # DDP: NCCL on GPUs, gloo on CPU
    python train_dit.py --dataset=mnist --preset=gpu --compile=False   # the GPU recipe, eager
    python train_dit.py config/dit_mnist_meanflow_cpu.py        # MeanFlow: digits in one network evaluation

Each dataset has a preset for a GPU and one for a CPU (config/dit_<dataset>.py, config/dit_<dataset>_cpu.py), chosen
by the device unless --preset says which; config files and --key=value go over it (--help shows what is in effect).

Writes under out_dir: ckpt.pt, log.jsonl, loss.png, loss_vs_t.png, samples_<iter>.png, samples.png.
"""
import copy
import json
import os
import shutil
import subprocess
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from model import (Batches, DATASETS, DiT_Llama, MeanFlow, Progress, RectifiedFlow, check_choices, check_out_dir,
                   compile_fallback, cosine_lr, die, load_training_set, pick_attention, plot_loss, resume_checkpoint,
                   rng_states, sample, sample_mean_flow, save_checkpoint, save_grid, set_rng_states, setup_distributed,
                   setup_precision, start_log, teardown_distributed, update_ema)

# -----------------------------------------------------------------------------
# default config: the GPU recipe for MNIST (config/dit_mnist.py); the dataset's preset goes over these
# I/O
out_dir = ''  # '' = out/dit_<dataset>
data_dir = 'data'
dataset = 'mnist'  # mnist | fashion_mnist | cifar10 | folder (data_dir/<class>/<image>)
image_size = 0  # resize every image to image_size x image_size (0: as stored, MNIST's 28 = 14 patches; a folder: 32)
download = True
skip_bad_images = False  # a folder: leave out files that are not whole images (a note counts them)
init_from = 'scratch'  # 'scratch' or 'resume' (from out_dir/ckpt.pt)
log_interval = 50
sample_interval = 2000  # 0: only at the end. In iterations, as the presets' max_iters (the UNet scripts: after epochs)
ckpt_interval = 1000
eval_interval = 0  # every N iters (and at the end): class accuracy and classifier-FID of the EMA weights (evaluate.py)
eval_samples = 500  # samples per evaluation, at sample_steps and sample_cfg, a fixed seed
judge = ''  # the evaluations' classifier: '' = the dataset's own | mnist | fashion_mnist | cifar10 (for a folder of it)
judge_data_dir = ''  # the judge's real train and test images ('' = data_dir; a folder: DIR holding train/ and test/)
classifier_path = ''  # the judge evaluate.py uses ('' = its cache, out/classifier_<judge>.pt, trained on first use)
# training
batch_size = 128  # global: split across DDP processes
max_iters = 0  # 0: run `epochs` epochs
epochs = 10
learning_rate = 8e-4
min_lr = 5e-5
warmup_iters = 200
lr_decay_iters = 0  # cosine decay to min_lr over this many iters; 0: max_iters, -1: constant lr
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0
ema_decay = 0.999
hflip = False  # random horizontal flips (CIFAR-10)
seed = 1337
# flow
objective = 'rf'  # rf: the network learns the velocity v (rectified flow) | meanflow: its average over [r, t]
t_sampling = 'logit_normal'  # logit_normal | uniform | mode
p_uncond = 0.1  # label dropout for classifier-free guidance
sample_steps = None  # steps of the samples written in training; None: 50 (rf), 1 (meanflow)
sample_cfg = 2.0  # their guidance (rf; MeanFlow's is trained in: mf_omega, mf_kappa)
# MeanFlow (objective = 'meanflow')
mf_ratio = 0.25  # share of the batch with r != t; the rest has r = t, plain flow matching
mf_omega = 1.0  # trained-in guidance: v~ = omega v + kappa u(z, t, t | y) + (1 - omega - kappa) u(z, t, t | null)
mf_kappa = 0.5  # ... its effective scale omega / (1 - kappa); omega = 1, kappa = 0: no guidance
mf_weight_p = 1.0  # adaptive loss weight 1 / (|u - u_tgt|^2 + 1e-3)^p; 0: the plain squared error
mf_t = ()  # (mean, std): t = sigmoid(N(mean, std^2)), the larger of the pair; (): drawn as t_sampling says
mf_r = ()  # the same for r, the smaller
# model
dim = 128
n_layers = 6
n_heads = 4
patch_size = 2
qk_norm = True
stem_channels = 32
# system
device = 'auto'  # auto | cpu | cuda
dtype = 'bfloat16'  # bfloat16 (autocast) | float32
compile = True  # torch.compile the training step (on a CPU it needs a C++ compiler; without one the run is eager)
attention = 'auto'  # sdpa | math (softmax written out) | kernels (CPU kernels) | auto: as model.pick_attention says
preset = 'auto'  # the dataset's recipe under config files and --key=value: auto (by the device) | gpu | cpu | none
config_domains = dict(  # each number's domain: a kind of configurator.py (count >= 1, count0 >= 0, ...) or a range
    image_size=(0, 4096), log_interval='count', sample_interval='count0', ckpt_interval='count', eval_interval='count0',
    eval_samples='count',  # I/O
    batch_size='count', max_iters='count0', epochs='count', learning_rate='rate', min_lr=(0, 10), warmup_iters='count0',
    lr_decay_iters=(-1, 10 ** 7), weight_decay='nonneg', beta1='decay', beta2='decay', grad_clip='positive',
    ema_decay='decay', seed='seed',  # training
    p_uncond='prob', sample_steps='count', sample_cfg='nonneg',  # flow
    mf_ratio='prob', mf_omega='nonneg', mf_kappa='decay', mf_weight_p=(0, 2),  # MeanFlow
    dim='size', n_layers='size', n_heads='size', patch_size='size', stem_channels='size')  # model
config_keys = [k for k, v in globals().items()  # the settings configurator.py may change, as nanoGPT declares them
               if not k.startswith('_') and k.islower() and isinstance(v, (bool, int, float, str, tuple, list, type(None)))]
PRESETS = {'mnist': 'dit_mnist', 'fashion_mnist': 'dit_mnist', 'cifar10': 'dit_cifar10'}  # config/<name>[_cpu].py


def preset_file():
    """The preset configurator.py applies: the GPU or CPU recipe of the dataset, as `preset` says or by the device."""
    if preset not in ('auto', 'gpu', 'cpu') or dataset not in PRESETS:
        return ''
    gpu = preset == 'gpu' or preset == 'auto' and device != 'cpu' and (device == 'cuda' or torch.cuda.is_available())
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config', PRESETS[dataset] + ('' if gpu else '_cpu') + '.py')


exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
out_dir = out_dir or f'out/dit_{dataset}'
config = {k: globals()[k] for k in config_keys}
# -----------------------------------------------------------------------------


JUDGES = ('mnist', 'fashion_mnist', 'cifar10')  # evaluate.py's classifiers (its RECIPES)
check_choices(dataset=(dataset, DATASETS), dtype=(dtype, ('bfloat16', 'float32')),
              device=(device, ('auto', 'cpu', 'cuda')), init_from=(init_from, ('scratch', 'resume')),
              attention=(attention, ('auto', 'sdpa', 'math', 'kernels')),
              t_sampling=(t_sampling, ('logit_normal', 'uniform', 'mode')), objective=(objective, ('rf', 'meanflow')),
              judge=(judge, ('', *JUDGES)), preset=(preset, ('auto', 'gpu', 'cpu', 'none')))
for name, pair in (('mf_t', mf_t), ('mf_r', mf_r)):
    if pair and not (len(pair) == 2 and all(isinstance(v, (int, float)) for v in pair) and 0 < pair[1] < 100):
        die(f'{name} must be () or (mean, std) of a logit-normal draw, std > 0, e.g. --{name}="(-0.4,1.0)"; got {pair!r}')
if eval_interval and (judge or dataset) not in JUDGES:
    die(f'--eval_interval judges samples with evaluate.py\'s classifiers (mnist, fashion_mnist, cifar10); for a folder '
        f'of images name one, e.g. --judge=cifar10 --judge_data_dir=DIR, or drop --eval_interval')
t_begin = time.time()  # the training wall clock (evaluations excluded) counts from here

# processes and devices: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE
check_out_dir(out_dir)  # before any work: a file, a folder that cannot be made or written
ddp, rank, local_rank, world_size, device = setup_distributed(device, batch_size)
master = rank == 0
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
log = print if master else (lambda *a, **k: None)
if config_preset:  # the first line: which recipe, why, and how to choose another
    cpu_recipe = config_preset.endswith('_cpu.py')
    why = f'--preset={preset}' if preset != 'auto' else 'no GPU found' if cpu_recipe else 'a GPU found'
    log(f'preset: config/{os.path.basename(config_preset)} ({why}; --preset={"gpu" if cpu_recipe else "cpu"} for the '
        f'{"GPU" if cpu_recipe else "CPU"} recipe, --preset=none for the defaults; config files and --key=value go over it)')
ctx, dtype = setup_precision(device, dtype, log)  # TF32 on GPUs; bf16 autocast where the device has it
compile = compile_fallback(compile, device_type, log)  # no C++ compiler on a CPU: eager, with one note
torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest convolutions (the stem)
torch.manual_seed(seed + rank)

# data: the whole set as uint8 on the device; each process reads its DistributedSampler share
x_all, y_all = load_training_set(dataset, data_dir, image_size, download, ddp, local_rank, device, skip_bad_images)
C, H, W = x_all.shape[1:]
num_classes = int(y_all.max()) + 1
batches = Batches(x_all, y_all, batch_size, world_size, rank, seed, hflip=hflip)
iters_per_epoch = batches.iters_per_epoch
if iters_per_epoch == 0:
    die(f'{len(x_all)} images are fewer than one batch of {batch_size}: lower --batch_size')
max_iters = max_iters or epochs * iters_per_epoch


# model, EMA copy and optimizer, from scratch or from out_dir/ckpt.pt
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
model_args = dict(in_channels=C, input_size=H, patch_size=patch_size, dim=dim, n_layers=n_layers, n_heads=n_heads,
                  num_classes=num_classes, p_uncond=p_uncond, qk_norm=qk_norm, stem_channels=stem_channels,
                  mean_flow=objective == 'meanflow')  # sample.py and evaluate.py read it: MeanFlow samples in 1 step
iter_num, ckpt = 0, None
if init_from == 'resume':
    ckpt = resume_checkpoint(ckpt_path, dict(arch='dit', in_channels=C, input_size=H), model_args, config_given)
    model_args, iter_num = ckpt['model_args'], ckpt['iter_num']
    if model_args.get('mean_flow', False) != (objective == 'meanflow'):
        die(f'{ckpt_path} was trained with --objective={"meanflow" if model_args.get("mean_flow") else "rf"}, this run '
            f'has --objective={objective}: use that run\'s objective, or another --out_dir')
    # MeanFlow's settings shape its target: a resumed run keeps its own, unless this command gives them
    for k in ('mf_ratio', 'mf_omega', 'mf_kappa', 'mf_weight_p', 'mf_t', 'mf_r'):
        if objective == 'meanflow' and k not in config_given and k in ckpt.get('config', {}):
            config[k] = globals()[k] = ckpt['config'][k]
train_seconds = ckpt.get('train_seconds', 0.0) if ckpt else 0.0  # wall clock of the run so far, evaluations excluded
if H != W or H % model_args['patch_size']:
    die(f'images are {H}x{W}: they must be square with a side divisible by patch_size {model_args["patch_size"]}')
if model_args['dim'] % model_args['n_heads'] or model_args['dim'] // model_args['n_heads'] % 4:
    die(f'dim {model_args["dim"]} / n_heads {model_args["n_heads"]} must be a whole multiple of 4 (2D RoPE)')
model = DiT_Llama(**model_args, attention=pick_attention(attention, device_type, dtype)).to(device)
ema = copy.deepcopy(model).eval().requires_grad_(False)
optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(beta1, beta2), weight_decay=weight_decay,
                              fused=True)  # one fused kernel for the whole update, on CPU and GPU
if ckpt is not None:
    model.load_state_dict(ckpt['model'])
    ema.load_state_dict(ckpt['ema'])
    optimizer.load_state_dict(ckpt['optimizer'])  # Adam's moments; its betas and weight decay: this run's settings
    optimizer.param_groups[0].update(betas=(beta1, beta2), weight_decay=weight_decay)
    set_rng_states(ckpt['rng'], rank, world_size, seed + rank + iter_num)
    del ckpt
n_params = sum(p.numel() for p in model.parameters())
train_model = torch.compile(model) if compile else model
if ddp:
    train_model = DDP(train_model, device_ids=[local_rank] if device_type == 'cuda' else None, forward_sync_buffers=False)
if objective == 'meanflow':  # its jvp runs on the plain model (DDP cannot carry it), its loss's forward on train_model
    flow = MeanFlow(model, t_sampling, mf_ratio, model_args['p_uncond'], mf_omega, mf_kappa, weight_p=mf_weight_p,
                    t_dist=mf_t, r_dist=mf_r)  # the label dropout of the network's model_args, as a flow run's
else:
    flow = RectifiedFlow(t_sampling)
sample_steps = sample_steps or (1 if objective == 'meanflow' else 50)


@torch.no_grad()
def write_samples(path):
    """Rows = classes 0..9, 8 samples each, from the EMA weights; fixed noise so grids are comparable."""
    n_rows = min(num_classes, 10)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n_rows * 8, C, H, W, generator=g).to(device)
    y = torch.arange(n_rows, device=device).repeat_interleave(8)
    with ctx:
        if objective == 'meanflow':
            x = sample_mean_flow(ema, z, y, steps=sample_steps)
        else:
            x = sample(ema, z, y, steps=sample_steps, cfg=sample_cfg)
    save_grid(x, path, nrow=8)


def plot_loss_vs_t(t, loss, path, bins=20):
    """Mean per-sample loss in equal-width bins of t."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    idx = (t.clamp(0, 1 - 1e-6) * bins).long()
    counts = torch.bincount(idx, minlength=bins)
    means = torch.bincount(idx, weights=loss.double(), minlength=bins) / counts.clamp(min=1)
    centres = (torch.arange(bins) + 0.5) / bins
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(centres[counts > 0], means[counts > 0], 'o-')
    ax.set(xlabel='t  (0 = data, 1 = noise)', ylabel='mean loss', title=f'loss versus t ({len(t)} samples)')
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate_ema(it):
    """evaluate.py, run as a user would, on the EMA weights: class accuracy and classifier-FID of eval_samples samples,
    appended to eval.jsonl with the training wall clock so far (this evaluation's own time is not counted)."""
    t0 = time.time()
    minutes = (train_seconds + t0 - t_begin) / 60
    path, out_json = os.path.join(out_dir, 'eval_ckpt.pt'), os.path.join(out_dir, 'eval_last.json')
    save_checkpoint(dict(model_args=model_args, model=ema.state_dict(), iter_num=it, config=config), path)
    cfg = [] if objective == 'meanflow' else [f'--cfg={sample_cfg}']  # MeanFlow's guidance is in its weights
    p = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'evaluate.py'),
                        f'--ckpt={path}', f'--data_dir={data_dir}', f'--num_samples={eval_samples}', *cfg,
                        f'--steps={sample_steps}', '--inception=off', f'--out_json={out_json}', f'--device={device_type}',
                        f'--classifier_path={classifier_path}', f'--judge={judge}', f'--judge_data_dir={judge_data_dir}'],
                       capture_output=True, text=True)
    os.remove(path)
    if p.returncode:
        log(f'note: evaluation at iter {it} failed: {(p.stderr.strip().splitlines() or ["?"])[-1]}')
    else:
        r = json.load(open(out_json))['rows'][0]
        row = dict(iter=it, minutes=minutes, acc=r['acc'], fid_cls=r['fid_cls'], samples=eval_samples)
        with open(eval_path, 'a') as f:
            f.write(json.dumps(row) + '\n')
        log(f'eval at iter {it} ({minutes:.1f} min of training): accuracy {100 * r["acc"]:.1f} % | FID-cls '
            f'{r["fid_cls"]:.2f} | {eval_samples} samples, {time.time() - t0:.0f} s', flush=True)
        plot_eval([json.loads(line) for line in open(eval_path)], os.path.join(out_dir, 'eval.png'))
    return time.time() - t0


def plot_eval(rows, path):
    """Accuracy and classifier-FID against training minutes."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    m = [r['minutes'] for r in rows]
    a1.plot(m, [100 * r['acc'] for r in rows], 'o-')
    a2.plot(m, [r['fid_cls'] for r in rows], 'o-')
    a1.set(xlabel='training minutes', ylabel='class accuracy (%)', title=f'{rows[-1]["samples"]} samples, cfg {sample_cfg:g}')
    a2.set(xlabel='training minutes', ylabel='classifier-FID', yscale='log', title='lower is better')
    for a in (a1, a2):
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots():
    rows = [json.loads(line) for line in open(log_path)]
    plot_loss([r['iter'] for r in rows], [r['loss'] for r in rows], os.path.join(out_dir, 'loss.png'),
              title=f'DiT-LLaMA {"MeanFlow" if objective == "meanflow" else "rectified flow"} on {dataset}')
    if t_seen:
        plot_loss_vs_t(torch.cat(t_seen).cpu(), torch.cat(loss_seen).cpu(), os.path.join(out_dir, 'loss_vs_t.png'))


log_path, eval_path = os.path.join(out_dir, 'log.jsonl'), os.path.join(out_dir, 'eval.jsonl')
if master:
    os.makedirs(out_dir, exist_ok=True)
    start_log(log_path, iter_num)
    if eval_interval:
        start_log(eval_path, iter_num)
log(f'DiT-LLaMA {n_params / 1e6:.2f}M params | {dataset} {len(x_all)} images {C}x{H}x{W}, {num_classes} classes | '
    f'{world_size} process(es) on {device}, {dtype} | batch {batch_size}, {iters_per_epoch} iters/epoch, '
    f'iters {iter_num} -> {max_iters}', flush=True)
if compile:
    log('torch.compile: the first iteration compiles the model (up to a minute on a 2-core CPU; --compile=False: eager)')

# training loop
t_seen, loss_seen = [], []  # per-sample (t, loss) of the last 200 iterations, kept on the device, for loss_vs_t.png
progress = Progress(iter_num, max_iters, batch_size, iters_per_epoch, ddp, world_size, ckpt_path)
train_model.train()
while iter_num < max_iters:
    lr = cosine_lr(iter_num, learning_rate, min_lr, warmup_iters, lr_decay_iters or max_iters)
    for group in optimizer.param_groups:
        group['lr'] = lr
    x0, y = batches.get(iter_num)
    with ctx:
        loss, (t, per_sample) = flow.loss(train_model, x0, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    update_ema(ema, model, min(ema_decay, (1 + iter_num) / (10 + iter_num)))  # short EMA memory early on
    iter_num += 1
    # summed on the device: read (and checked for NaN) only at log and checkpoint time; the mean squared error (rf: the
    # loss; MeanFlow's adaptive weight makes its loss about 1, whatever the error)
    progress.add(per_sample.mean(), grad_norm)
    if master:
        t_seen.append(t)
        loss_seen.append(per_sample)
        del t_seen[:-200], loss_seen[:-200]

    if iter_num % log_interval == 0 or iter_num == max_iters:
        row, line = progress.report(iter_num, lr)
        log(line, flush=True)
        if master:
            with open(log_path, 'a') as f:
                f.write(json.dumps(row) + '\n')
    if master and sample_interval and iter_num % sample_interval == 0 and iter_num < max_iters:
        write_samples(os.path.join(out_dir, f'samples_{iter_num:06d}.png'))
        progress.pause()
    if master and eval_interval and (iter_num % eval_interval == 0 or iter_num == max_iters):
        t_begin += evaluate_ema(iter_num)  # the clock stops while evaluate.py runs
        progress.pause()
    stop = progress.interrupted(iter_num)  # Ctrl-C or SIGTERM: a checkpoint at this iteration, then stop
    if iter_num % ckpt_interval == 0 or iter_num == max_iters or stop:
        progress.check(iter_num)  # a NaN since the last report stops the run here, before the checkpoint
        rng = rng_states(ddp, world_size)
        if master:
            save_checkpoint(dict(model_args=model_args, model=model.state_dict(), ema=ema.state_dict(),
                                 optimizer=optimizer.state_dict(), iter_num=iter_num, epoch=iter_num // iters_per_epoch,
                                 config=config, rng=rng, train_seconds=train_seconds + time.time() - t_begin), ckpt_path)
            write_plots()
        progress.pause()
    if stop:
        progress.exit_interrupted(iter_num)  # one line on how to go on

if master:
    write_plots()
    write_samples(os.path.join(out_dir, 'samples.png'))
    shutil.copy(os.path.join(out_dir, 'samples.png'), os.path.join(out_dir, f'samples_{iter_num:06d}.png'))
    log(f'done: {iter_num} iters in {(time.time() - progress.t_start) / 60:.1f} min; outputs in {out_dir}', flush=True)
if ddp:
    # DDP keeps every process's weights identical: log a checksum (sum, sum of squares) of each process's
    # parameters so that can be checked (the 2-process test compares them)
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    sums = [torch.zeros(2, dtype=torch.float64, device=device) for _ in range(world_size)]
    dist.all_gather(sums, torch.stack([flat.sum(), flat.square().sum()]))
    log('DDP: parameter checksums per process: ' + ', '.join('{:.17g} {:.17g}'.format(*s.tolist()) for s in sums), flush=True)
    del train_model, model, optimizer  # DDP's hooks on the weights hold the process group
    teardown_distributed()
