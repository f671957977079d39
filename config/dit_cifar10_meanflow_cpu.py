# MeanFlow on CIFAR-10 for a 2-core CPU: python train_dit.py config/dit_cifar10_meanflow_cpu.py --data_dir=DIR
# (the JPEG folder: add --dataset=folder --data_dir=DIR/train --judge=cifar10 --judge_data_dir=DIR), then
# python sample.py --out_dir=out/dit_cifar10_meanflow draws each image in 1 network evaluation (docs/meanflow.md).
# The network, batch and optimizer of config/dit_cifar10_cpu.py; MeanFlow's settings of config/dit_mnist_meanflow_cpu.py
# (uniform (t, r) pairs, 25 % of the batch with r != t, guidance omega 2 trained in, kappa 0). 800 iterations: about
# an hour of training on the slowest CPU measured (AVX2 only), where a MeanFlow iteration costs about 1.8 of the
# flow's and the flow preset's 10,000 iterations take hours; the cosine ends with the run, a short warm-up.
# On a faster CPU --max_iters=N buys more (the cosine stretches with it).
out_dir = 'out/dit_cifar10_meanflow'
dataset = 'cifar10'
objective = 'meanflow'
t_sampling = 'uniform'
mf_ratio = 0.25
mf_omega = 2.0
mf_kappa = 0.0
mf_weight_p = 1.0
batch_size = 128
max_iters = 800
epochs = 200
learning_rate = 1e-3
warmup_iters = 100
ema_decay = 0.999
hflip = True
dim = 192
n_layers = 8
n_heads = 6
patch_size = 4
stem_channels = 32
log_interval = 25
sample_interval = 250
ckpt_interval = 250
eval_interval = 0
