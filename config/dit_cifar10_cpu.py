# DiT-LLaMA on CIFAR-10 for a 2-core CPU: python train_dit.py config/dit_cifar10_cpu.py
# The JPEG stand-in (a folder of class folders) instead of the pickles: add --dataset=folder --data_dir=DIR/train
# --judge=cifar10 --judge_data_dir=DIR. Chosen by a 5-minute probe of three sizes (docs/results.md, "CIFAR-10 on a
# CPU"): patches of 4 (64 tokens), dim 192, 8 layers reached the lowest loss per minute; 10,000 iterations = 26
# epochs (--max_iters=N for longer: the cosine stretches with it).
out_dir = 'out/dit_cifar10_cpu'
dataset = 'cifar10'
batch_size = 128
max_iters = 10000
learning_rate = 1e-3
warmup_iters = 200
ema_decay = 0.999
hflip = True
dim = 192
n_layers = 8
n_heads = 6
patch_size = 4
compile = True
log_interval = 100
sample_interval = 3000
ckpt_interval = 1000
eval_interval = 2500
eval_samples = 500
