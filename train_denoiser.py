"""
One-step denoising UNet, part 1 of the course: learn D(z) ~ x from z = x + sigma * eps at one sigma,
then ask it about noise levels it never saw, and about pure noise.

    python train_denoiser.py                                             # sigma = 0.5, 5 epochs
    python train_denoiser.py --mode=pure_noise                           # z = eps: noise -> digit in one step

Writes under out_dir: noise_grid.png (test digits at every sigma), log.jsonl, loss.png, ckpt.pt, and
  mode=denoise:    denoise_epochNN.png (clean / noisy / denoised test digits), ood_sweep.png (the trained
                   denoiser on every sigma of the sweep);
  mode=pure_noise: pure_noise_epochNN.png (the training-set mean beside outputs for fresh noise) and
                   pure_noise.json (the distances that show the outputs are the mean image).
"""
import copy
import json
import os
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from model import (Batches, DATASETS, Progress, build_model, check_choices, check_out_dir, compile_fallback, cosine_lr,
                   die, load_dataset, load_training_set, plot_loss, resize, resume_checkpoint, rng_states,
                   save_checkpoint, save_labelled_grid, set_rng_states, setup_distributed, setup_precision, start_log,
                   teardown_distributed, to_model_range, update_ema)

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out/denoiser'
data_dir = 'data'
dataset = 'mnist'  # mnist | fashion_mnist | cifar10 | folder
image_size = 32  # resize every image to image_size x image_size (0: as stored); 32: UNet levels 32, 16, 8 (the DiT: 28)
download = True
skip_bad_images = False  # a folder: leave out files that are not whole images (a note counts them)
init_from = 'scratch'
log_interval = 50
ckpt_interval = 1000
sample_epochs = (1, 5)  # figures after these epochs (train_dit.py: by iterations)
# training
mode = 'denoise'  # denoise: z = x + sigma eps | pure_noise: z = eps
sigma = 0.5  # the one noise level the denoiser is trained at
sigmas = (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0)  # the noise grid and the out-of-distribution sweep
batch_size = 128
max_iters = 0  # 0: run `epochs` epochs
epochs = 5
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 100  # the flow scripts' 200 over 10 epochs, for this run of 5
lr_decay_iters = 0
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0
ema_decay = 0.999
hflip = False  # random horizontal flips (CIFAR-10)
seed = 1337
# model
base_channels = 32
channel_mult = (1, 2, 2)
n_res = 2  # ResBlocks per level (1 halves the cost: what the CPU runs in docs/results.md use)
# system
device = 'auto'
dtype = 'bfloat16'
compile = False  # unlike train_dit.py: its gain was measured for the DiT only (docs/performance.md)
channels_last = True
config_domains = dict(  # each number's domain: a kind of configurator.py (count >= 1, count0 >= 0, ...) or a range
    image_size=(0, 4096), log_interval='count', ckpt_interval='count', sample_epochs='count',  # I/O
    sigma='nonneg', sigmas='nonneg',
    batch_size='count', max_iters='count0', epochs='count', learning_rate='rate', min_lr=(0, 10), warmup_iters='count0',
    lr_decay_iters=(-1, 10 ** 7), weight_decay='nonneg', beta1='decay', beta2='decay', grad_clip='positive',
    ema_decay='decay', seed='seed',  # training
    base_channels='size', channel_mult='size', n_res='size')  # model
config_keys = [k for k, v in globals().items()  # the settings configurator.py may change, as nanoGPT declares them
               if not k.startswith('_') and k.islower() and isinstance(v, (bool, int, float, str, tuple, list, type(None)))]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: globals()[k] for k in config_keys}
# -----------------------------------------------------------------------------


check_choices(dataset=(dataset, DATASETS), dtype=(dtype, ('bfloat16', 'float32')),
              device=(device, ('auto', 'cpu', 'cuda')), init_from=(init_from, ('scratch', 'resume')),
              mode=(mode, ('denoise', 'pure_noise')))
check_out_dir(out_dir)  # before any work: a file, a folder that cannot be made or written
ddp, rank, local_rank, world_size, device = setup_distributed(device, batch_size)
master, device_type = rank == 0, ('cuda' if device.startswith('cuda') else 'cpu')
log = print if master else (lambda *a, **k: None)
ctx, dtype = setup_precision(device, dtype, log)  # TF32 on GPUs; bf16 autocast where the device has it
compile = compile_fallback(compile, device_type, log)  # no C++ compiler on a CPU: eager, with one note
torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest convolutions
torch.manual_seed(seed + rank)
memory_format = torch.channels_last if channels_last else torch.contiguous_format

# data: training set for learning, test set (the training set for a folder) for the figures
x_all, y_all = load_training_set(dataset, data_dir, image_size, download, ddp, local_rank, device, skip_bad_images)
x_test = load_dataset(dataset, data_dir, train=False)[0] if dataset != 'folder' else x_all
C, S = x_all.shape[1], x_all.shape[-1]
batches = Batches(x_all, y_all, batch_size, world_size, rank, seed, hflip=hflip)
iters_per_epoch = batches.iters_per_epoch
if iters_per_epoch == 0:
    die(f'{len(x_all)} images are fewer than one batch of {batch_size}: lower --batch_size')
max_iters = max_iters or epochs * iters_per_epoch
if S % 2 ** (len(channel_mult) - 1):
    die(f'image_size {S} must be divisible by {2 ** (len(channel_mult) - 1)} for channel_mult {channel_mult}')
g = torch.Generator().manual_seed(seed)
x_show = resize(to_model_range(x_test[torch.randperm(len(x_test), generator=g)[:8]].cpu()), S).to(device)
eps_show = torch.randn(x_show.shape, generator=g).to(device)  # fixed noise: figures compare across epochs

# model: a UNet with no conditioning, D(z) -> x
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
model_args = dict(in_channels=C, input_size=S, base_channels=base_channels, channel_mult=tuple(channel_mult), n_res=n_res,
                  time_cond=False, num_classes=0)
iter_num, ckpt = 0, None
if init_from == 'resume':
    ckpt = resume_checkpoint(ckpt_path, dict(arch='unet', in_channels=C, input_size=S, time_cond=False, num_classes=0),
                             model_args, config_given)
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


def corrupt(x, eps, s):
    return eps if mode == 'pure_noise' else x + s * eps  # z = x + sigma eps, or pure noise


@torch.no_grad()
def denoise(z):
    with ctx:
        return ema(z.contiguous(memory_format=memory_format)).float()


def write_epoch_figure(epoch):
    if mode == 'denoise':
        z = corrupt(x_show, eps_show, sigma)
        rows = torch.stack([x_show, z, denoise(z)])
        save_labelled_grid(rows, os.path.join(out_dir, f'denoise_epoch{epoch:02d}.png'),
                           ['clean', f'noisy σ={sigma}', 'denoised'], f'test digits after epoch {epoch}')
        return
    outs = denoise(eps_show)  # pure noise in, one step out
    mean = x_mean.expand_as(outs)
    stats = dict(epoch=epoch, mse_outputs_to_mean=(outs - mean).square().mean().item(),
                 mse_between_outputs=(outs[1:] - outs[:-1]).square().mean().item(),
                 mse_test_digits_to_mean=(x_show - mean).square().mean().item())
    save_labelled_grid(torch.stack([torch.cat([x_mean, outs[:7]]), torch.cat([x_mean, x_show[:7]])]),
                       os.path.join(out_dir, f'pure_noise_epoch{epoch:02d}.png'), ['outputs', 'real digits'],
                       f'epoch {epoch}: first column the training-set mean; MSE(outputs, mean) = '
                       f'{stats["mse_outputs_to_mean"]:.4f}, MSE(digits, mean) = {stats["mse_test_digits_to_mean"]:.4f}')
    log(f'pure noise, epoch {epoch}: ' + ', '.join(f'{k} {v:.4f}' for k, v in stats.items() if k != 'epoch'))
    pure_stats.append(stats)
    with open(os.path.join(out_dir, 'pure_noise.json'), 'w') as f:
        json.dump(pure_stats, f, indent=1)


def write_plot():
    rows = [json.loads(line) for line in open(log_path)]
    plot_loss([r['iter'] for r in rows], [r['loss'] for r in rows], os.path.join(out_dir, 'loss.png'),
              title=f'one-step denoiser ({mode}, σ={sigma}) on {dataset}')


log_path = os.path.join(out_dir, 'log.jsonl')
x_mean = to_model_range(x_all).mean(0, keepdim=True)  # the MSE-optimal answer to pure noise
pure_stats = []
if master:
    os.makedirs(out_dir, exist_ok=True)
    start_log(log_path, iter_num)
    save_labelled_grid(torch.stack([x_show + s * eps_show for s in sigmas]), os.path.join(out_dir, 'noise_grid.png'),
                       [f'σ={s}' for s in sigmas], 'z = x + σ·eps on test digits')
log(f'denoising UNet ({mode}) {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params | {dataset} '
    f'{len(x_all)} images at {C}x{S}x{S} | {world_size} process(es) on {device}, {dtype} | '
    f'batch {batch_size}, {iters_per_epoch} iters/epoch, iters {iter_num} -> {max_iters}', flush=True)

progress = Progress(iter_num, max_iters, batch_size, iters_per_epoch, ddp, world_size, ckpt_path)
train_model.train()
while iter_num < max_iters:
    lr = cosine_lr(iter_num, learning_rate, min_lr, warmup_iters, lr_decay_iters or max_iters)
    for group in optimizer.param_groups:
        group['lr'] = lr
    x0, _ = batches.get(iter_num)
    z = corrupt(x0, torch.randn_like(x0), sigma)
    with ctx:
        out = train_model(z.contiguous(memory_format=memory_format))
    loss = (out.float() - x0).square().mean()  # per-pixel MSE to the clean image
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
    if master and iter_num % iters_per_epoch == 0 and iter_num // iters_per_epoch in sample_epochs:
        write_epoch_figure(iter_num // iters_per_epoch)
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
    if mode == 'denoise':  # the trained denoiser on noise levels it never saw
        outs = [denoise(x_show + s * eps_show) for s in sigmas]
        rows = torch.stack([torch.cat([x_show[:5] + s * eps_show[:5], o[:5]]) for s, o in zip(sigmas, outs)])
        save_labelled_grid(rows, os.path.join(out_dir, 'ood_sweep.png'), [f'σ={s}' for s in sigmas],
                           f'trained at σ={sigma}: 5 noisy inputs, then the 5 outputs',
                           col_labels=['input'] * 5 + ['output'] * 5)
    log(f'done: {iter_num} iters in {(time.time() - progress.t_start) / 60:.1f} min; outputs in {out_dir}', flush=True)
if ddp:
    del train_model, model, optimizer  # DDP's hooks on the weights hold the process group
    teardown_distributed()
