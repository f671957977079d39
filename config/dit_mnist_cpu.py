# DiT-LLaMA on MNIST for a CPU: the preset of `python train_dit.py --dataset=mnist` where there is no GPU; on any
# device `python train_dit.py config/dit_mnist_cpu.py`.
# Chosen by time-to-quality on a 2-core CPU (docs/results.md, "The MNIST recipe on a CPU"): 16 tokens (patch 7 on 28x28)
# instead of 196, a thin conv stem, batch 64 at a high learning rate, and a short EMA. 16 tokens make a step far cheaper
# than 49 do, so the same minutes buy more iterations: 2,600 iterations (2.8 epochs) of patches of 7 judge better than
# 1,600 of patches of 4. --max_iters=N (the cosine schedule over N) trains longer.
dataset = 'mnist'
batch_size = 64
max_iters = 2600
epochs = 10
learning_rate = 3e-3
warmup_iters = 100
ema_decay = 0.99
hflip = False
dim = 128
n_layers = 6
n_heads = 4
patch_size = 7
stem_channels = 16
log_interval = 100
sample_interval = 0
ckpt_interval = 400
eval_interval = 0
