# DiT-LLaMA on CIFAR-10 for a CPU: the preset of `python train_dit.py --dataset=cifar10` where there is no GPU; on any
# device `python train_dit.py config/dit_cifar10_cpu.py`.
# The JPEG stand-in (a folder of class folders) instead of the pickles: add --dataset=folder --data_dir=DIR/train
# --judge=cifar10 --judge_data_dir=DIR. Patches of 4 (64 tokens), dim 192, 8 layers reached the lowest loss per
# minute of three sizes tried (docs/results.md); 10,000 iterations = 26 epochs (--max_iters=N trains longer).
dataset = 'cifar10'
batch_size = 128
max_iters = 10000
epochs = 200
learning_rate = 1e-3
warmup_iters = 200
ema_decay = 0.999
hflip = True
dim = 192
n_layers = 8
n_heads = 6
patch_size = 4
stem_channels = 32
log_interval = 100
sample_interval = 3000
ckpt_interval = 1000
eval_interval = 0
