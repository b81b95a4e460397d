"""Pretrain a small GPT for a fixed 5 minutes of wall clock, then report val_bpb (lower is better).
Usage: uv run train.py > run.log 2>&1. The one file the agent edits; prepare.py (data, tokenizer, metric) stays
fixed. Importing this file builds and trains nothing (tests import GPT and MuonAdamW from it)."""

import functools
import gc
import hashlib
import math
import os
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from prepare import (DATASET, GPU_PEAK_FLOPS, MAX_SEQ_LEN, check_data, cuda_step_fits, eval_tokens, evaluate_bpb,
                     load_flash_attention_3, make_dataloader, time_budget)

# The device is decided once, here: cuda -> mps -> cpu
DEVICE_TYPE = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"

# -----------------------------------------------------------------------------
# Model


@dataclass
class GPTConfig:
    sequence_len: int = 2048      # context length, tokens; sets the attention windows and the rotary table
    vocab_size: int = 8192
    n_layer: int = 8
    n_head: int = 4               # query heads
    n_kv_head: int = 4            # key/value heads (grouped-query attention when < n_head)
    n_embd: int = 512             # model width; head_dim = n_embd // n_head
    window_pattern: str = "SSSL"  # per-layer attention window, repeated: S = half context, L = full; last layer always L


def norm(x):
    return F.rms_norm(x, (x.size(-1),))  # no learned weight


def has_value_embedding(layer_idx, n_layer):
    return layer_idx % 2 == (n_layer - 1) % 2  # alternating layers, the last one always included


def apply_rotary_emb(x, cos, sin):
    d = x.shape[3] // 2  # channels split in halves, (B, T, H, D)
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], 3)


def load_attention_backend():
    """FA3 on CUDA (local cache, else the `kernels` hub), else flex attention, else SDPA: (backend, fa3, log note)."""
    if DEVICE_TYPE != "cuda":
        return "sdpa", None, f"no CUDA on {DEVICE_TYPE}"
    try:
        kernel, repo, source = load_flash_attention_3(torch.cuda.get_device_capability())
        fa3 = kernel.flash_attn_interface
        q = torch.randn(1, 256, 2, 128, device="cuda", dtype=torch.bfloat16)
        fa3.flash_attn_func(q, q, q, causal=True, window_size=(128, 0))  # a kernel that loads but fails to run
        return "fa3", fa3, f"Flash Attention 3 from {repo} ({'local cache' if source == 'cache' else 'hub'})"
    except Exception as e:
        reason = f"Flash Attention 3 unavailable: {type(e).__name__}"
    try:  # same masks without a T x T tensor per layer
        check_flex_attention()
        return "flex", None, f"flex attention ({reason})"
    except Exception as e:
        return "sdpa", None, f"PyTorch SDPA with a mask ({reason}; flex attention failed: {type(e).__name__})"


def check_flex_attention():  # raises if flex attention with a sliding-window block mask cannot run on this GPU
    q = torch.randn(1, 2, 256, 128, device="cuda", dtype=torch.bfloat16)
    with warnings.catch_warnings():  # the probe runs uncompiled on purpose; the model is compiled
        warnings.simplefilter("ignore")
        flex_attention(q, q, q, block_mask=make_block_mask(256, 128, "cuda"))


ATTN_BACKEND, fa3 = None, None  # set by main() before the model is built


@functools.lru_cache(maxsize=8)
def sliding_window_mask(T, window, device):
    i = torch.arange(T, device=device)
    d = i[:, None] - i[None, :]  # (T, T): query i sees keys i-window ... i
    return (d >= 0) & (d <= window)


def attention(q, k, v, window, block_mask=None):
    """Causal attention where query i sees keys i-window ... i (window+1 keys). (B, T, H, D) in and out."""
    if ATTN_BACKEND == "fa3":
        y = fa3.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
        return y[0] if isinstance(y, tuple) else y
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    T, gqa = q.size(2), q.size(1) != k.size(1)
    if block_mask is not None:  # flex attention: sparse blocks, no T x T mask in memory
        y = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    elif window >= T - 1:  # the window covers the whole sequence: plain causal
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=sliding_window_mask(T, window, q.device), enable_gqa=gqa)
    return y.transpose(1, 2)


def make_block_mask(T, window, device):
    return create_block_mask(lambda b, h, q, kv: (q >= kv) & (q - kv <= window), None, None, T, T, device=device)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.ve_gate_channels = 32
        has_ve = has_value_embedding(layer_idx, config.n_layer)
        self.ve_gate = nn.Linear(self.ve_gate_channels, self.n_kv_head, bias=False) if has_ve else None

    def forward(self, x, ve, cos_sin, window, block_mask):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # ResFormer value embedding, mixed in by a per-head gate in (0, 2), 1 at init
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))  # (B, T, n_kv_head)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = norm(apply_rotary_emb(q, *cos_sin)), norm(apply_rotary_emb(k, *cos_sin))  # QK norm after RoPE
        y = attention(q, k, v, window, block_mask)
        return self.c_proj(y.contiguous().view(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU^2


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, window, block_mask):
        x = x + self.attn(norm(x), ve, cos_sin, window, block_mask)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        pattern, long = config.window_pattern, config.sequence_len
        self.window_sizes = [long // (2 if pattern[i % len(pattern)] == "S" else 1) for i in range(config.n_layer)]
        self.window_sizes[-1] = long
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(config.vocab_size, config.n_embd),
                                              h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)])))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # untied from wte
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))   # scales the residual stream into layer i
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))     # mixes the normed embedding back in
        kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, kv_dim)
                                           for i in range(config.n_layer) if has_value_embedding(i, config.n_layer)})
        self.rotary_seq_len = config.sequence_len * 10  # headroom for longer evaluation
        cos, sin = self.precompute_rotary(self.rotary_seq_len, config.n_embd // config.n_head)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.block_masks = {}  # window -> flex BlockMask for T = sequence_len, built by init_weights on CUDA

    @staticmethod
    def precompute_rotary(seq_len, head_dim, base=10000, device=None):
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
        return freqs.cos().bfloat16()[None, :, None, :], freqs.sin().bfloat16()[None, :, None, :]  # (1, T, 1, D/2)

    @torch.no_grad()
    def init_weights(self, seed):
        """Each parameter draws from its own stream, seeded by `seed` and its name, on the CPU (any device gets the
        same values): adding, removing or reshaping one module leaves every other parameter's values as they were."""
        n_embd = self.config.n_embd
        s = 3**0.5 * n_embd**-0.5  # uniform(-s, s) has the std of normal(0, 1/sqrt(d))
        names = {p: name for name, p in self.named_parameters()}

        def draw(p, fill):
            digest = hashlib.blake2b(f"{seed}:{names[p]}".encode(), digest_size=8).digest()
            p.copy_(fill(torch.empty(p.shape), torch.Generator().manual_seed(int.from_bytes(digest, "little"))))

        draw(self.transformer.wte.weight, lambda t, g: t.normal_(0.0, 1.0, generator=g))
        draw(self.lm_head.weight, lambda t, g: t.normal_(0.0, 0.001, generator=g))
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                draw(lin.weight, lambda t, g: t.uniform_(-s, s, generator=g))
            nn.init.zeros_(block.attn.c_proj.weight)  # every block starts as the identity
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)  # gate = 2 * sigmoid(0) = 1
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        for ve in self.value_embeds.values():
            draw(ve.weight, lambda t, g: t.uniform_(-s, s, generator=g))
        device = self.lm_head.weight.device
        self.cos, self.sin = self.precompute_rotary(self.rotary_seq_len, n_embd // self.config.n_head, device=device)
        if device.type == "cuda":  # bf16 embeddings halve their memory; autocast runs the rest in bf16
            self.transformer.wte.to(dtype=torch.bfloat16)
            self.value_embeds.to(dtype=torch.bfloat16)
            if ATTN_BACKEND == "flex":
                self.block_masks = {w: make_block_mask(self.config.sequence_len, w, device) for w in set(self.window_sizes)}

    def num_params(self):  # parameter counts by kind
        counts = {"wte": self.transformer.wte.weight.numel(),
                  "value_embeds": sum(p.numel() for p in self.value_embeds.parameters()),
                  "lm_head": self.lm_head.weight.numel(),
                  "transformer_matrices": sum(p.numel() for p in self.transformer.h.parameters()),
                  "scalars": self.resid_lambdas.numel() + self.x0_lambdas.numel()}
        counts["total"] = sum(counts.values())
        assert counts["total"] == sum(p.numel() for p in self.parameters()), counts
        return counts

    def estimate_flops(self):
        """Training FLOPs per token: 6 per matmul weight (not embeddings or scalars), plus QK^T and AV per window."""
        c = self.num_params()
        matmul_params = c["total"] - c["wte"] - c["value_embeds"] - c["scalars"]
        head_dim = self.config.n_embd // self.config.n_head
        attn = sum(12 * self.config.n_head * head_dim * min(w, self.config.sequence_len) for w in self.window_sizes)
        return 6 * matmul_params + attn

    def setup_optimizer(self, unembedding_lr, embedding_lr, matrix_lr, weight_decay, adam_betas, scalar_lr):
        dmodel_lr_scale = (self.config.n_embd / 768) ** -0.5  # AdamW lrs were tuned at width 768
        adamw = dict(kind="adamw", betas=adam_betas, eps=1e-10, weight_decay=0.0)
        groups = [
            dict(adamw, params=[self.lm_head.weight], lr=unembedding_lr * dmodel_lr_scale),
            dict(adamw, params=[self.transformer.wte.weight], lr=embedding_lr * dmodel_lr_scale),
            dict(adamw, params=list(self.value_embeds.parameters()), lr=embedding_lr * dmodel_lr_scale),
            dict(adamw, params=[self.resid_lambdas], lr=scalar_lr * 0.01),
            dict(adamw, params=[self.x0_lambdas], lr=scalar_lr, betas=(0.96, 0.95)),
        ]
        matrices = list(self.transformer.h.parameters())
        for shape in sorted({p.shape for p in matrices}):  # Muon updates same-shape matrices stacked
            groups.append(dict(kind="muon", params=[p for p in matrices if p.shape == shape], lr=matrix_lr,
                               momentum=0.95, ns_steps=5, beta2=0.95, weight_decay=weight_decay))
        optimizer = MuonAdamW([g for g in groups if g["params"]])
        for g in optimizer.param_groups:
            g["initial_lr"] = g["lr"]
        return optimizer

    def forward(self, idx, targets=None, reduction="mean"):
        B, T = idx.size()
        cos_sin = self.cos[:, :T], self.sin[:, :T]
        x = x0 = norm(self.transformer.wte(idx))  # (B, T, n_embd)
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            w = self.window_sizes[i]
            x = block(x, ve, cos_sin, w, self.block_masks.get(w) if T == self.config.sequence_len else None)
        logits = self.lm_head(norm(x)).float()
        logits = 15 * torch.tanh(logits / 15)  # soft cap at +-15
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1, reduction=reduction)

# -----------------------------------------------------------------------------
# Optimizer: Muon for the 2-D matrices in the blocks, AdamW for everything else

# Polar Express: per-step (a, b, c) of X <- a X + b (X X^T) X + c (X X^T)^2 X, converging to the polar factor
POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def adamw_step(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, wd):
    p.mul_(1 - lr * wd)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2)
    denom = (exp_avg_sq / (1 - beta2**step)).sqrt() + eps
    p.add_(exp_avg / denom * (-lr / (1 - beta1**step)))


def muon_step(grads, params, momentum_buffer, second_momentum_buffer, momentum, lr, wd, beta2, ns_steps, red_dim):
    """One Muon step on stacked (N, rows, cols) matrices, in place."""
    # Nesterov momentum
    momentum = momentum.to(grads.dtype)
    momentum_buffer.lerp_(grads, 1 - momentum)
    g = grads.lerp_(momentum_buffer, momentum)
    # Polar Express orthogonalization, in bf16; X X^T is taken on the smaller side
    X = g.bfloat16()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    tall = g.size(-2) > g.size(-1)
    for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
        if tall:
            A = X.mT @ X
            X = a * X + X @ (b * A + c * (A @ A))
        else:
            A = X @ X.mT
            X = a * X + (b * A + c * (A @ A)) @ X
    g = X
    # NorMuon: normalize each row (or column) by an EMA of its mean square, keeping the update's total norm
    v_mean = g.float().square().mean(dim=red_dim, keepdim=True)
    red_size = g.size(red_dim)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * red_size).sqrt()
    second_momentum_buffer.lerp_(v_mean.to(second_momentum_buffer.dtype), 1 - beta2.to(g.dtype))
    step_size = second_momentum_buffer.clamp_min(1e-10).rsqrt()
    v_norm_new = ((v_mean * red_size) * step_size.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    g = g * (step_size * (v_norm / v_norm_new.clamp_min(1e-10))).to(g.dtype)
    # cautious weight decay: only where the update and the parameter agree in sign
    lr, wd = lr.to(g.dtype), wd.to(g.dtype)
    mask = (g * params) >= 0
    params.sub_(lr * g + lr * wd * params * mask)


if DEVICE_TYPE == "cuda":  # fused kernels on the GPU; eager elsewhere (no compiler needed)
    adamw_step = torch.compile(adamw_step, dynamic=False, fullgraph=True)
    muon_step = torch.compile(muon_step, dynamic=False, fullgraph=True)


class MuonAdamW(torch.optim.Optimizer):
    """Groups of kind "adamw" (lr, betas, eps, weight_decay) or "muon" (lr, momentum, ns_steps, beta2, weight_decay;
    every matrix of a muon group has the same shape)."""

    def __init__(self, param_groups):
        super().__init__(param_groups, defaults={})
        # hyperparameters travel as 0-D tensors so changing them does not recompile the step
        self._t = {k: torch.tensor(0.0) for k in ("step", "lr", "beta1", "beta2", "eps", "wd", "momentum")}

    def _set(self, **values):
        for k, v in values.items():
            self._t[k].fill_(v)
        return self._t

    def _step_adamw(self, group):
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            state["step"] += 1
            t = self._set(step=state["step"], lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
                          eps=group["eps"], wd=group["weight_decay"])
            adamw_step(p, p.grad, state["exp_avg"], state["exp_avg_sq"], t["step"], t["lr"], t["beta1"], t["beta2"],
                       t["eps"], t["wd"])

    def _step_muon(self, group):
        params = group["params"]
        rows, cols = params[0].shape
        state = self.state[params[0]]
        if not state:
            state["momentum_buffer"] = torch.zeros(len(params), rows, cols, dtype=params[0].dtype, device=params[0].device)
            # one second moment per row of a tall-or-square matrix, per column of a wide one
            shape = (len(params), rows, 1) if rows >= cols else (len(params), 1, cols)
            state["second_momentum_buffer"] = torch.zeros(shape, dtype=params[0].dtype, device=params[0].device)
        red_dim = -1 if rows >= cols else -2
        grads, stacked = torch.stack([p.grad for p in params]), torch.stack(params)
        t = self._set(momentum=group["momentum"], beta2=group["beta2"], wd=group["weight_decay"],
                      lr=group["lr"] * max(1.0, rows / cols) ** 0.5)
        muon_step(grads, stacked, state["momentum_buffer"], state["second_momentum_buffer"], t["momentum"], t["lr"],
                  t["wd"], t["beta2"], group["ns_steps"], red_dim)
        torch._foreach_copy_(params, list(stacked.unbind(0)))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            (self._step_adamw if group["kind"] == "adamw" else self._step_muon)(group)

# -----------------------------------------------------------------------------
# Hyperparameters (edit these directly: no CLI flags)

# Model size
DEPTH = 8                  # transformer layers; everything else scales from it
ASPECT_RATIO = 64          # model_dim = DEPTH * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
HEAD_DIM = 128             # channels per attention head
WINDOW_PATTERN = "SSSL"    # S = half-context sliding window, L = full context; the last layer is always L

# Optimization
TOTAL_BATCH_SIZE = 2**19   # tokens per optimizer step (gradient accumulation over micro-batches)
DEVICE_BATCH_SIZE = 128    # sequences per micro-batch, at most: on CUDA halved until a step fits the GPU's memory
EMBEDDING_LR = 0.6         # AdamW, token and value embeddings
UNEMBEDDING_LR = 0.004     # AdamW, output head
MATRIX_LR = 0.04           # Muon, block matrices
SCALAR_LR = 0.5            # AdamW, per-layer residual/x0 scalars
WEIGHT_DECAY = 0.2         # Muon cautious weight decay, decays linearly to 0 over the budget
ADAM_BETAS = (0.8, 0.95)
WARMUP_RATIO = 0.0         # fraction of the budget with linear lr warm-up
WARMDOWN_RATIO = 0.5       # fraction of the budget at the end with linear lr decay
FINAL_LR_FRAC = 0.0        # lr multiplier at the very end
SEED = 42                  # initial weights; reruns under other seeds set AUTORESEARCH_SEED (never tune SEED)

if DATASET == "tinystories":  # `uv run prepare.py --dataset tinystories`: the reference's advice for small machines
    DEPTH, WINDOW_PATTERN, TOTAL_BATCH_SIZE, DEVICE_BATCH_SIZE = 4, "L", 2**14, 32
# Small machines (Apple MPS, CPU), where one default step takes minutes: a small model and batch keep `uv run train.py`
# working end to end (prepare.py scores fewer tokens there); val_bpb compares only with runs on the same machine.
if DEVICE_TYPE != "cuda":
    DEPTH, ASPECT_RATIO, HEAD_DIM = 2, 64, 64   # width 128, 2 heads (3.5M parameters on ClimbMix)
    TOTAL_BATCH_SIZE, DEVICE_BATCH_SIZE = 2**13, 4

# -----------------------------------------------------------------------------
# Setup


def check_settings():
    """Settings that cannot work, caught before anything is allocated."""
    problems = []
    if TOTAL_BATCH_SIZE % (DEVICE_BATCH_SIZE * MAX_SEQ_LEN) != 0:
        problems.append(f"TOTAL_BATCH_SIZE={TOTAL_BATCH_SIZE} must be a multiple of DEVICE_BATCH_SIZE * MAX_SEQ_LEN "
                        f"= {DEVICE_BATCH_SIZE} * {MAX_SEQ_LEN} = {DEVICE_BATCH_SIZE * MAX_SEQ_LEN}")
    if not WINDOW_PATTERN or set(WINDOW_PATTERN) - set("SL"):
        problems.append(f"WINDOW_PATTERN={WINDOW_PATTERN!r} may contain only the letters S and L")
    if HEAD_DIM <= 0 or HEAD_DIM % 2:
        problems.append(f"HEAD_DIM={HEAD_DIM} must be a positive even number (rotary embeddings split it in halves)")
    if DEPTH < 1 or ASPECT_RATIO < 1:
        problems.append(f"DEPTH={DEPTH} and ASPECT_RATIO={ASPECT_RATIO} must be positive")
    if problems:
        raise SystemExit("error: bad setting in train.py: " + "; ".join(problems))


def build_model_config(depth, vocab_size):
    model_dim = -(-depth * ASPECT_RATIO // HEAD_DIM) * HEAD_DIM  # round up to whole heads
    n_head = model_dim // HEAD_DIM
    return GPTConfig(sequence_len=MAX_SEQ_LEN, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_head, n_embd=model_dim, window_pattern=WINDOW_PATTERN)


def peak_memory_mb():
    if DEVICE_TYPE == "cuda":
        return torch.cuda.max_memory_allocated() / 1024**2
    if DEVICE_TYPE == "mps":
        return torch.mps.driver_allocated_memory() / 1024**2
    import resource  # POSIX only
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # process peak resident memory
    return rss / 1024**2 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def sync():
    {"cuda": torch.cuda.synchronize, "mps": torch.mps.synchronize}.get(DEVICE_TYPE, lambda: None)()


def init_fingerprint(model):
    """12 hex digits of a hash of the initial weights: equal for two runs that start from the same weights."""
    h = hashlib.blake2b(digest_size=6)
    for name, p in model.named_parameters():
        h.update(name.encode() + p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def lr_multiplier(progress):
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO
    if progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    cooldown = (1.0 - progress) / WARMDOWN_RATIO
    return cooldown + (1 - cooldown) * FINAL_LR_FRAC


def fit_micro_batch(fits):  # (micro-batch, accumulation steps): DEVICE_BATCH_SIZE halved until fits(b)
    b = DEVICE_BATCH_SIZE
    while not fits(b):
        if b % 2:  # one sequence, or an odd DEVICE_BATCH_SIZE: no smaller half
            raise SystemExit(f"error: {b} x {MAX_SEQ_LEN} tokens per micro-batch do not fit in the GPU's memory; lower "
                             f"DEPTH (now {DEPTH}) in train.py, or use `uv run prepare.py --dataset tinystories`")
        b //= 2
    if b < DEVICE_BATCH_SIZE:
        print(f"micro-batch: DEVICE_BATCH_SIZE {DEVICE_BATCH_SIZE} does not fit in the GPU's memory, {b} does")
    return b, TOTAL_BATCH_SIZE // (b * MAX_SEQ_LEN)  # the tokens per step stay


def muon_momentum(step):
    return 0.85 + 0.10 * min(step / 300, 1.0)  # 0.85 -> 0.95 over the first 300 steps


def muon_weight_decay(progress):
    return WEIGHT_DECAY * (1 - progress)  # linearly to 0 over the budget


def main():
    global ATTN_BACKEND, fa3, DEVICE_BATCH_SIZE
    t_start = time.time()
    check_settings()
    budget, val_tokens = time_budget(), eval_tokens(DEVICE_TYPE)  # prepare.py's (tests shorten them)
    seed = os.environ.get("AUTORESEARCH_SEED", str(SEED))  # the protocol's reruns; the only source of randomness
    if not seed.lstrip("-").isdigit():
        raise SystemExit(f"error: AUTORESEARCH_SEED={seed!r} must be an integer (unset it to use SEED = {SEED})")
    seed = int(seed)
    tokenizer = check_data()  # a missing or broken tokenizer or shard fails here, not after training
    torch.set_float32_matmul_precision("high")
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if DEVICE_TYPE == "cuda" else nullcontext()
    ATTN_BACKEND, fa3, attn_note = load_attention_backend()
    gpu = torch.cuda.get_device_name() if DEVICE_TYPE == "cuda" else None
    peak_flops = next((f for name, f in GPU_PEAK_FLOPS if name in gpu), 0.0) if gpu else 0.0

    config = build_model_config(DEPTH, tokenizer.get_vocab_size())
    # GPU: shapes on the meta device, then memory once; elsewhere in place (meta imports the compiler: ~3.5 s on CPU)
    with torch.device("meta" if DEVICE_TYPE == "cuda" else DEVICE_TYPE):
        model = GPT(config)
    model.to_empty(device=DEVICE_TYPE)
    torch.manual_seed(seed)  # for anything an edit draws from the global stream; init_weights seeds its own
    model.init_weights(seed)
    fingerprint = init_fingerprint(model)
    counts, flops_per_token = model.num_params(), model.estimate_flops()
    optimizer = model.setup_optimizer(unembedding_lr=UNEMBEDDING_LR, embedding_lr=EMBEDDING_LR, matrix_lr=MATRIX_LR,
                                      weight_decay=WEIGHT_DECAY, adam_betas=ADAM_BETAS, scalar_lr=SCALAR_LR)
    if DEVICE_TYPE == "cuda":
        model = torch.compile(model, dynamic=False)

    print(f"torch {torch.__version__} | device: {DEVICE_TYPE}{f' ({gpu})' if gpu else ''} | dataset: {DATASET} | "
          f"seed: {seed} | precision: {'bf16 autocast' if DEVICE_TYPE == 'cuda' else 'fp32'} | attention: {attn_note}")
    print(f"model: {asdict(config)}")
    print("params: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()) + f" | FLOPs/token: {flops_per_token:e}")
    DEVICE_BATCH_SIZE, grad_accum_steps = fit_micro_batch(  # on CUDA the model compiles here, at the first size tried
        lambda b: DEVICE_TYPE != "cuda" or cuda_step_fits(model, b, MAX_SEQ_LEN, autocast))
    train_loader = make_dataloader(tokenizer, DEVICE_BATCH_SIZE, MAX_SEQ_LEN, "train", device=DEVICE_TYPE)
    print(f"batch: {TOTAL_BATCH_SIZE:,} tokens/step = {grad_accum_steps} x {DEVICE_BATCH_SIZE} x {MAX_SEQ_LEN} | "
          f"time budget: {budget:g}s | eval tokens: {val_tokens:,}"
          + ("" if DEVICE_TYPE == "cuda" else " (small-machine settings)"))
    if not peak_flops:
        print(f"mfu: reported as 0 (no known bf16 peak for {gpu or DEVICE_TYPE})")

    # -------------------------------------------------------------------------
    # Training loop

    x, y, epoch = next(train_loader)
    t_loop, wait_before_loop = time.time(), train_loader.wait_seconds
    interactive, last_print = sys.stdout.isatty(), 0.0
    smooth_loss, training_time, step, done = 0.0, 0.0, 0, False
    while not done:
        sync()
        t0 = time.time()
        for _ in range(grad_accum_steps):
            with autocast:
                loss = model(x, y)
            train_loss = loss.detach()
            (loss / grad_accum_steps).backward()
            x, y, epoch = next(train_loader)  # the next batch is already packed by the loader's thread
        progress = min(training_time / budget, 1.0)
        lrm = lr_multiplier(progress)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum(step)
                group["weight_decay"] = muon_weight_decay(progress)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        loss_f = train_loss.item()  # the one host sync per step
        if math.isnan(loss_f) or loss_f > 100:
            print(f"\nFAIL: loss is {loss_f} at step {step}", flush=True)
            sys.exit(1)
        sync()
        dt = time.time() - t0
        if step > 10:  # steps 0-10 compile and warm up; they do not count against the budget
            training_time += dt
        smooth_loss = 0.9 * smooth_loss + 0.1 * loss_f
        debiased = smooth_loss / (1 - 0.9 ** (step + 1))
        mfu = 100 * flops_per_token * TOTAL_BATCH_SIZE / dt / peak_flops if peak_flops else 0.0
        step += 1
        done = step > 10 and training_time >= budget
        line = (f"step {step - 1:05d} ({100 * progress:5.1f}%) | loss: {debiased:.6f} | lrm: {lrm:.2f} | "
                f"dt: {dt * 1000:6.0f}ms | tok/sec: {int(TOTAL_BATCH_SIZE / dt):>9,} | mfu: {mfu:5.1f}% | "
                f"epoch: {epoch} | remaining: {max(0.0, budget - training_time):4.0f}s")
        if interactive:
            print(f"\r{line}    ", end="", flush=True)
        elif done or step <= 12 or time.time() - last_print >= 5:  # whole lines for run.log, one per ~5 s
            print(line, flush=True)
            last_print = time.time()
        if step == 1:  # the GC stalls ~500 ms per collection; everything alive now lives for the whole run
            gc.collect()
            gc.freeze()
            gc.disable()
    if interactive:
        print()
    train_loader.close()
    loop_seconds, waited = time.time() - t_loop, train_loader.wait_seconds - wait_before_loop
    print(f"data: the loop waited {waited:.2f}s for batches in {loop_seconds:.1f}s ({100 * waited / loop_seconds:.2f}%)")

    # -------------------------------------------------------------------------
    # Evaluation and summary

    with autocast:
        val_bpb = evaluate_bpb(model, tokenizer, DEVICE_BATCH_SIZE)  # prints prepare.py's receipt of what it scored
    sync()
    steady_mfu = (100 * flops_per_token * TOTAL_BATCH_SIZE * (step - 11) / training_time / peak_flops
                  if peak_flops and training_time > 0 else 0.0)
    print("---")
    print(f"val_bpb:          {val_bpb:.6f}")
    print(f"training_seconds: {training_time:.1f}")
    print(f"total_seconds:    {time.time() - t_start:.1f}")
    print(f"peak_vram_mb:     {peak_memory_mb():.1f}")
    print(f"mfu_percent:      {steady_mfu:.2f}")
    print(f"total_tokens_M:   {step * TOTAL_BATCH_SIZE / 1e6:.1f}")
    print(f"num_steps:        {step}")
    print(f"num_params_M:     {counts['total'] / 1e6:.1f}")
    print(f"depth:            {DEPTH}")
    # the run's conditions, after the reference's nine keys: analysis.py compares only like with like
    for key, value in [("seed", seed), ("attention", ATTN_BACKEND), ("device", gpu or DEVICE_TYPE),
                       ("init_fingerprint", fingerprint), ("time_budget", f"{budget:g}"), ("eval_tokens", val_tokens),
                       ("dataset", DATASET)]:
        print(f"{key + ':':<18}{value}")


def on_sigterm(signum, frame):  # `timeout 600` stops a run with SIGTERM: say so in run.log, then end by it
    print("\nFAIL: stopped by SIGTERM (the 10-minute timeout, or the machine)", flush=True)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        main()
    except torch.OutOfMemoryError:  # the agent logs a crash and moves on
        print(f"\nFAIL: out of memory on {DEVICE_TYPE}; lower DEVICE_BATCH_SIZE (now {DEVICE_BATCH_SIZE}) "
              "and keep TOTAL_BATCH_SIZE a multiple of it times MAX_SEQ_LEN", flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted", flush=True)
        sys.exit(130)
