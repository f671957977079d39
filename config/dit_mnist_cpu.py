# DiT-LLaMA on MNIST for a laptop CPU: python train_dit.py config/dit_mnist_cpu.py --data_dir=DIR
# Chosen by time-to-quality on a 2-core CPU (docs/results.md, "The MNIST recipe on a CPU"): 49 tokens (patch 4 on 28x28)
# instead of 196, a thin conv stem, batch 64 at a high learning rate, and a short EMA;
# --max_iters=N (with the cosine schedule over N) trains longer.
out_dir = 'out/dit_mnist_cpu'
dataset = 'mnist'
batch_size = 64
max_iters = 7000
learning_rate = 3e-3
warmup_iters = 100
ema_decay = 0.99
dim = 128
n_layers = 6
n_heads = 4
patch_size = 4
stem_channels = 16
compile = True
log_interval = 100
sample_interval = 0
ckpt_interval = 1000
eval_interval = 700
eval_samples = 1000
