# DiT-LLaMA on MNIST for a GPU: the preset of `python train_dit.py --dataset=mnist` where there is one; on any
# device `python train_dit.py config/dit_mnist.py`. Each preset of a dataset sets the same keys, so naming one as a config
# file replaces the other.
dataset = 'mnist'
batch_size = 128
max_iters = 0  # 0: `epochs` epochs
epochs = 10
learning_rate = 8e-4
warmup_iters = 200
ema_decay = 0.999
hflip = False
dim = 128
n_layers = 6
n_heads = 4
patch_size = 2
stem_channels = 32
log_interval = 50
sample_interval = 2000
ckpt_interval = 1000
eval_interval = 0
