"""
nanoflow's one shared module, in the order a reader meets it:

1. networks: the time and label embeddings they share; DiT-LLaMA (AdaLN-Zero, 2D RoPE, SwiGLU), as its equations;
   the UNet (the one-step denoiser, the flow model and the class-conditional CFG model, chosen by its arguments); a
   convolution-only ResNet; build_model, which rebuilds any of them from a checkpoint's model_args;
2. the flow: the rectified-flow loss, time grids, ODE solvers and classifier-free guidance; MeanFlow's loss and
   sampler, for one-step samples;
3. EMA of the weights;
4. CPU kernels: DiT-LLaMA's attention and block again, the same maths by hand-written kernels, for a CPU;
5. what the scripts share: one-line errors, devices and DDP, data and batches, the training loop's bookkeeping,
   checkpoints and figures.

Conventions: images in [-1, 1]; t = 0 is data, t = 1 is noise; x_t = (1 - t) x0 + t eps and the networks predict
the velocity v = eps - x0 (MeanFlow's: its average u over [r, t]). Sampling integrates dx/dt = v from t = 1 down to
t = 0 (MeanFlow jumps: z_r = z_t - (t - r) u).
"""
import gc
import math
import os
import pickle
import shutil
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# =============================================================================
# Networks
# embeddings the networks share: time and class labels

def timestep_embedding(t, dim, scale=1000.0):
    """Sinusoidal embedding of scale * t for t in [0, 1]: the flow's 1000 t spreads its frequencies over the whole
    range (unscaled, the embedding would be nearly linear in t)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (scale * t.float())[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

class TimestepEmbedder(nn.Module):
    """t -> sinusoidal(freq_dim) of scale * t -> MLP -> dim."""
    def __init__(self, dim, freq_dim=256, scale=1000.0):
        super().__init__()
        self.freq_dim, self.scale = freq_dim, scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq_dim, self.scale))

class LabelEmbedder(nn.Module):
    """Labels -> vectors; index num_classes is CFG's null class, which a label becomes in training w.p. p_uncond."""
    def __init__(self, num_classes, dim, p_uncond=0.1):
        super().__init__()
        self.num_classes, self.p_uncond = num_classes, p_uncond
        self.embedding = nn.Embedding(num_classes + 1, dim)

    def token_drop(self, labels):
        drop = torch.rand(labels.shape[0], device=labels.device) < self.p_uncond
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels, train=False):
        return self.embedding(self.token_drop(labels) if train and self.p_uncond > 0 else labels)

# 2D rotary position embedding: half the head dims rotate with the row, half with the column

def rope_angles(rows, cols, head_dim):
    """Angles [L, head_dim // 2] for tokens at integer positions (rows[i], cols[i])."""
    quarter = head_dim // 4
    freqs = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    return torch.cat([rows.float()[:, None] * freqs, cols.float()[:, None] * freqs], dim=-1)

def rope_grid(h, w, head_dim):
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
    return rope_angles(rows.flatten(), cols.flatten(), head_dim)

def apply_rope(x, angles):
    """Rotate consecutive pairs (x[2i], x[2i+1]) of the last dim of x [..., L, head_dim] by angles [L, head_dim/2]:
    (x[2i] + i x[2i+1]) e^(i angle), one complex product in fp32, returned in x's dtype."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * torch.polar(torch.ones_like(angles), angles)).flatten(-2).to(x.dtype)

# -----------------------------------------------------------------------------
# DiT-LLaMA

def modulate(x, shift, scale):
    # AdaLN: one (shift, scale) per sample, broadcast over the tokens
    return x * (1 + scale) + shift

class Attention(nn.Module):
    """Multi-head self-attention over all tokens (nanoGPT's CausalSelfAttention without the causal mask), q and k
    RMS-normalised per head (qk_norm) and rotated by 2D RoPE. `attention` says how softmax(q k^T / sqrt(d)) v is
    computed: 'sdpa' by F.scaled_dot_product_attention, 'math' written out below, 'kernels' by the CPU kernels
    section further down (the same maths, by hand-written kernels that train faster on a CPU)."""
    def __init__(self, dim, n_heads, qk_norm=True, attention='sdpa'):
        super().__init__()
        assert dim % n_heads == 0 and (dim // n_heads) % 4 == 0, 'head dim must be a multiple of 4 for 2D RoPE'
        self.n_heads, self.head_dim, self.attention = n_heads, dim // n_heads, attention
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def forward(self, x, angles):
        if self.attention == 'kernels':
            return kernel_attention(self, x, angles)
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # each [B, heads, L, d]
        q, k = self.q_norm(q.float()), self.k_norm(k.float())  # RMSNorm in fp32, as LLaMA computes it
        q, k = apply_rope(q, angles).to(v.dtype), apply_rope(k, angles).to(v.dtype)
        if self.attention == 'sdpa':
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            att = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            att = att.softmax(dim=-1)
            y = att @ v
        return self.proj(y.transpose(1, 2).reshape(B, L, D))  # heads side by side again: [B, L, D]

class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), hidden size 2/3 of 4*dim as in LLaMA, rounded up to a multiple of 32."""
    def __init__(self, dim):
        super().__init__()
        hidden = 32 * math.ceil(int(2 * 4 * dim / 3) / 32)
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

class TransformerBlock(nn.Module):
    """Pre-norm block with AdaLN-Zero: shift, scale and gate for attention and the MLP from c; at init the identity."""
    def __init__(self, dim, n_heads, qk_norm=True, attention='sdpa'):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, n_heads, qk_norm, attention)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = SwiGLU(dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        for p in self.adaLN_modulation[-1].parameters():
            nn.init.zeros_(p)

    def forward(self, x, c, angles):
        if self.attn.attention == 'kernels':
            return kernel_block(self, x, c, angles)  # these two lines by fused kernels (the CPU kernels section)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), angles)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x

class FinalLayer(nn.Module):
    """AdaLN (shift, scale, no gate) then a linear map to patch_size^2 * out_channels; zero-initialised."""
    def __init__(self, dim, patch_size, out_channels):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        for p in [*self.linear.parameters(), *self.adaLN_modulation[-1].parameters()]:
            nn.init.zeros_(p)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))

def patchify(x, p):
    """[B, C, H, W] -> [B, (H/p)*(W/p), p*p*C], tokens in row-major order."""
    B, C, H, W = x.shape
    return x.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)

def unpatchify(x, p, C, H, W):
    """Inverse of patchify: [B, L, p*p*C] -> [B, C, H, W]."""
    B = x.shape[0]
    return x.view(B, H // p, W // p, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)

class DiT_Llama(nn.Module):
    """mean_flow: MeanFlow's network u(x, r, t), which also embeds the interval t - r (the paper's (t, t - r)) and
    leaves the label dropout to MeanFlow's loss (which must know the dropped labels: their target is unguided)."""
    def __init__(self, in_channels=1, input_size=28, patch_size=2, dim=256, n_layers=6, n_heads=4,
                 num_classes=10, p_uncond=0.1, qk_norm=True, stem_channels=32, attention='sdpa', mean_flow=False):
        super().__init__()
        assert input_size % patch_size == 0, f'input_size {input_size} must be divisible by patch_size {patch_size}'
        self.in_channels, self.input_size, self.patch_size, self.num_classes = in_channels, input_size, patch_size, num_classes
        # a shallow conv stem gives every patch some local context before the linear patch embedding
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem_channels, 3, padding=1), nn.GroupNorm(8, stem_channels), nn.SiLU(),
            nn.Conv2d(stem_channels, stem_channels, 3, padding=1), nn.GroupNorm(8, stem_channels), nn.SiLU())
        self.x_embedder = nn.Linear(patch_size * patch_size * stem_channels, dim)
        # MeanFlow differentiates u in t: embedding 1000 t would make d_t u up to 1000 times larger than u's change
        # along the path (the fastest frequency) and its target diverges; it embeds t itself, as MeanFlow's code does
        scale = 1.0 if mean_flow else 1000.0
        self.t_embedder = TimestepEmbedder(dim, scale=scale)
        self.y_embedder = LabelEmbedder(num_classes, dim, 0.0 if mean_flow else p_uncond)
        self.interval_embedder = TimestepEmbedder(dim, scale=scale) if mean_flow else None
        self.blocks = nn.ModuleList(TransformerBlock(dim, n_heads, qk_norm, attention) for _ in range(n_layers))
        self.final_layer = FinalLayer(dim, patch_size, in_channels)
        g = input_size // patch_size
        self.register_buffer('angles', rope_grid(g, g, dim // n_heads), persistent=False)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.weight.abs().sum() > 0:  # leave the zero-init (AdaLN-Zero) layers
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embedder.embedding.weight, std=0.02)
        for embedder in [e for e in (self.t_embedder, self.interval_embedder) if e is not None]:
            for m in embedder.mlp[::2]:
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, x, t, y=None, r=None):
        B, C, H, W = x.shape
        if y is None:  # unconditional: every label is the null class
            y = torch.full((B,), self.num_classes, dtype=torch.long, device=x.device)
        h = self.x_embedder(patchify(self.stem(x), self.patch_size))
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        if self.interval_embedder is not None:  # MeanFlow: u(x, r, t) over [r, t]; no r is r = t, the velocity v(x, t)
            c = c + self.interval_embedder(t - r if r is not None else torch.zeros_like(t))
        for block in self.blocks:
            h = block(h, c, self.angles)
        return unpatchify(self.final_layer(h, c), self.patch_size, C, H, W)

@contextmanager
def jvp_attention(net):
    """Every Attention of net that runs SDPA on the written-out softmax ('math') for a while: torch.func.jvp needs a
    forward-mode derivative, which SDPA's fused kernels lack (the written-out path and the CPU kernels have one)."""
    attns = [m for m in net.modules() if isinstance(m, Attention) and m.attention == 'sdpa']
    for a in attns:
        a.attention = 'math'
    try:
        yield
    finally:
        for a in attns:
            a.attention = 'sdpa'

# -----------------------------------------------------------------------------
# UNet: one network for the one-step denoiser (no conditioning), the flow model (time) and the
# CFG model (time + class with a null class), chosen by its arguments

class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a residual (norm=False: no GroupNorm); conditioning scales and shifts norm2."""
    def __init__(self, c_in, c_out, emb_dim=0, norm=True, padding_mode='zeros'):
        super().__init__()
        gn = lambda c: nn.GroupNorm(math.gcd(8, c), c) if norm else nn.Identity()
        self.norm1, self.conv1 = gn(c_in), nn.Conv2d(c_in, c_out, 3, padding=1, padding_mode=padding_mode)
        self.norm2, self.conv2 = gn(c_out), nn.Conv2d(c_out, c_out, 3, padding=1, padding_mode=padding_mode)
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * c_out)) if emb_dim else None
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb=None):
        h = self.norm2(self.conv1(F.silu(self.norm1(x))))
        if self.emb is not None:  # h * (1 + scale) + shift from the time (+ class) embedding
            scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))

class AttnBlock(nn.Module):
    """Self-attention over the H*W positions of a feature map, with a residual."""
    def __init__(self, c):
        super().__init__()
        self.n_heads = 4
        self.norm, self.qkv, self.proj = nn.GroupNorm(math.gcd(8, c), c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, 3, self.n_heads, C // self.n_heads, H * W).transpose(-1, -2).unbind(1)
        y = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())  # [B, heads, HW, C/heads]; CUDA's fused kernels want contiguous inputs
        return x + self.proj(y.transpose(-1, -2).reshape(B, C, H, W))

class UNet(nn.Module):
    """attn_levels: the levels (0 = full resolution) with self-attention; the middle block has it when the deepest
    level does. attn_levels=() and norm=False make it convolution-only, as the ideal machines assume."""
    def __init__(self, in_channels=1, input_size=32, base_channels=32, channel_mult=(1, 2, 2), attn_levels=(2,),
                 n_res=2, time_cond=True, num_classes=0, p_uncond=0.1, norm=True, padding_mode='zeros'):
        super().__init__()
        assert input_size % 2 ** (len(channel_mult) - 1) == 0, f'input_size must be divisible by {2 ** (len(channel_mult) - 1)}'
        self.in_channels, self.input_size, self.time_cond, self.num_classes = in_channels, input_size, time_cond, num_classes
        emb_dim = 4 * base_channels if (time_cond or num_classes) else 0
        self.t_embedder = TimestepEmbedder(emb_dim, freq_dim=base_channels) if time_cond else None
        self.y_embedder = LabelEmbedder(num_classes, emb_dim, p_uncond) if num_classes else None
        conv = lambda c_in, c_out, **kw: nn.Conv2d(c_in, c_out, 3, padding=1, padding_mode=padding_mode, **kw)
        block = lambda c_in, c_out: ResBlock(c_in, c_out, emb_dim, norm, padding_mode)
        self.conv_in = conv(in_channels, base_channels)
        chans, ch = [base_channels], base_channels
        self.down = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            for _ in range(n_res):
                self.down.append(nn.ModuleList([block(ch, base_channels * mult)]))
                ch = base_channels * mult
                if level in attn_levels:
                    self.down[-1].append(AttnBlock(ch))
                chans.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(nn.ModuleList([conv(ch, ch, stride=2)]))
                chans.append(ch)
        mid_attn = [AttnBlock(ch)] if len(channel_mult) - 1 in attn_levels else []
        self.mid = nn.ModuleList([block(ch, ch), *mid_attn, block(ch, ch)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(n_res + 1):
                self.up.append(nn.ModuleList([block(ch + chans.pop(), base_channels * mult)]))
                ch = base_channels * mult
                if level in attn_levels:
                    self.up[-1].append(AttnBlock(ch))
            if level > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode='nearest'), conv(ch, ch)]))
        self.out = nn.Sequential(nn.GroupNorm(math.gcd(8, ch), ch) if norm else nn.Identity(), nn.SiLU(),
                                 conv(ch, in_channels))

    def _run(self, layers, h, emb):
        for layer in layers:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def forward(self, x, t=None, y=None):
        emb = self.t_embedder(t) if self.time_cond else None
        if self.num_classes:
            if y is None:  # unconditional: the null class
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            e = self.y_embedder(y, self.training)
            emb = e if emb is None else emb + e
        h = self.conv_in(x)
        skips = [h]
        for layers in self.down:
            h = self._run(layers, h, emb)
            skips.append(h)
        h = self._run(self.mid, h, emb)
        for layers in self.up:
            if isinstance(layers[0], ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(layers, h, emb)
        return self.out(h)

class ResNet(nn.Module):
    """Kamb & Ganguli's convolution-only MNIST network: n_layers full-resolution 3x3 convolutions (receptive field
    2 n_layers + 1), the middle ones residual and conditioned on t; no norm, no attention."""
    def __init__(self, in_channels=1, input_size=32, width=64, n_layers=8, padding_mode='zeros'):
        super().__init__()
        self.in_channels, self.input_size, self.time_cond, self.num_classes = in_channels, input_size, True, 0
        conv = lambda c_in, c_out: nn.Conv2d(c_in, c_out, 3, padding=1, padding_mode=padding_mode)
        self.t_embedder = TimestepEmbedder(4 * width, freq_dim=width)
        self.conv_in, self.conv_out = conv(in_channels, width), conv(width, in_channels)
        self.convs = nn.ModuleList(conv(width, width) for _ in range(n_layers - 2))
        self.embs = nn.ModuleList(nn.Linear(4 * width, 2 * width) for _ in range(n_layers - 2))

    def forward(self, x, t, y=None):
        emb = F.silu(self.t_embedder(t))
        h = self.conv_in(x)
        for conv, lin in zip(self.convs, self.embs):
            scale, shift = lin(emb)[:, :, None, None].chunk(2, dim=1)
            h = h + conv(F.silu(h * (1 + scale) + shift))
        return self.conv_out(F.silu(h))

def build_model(model_args, attention='sdpa'):
    """The network a checkpoint's model_args describe: DiT-LLaMA's have `dim` (and take `attention`), the ResNet's
    `width`, else a UNet."""
    if 'dim' in model_args:
        return DiT_Llama(**model_args, attention=attention)
    return ResNet(**model_args) if 'width' in model_args else UNet(**model_args)

# =============================================================================
# The flow: loss, time grids and ODE solvers with classifier-free guidance; MeanFlow

class RectifiedFlow:
    """x_t = (1 - t) x0 + t eps, target v = eps - x0, loss = per-sample MSE over C*H*W."""
    def __init__(self, t_sampling='logit_normal'):
        assert t_sampling in ('logit_normal', 'uniform', 'mode'), f'unknown t_sampling {t_sampling!r}'
        self.t_sampling = t_sampling

    def sample_t(self, n, device='cpu'):
        if self.t_sampling == 'logit_normal':  # t = sigmoid(n), n ~ N(0, 1)
            return torch.sigmoid(torch.randn(n, device=device))
        u = torch.rand(n, device=device)
        if self.t_sampling == 'uniform':
            return u
        return 1 - u - 1.29 * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)  # SD3's mode density, scale 1.29

    def loss(self, model, x0, y=None):
        """Returns the mean loss and the per-sample (t, loss) pairs."""
        t = self.sample_t(x0.shape[0], x0.device)
        eps = torch.randn_like(x0)
        tb = t.view(-1, *[1] * (x0.dim() - 1))
        x_t = (1 - tb) * x0 + tb * eps
        v = model(x_t, t, y)
        per_sample = ((v.float() - (eps - x0)) ** 2).mean(dim=tuple(range(1, x0.dim())))
        return per_sample.mean(), (t.detach(), per_sample.detach())

class MeanFlow(RectifiedFlow):
    """MeanFlow (Geng et al. 2025): the network predicts the average velocity over [r, t],
    u(z_t, r, t) = 1 / (t - r) int_r^t v(z_s, s) ds, so that one step from noise is x0 = eps - u(eps, 0, 1). Its target
    is the MeanFlow identity u = v - (t - r) du/dt, du/dt = v . d_z u + d_t u the derivative along the path.
    net: the plain network (no DDP, not compiled) that torch.func.jvp differentiates; the loss's own forward runs on the
    model it is handed, so that DDP averages the gradients. ratio: the share of the batch with r != t (the rest is
    flow matching). t_dist, r_dist: (mean, std) of logit-normal draws of t and r, () for t_sampling's. Guidance is
    trained in (omega, kappa, for t in cfg_t) and labels are dropped here w.p. p_uncond."""
    def __init__(self, net, t_sampling='logit_normal', ratio=0.25, p_uncond=0.1, omega=1.0, kappa=0.0,
                 cfg_t=(0.0, 1.0), weight_p=1.0, weight_c=1e-3, t_dist=(), r_dist=()):
        super().__init__(t_sampling)
        self.net, self.ratio, self.p_uncond, self.t_dist, self.r_dist = net, ratio, p_uncond, t_dist, r_dist
        self.omega, self.kappa, self.cfg_t, self.weight_p, self.weight_c = omega, kappa, cfg_t, weight_p, weight_c

    def sample_tr(self, n, device='cpu'):
        """t >= r (the larger and the smaller of two draws); r = t for a share 1 - ratio of them."""
        draw = lambda dist: (torch.sigmoid(dist[0] + dist[1] * torch.randn(n, device=device)) if dist  # sigmoid(N(m, s^2))
                             else self.sample_t(n, device))
        t, r = draw(self.t_dist), draw(self.r_dist)
        t, r = torch.maximum(t, r), torch.minimum(t, r)
        return t, torch.where(torch.rand(n, device=device) < self.ratio, r, t)

    @torch.no_grad()
    def guided(self, z, t, v, y, null):
        """For t in cfg_t v~ = omega v + kappa u(z, t, t | y) + (1 - omega - kappa) u(z, t, t | null), whose effective
        guidance scale is omega / (1 - kappa) (the paper's appendix); elsewhere v."""
        u_uncond = self.net(z, t, null).float()
        u_cond = self.net(z, t, y).float() if self.kappa else 0  # kappa = 0: one forward, not two
        v_cfg = self.omega * v + self.kappa * u_cond + (1 - self.omega - self.kappa) * u_uncond
        inside = (t >= self.cfg_t[0]) & (t <= self.cfg_t[1])
        return torch.where(inside.view(-1, *[1] * (v.dim() - 1)), v_cfg, v)

    @torch.no_grad()
    def target(self, z, r, t, v, y=None):
        """u_tgt = v - (t - r) du/dt, du/dt by torch.func.jvp along the tangent (v, 0, 1) of (z, r, t); the jvp in fp32
        (autocast has no forward-mode rules; v, guided, comes from the run's own precision) and without SDPA."""
        u = lambda z, r, t: self.net(z, t, y, r)
        with torch.autocast(z.device.type, enabled=False), jvp_attention(self.net), warnings.catch_warnings():
            warnings.filterwarnings('ignore', '`torch.jit.script` is deprecated')  # torch loads its own jvp rules by it
            _, dudt = torch.func.jvp(u, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
        return v - (t - r).view(-1, *[1] * (z.dim() - 1)) * dudt

    def loss(self, model, x0, y=None):
        """The batch mean of w |u - u_tgt|^2, w = 1 / (|u - u_tgt|^2 + c)^p the paper's adaptive weight under stop-gradient,
        |.|^2 the mean over C*H*W (p = 0: RectifiedFlow's loss). Returns it and the per-sample (t, |u - u_tgt|^2)."""
        t, r = self.sample_tr(x0.shape[0], x0.device)
        eps = torch.randn_like(x0)
        tb = t.view(-1, *[1] * (x0.dim() - 1))
        z = (1 - tb) * x0 + tb * eps
        v = eps - x0
        if y is not None:
            null = torch.full_like(y, self.net.num_classes)
            if self.omega != 1 or self.kappa != 0:
                v = self.guided(z, t, v, y, null)
            drop = torch.rand(y.shape[0], device=y.device) < self.p_uncond  # a dropped label learns the unguided v
            y, v = torch.where(drop, null, y), torch.where(drop.view_as(tb), eps - x0, v)
        u_tgt, jump = v.clone(), r < t  # at r = t the target is v: (t - r) du/dt = 0, so the jvp runs on r < t only
        if jump.any():
            u_tgt[jump] = self.target(z[jump], r[jump], t[jump], v[jump], None if y is None else y[jump])
        u = model(z, t, y, r)  # the DDP (and compiled) model: the one forward whose gradients are averaged
        per_sample = ((u.float() - u_tgt) ** 2).mean(dim=tuple(range(1, x0.dim())))
        loss = (per_sample / (per_sample.detach() + self.weight_c) ** self.weight_p).mean()
        return loss, (t.detach(), per_sample.detach())

def time_grid(steps, shift=1.0):
    """steps + 1 times from 1 (noise) down to 0 (data)."""
    t = torch.linspace(1.0, 0.0, steps + 1)
    return shift * t / (1 + (shift - 1) * t)  # SD3's shift: t' = s t / (1 + (s - 1) t); s > 1 stays near noise

def guided_velocity(model, x, t, y=None, cfg=1.0):
    """v = v_uncond + cfg (v_cond - v_uncond), both passes in one doubled batch; cfg = 1 or y = None: one plain pass."""
    tb = torch.full((x.shape[0],), float(t), device=x.device)
    if y is None or cfg == 1.0:
        return model(x, tb, y).to(x.dtype)
    null = torch.full_like(y, model.num_classes)
    v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([tb, tb]), torch.cat([y, null])).to(x.dtype).chunk(2)
    return v_uncond + cfg * (v_cond - v_uncond)

NFE_PER_STEP = {'euler': 1, 'midpoint': 2, 'heun': 2, 'rk4': 4}  # network calls per step (a doubled batch with CFG)

def ode_step(f, x, t, t_next, solver):
    """One step of dx/dt = f(x, t) from t to t_next (dt = t_next - t is negative when sampling)."""
    dt = t_next - t
    if solver == 'euler':
        return x + dt * f(x, t)
    if solver == 'midpoint':
        return x + dt * f(x + dt / 2 * f(x, t), t + dt / 2)
    if solver == 'heun':  # trapezoid on the Euler predictor
        k1 = f(x, t)
        return x + dt / 2 * (k1 + f(x + dt * k1, t_next))
    if solver == 'rk4':
        k1 = f(x, t)
        k2 = f(x + dt / 2 * k1, t + dt / 2)
        k3 = f(x + dt / 2 * k2, t + dt / 2)
        k4 = f(x + dt * k3, t_next)
        return x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    raise ValueError(f'unknown solver {solver!r}; choose one of {list(NFE_PER_STEP)}')

@torch.no_grad()
def sample(model, z, y=None, steps=50, cfg=1.0, solver='euler', shift=1.0, return_traj=False):
    """Integrate from z (noise, t = 1) to t = 0: x0, or (x0, [x at every grid time]) when return_traj."""
    ts = time_grid(steps, shift).tolist()
    f = lambda x, t: guided_velocity(model, x, t, y, cfg)
    x = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z  # integrate in fp32 (or fp64)
    traj = [x]
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = ode_step(f, x, t, t_next, solver)
        if return_traj:
            traj.append(x)
    return (x, traj) if return_traj else x

@torch.no_grad()
def sample_mean_flow(model, z, y=None, steps=1, shift=1.0, return_traj=False):
    """MeanFlow's jumps from z (noise, t = 1) down the time grid, z_r = z_t - (t - r) u(z_t, r, t): one step is
    x0 = eps - u(eps, 0, 1). One network evaluation a step, guidance included (trained in). x0, or (x0, trajectory)."""
    ts = time_grid(steps, shift).tolist()
    x = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    traj = [x]
    for t, r in zip(ts[:-1], ts[1:]):
        full = lambda s: torch.full((x.shape[0],), s, device=x.device)
        x = x - (t - r) * model(x, full(t), y, full(r)).to(x.dtype)
        if return_traj:
            traj.append(x)
    return (x, traj) if return_traj else x

# =============================================================================
# EMA of the weights, used for sampling

@torch.no_grad()
def update_ema(ema_model, model, decay):
    # ema <- decay * ema + (1 - decay) * w
    ema_p = list(ema_model.parameters())
    torch._foreach_lerp_(ema_p, [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_p)], 1 - decay)

# =============================================================================
# CPU kernels: DiT-LLaMA's attention and block, the same maths as Attention's 'math' path and TransformerBlock, with
# forwards, backwards and forward-mode derivatives (for torch.func.jvp) written by hand, for training on a CPU.
# Why: there, in bf16 above all, the attention's time goes less to its products than to passes over memory at a head
# dimension of 16. Autograd's RMSNorm and RoPE read and write q and k about twice as often as their maths needs, and
# a batch's L x L scores, written out three times forward and more backward, do not fit in the cache. So here RMSNorm
# and RoPE are one function that keeps only what its backward needs; the softmax runs on chunks of images whose
# scores stay in the cache, takes its exponentials in base 2 straight from the product, gets the row sums from the
# same product as the output, and its backward uses sum_j p_j dp_j = dy . y; the whole layer runs eager under
# torch.compile; the block's modulation and gated residuals are one fused kernel each. pick_attention says where they
# are used, tests/test_kernels.py that they equal the plain path in outputs and derivatives, docs/performance.md what
# each choice measured.

def pick_attention(attention, device_type, dtype):
    """The `attention` setting of the scripts -> Attention's path. auto: the kernels for bf16 on a CPU, where they
    train fastest; SDPA elsewhere (compiled fp32 on a CPU without bf16 units, the kernels trained slowest of the three
    paths: docs/performance.md). MeanFlow's jvp, which SDPA lacks, switches it to 'math' (jvp_attention)."""
    if attention != 'auto':
        return attention
    return 'kernels' if device_type == 'cpu' and dtype == 'bfloat16' else 'sdpa'

def kernel_block(block, x, c, angles):
    """TransformerBlock.forward with modulate and the gated residuals x + gate * f as one addcmul each."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
    x = torch.addcmul(x, gate_msa, block.attn(torch.addcmul(shift_msa, block.norm1(x), 1 + scale_msa), angles))
    return torch.addcmul(x, gate_mlp, block.mlp(torch.addcmul(shift_mlp, block.norm2(x), 1 + scale_mlp)))

@torch.compiler.disable  # eager under torch.compile, all of the layer: the hand-written backwards run slower compiled,
def kernel_attention(attn, x, angles):  # and compiled q/k/v copies around an eager core cost what compiling gains
    """Attention.forward by the kernels below. 1/sqrt(d) and log2 e ride on q's rotation, a complex factor of that
    modulus, so that neither q nor the scores get a pass of their own."""
    B, L, D = x.shape  # q, k, v: [B, heads, L, head_dim], copied once into that order (not copied per product)
    q, k, v = attn.qkv(x).view(B, L, 3, attn.n_heads, attn.head_dim).permute(2, 0, 3, 1, 4).contiguous()
    scale = attn.head_dim ** -0.5 * math.log2(math.e)  # scores in base 2: softmax(s) = 2^(s log2 e) / sum
    rot_q, rot_k = torch.polar(torch.full_like(angles, scale), angles), torch.polar(torch.ones_like(angles), angles)
    if isinstance(attn.q_norm, nn.RMSNorm):
        # |q k^T| <= |q| |k| <= d scale max|w_q| max|w_k| (RMSNorm: |x / rms(x)| = sqrt(d)): below 100, 2^(q k^T) can
        # neither overflow nor vanish and no row max is needed; above, it is subtracted
        bound = attn.head_dim * scale * attn.q_norm.weight.abs().max() * attn.k_norm.weight.abs().max()
        q, k, sub_max = norm_rope(q, attn.q_norm, rot_q), norm_rope(k, attn.k_norm, rot_k), bool(bound >= 100)
    else:
        q, k, sub_max = rotate(q, rot_q), rotate(k, rot_k), True
    images = max(1, 2 ** 21 // (attn.n_heads * L ** 2)) if x.device.type == 'cpu' else B  # 2^21 scores a chunk
    y = ExplicitAttention.apply(q, k, v, images, sub_max)[0]
    return attn.proj(y.reshape(B, L, D))  # y: [B, L, heads, head_dim]

def rotate(x, rot):
    """RoPE with its factor: pairs (x[2i], x[2i+1]) as complex numbers times rot [L, head_dim/2], in fp32."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * rot).flatten(-2).to(x.dtype)

def norm_rope(x, norm, rot):
    """rotate(RMSNorm(x)) for q or k [B, heads, L, d] by NormRoPEFunction, on a CPU in chunks of images whose fp32
    copies (2 MB) stay in the cache."""
    images = max(1, 2 ** 19 // x[0].numel()) if x.device.type == 'cpu' else len(x)
    return NormRoPEFunction.apply(x, norm.weight, rot, norm.eps, images)[0]

class NormRoPEFunction(torch.autograd.Function):
    """y = rot (x_hat w), x_hat = x / rms(x), rms(x) = sqrt(mean(x^2) + eps) over the last dim, in fp32, returned in
    x's dtype; rot [L, d/2], a constant, multiplies consecutive pairs as complex numbers. The forward keeps only x_hat
    and 1 / rms (returned beside y for the backward and the jvp); the backward makes one pass per chunk."""
    @staticmethod
    def forward(x, w, rot, eps, images):
        f32 = torch.promote_types(x.dtype, torch.float32)
        y, x_hat = torch.empty_like(x), torch.empty_like(x, dtype=f32)
        inv_rms = x.new_empty(x.shape[:-1] + (1,), dtype=f32)
        for i in range(0, len(x), images):
            xf, r = x[i:i + images].to(f32), inv_rms[i:i + images]
            torch.rsqrt(torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps), out=r)
            torch.mul(xf, r, out=x_hat[i:i + images])
            y[i:i + images] = torch.view_as_real(torch.view_as_complex((x_hat[i:i + images] * w).unflatten(-1, (-1, 2))) * rot).flatten(-2)
        return y, x_hat, inv_rms

    @staticmethod
    def setup_context(ctx, inputs, output):
        (_, w, rot, _, ctx.images), (y, x_hat, inv_rms) = inputs, output
        ctx.mark_non_differentiable(x_hat, inv_rms)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x_hat, inv_rms, w, rot)
        ctx.save_for_forward(x_hat, inv_rms, w, rot)
        ctx.y_dtype = y.dtype

    @staticmethod
    def backward(ctx, dy, *_):
        # with g = conj(rot) dy (dy rotated back): dw = sum g x_hat, dx = (g w - x_hat mean(g w x_hat)) / rms(x)
        (x_hat, inv_rms, w, rot), images = ctx.saved_tensors, ctx.images
        dx, dw = torch.empty_like(dy), torch.zeros_like(w)
        for i in range(0, len(x_hat), images):
            xh = x_hat[i:i + images]
            g = torch.view_as_complex(dy[i:i + images].to(xh.dtype).contiguous().unflatten(-1, (-1, 2))) * rot.conj()
            g = torch.view_as_real(g).flatten(-2)
            g_xh = g * xh
            dw += g_xh.sum(dim=tuple(range(xh.dim() - 1)))
            mean_gw_xh = (g_xh @ w).unsqueeze(-1).div_(xh.shape[-1])
            torch.mul(torch.addcmul(g.mul_(w), xh, mean_gw_xh, value=-1), inv_rms[i:i + images], out=dx[i:i + images])
        return dx, dw, None, None, None

    @staticmethod
    def jvp(ctx, dx, dw, *_):
        # forward mode, in one piece: dx_hat = (dx - x_hat mean(x_hat dx)) / rms(x), dy = rot (dx_hat w + x_hat dw)
        x_hat, inv_rms, w, rot = ctx.saved_tensors
        d = torch.zeros_like(x_hat)
        if dx is not None:
            dx = dx.to(x_hat.dtype)
            d += (dx - x_hat * (x_hat * dx).mean(-1, keepdim=True)) * inv_rms * w
        if dw is not None:
            d += x_hat * dw
        dy = torch.view_as_real(torch.view_as_complex(d.unflatten(-1, (-1, 2))) * rot).flatten(-2)
        return dy.to(ctx.y_dtype), None, None

class ExplicitAttention(torch.autograd.Function):
    """y = softmax(q k^T ln 2) v for q, k, v [B, heads, L, d] (base 2: the caller folds log2 e into q), returned as
    [B, L, heads, d], `images` images at a time. Forward: e = 2^(q k^T) (minus the row max if sub_max), then
    e [v, 1] = [e v, sum(e)], one pass over e where softmax takes two, and y = e v / sum(e); [v, 1], e and sum(e) are
    returned beside y for the backward and the jvp. The row-wise divisions run in fp32 (in bf16, broadcast along rows
    of d, they are slow on a CPU)."""
    @staticmethod
    def forward(q, k, v, images, sub_max):
        d, f32 = v.shape[-1], torch.promote_types(v.dtype, torch.float32)
        y, exps, row_sums = q.new_empty(q.shape[0], q.shape[2], q.shape[1], d), [], []
        v1 = torch.cat([v, torch.ones_like(v[..., :1])], -1)
        for i in range(0, q.shape[0], images):
            s = q[i:i + images] @ k[i:i + images].transpose(-2, -1)
            if sub_max:
                s -= s.amax(dim=-1, keepdim=True)
            exps.append(s.exp2_())
            ev_and_sum = (exps[-1] @ v1[i:i + images]).to(f32)  # [e v, sum(e)]
            row_sums.append(ev_and_sum[..., d:].contiguous())  # a copy: a view would keep all of ev_and_sum alive
            y[i:i + images] = (ev_and_sum[..., :d] / row_sums[-1]).transpose(1, 2)
        return (y, v1, *exps, *row_sums)

    @staticmethod
    def setup_context(ctx, inputs, output):
        (q, k, _, ctx.images, _), (y, v1, *saved) = inputs, output
        ctx.mark_non_differentiable(v1, *saved)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v1, y, *saved)
        ctx.save_for_forward(q, k, v1, y, *saved)

    @staticmethod
    def backward(ctx, dy, *_):
        # p = e / sum(e), dp = dy v^T, and per row D = sum_j p_j dp_j = dy . y. Scores in base 2:
        # ds = ln2 p (dp - D) = e * ([dy', -D'] [v, 1]^T) with dy' = dy ln2 / sum(e), D' = D ln2 / sum(e);
        # dq = ds k, dk = ds^T q, dv = p^T dy = e^T (dy / sum(e))
        (q, k, v1, y, *saved), images = ctx.saved_tensors, ctx.images
        exps, row_sums = saved[:len(saved) // 2], saved[len(saved) // 2:]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v1[..., :-1])
        dy_heads = dy.transpose(1, 2)  # [B, heads, L, d], as q, k, v
        D = (dy * y).sum(dim=-1, dtype=row_sums[0].dtype).transpose(1, 2).unsqueeze(-1)  # [B, heads, L, 1]
        for e, row_sum, i in zip(exps, row_sums, range(0, q.shape[0], images)):
            j = slice(i, i + images)
            dy_over_sum = dy_heads[j].to(row_sum.dtype, memory_format=torch.contiguous_format) / row_sum
            dy_and_D = torch.cat([dy_over_sum, -D[j] / row_sum], -1).mul_(math.log(2)).to(q.dtype)  # [dy', -D']
            ds = (dy_and_D @ v1[j].transpose(-2, -1)).mul_(e)
            dq[j] = ds @ k[j]
            dk[j] = (q[j].transpose(-2, -1) @ ds).transpose(-2, -1)  # dk^T = q^T ds
            dv[j] = (dy_over_sum.to(q.dtype).transpose(-2, -1) @ e).transpose(-2, -1)  # dv^T = (dy / sum(e))^T e
        return dq, dk, dv, None, None

    @staticmethod
    def jvp(ctx, dq, dk, dv, *_):
        # forward mode: ds = dq k^T + q dk^T, de = ln2 e ds, so with p = e / sum(e)
        # dy = ln2 ((p ds) v - sum_j (p ds) y) + p dv, the first two terms from one product (e ds) [v, 1]
        (q, k, v1, y, *saved), images = ctx.saved_tensors, ctx.images
        exps, row_sums = saved[:len(saved) // 2], saved[len(saved) // 2:]
        d, dy = v1.shape[-1] - 1, torch.zeros_like(y)
        for e, row_sum, i in zip(exps, row_sums, range(0, q.shape[0], images)):
            j = slice(i, i + images)
            dy_sum = torch.zeros_like(row_sum).expand(*row_sum.shape[:-1], d)  # sum(e) dy, in fp32
            if dq is not None or dk is not None:
                ds = 0 if dq is None else dq[j] @ k[j].transpose(-2, -1)
                ds = ds if dk is None else ds + q[j] @ dk[j].transpose(-2, -1)
                eds_v1 = ((e * ds) @ v1[j]).to(row_sum.dtype) * math.log(2)  # ln2 [(e ds) v, sum(e ds)]
                dy_sum = dy_sum + eds_v1[..., :d] - eds_v1[..., d:] * y[j].transpose(1, 2)
            if dv is not None:
                dy_sum = dy_sum + e @ dv[j]
            dy[j] = (dy_sum / row_sum).transpose(1, 2)
        return (dy, *[None] * (1 + len(saved)))

# =============================================================================
# What the scripts share: one-line errors, devices and processes, data and batches, the training loop's
# bookkeeping, checkpoints, figures. Every helper here reports bad input with die(): one line, no traceback.

DATASETS = ('mnist', 'fashion_mnist', 'cifar10', 'folder')

def die(msg):
    """How every script reports bad input: one line on stderr, exit code 1, no traceback."""
    print(f'error: {msg}', file=sys.stderr)
    sys.exit(1)

def check_out_dir(path, setting='out_dir'):
    """Die now, before any work, when the folder `path` (--setting) cannot be written: a file, under a file, or a folder
    this process may not write in (tried, not read from permission bits, which root ignores). Creates nothing. From here
    on an OSError nothing caught (a disk that fills up) or a Ctrl-C ends the script with one line, not a traceback."""
    import tempfile
    d = os.path.abspath(path)
    while not os.path.lexists(d):  # the nearest existing folder: path itself or the one it would be made in
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        die(f'--{setting}: {path} is a file, not a folder; choose another --{setting}' if d == os.path.abspath(path)
            else f'--{setting}: {path} cannot be made, {d} is a file; choose another --{setting}')
    try:
        tempfile.TemporaryFile(dir=d).close()
    except OSError as e:
        die(f'--{setting}: cannot write in {d} ({e.strerror}); choose another --{setting}')
    sys.excepthook = _one_line_excepthook

def _one_line_excepthook(kind, e, tb):
    if issubclass(kind, KeyboardInterrupt):
        print('stopped by Ctrl-C', file=sys.stderr)
    elif issubclass(kind, OSError):
        print(f'error: {e.filename}: {e.strerror}' if e.filename and e.strerror else
              f'error: {kind.__name__}: {e}'.splitlines()[0], file=sys.stderr)
    else:
        sys.__excepthook__(kind, e, tb)

def check_choices(**settings):
    """settings: name=(value, allowed values); dies naming the first value that is not allowed."""
    for key, (value, choices) in settings.items():
        if value not in choices:
            die(f"unknown {key} {value!r}: choose one of {', '.join(choices)}")

# devices, precision and processes

def setup_distributed(device, batch_size):
    """(ddp, rank, local_rank, world_size, device) from torchrun's environment; NCCL between GPUs, else gloo."""
    import datetime
    ddp = 'RANK' in os.environ
    rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')) if ddp else (0, 0, 1)
    if batch_size % world_size:
        die(f'batch_size {batch_size} is not divisible by {world_size} processes: use a multiple of {world_size}')
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device == 'cuda':
        if not torch.cuda.is_available():
            die('device=cuda but no GPU is visible: use --device=cpu (or auto)')
        if local_rank >= torch.cuda.device_count():
            die(f'LOCAL_RANK {local_rank} but {torch.cuda.device_count()} GPU(s) visible: use --nproc_per_node '
                f'{torch.cuda.device_count()} or fewer')
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    if ddp:  # a long timeout: the other processes wait at a barrier while local rank 0 reads (or downloads) the data
        cuda = device.startswith('cuda')
        dist.init_process_group('nccl' if cuda else 'gloo', timeout=datetime.timedelta(hours=2),
                                device_id=torch.device(device) if cuda else None)
    return ddp, rank, local_rank, world_size, device

def teardown_distributed():
    """Free what holds the process group (DDP's hooks, once the script has deleted the model), wait for every process,
    then destroy it: a gloo group freed at exit, or while a peer uses it, aborted now and then."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()

def setup_precision(device, dtype, log=print):
    """TF32 on a GPU; (autocast context, dtype): bf16 on a CPU or a GPU with native bf16, else fp32 with one note.
    On a CPU also keep freed memory for reuse: glibc hands a freed block of a few MB back to the system, and the next
    tensor of that size faults its pages in again."""
    if device == 'cpu' and sys.platform.startswith('linux'):
        import ctypes
        try:
            libc = ctypes.CDLL('libc.so.6')
            libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks under 32 MB come from the heap, not mmap
            libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GB of freed heap instead of returning it
        except (OSError, AttributeError):  # not glibc (musl): its default
            pass
    if device.startswith('cuda'):
        torch.backends.cuda.matmul.fp32_precision = 'tf32'
        torch.backends.cudnn.conv.fp32_precision = 'tf32'
        if dtype == 'bfloat16' and not torch.cuda.is_bf16_supported(including_emulation=False):
            log('note: this GPU has no native bf16, so this run uses float32')
            dtype = 'float32'
    elif dtype == 'bfloat16' and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        # without AVX-512 (or AMX) oneDNN has no bf16 matmul and PyTorch falls back to a scalar loop, far slower than fp32
        log('note: this CPU has no bf16 matrix unit (AVX-512 or AMX), so this run uses float32')
        dtype = 'float32'
    ctx = nullcontext() if dtype == 'float32' else torch.autocast(device.split(':')[0], dtype=torch.bfloat16)
    return ctx, dtype

def compile_fallback(compile, device_type, log=print):
    """Whether the training step can be compiled: on a CPU inductor needs a C++ compiler, and without one on PATH the
    run is eager with one note. When compiling, two messages a user cannot act on are silenced: inductor looking for
    CUDA on a CPU, and complex operations (the DiT's RoPE) left to eager."""
    cxx = os.environ.get('CXX') or ('clang++' if sys.platform == 'darwin' else 'g++')  # the compiler inductor calls
    if compile and device_type == 'cpu' and not shutil.which(cxx):
        log(f'note: torch.compile on a CPU needs a C++ compiler and {cxx} is not on PATH: this run is eager '
            f'(--compile=False)')
        return False
    if compile:
        import logging
        logging.getLogger('torch.utils.cpp_extension').setLevel(logging.ERROR)
        warnings.filterwarnings('ignore', message='Torchinductor does not support code generation for complex')
    return compile

def rng_states(ddp, world_size):
    """Every process's RNG state (gathered to each process), so a resumed DDP run draws the same noise."""
    state = {'cpu': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    if not ddp:
        return [state]
    states = [None] * world_size
    dist.all_gather_object(states, state)
    return states

def set_rng_states(states, rank, world_size, fallback_seed):
    """Restore this process's RNG states, or reseed (one note) with another process count or no CUDA state for a GPU."""
    if len(states) != world_size or (torch.cuda.is_available() and states[rank]['cuda'] is None):
        torch.manual_seed(fallback_seed)  # seeds the CUDA generators too
        if rank == 0:
            print(f'note: the checkpoint holds RNG states for {len(states)} process(es), not {world_size} on this '
                  f'device: reseeding, so batches and noise differ from an uninterrupted run')
        return
    torch.set_rng_state(states[rank]['cpu'])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state(states[rank]['cuda'])

# data

def _torchvision_idx(name, data_dir, train, download):
    from torchvision import datasets
    cls, folder = {'mnist': (datasets.MNIST, 'MNIST'), 'fashion_mnist': (datasets.FashionMNIST, 'FashionMNIST')}[name]
    made = not os.path.exists(os.path.join(data_dir, folder))
    try:  # download=True skips files already there
        ds = cls(data_dir, train=train, download=download)
        return ds.data.unsqueeze(1), ds.targets
    except Exception as e:
        error = e
    if made:  # leave nothing behind from a failed download
        shutil.rmtree(os.path.join(data_dir, folder), ignore_errors=True)
    split = [f'{"train" if train else "t10k"}-{k}-ubyte' for k in ('images-idx3', 'labels-idx1')]
    raw = os.path.join(data_dir, folder, 'raw')
    if all(os.path.isfile(os.path.join(raw, f)) for f in split):  # there, but not whole: a cut-short copy, say
        raise ValueError(f'cannot read {name} from {raw}: {" or ".join(split)} is damaged ({type(error).__name__}: '
                         f'{str(error).splitlines()[0] if str(error) else "?"}); copy it again, or delete it and pass '
                         f'--download=True')
    files = ', '.join(f'{s}-{k}-ubyte' for s in ('train', 't10k') for k in ('images-idx3', 'labels-idx1'))
    why = 'the download failed (offline?)' if download else 'download is off'
    raise FileNotFoundError(f'{name} not found in {os.path.join(data_dir, folder, "raw")} and {why}: expected {files} '
                            f'there; pass --data_dir=DIR that holds {folder}/raw/')

def _cifar10(data_dir, train, download):
    """torchvision's CIFAR10 layout, archive and download, read here: its constructor checks the md5 of all six
    batches and batches.meta against the real files' sums, so it refuses any other copy of the format (the tests'
    small ones) and a training set without test_batch; a damaged file is named below instead."""
    from torchvision.datasets import CIFAR10
    root = os.path.join(data_dir, CIFAR10.base_folder)
    files = [f for f, _ in (CIFAR10.train_list if train else CIFAR10.test_list)]
    if not all(os.path.isfile(os.path.join(root, f)) for f in files) and download:
        try:
            from torchvision.datasets.utils import download_and_extract_archive
            download_and_extract_archive(CIFAR10.url, data_dir, filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
        except Exception:
            pass
    if not all(os.path.isfile(os.path.join(root, f)) for f in files):
        why = 'the download failed (offline?)' if download else 'download is off'
        raise FileNotFoundError(
            f'cifar10 not found in {root} and {why}: expected the python pickle batches {", ".join(files)} there; '
            f'or use --dataset=folder --data_dir=DIR with one sub-folder of images per class')
    xs, ys = [], []
    for f in files:  # the real format: a pickled dict with 'data' uint8 [N, 3072] and 'labels'
        try:
            with open(os.path.join(root, f), 'rb') as fh:
                d = pickle.load(fh, encoding='latin1')
            xs.append(torch.as_tensor(np.asarray(d['data'], dtype=np.uint8)).view(-1, 3, 32, 32))
            ys.append(torch.as_tensor(d['labels']))
        except Exception as e:  # a cut-short download, another file under that name
            raise ValueError(f'{os.path.join(root, f)} is not a CIFAR-10 python batch ({type(e).__name__}): copy it '
                             f'again, or delete {root} and pass --download=True') from None
    return torch.cat(xs), torch.cat(ys)

def _image_folder(data_dir, image_size, skip_bad=False):
    """[N, 1, S, S] when every image is greyscale (L, 1-bit, 16-bit, grey + alpha), else [N, 3, S, S] in RGB. A file
    that is not a whole image stops the load, named; with skip_bad it is left out, and one note counts them."""
    from PIL import Image
    from torchvision import datasets, transforms
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f'image folder {data_dir!r} not found: --dataset=folder wants --data_dir=DIR with one sub-folder of images per class')
    try:
        samples = datasets.ImageFolder(data_dir, loader=lambda path: path).samples  # (path, class): opened below
    except FileNotFoundError as e:  # no class folder, or a class folder with no image
        raise FileNotFoundError(f'image folder {data_dir!r}: {e}') from None
    bad = {}  # path: what is wrong with it

    def read(path, mode=None):
        """(mode, size) from the header alone, or the image decoded in `mode`; None for a bad file when skipping."""
        try:
            with Image.open(path) as im:
                if mode is None:
                    return im.mode, im.size
                if mode == 'L' and im.mode.startswith('I;16'):  # 16 bits to 8 (PIL's convert('L') would clip at 255)
                    return Image.fromarray((np.asarray(im) >> 8).astype(np.uint8))
                return im.convert(mode)
        except Exception as e:  # empty, cut short, not an image at all, unreadable
            bad[path] = 'not an image file' if isinstance(e, Image.UnidentifiedImageError) else \
                f'{(str(e) or "?").splitlines()[0]} ({type(e).__name__})'
            if not skip_bad:
                raise ValueError(f'{path}: {bad[path]}; remove it, or pass --skip_bad_images=True to leave out every '
                                 f'unreadable file') from None

    heads = {path: read(path) for path, _ in samples}
    heads = {path: head for path, head in heads.items() if head is not None}
    mode = 'L' if all(m in ('1', 'L', 'LA', 'I;16', 'I;16B', 'I;16L') for m, _ in heads.values()) else 'RGB'
    small = sorted((min(size), path) for path, (_, size) in heads.items() if min(size) < image_size)
    if small and len({size for _, size in heads.values()}) > 1:  # one size for all is scaled alike (as MNIST to 32)
        side, path = small[0]
        raise ValueError(f'image folder {data_dir!r} mixes image sizes, and {len(small)} image(s) are smaller than '
                         f'image_size {image_size} (the smallest: {path}, {"x".join(map(str, heads[path][1]))}): only '
                         f'those would be blurred up; pass --image_size={side} or remove them')
    tf = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.PILToTensor()])
    x, y = [], []
    for path, k in samples:
        im = read(path, mode) if path in heads else None
        if im is not None:
            x.append(tf(im))
            y.append(k)
    if bad and int(os.environ.get('RANK', 0)) == 0:
        path, why = next(iter(bad.items()))
        print(f'note: left out {len(bad)} unreadable file(s) of {len(samples)} in {data_dir} (e.g. {path}: {why})')
    if not x:
        raise FileNotFoundError(f'image folder {data_dir!r} holds no readable image')
    return torch.stack(x), torch.as_tensor(y)

def load_dataset(name, data_dir, train=True, image_size=32, download=False, hint='', skip_bad=False):
    """The whole dataset in memory: uint8 images [N, C, H, W] and int64 labels [N]; mnist / fashion_mnist / cifar10
    in torchvision's layout under data_dir, folder: data_dir/<class>/<image> (skip_bad: leave out unreadable files).
    Dies with the reason, then `hint`."""
    try:
        if name in ('mnist', 'fashion_mnist'):
            x, y = _torchvision_idx(name, data_dir, train, download)
        elif name == 'cifar10':
            x, y = _cifar10(data_dir, train, download)
        elif name == 'folder':
            x, y = _image_folder(data_dir, image_size or 32, skip_bad)
        else:
            raise ValueError(f"unknown dataset {name!r}: choose mnist, fashion_mnist, cifar10 or folder")
        if len(x) == 0:
            raise FileNotFoundError(f'dataset {name!r} under {data_dir!r} holds no images')
    except (OSError, ValueError, RuntimeError) as e:  # OSError: also a file or folder this process may not read
        die(f'{e}{hint}')
    return x.contiguous(), y.long()

def load_training_set(dataset, data_dir, image_size, download, ddp, local_rank, device, skip_bad=False):
    """The training set as uint8 [N, C, S, S] and labels on `device`, resized once here to image_size (0: as
    stored). Under DDP each node's local rank 0 reads (and downloads) first while the others wait."""
    if ddp and local_rank != 0:
        dist.barrier()
    x, y = load_dataset(dataset, data_dir, True, image_size, download and local_rank == 0, skip_bad=skip_bad)
    if ddp and local_rank == 0:
        dist.barrier()
    if image_size and x.shape[-1] != image_size:
        x = resize(x.float(), image_size).round().clamp(0, 255).to(torch.uint8)
    return x.to(device), y.to(device)

def to_model_range(x_uint8):
    return x_uint8.float() / 127.5 - 1.0  # [0, 255] -> [-1, 1]

def to_uint8(x):
    """[-1, 1] NCHW -> uint8 NHWC numpy (the layout of image files and FID .npz files)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

def resize(x, size):
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode='bilinear', antialias=True)

class Batches:
    """Batch `it` of a run over uint8 images on the training device, in an order set by (seed, epoch) alone (a
    DistributedSampler share per process), so a resumed run sees the same batches; gathered, scaled, flipped there."""
    def __init__(self, x, y, batch_size, world_size=1, rank=0, seed=0, hflip=False):
        from torch.utils.data.distributed import DistributedSampler
        self.x, self.y, self.B, self.hflip = x, y, batch_size // world_size, hflip
        self.sampler = DistributedSampler(range(len(x)), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                          drop_last=True)
        self.iters_per_epoch = len(self.sampler) // self.B
        self.epoch, self.order = None, None

    def get(self, it):
        epoch, i = divmod(it, self.iters_per_epoch)
        if epoch != self.epoch:
            self.sampler.set_epoch(epoch)
            self.epoch, self.order = epoch, torch.tensor(list(self.sampler), device=self.x.device)
        idx = self.order[i * self.B:(i + 1) * self.B]
        x = to_model_range(self.x[idx])
        if self.hflip:
            x = torch.where(torch.rand(self.B, 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)
        return x, self.y[idx]

# the training loop's bookkeeping

def cosine_lr(it, lr, min_lr, warmup_iters, decay_iters):
    """Linear warm-up to lr, then cosine decay to min_lr at decay_iters (decay_iters < 0: constant lr)."""
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    if decay_iters < 0:
        return lr
    if it >= decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (lr - min_lr)

class Progress:
    """Loss, images/s and ETA. Loss and a finite-flag are summed on the device (no host sync per iteration); check()
    reads them over all processes and stops every one on a NaN or inf; pause() keeps sampling out of the speed.
    From here to the last iteration Ctrl-C (SIGINT) and SIGTERM, a cluster scheduler's stop, only set a flag: the loop
    finishes its iteration, writes a checkpoint there when interrupted() says so, and exit_interrupted() ends the run.
    Under DDP all processes must stop at one iteration: the flag joins check()'s all-reduce, so they stop together at
    the first log or checkpoint iteration after the signal (torchrun waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s, for it)."""
    def __init__(self, iter_num, max_iters, batch_size, iters_per_epoch, ddp, world_size, ckpt_path):
        import signal
        self.max_iters, self.batch_size, self.iters_per_epoch = max_iters, batch_size, iters_per_epoch
        self.ddp, self.world_size, self.ckpt_path = ddp, world_size, ckpt_path
        self.t_start = self.t_last = time.time()
        self.loss_sum, self.bad, self.n, self.it_last = 0.0, 0.0, 0, iter_num
        self.signal, self.stop = 0, False  # the signal this process got; under DDP: whether any process got one
        self.handlers = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)
                         if iter_num < max_iters}

    def on_signal(self, signum, frame):
        self.signal = signum

    def add(self, loss, grad_norm):
        self.loss_sum = self.loss_sum + loss.detach().float()
        self.bad = self.bad + (~torch.isfinite(loss.detach()) | ~torch.isfinite(grad_norm)).float()
        self.n += 1

    def check(self, iter_num):
        """The mean loss since the last report over all processes; dies if any loss or gradient was not finite."""
        if not self.n:
            return float('nan')
        x = torch.stack([torch.as_tensor(self.loss_sum) / self.n, torch.as_tensor(self.bad).float()])
        x = torch.cat([x, x.new_tensor([float(self.signal > 0)])])  # and the stop flag
        if self.ddp:
            dist.all_reduce(x)  # a sum: gloo has no AVG
            x[0] /= self.world_size
        loss, bad, stop = x.tolist()
        self.stop = stop > 0
        if bad or not math.isfinite(loss):
            die(f'loss is not finite (mean {loss}) before iter {iter_num}; stopped without writing, the last good '
                f'checkpoint ({self.ckpt_path}) is untouched. Lower --learning_rate or use --dtype=float32, then '
                f'--init_from=resume')
        return loss

    def interrupted(self, iter_num):
        """Whether to write a checkpoint at iter_num and stop: a stop signal came (under DDP: to any process, as of
        the last check(), the same answer in every process). After the last iteration the signals act as before."""
        import signal
        if iter_num >= self.max_iters:
            for s, handler in self.handlers.items():
                signal.signal(s, handler)
        return self.stop if self.ddp else self.signal > 0

    def exit_interrupted(self, iter_num):
        """After the checkpoint at iter_num: one line on how to go on, then exit 128 + the signal's number (130 for
        Ctrl-C, 143 for SIGTERM), the code a shell gives a process a signal ended."""
        import signal
        name = signal.Signals(self.signal).name if self.signal else 'a stop signal to another process'
        if self.ddp:
            dist.barrier()  # until rank 0 has written the checkpoint
        if not self.ddp or dist.get_rank() == 0:
            print(f'stopped by {name} at iter {iter_num}, checkpoint {self.ckpt_path} written there: to go on, run the '
                  f'same command with --init_from=resume', file=sys.stderr, flush=True)
        code = 128 + (self.signal or signal.SIGTERM)
        if self.ddp:  # at once: a gloo group freed at exit can abort (teardown_distributed), and nothing is left to do
            sys.stdout.flush()
            os._exit(code)
        sys.exit(code)

    def pause(self):
        self.t_last = time.time()

    def report(self, iter_num, lr):
        loss = self.check(iter_num)
        dt = time.time() - self.t_last
        img_s = (iter_num - self.it_last) * self.batch_size / dt
        eta = (self.max_iters - iter_num) * dt / max(1, iter_num - self.it_last)
        row = dict(iter=iter_num, epoch=iter_num / self.iters_per_epoch, loss=loss, lr=lr, img_per_s=img_s,
                   time=time.time() - self.t_start)
        line = (f'iter {iter_num}/{self.max_iters} (epoch {row["epoch"]:.2f}) | loss {loss:.4f} | lr {lr:.2e} | '
                f'{img_s:.1f} img/s | ETA {int(eta // 60)}m{int(eta % 60):02d}s')
        self.loss_sum, self.bad, self.n, self.t_last, self.it_last = 0.0, 0.0, 0, time.time(), iter_num
        return row, line

def start_log(log_path, iter_num):
    """A JSON-lines log; on resume keep the rows up to the checkpoint's iteration, drop what came after it."""
    import json
    old = open(log_path).readlines() if iter_num and os.path.isfile(log_path) else []
    with open(log_path, 'w') as f:
        f.writelines(line for line in old if json.loads(line)['iter'] <= iter_num)

# checkpoints

def save_checkpoint(ckpt, path):
    """Atomic: write a temporary file, then rename it over the old checkpoint. A write that fails (a full disk) leaves
    the old checkpoint as it was and ends the run with one line."""
    tmp = path + '.tmp'
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # RuntimeError: torch's zip writer reports a failed write as one
        if os.path.exists(tmp):
            os.remove(tmp)
        why = e.strerror if isinstance(e, OSError) and e.strerror else f'{type(e).__name__}: {e}'.splitlines()[0]
        kept = f'{path} is kept as it was' if os.path.exists(path) else 'nothing was written'
        die(f'cannot write {tmp} ({why}): {kept}; free some space or pass another --out_dir, then go on with '
            f'--init_from=resume')

def load_checkpoint(path, hint=''):
    """A nanoflow checkpoint dict, or die with the reason and then `hint`."""
    if not os.path.isfile(path):
        die(f'no checkpoint at {path}{hint}')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:
        die(f'cannot read checkpoint {path} ({type(e).__name__}); it is damaged or not a torch file{hint}')
    if not isinstance(ckpt, dict) or 'model_args' not in ckpt or 'model' not in ckpt:
        die(f'{path} is not a nanoflow checkpoint (no model_args / model){hint}')
    return ckpt

def resume_checkpoint(path, expect, model_args, given):
    """The checkpoint to continue from, or die with one line saying what to do. expect: what this run's data and
    script fix (channels, size, classes, time input; arch: dit, unet or resnet, told apart as build_model does).
    model_args: what this run's settings would build; given: the settings the user gave (configurator's
    config_given). The checkpoint's model_args build the network on resume, so a given setting they contradict (a
    typed --dim=64 on a dim-32 checkpoint) stops the run, naming each with both values, rather than be ignored."""
    ckpt = load_checkpoint(path, ": train with --init_from=scratch or set --out_dir")
    args = ckpt['model_args']
    there = {'time_cond': True, 'num_classes': 0, **args,  # (the ResNet's: a time input, no classes)
             'arch': 'dit' if 'dim' in args else 'resnet' if 'width' in args else 'unet'}
    wrong = ', '.join(f'{k}={there.get(k)!r} there, {v!r} here' for k, v in expect.items() if there.get(k) != v)
    if wrong:
        die(f'{path} does not fit this run ({wrong}): use the data and script of that run, or another --out_dir')
    show = lambda v: v if isinstance(v, str) else repr(v).replace(' ', '')  # as typed on the command line
    asked = [f'--{k}={show(v)} (the checkpoint: {show(there[k])})' if k in there else f'--{k}={show(v)} (the '
             f'checkpoint\'s {there["arch"]} has no {k})' for k, v in model_args.items() if k in given and there.get(k) != v]
    if asked:
        die(f'{path} holds another network than your settings ask for: {", ".join(asked)}; a resumed run keeps the '
            f'checkpoint\'s network, so drop these settings, or train the new network in another --out_dir')
    missing = [k for k in ('ema', 'optimizer', 'iter_num', 'rng') if k not in ckpt]
    if missing:
        die(f'{path} holds no {", ".join(missing)}: it cannot be resumed (sample.py can still use it); train in '
            f'another --out_dir')
    return ckpt

def load_flow_model(path, device='cpu', use_ema=True, attention='sdpa'):
    """(The flow model rebuilt from model_args, EMA weights by default, in eval mode; the checkpoint), or die."""
    ckpt = load_checkpoint(path, ': pass --out_dir=DIR of a training run or --ckpt=PATH')
    if not ckpt['model_args'].get('time_cond', True):
        die(f'{path} is a one-step denoiser (no time input), not a flow model: use a checkpoint of '
            f'train_flow_unet.py, train_class_cfg.py or train_dit.py')
    try:
        model = build_model(ckpt['model_args'], attention)
        model.load_state_dict(ckpt['ema'] if use_ema and ckpt.get('ema') else ckpt['model'])
    except (TypeError, RuntimeError, AssertionError) as e:  # model_args a network does not take, weights of another
        die(f'{path}: its weights do not fit its model_args ({type(e).__name__}): it is damaged or not a nanoflow '
            f'checkpoint')
    return model.to(device).eval(), ckpt

# figures

def save_grid(x, path, nrow):
    """Images in [-1, 1] -> one PNG grid."""
    from torchvision.utils import save_image
    save_image((x.float().clamp(-1, 1) + 1) / 2, path, nrow=nrow, padding=2, pad_value=1.0)

def plot_loss(iters, losses, path, title):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(iters, losses, lw=0.8, alpha=0.4, label='per log interval')
    if len(losses) >= 10:  # a moving average makes the trend readable
        k = max(len(losses) // 20, 2)
        smooth = np.convolve(losses, np.ones(k) / k, mode='valid')
        ax.plot(iters[k - 1:], smooth, lw=1.8, label=f'moving average ({k})')
    ax.set(xlabel='iteration', ylabel='loss', title=title, yscale='log')
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

def save_labelled_grid(rows, path, row_labels, title, col_labels=None):
    """rows: [R, K, C, H, W] images in [-1, 1] -> one figure, a labelled row per entry of rows."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    R, K = rows.shape[:2]
    fig, axes = plt.subplots(R, K, figsize=(1.1 * K + 1.2, 1.1 * R + 0.6), squeeze=False)
    for r in range(R):
        for k in range(K):
            img = ((rows[r, k].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy()
            ax = axes[r, k]
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap='gray', vmin=0, vmax=1)
            ax.set(xticks=[], yticks=[])
            if k == 0:
                ax.set_ylabel(row_labels[r], rotation=0, ha='right', va='center', fontsize=9)
            if r == 0 and col_labels:
                ax.set_title(col_labels[k], fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
