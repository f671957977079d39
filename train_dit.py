"""
DiT-LLaMA rectified flow on MNIST, Fashion-MNIST, CIFAR-10 or a folder of images.

    python train_dit.py --dataset=mnist                         # one process (CPU or one GPU)
    python train_dit.py config/dit_cifar10.py --compile=True
    torchrun --nproc_per_node=4 train_dit.py --dataset=cifar10  # DDP: NCCL on GPUs, gloo on CPU

Writes under out_dir: ckpt.pt, log.jsonl, loss.png, loss_vs_t.png, samples_<iter>.png, samples.png.
"""
import copy
import json
import math
import os
import shutil
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from model import (Batches, DATASETS, DiT_Llama, Progress, RectifiedFlow, check_choices, cosine_lr, die,
                   load_training_set, mean_over_processes, plot_loss, plot_loss_vs_t, resume_checkpoint,
                   rng_states, sample, save_checkpoint, save_grid, set_rng_states, setup_distributed, start_log,
                   update_ema)

# -----------------------------------------------------------------------------
# default config: MNIST; config/dit_cifar10.py holds the CIFAR-10 preset
# I/O
out_dir = 'out/dit_mnist'
data_dir = 'data'
dataset = 'mnist'  # mnist | fashion_mnist | cifar10 | folder (data_dir/<class>/<image>)
image_size = 32  # only for dataset=folder
download = True
init_from = 'scratch'  # 'scratch' or 'resume' (from out_dir/ckpt.pt)
log_interval = 50
sample_interval = 2000  # 0: only at the end
ckpt_interval = 1000
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
t_sampling = 'logit_normal'  # logit_normal | uniform | mode
p_uncond = 0.1  # label dropout for classifier-free guidance
sample_steps = 50
sample_cfg = 2.0
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
compile = False
attention = 'auto'  # sdpa | math (explicit softmax) | auto: sdpa on CUDA, math on CPU (faster there in bf16, see bench.py)
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: globals()[k] for k in _config_keys}
# -----------------------------------------------------------------------------


check_choices(dataset=(dataset, DATASETS), dtype=(dtype, ('bfloat16', 'float32')),
              device=(device, ('auto', 'cpu', 'cuda')), init_from=(init_from, ('scratch', 'resume')),
              attention=(attention, ('auto', 'sdpa', 'math')),
              t_sampling=(t_sampling, ('logit_normal', 'uniform', 'mode')))

# processes and devices: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE
try:
    ddp, rank, local_rank, world_size, device = setup_distributed(device, batch_size)
except ValueError as e:
    die(e)
master = rank == 0
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
torch.manual_seed(seed + rank)
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
ctx = torch.autocast(device_type, dtype=torch.bfloat16) if dtype == 'bfloat16' else nullcontext()
log = print if master else (lambda *a, **k: None)

# data: the whole set as uint8 in memory; each process reads its DistributedSampler share
x_all, y_all = load_training_set(dataset, data_dir, image_size, download, ddp, master)
C, H, W = x_all.shape[1:]
num_classes = int(y_all.max()) + 1
batches = Batches(x_all, y_all, batch_size, world_size, rank, seed, hflip=hflip, device=device)
iters_per_epoch = batches.iters_per_epoch
if iters_per_epoch == 0:
    die(f'{len(x_all)} images are fewer than one batch of {batch_size}: lower --batch_size')
max_iters = max_iters or epochs * iters_per_epoch


# model, EMA copy and optimizer, from scratch or from out_dir/ckpt.pt
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
model_args = dict(in_channels=C, input_size=H, patch_size=patch_size, dim=dim, n_layers=n_layers, n_heads=n_heads,
                  num_classes=num_classes, p_uncond=p_uncond, qk_norm=qk_norm, stem_channels=stem_channels)
iter_num, ckpt = 0, None
if init_from == 'resume':
    try:
        ckpt = resume_checkpoint(ckpt_path, dict(in_channels=C, input_size=H))
    except ValueError as e:
        die(e)
    model_args, iter_num = ckpt['model_args'], ckpt['iter_num']
if H != W or H % model_args['patch_size']:
    die(f'images are {H}x{W}: they must be square with a side divisible by patch_size {model_args["patch_size"]}')
try:
    model = DiT_Llama(**model_args, sdpa=attention == 'sdpa' or attention == 'auto' and device_type == 'cuda').to(device)
except AssertionError as e:
    die(e)
ema = copy.deepcopy(model).eval().requires_grad_(False)
optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(beta1, beta2), weight_decay=weight_decay)
if ckpt is not None:
    model.load_state_dict(ckpt['model'])
    ema.load_state_dict(ckpt['ema'])
    optimizer.load_state_dict(ckpt['optimizer'])
    if not set_rng_states(ckpt['rng'], rank, world_size, seed + rank + iter_num):
        log(f'note: checkpoint has RNG states for {len(ckpt["rng"])} processes, not {world_size}; reseeding')
    del ckpt
n_params = sum(p.numel() for p in model.parameters())
train_model = torch.compile(model) if compile else model
if ddp:
    train_model = DDP(train_model, device_ids=[local_rank] if device_type == 'cuda' else None)
flow = RectifiedFlow(t_sampling)


@torch.no_grad()
def write_samples(path):
    """Rows = classes 0..9, 8 samples each, from the EMA weights; fixed noise so grids are comparable."""
    n_rows = min(num_classes, 10)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n_rows * 8, C, H, W, generator=g).to(device)
    y = torch.arange(n_rows, device=device).repeat_interleave(8)
    with ctx:
        x = sample(ema, z, y, steps=sample_steps, cfg=sample_cfg)
    save_grid(x, path, nrow=8)


def write_plots():
    rows = [json.loads(line) for line in open(log_path)]
    plot_loss([r['iter'] for r in rows], [r['loss'] for r in rows], os.path.join(out_dir, 'loss.png'),
              title=f'DiT-LLaMA rectified flow on {dataset}')
    if t_seen:
        plot_loss_vs_t(torch.cat(t_seen), torch.cat(loss_seen), os.path.join(out_dir, 'loss_vs_t.png'))


log_path = os.path.join(out_dir, 'log.jsonl')
if master:
    os.makedirs(out_dir, exist_ok=True)
    start_log(log_path, iter_num)
log(f'DiT-LLaMA {n_params / 1e6:.2f}M params | {dataset} {len(x_all)} images {C}x{H}x{W}, {num_classes} classes | '
    f'{world_size} process(es) on {device}, {dtype} | batch {batch_size}, {iters_per_epoch} iters/epoch, '
    f'iters {iter_num} -> {max_iters}', flush=True)

# training loop
t_seen, loss_seen = [], []  # per-sample (t, loss) of the recent iterations, for the loss-versus-t plot
progress = Progress(iter_num, max_iters, batch_size, iters_per_epoch)
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
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    loss_all = mean_over_processes(loss, ddp, world_size)  # the same on every process, so all stop together
    if not math.isfinite(loss_all):
        die(f'loss is {loss_all} at iter {iter_num}; stopped without writing, the last good checkpoint '
            f'({ckpt_path}) is untouched. Lower --learning_rate or use --dtype=float32, then --init_from=resume')
    optimizer.step()
    update_ema(ema, model, min(ema_decay, (1 + iter_num) / (10 + iter_num)))  # short EMA memory early on
    iter_num += 1
    progress.add(loss_all)
    if master:
        t_seen.append(t.cpu())
        loss_seen.append(per_sample.cpu())
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
    if iter_num % ckpt_interval == 0 or iter_num == max_iters:
        rng = rng_states(ddp, world_size)
        if master:
            save_checkpoint(dict(model_args=model_args, model=model.state_dict(), ema=ema.state_dict(),
                                 optimizer=optimizer.state_dict(), iter_num=iter_num, epoch=iter_num // iters_per_epoch,
                                 config=config, rng=rng), ckpt_path)
            write_plots()
        progress.pause()

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
    dist.destroy_process_group()
