# DiT-LLaMA on MNIST: python train_dit.py config/dit_mnist.py (the defaults of train_dit.py)
out_dir = 'out/dit_mnist'
dataset = 'mnist'
batch_size = 128
epochs = 10
learning_rate = 8e-4
dim = 128
n_layers = 6
n_heads = 4
patch_size = 2
