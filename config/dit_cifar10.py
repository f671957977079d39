# DiT-LLaMA on CIFAR-10 for GPUs: the preset of `torchrun --nproc_per_node=4 train_dit.py --dataset=cifar10`; on any
# device `python train_dit.py config/dit_cifar10.py`. Each preset of a dataset sets the same keys, so naming one as a
# config file replaces the other.
dataset = 'cifar10'
batch_size = 256
max_iters = 0  # 0: `epochs` epochs
epochs = 200
learning_rate = 5e-4
warmup_iters = 1000
ema_decay = 0.9999
hflip = True
dim = 256
n_layers = 10
n_heads = 8
patch_size = 2
stem_channels = 32
log_interval = 50
sample_interval = 5000
ckpt_interval = 2000
eval_interval = 0
