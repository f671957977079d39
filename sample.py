"""
Sample any flow checkpoint of this project (DiT-LLaMA, flow UNet, class-conditional UNet), rebuilt from
its model_args alone, with the EMA weights. A MeanFlow checkpoint (train_dit.py --objective=meanflow) samples in
one step by default, by its own jump z_r = z_t - (t - r) u(z_t, r, t), guidance included (trained in).

    python sample.py --steps=50 --cfg=2.0 --gif      # grid + trajectory GIF of python train_dit.py --dataset=mnist
    python sample.py --out_dir=out/dit_mnist --sweep=steps                # 1, 5, 10, 50 steps, one figure
    python sample.py --out_dir=out/dit_mnist --sweep=cfg                  # cfg 0, 1, 2, 10
    python sample.py --out_dir=out/dit_mnist --num_samples=10000 --save_npz=out/dit_mnist/samples.npz

Writes into out_dir: samples_<solver><steps>_cfg<cfg>.png (a row per class, 8 each; an 8x8 grid for an
unconditional model), trajectory.gif, sweep_steps.png, sweep_cfg.png; the npz holds arr_0 uint8 NxHxWxC
and arr_1 the int labels, the layout FID evaluators read.
"""
import os
import time

import numpy as np
import torch

from model import (NFE_PER_STEP, check_choices, check_out_dir, die, load_flow_model, pick_attention, sample,
                   sample_mean_flow, save_grid, save_labelled_grid, setup_precision, to_uint8)

# -----------------------------------------------------------------------------
out_dir = 'out/dit_mnist'
ckpt = ''  # '' = out_dir/ckpt.pt
steps = None  # None: 50, or 1 for a MeanFlow model
cfg = None  # guidance v = v_uncond + cfg (v_cond - v_uncond); None: 2.0, or none for an unconditional or MeanFlow model
solver = ''  # euler | midpoint | heun | rk4 | meanflow (MeanFlow's jump); '': euler, or meanflow for a MeanFlow model
shift = 1.0  # SD3 time-grid shift (1 = uniform grid)
gif = False
sweep = ''  # '' | steps | cfg
per_class = 8
class_label = -1  # >= 0: every sample of this class
num_samples = 0  # with save_npz: how many samples to write
save_npz = ''
batch_size = 64  # samples per network call (x2 with cfg): small batches stay in the CPU's cache
use_ema = True
seed = 0
device = 'auto'
dtype = 'bfloat16'  # bfloat16 (autocast) | float32: bf16 samples match fp32 ones (bench.py --sample_check)
attention = 'auto'  # sdpa | math (softmax written out) | kernels (CPU kernels) | auto: as model.pick_attention says
config_domains = dict(  # each number's domain: a kind of configurator.py (count >= 1, count0 >= 0, ...) or a range
    steps='count', cfg='nonneg', shift='positive', per_class='size', class_label=(-1, 10 ** 7), num_samples='count0',
    batch_size='count', seed='seed')
config_keys = [k for k, v in globals().items()  # the settings configurator.py may change, as nanoGPT declares them
               if not k.startswith('_') and k.islower() and isinstance(v, (bool, int, float, str, tuple, list, type(None)))]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------


if solver not in ('', *NFE_PER_STEP, 'meanflow'):
    die(f"unknown solver {solver!r}: choose one of {', '.join(NFE_PER_STEP)} or meanflow")
if sweep not in ('', 'steps', 'cfg'):
    die(f"unknown sweep {sweep!r}: choose steps or cfg")
if save_npz and num_samples < 1:
    die('--save_npz needs --num_samples=N (N >= 1)')
check_choices(dtype=(dtype, ('bfloat16', 'float32')), attention=(attention, ('auto', 'sdpa', 'math', 'kernels')),
              device=(device, ('auto', 'cpu', 'cuda')))
device = ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device
if device == 'cuda' and not torch.cuda.is_available():
    die('device=cuda but no GPU is visible: use --device=cpu (or auto)')
check_out_dir(out_dir)  # before any work: a file, a folder that cannot be made or written
if save_npz:
    check_out_dir(os.path.dirname(os.path.abspath(save_npz)), 'save_npz')
ctx, dtype = setup_precision(device, dtype)  # TF32 on GPUs; bf16 autocast where the device has it
ckpt_path = ckpt or os.path.join(out_dir, 'ckpt.pt')
model, checkpoint = load_flow_model(ckpt_path, device, use_ema,
                                    attention=pick_attention(attention, device.split(':')[0], dtype))
num_classes = model.num_classes
conditional = num_classes > 0
mean_flow = checkpoint['model_args'].get('mean_flow', False)  # MeanFlow: its own jump, one evaluation a step
del checkpoint
if mean_flow and solver not in ('', 'meanflow'):
    die(f'{ckpt_path} is a MeanFlow model: it samples by its own jump (--solver=meanflow), not {solver}; drop --solver')
if mean_flow and (cfg is not None or sweep == 'cfg'):
    die(f'{ckpt_path} is a MeanFlow model: its guidance is trained in (train_dit.py\'s mf_omega, mf_kappa), drop '
        f'{"--sweep=cfg" if sweep == "cfg" else f"cfg ({cfg!r} from --cfg or a config file)"}')
if not mean_flow and solver == 'meanflow':
    die(f'{ckpt_path} is a flow model, not MeanFlow: choose --solver={" | ".join(NFE_PER_STEP)}')
solver, steps = solver or ('meanflow' if mean_flow else 'euler'), steps or (1 if mean_flow else 50)
if not conditional and cfg is not None:
    die(f'{ckpt_path} is an unconditional model: guidance needs classes, drop cfg ({cfg!r} from --cfg or a config file)')
cfg = (2.0 if conditional and not mean_flow else 1.0) if cfg is None else cfg  # 1: the plain velocity
if not conditional and sweep == 'cfg':
    die(f'{ckpt_path} is an unconditional model: --sweep=cfg needs a class-conditional one')
if class_label >= num_classes or (class_label >= 0 and not conditional):
    die(f'class_label {class_label} is out of range: this model has {num_classes} classes (0..{num_classes - 1})'
        if conditional else f'{ckpt_path} is an unconditional model: drop --class_label')
C, S = model.in_channels, model.input_size
per_step = 1 if mean_flow else NFE_PER_STEP[solver]  # network evaluations a step
nfe = steps * per_step
tag = f'{solver}{steps}' + (f'_cfg{cfg:g}' if conditional and not mean_flow else '')


def labels(n, offset=0):
    """Class ids for n samples: one class throughout, or 0..K-1 in turn; None for an unconditional model."""
    if not conditional:
        return None
    ids = torch.full((n,), class_label) if class_label >= 0 else (torch.arange(n) + offset) % num_classes
    return ids.to(device)


def generate(z, y, steps=steps, cfg=cfg, return_traj=False):
    with ctx:
        if mean_flow:
            return sample_mean_flow(model, z, y, steps=steps, shift=shift, return_traj=return_traj)
        return sample(model, z, y, steps=steps, cfg=cfg if conditional else 1.0, solver=solver, shift=shift,
                      return_traj=return_traj)


def noise(n, seed_offset=0):
    return torch.randn(n, C, S, S, generator=torch.Generator().manual_seed(seed + seed_offset)).to(device)


# the grid: a row per class (class-conditional), else 8x8
n_rows = min(num_classes, 10) if conditional and class_label < 0 else 8
y = labels(n_rows * per_class)
if conditional and class_label < 0:
    y = torch.arange(n_rows, device=device).repeat_interleave(per_class)
z = noise(n_rows * per_class)
t0 = time.time()
x, traj = generate(z, y, return_traj=True)
grid_path = os.path.join(out_dir, f'samples_{tag}.png')
os.makedirs(out_dir, exist_ok=True)
save_grid(x, grid_path, nrow=per_class)
guidance = (' (guidance trained in: no doubled batch)' if mean_flow and conditional else
            ' (each on a doubled batch for cfg)' if conditional and cfg != 1 else '')
print(f'wrote {grid_path}: {len(z)} samples, {solver} {steps} steps = {nfe} NFE{guidance}, {time.time() - t0:.1f}s')

if gif:  # every step of the trajectory, the last frame held
    import imageio.v2 as imageio
    from torchvision.utils import make_grid
    frames = [make_grid((f.clamp(-1, 1) + 1) / 2, nrow=per_class, padding=2, pad_value=1.0) for f in traj]
    frames = [(f * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy() for f in frames]
    gif_path = os.path.join(out_dir, 'trajectory.gif')
    imageio.mimsave(gif_path, frames, duration=[80] * (len(frames) - 1) + [2000], loop=0)
    print(f'wrote {gif_path}: {len(frames)} frames, t = 1 (noise) to t = 0')

if sweep:  # one labelled figure: the same noise and classes under each setting
    n = min(num_classes, 10) if conditional else 8
    z, y = noise(n, 1), labels(n)
    values = (1, 5, 10, 50) if sweep == 'steps' else (0.0, 1.0, 2.0, 10.0)
    rows = [generate(z, y, steps=v) if sweep == 'steps' else generate(z, y, cfg=v) for v in values]
    if sweep == 'steps':
        names = [f'{v} steps ({v * per_step} NFE)' for v in values]
        title = f'{solver}, ' + ('guidance trained in' if mean_flow else f'cfg {cfg:g}')
    else:
        names, title = [f'cfg {v:g}' for v in values], f'{solver}, {steps} steps'
    path = os.path.join(out_dir, f'sweep_{sweep}.png')
    save_labelled_grid(torch.stack(rows), path, names, title, col_labels=[str(k) for k in range(n)] if conditional else None)
    print(f'wrote {path}')

if save_npz:  # N samples in batches, labels 0..K-1 in turn
    xs, ys, t0 = [], [], time.time()
    for i in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - i)
        y = labels(n, i)
        xs.append(to_uint8(generate(noise(n, 1000 + i), y)))
        ys.append(y.cpu().numpy() if y is not None else np.zeros(n, dtype=np.int64))
        done, el = i + n, time.time() - t0
        print(f'{done}/{num_samples} samples | {done / el:.1f} samples/s | ETA {(num_samples - done) * el / done:.0f}s',
              flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(save_npz)), exist_ok=True)
    np.savez(save_npz, arr_0=np.concatenate(xs), arr_1=np.concatenate(ys).astype(np.int64))
    print(f'wrote {save_npz}: arr_0 {num_samples}x{S}x{S}x{C} uint8, arr_1 labels; {nfe} NFE per sample')
