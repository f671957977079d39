# MeanFlow on MNIST for a 2-core CPU: python train_dit.py config/dit_mnist_meanflow_cpu.py --data_dir=DIR
# then python sample.py --out_dir=out/dit_mnist_meanflow draws digits in 1 network evaluation each (docs/meanflow.md).
# The network and optimizer of config/dit_mnist_cpu.py. MeanFlow's settings: the paper's ImageNet ratio (25 % of the
# batch with r != t, its best in the paper's ablation), adaptive weight power 1; t and r the larger and the smaller of
# two uniform draws: one step asks for u(eps, 0, 1), a corner that logit-normal pairs almost never reach (one step's
# accuracy rose from 97.8 % to 99.5 % with uniform pairs; the reference code's CIFAR-10 draws, mf_t and mf_r, did far
# worse: docs/meanflow.md); guidance omega 2, kappa 0, the flow's cfg 2 trained in at the cost of one more forward
# (kappa > 0 costs two). The network of config/dit_mnist_cpu.py, patches of 7 (16 tokens), so the same minutes buy
# more iterations. 3,000 iterations of a cosine laid over 4,000: one step wants iterations more than the end of the
# annealing (a cosine decayed over 1,800 iterations scored below the 2,000-iteration weights of a longer one), and
# the run stops where half an hour of training holds on the slowest CPU measured (docs/meanflow.md).
out_dir = 'out/dit_mnist_meanflow'
dataset = 'mnist'
objective = 'meanflow'
t_sampling = 'uniform'
mf_ratio = 0.25
mf_omega = 2.0
mf_kappa = 0.0
mf_weight_p = 1.0
batch_size = 64
max_iters = 3000
lr_decay_iters = 4000
learning_rate = 3e-3
warmup_iters = 100
ema_decay = 0.99
dim = 128
n_layers = 6
n_heads = 4
patch_size = 7
stem_channels = 16
log_interval = 100
sample_interval = 1000
ckpt_interval = 500
eval_interval = 0
