"""
train_flow_unet.py plus a class label: the same UNet, data, loop and checkpoints, with a class embedding,
label dropout and guided sample grids.

Class-conditioned flow-matching UNet trained for classifier-free guidance (CFG): the label is dropped to
the null class with probability p_uncond, so one network gives both v(x_t, t, y) and v(x_t, t); sampling
uses v = v_uncond + cfg (v_cond - v_uncond).

    python train_class_cfg.py                                      # MNIST at 32x32, 10 epochs
    torchrun --nproc_per_node=2 train_class_cfg.py --dataset=fashion_mnist

Writes under out_dir: ckpt.pt, log.jsonl, loss.png, samples_epochNN.png after each epoch in sample_epochs
(10x4 grid: 4 samples of each class, row = class, at guidance sample_cfg) and samples.png at the end.
"""
import copy
import json
import os
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from model import (Batches, DATASETS, Progress, RectifiedFlow, build_model, check_choices, check_out_dir,
                   compile_fallback, cosine_lr, die, load_training_set, plot_loss, resume_checkpoint, rng_states,
                   sample, save_checkpoint, save_grid, set_rng_states, setup_distributed, setup_precision, start_log,
                   teardown_distributed, update_ema)

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out/class_cfg'
data_dir = 'data'
dataset = 'mnist'  # mnist | fashion_mnist | cifar10 | folder
image_size = 32  # resize every image to image_size x image_size (0: as stored); 32: UNet levels 32, 16, 8 (the DiT: 28)
download = True
skip_bad_images = False  # a folder: leave out files that are not whole images (a note counts them)
init_from = 'scratch'  # 'scratch' or 'resume'
log_interval = 50
ckpt_interval = 1000
sample_epochs = (1, 5, 10)  # write a sample grid after these epochs (train_dit.py: by iterations)
# training
batch_size = 128
max_iters = 0  # 0: run `epochs` epochs
epochs = 10
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 200
lr_decay_iters = 0  # 0: max_iters, -1: constant lr
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0
ema_decay = 0.999
hflip = False  # random horizontal flips (CIFAR-10)
seed = 1337
# flow
t_sampling = 'uniform'
p_uncond = 0.1  # label dropout: the share of null-class labels in training
sample_steps = 50
sample_cfg = 5.0  # guidance of the sample grids
# model
base_channels = 32
channel_mult = (1, 2, 2)
n_res = 2  # ResBlocks per level (1 halves the cost: what the CPU runs in docs/results.md use)
# system
device = 'auto'
dtype = 'bfloat16'
compile = False  # unlike train_dit.py: its gain was measured for the DiT only (docs/performance.md)
channels_last = True  # NHWC convolutions: faster with oneDNN on CPU and with cuDNN on GPU
config_domains = dict(  # each number's domain: a kind of configurator.py (count >= 1, count0 >= 0, ...) or a range
    image_size=(0, 4096), log_interval='count', ckpt_interval='count', sample_epochs='count',  # I/O
    batch_size='count', max_iters='count0', epochs='count', learning_rate='rate', min_lr=(0, 10), warmup_iters='count0',
    lr_decay_iters=(-1, 10 ** 7), weight_decay='nonneg', beta1='decay', beta2='decay', grad_clip='positive', ema_decay='decay',
    seed='seed',  # training
    p_uncond='prob', sample_steps='count', sample_cfg='nonneg',  # flow
    base_channels='size', channel_mult='size', n_res='size')  # model
config_keys = [k for k, v in globals().items()  # the settings configurator.py may change, as nanoGPT declares them
               if not k.startswith('_') and k.islower() and isinstance(v, (bool, int, float, str, tuple, list, type(None)))]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: globals()[k] for k in config_keys}
# -----------------------------------------------------------------------------


check_choices(dataset=(dataset, DATASETS), dtype=(dtype, ('bfloat16', 'float32')),
              device=(device, ('auto', 'cpu', 'cuda')), init_from=(init_from, ('scratch', 'resume')),
              t_sampling=(t_sampling, ('logit_normal', 'uniform', 'mode')))
check_out_dir(out_dir)  # before any work: a file, a folder that cannot be made or written
ddp, rank, local_rank, world_size, device = setup_distributed(device, batch_size)
master, device_type = rank == 0, ('cuda' if device.startswith('cuda') else 'cpu')
log = print if master else (lambda *a, **k: None)
ctx, dtype = setup_precision(device, dtype, log)  # TF32 on GPUs; bf16 autocast where the device has it
compile = compile_fallback(compile, device_type, log)  # no C++ compiler on a CPU: eager, with one note
torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest convolutions
torch.manual_seed(seed + rank)
memory_format = torch.channels_last if channels_last else torch.contiguous_format

# data: resized to image_size, in [-1, 1]
x_all, y_all = load_training_set(dataset, data_dir, image_size, download, ddp, local_rank, device, skip_bad_images)
C, S, num_classes = x_all.shape[1], x_all.shape[-1], int(y_all.max()) + 1
batches = Batches(x_all, y_all, batch_size, world_size, rank, seed, hflip=hflip)
iters_per_epoch = batches.iters_per_epoch
if iters_per_epoch == 0:
    die(f'{len(x_all)} images are fewer than one batch of {batch_size}: lower --batch_size')
max_iters = max_iters or epochs * iters_per_epoch
if S % 2 ** (len(channel_mult) - 1):
    die(f'image_size {S} must be divisible by {2 ** (len(channel_mult) - 1)} for channel_mult {channel_mult}')

# model: a UNet conditioned on t and the class (index num_classes = the null class)
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
model_args = dict(in_channels=C, input_size=S, base_channels=base_channels, channel_mult=tuple(channel_mult), n_res=n_res,
                  time_cond=True, num_classes=num_classes, p_uncond=p_uncond)
iter_num, ckpt = 0, None
if init_from == 'resume':
    ckpt = resume_checkpoint(ckpt_path, dict(arch='unet', in_channels=C, input_size=S, time_cond=True,
                                             num_classes=num_classes), model_args, config_given)
    model_args, iter_num = ckpt['model_args'], ckpt['iter_num']
model = build_model(model_args).to(device, memory_format=memory_format)
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
train_model = torch.compile(model) if compile else model
if ddp:
    train_model = DDP(train_model, device_ids=[local_rank] if device_type == 'cuda' else None, forward_sync_buffers=False)
flow = RectifiedFlow(t_sampling)


@torch.no_grad()
def write_samples(path):
    """Row k = 4 samples of class k at guidance sample_cfg, from fixed noise (grids compare across epochs)."""
    n_rows = min(num_classes, 10)
    z = torch.randn(4 * n_rows, C, S, S, generator=torch.Generator().manual_seed(seed)).to(device)
    y = torch.arange(n_rows, device=device).repeat_interleave(4)
    with ctx:
        x = sample(ema, z.contiguous(memory_format=memory_format), y, steps=sample_steps, cfg=sample_cfg)
    save_grid(x, path, nrow=4)


def write_plot():
    rows = [json.loads(line) for line in open(log_path)]
    plot_loss([r['iter'] for r in rows], [r['loss'] for r in rows], os.path.join(out_dir, 'loss.png'),
              title=f'class-conditional UNet (CFG) on {dataset}')


log_path = os.path.join(out_dir, 'log.jsonl')
if master:
    os.makedirs(out_dir, exist_ok=True)
    start_log(log_path, iter_num)
log(f'class-conditional UNet {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params | {dataset} '
    f'{len(x_all)} images at {C}x{S}x{S}, {num_classes} classes | {world_size} process(es) on '
    f'{device}, {dtype} | batch {batch_size}, {iters_per_epoch} iters/epoch, iters {iter_num} -> {max_iters}', flush=True)

progress = Progress(iter_num, max_iters, batch_size, iters_per_epoch, ddp, world_size, ckpt_path)
train_model.train()
while iter_num < max_iters:
    lr = cosine_lr(iter_num, learning_rate, min_lr, warmup_iters, lr_decay_iters or max_iters)
    for group in optimizer.param_groups:
        group['lr'] = lr
    x0, y = batches.get(iter_num)
    with ctx:
        loss, _ = flow.loss(train_model, x0.contiguous(memory_format=memory_format), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    update_ema(ema, model, min(ema_decay, (1 + iter_num) / (10 + iter_num)))  # short EMA memory early on
    iter_num += 1
    progress.add(loss, grad_norm)  # summed on the device: read (and checked for NaN) only at log and checkpoint time

    if iter_num % log_interval == 0 or iter_num == max_iters:
        row, line = progress.report(iter_num, lr)
        log(line, flush=True)
        if master:
            with open(log_path, 'a') as f:
                f.write(json.dumps(row) + '\n')
    epoch_done = iter_num % iters_per_epoch == 0 and iter_num // iters_per_epoch in sample_epochs
    if master and epoch_done:
        write_samples(os.path.join(out_dir, f'samples_epoch{iter_num // iters_per_epoch:02d}.png'))
        progress.pause()
    stop = progress.interrupted(iter_num)  # Ctrl-C or SIGTERM: a checkpoint at this iteration, then stop
    if iter_num % ckpt_interval == 0 or iter_num == max_iters or stop:
        progress.check(iter_num)  # a NaN since the last report stops the run here, before the checkpoint
        rng = rng_states(ddp, world_size)
        if master:
            save_checkpoint(dict(model_args=model_args, model=model.state_dict(), ema=ema.state_dict(),
                                 optimizer=optimizer.state_dict(), iter_num=iter_num, epoch=iter_num // iters_per_epoch,
                                 config=config, rng=rng), ckpt_path)
            write_plot()
        progress.pause()
    if stop:
        progress.exit_interrupted(iter_num)  # one line on how to go on

if master:
    write_plot()
    write_samples(os.path.join(out_dir, 'samples.png'))
    log(f'done: {iter_num} iters in {(time.time() - progress.t_start) / 60:.1f} min; outputs in {out_dir}', flush=True)
if ddp:
    del train_model, model, optimizer  # DDP's hooks on the weights hold the process group
    teardown_distributed()
