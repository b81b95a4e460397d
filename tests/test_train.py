"""
train.py: model size and FLOPs, the per-name initialisation, attention against a naive reference and its
fallback order, MuonAdamW against plain reference math, the schedules against hand-computed values, and the
real script end to end on tiny prepared data (its runs side by side, one CPU thread each).

Run: uv run pytest tests/test_train.py
"""

import dataclasses
import math
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import prepare
import train
from helpers import ROOT, run_script, script_env

# -----------------------------------------------------------------------------
# Model


def test_default_config_has_50_3M_parameters_and_the_breakdown_sums_to_it():
    config = train.GPTConfig(sequence_len=2048, vocab_size=8192, n_layer=8, n_head=4, n_kv_head=4, n_embd=512)
    with torch.device("meta"):
        model = train.GPT(config)
    counts = model.num_params()
    assert counts["total"] == 50_332_176
    assert sum(v for k, v in counts.items() if k != "total") == counts["total"]
    assert counts["wte"] == counts["lm_head"] == 8192 * 512
    assert counts["value_embeds"] == 4 * 8192 * 512  # layers 1, 3, 5, 7
    assert model.estimate_flops() == 239_078_400  # the spec's 2.390784e8


def test_build_model_config_uses_the_spec_defaults_on_cuda_sizes():
    # the hyperparameter block's CUDA values (the module may hold small-machine values on this CPU)
    saved = train.ASPECT_RATIO, train.HEAD_DIM
    train.ASPECT_RATIO, train.HEAD_DIM = 64, 128
    try:
        config = train.build_model_config(8, 8192)
        assert (config.n_embd, config.n_head, config.sequence_len) == (512, 4, 2048)
        assert train.build_model_config(5, 8192).n_embd == 384  # 320 rounded up to whole 128-channel heads
    finally:
        train.ASPECT_RATIO, train.HEAD_DIM = saved


def test_estimate_flops_matches_a_hand_count_for_a_tiny_config():
    config = train.GPTConfig(sequence_len=64, vocab_size=100, n_layer=3, n_head=2, n_kv_head=1, n_embd=32,
                             window_pattern="SL")
    model = train.GPT(config)
    head_dim, kv_dim = 16, 16
    block = 32 * 32 + 2 * 32 * kv_dim + 32 * 32 + 2 * 32 * 128  # q, k, v, proj, mlp
    gates = 2 * (32 * 1)  # value embeddings on layers 0 and 2 (alternating, the last included)
    matmul = 3 * block + gates + 100 * 32  # + lm_head; wte, value embeddings and scalars excluded
    windows = [32, 64, 64]  # S, L, and the last layer always L
    attn = sum(12 * 2 * head_dim * w for w in windows)
    assert model.window_sizes == windows
    assert model.estimate_flops() == 6 * matmul + attn


def test_initialisation_follows_the_spec():
    torch.manual_seed(0)
    config = train.GPTConfig(sequence_len=64, vocab_size=512, n_layer=4, n_head=2, n_kv_head=2, n_embd=64)
    model = train.GPT(config)
    model.init_weights(0)
    s = 3**0.5 * 64**-0.5
    assert abs(model.transformer.wte.weight.std().item() - 1.0) < 0.05
    assert abs(model.lm_head.weight.std().item() - 0.001) < 1e-4
    for block in model.transformer.h:
        assert block.attn.c_q.weight.abs().max() <= s and block.mlp.c_fc.weight.abs().max() <= s
        assert block.attn.c_proj.weight.count_nonzero() == 0 and block.mlp.c_proj.weight.count_nonzero() == 0
    assert sorted(model.value_embeds.keys()) == ["1", "3"]
    assert all(b.attn.ve_gate is None for b in (model.transformer.h[0], model.transformer.h[2]))
    assert model.transformer.h[3].attn.ve_gate.weight.count_nonzero() == 0  # gate starts at 2*sigmoid(0) = 1
    assert torch.equal(model.resid_lambdas, torch.ones(4)) and torch.allclose(model.x0_lambdas, torch.full((4,), 0.1))


def test_untrained_model_predicts_nearly_uniform_soft_capped_logits():
    torch.manual_seed(0)
    model = train.GPT(train.GPTConfig(sequence_len=32, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights(0)
    idx = torch.randint(0, 512, (2, 32))
    logits = model(idx)
    assert logits.dtype == torch.float32 and logits.shape == (2, 32, 512)
    assert abs(model(idx, idx).item() - math.log(512)) < 0.05
    model.lm_head.weight.data.mul_(1e6)  # huge logits are capped at +-15
    assert model(idx).abs().max() <= 15.0


def small_config(**changes):
    return train.GPTConfig(**{**dict(sequence_len=64, vocab_size=512, n_layer=4, n_head=2, n_kv_head=2, n_embd=64),
                              **changes})


def initialised(model, seed):
    """name -> initial values, initialised as train.main does it (the global seed, then init_weights)."""
    torch.manual_seed(seed)
    model.init_weights(seed)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


class GPTWithAnExtraModule(train.GPT):
    """An edit as the agent makes one: a new module, initialised first, from the global random stream."""

    def __init__(self, config):
        super().__init__(config)
        self.extra = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def init_weights(self, seed):
        with torch.no_grad():
            self.extra.weight.normal_()
        super().init_weights(seed)


RANDOM_INIT = (r"transformer\.wte\.weight|lm_head\.weight|value_embeds\.\d+\.weight"
               r"|transformer\.h\.\d+\.(attn\.c_[qkv]|mlp\.c_fc)\.weight")
ZERO_INIT = r"transformer\.h\.\d+\.(attn\.c_proj|mlp\.c_proj|attn\.ve_gate)\.weight"
CONSTANT_INIT = ("resid_lambdas", "x0_lambdas")


def test_adding_a_module_leaves_every_other_initial_weight_as_it_was():
    base = initialised(train.GPT(small_config()), 7)
    extended = initialised(GPTWithAnExtraModule(small_config()), 7)
    assert set(extended) - set(base) == {"extra.weight"}
    for name, p in base.items():
        assert torch.equal(p, extended[name]), name


@pytest.mark.parametrize("change", [dict(n_layer=3), dict(vocab_size=256)])
def test_reshaping_the_model_leaves_every_parameter_it_does_not_touch_as_it_was(change):
    """Another depth moves the value embeddings (layers 1, 3 -> 0, 2) and resizes the per-layer scalars; another
    vocabulary resizes the embeddings and the head. Every parameter of the same name and shape in both models
    starts from the same values."""
    before, after = initialised(train.GPT(small_config()), 7), initialised(train.GPT(small_config(**change)), 7)
    shared = [n for n in after if n in before and after[n].shape == before[n].shape]
    assert "transformer.h.2.attn.c_q.weight" in shared and len(shared) >= 12, shared
    assert len(shared) < len(after)  # the change did reshape something
    for name in shared:
        assert torch.equal(after[name], before[name]), name


def test_another_seed_redraws_every_random_parameter_and_keeps_the_fixed_ones():
    a, b = initialised(train.GPT(small_config()), 7), initialised(train.GPT(small_config()), 8)
    for name in a:
        if re.fullmatch(RANDOM_INIT, name):
            assert (a[name] != b[name]).float().mean() > 0.99, name  # redrawn, element by element
        elif re.fullmatch(ZERO_INIT, name):
            assert a[name].count_nonzero() == 0 and b[name].count_nonzero() == 0, name
        else:
            assert name in CONSTANT_INIT and torch.equal(a[name], b[name]), name


# -----------------------------------------------------------------------------
# Attention


def naive_attention(q, k, v, window):
    """Masked softmax attention, (B, T, H, D); kv heads shared by consecutive query heads."""
    B, T, H, D = q.shape
    k = k.repeat_interleave(H // k.size(2), dim=2)
    v = v.repeat_interleave(H // v.size(2), dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
    i = torch.arange(T)
    allowed = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] <= window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)


@pytest.mark.parametrize("window", [0, 1, 7, 31, 62, 63, 64, 1000])
@pytest.mark.parametrize("n_head,n_kv_head", [(4, 4), (4, 2), (4, 1)])
def test_fallback_attention_equals_naive_masked_attention(window, n_head, n_kv_head, monkeypatch):
    monkeypatch.setattr(train, "ATTN_BACKEND", "sdpa")
    torch.manual_seed(window)
    q = torch.randn(2, 64, n_head, 16)
    k, v = torch.randn(2, 64, n_kv_head, 16), torch.randn(2, 64, n_kv_head, 16)
    torch.testing.assert_close(train.attention(q, k, v, window), naive_attention(q, k, v, window), atol=1e-5, rtol=1e-5)


def test_sliding_window_sees_exactly_window_plus_one_keys():
    mask = train.sliding_window_mask(10, 3, torch.device("cpu"))
    assert mask.sum(1).tolist() == [1, 2, 3, 4, 4, 4, 4, 4, 4, 4]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_backend_matches_naive_attention(monkeypatch):
    backend, fa3, _ = train.load_attention_backend()
    monkeypatch.setattr(train, "ATTN_BACKEND", backend)
    monkeypatch.setattr(train, "fa3", fa3)
    q = torch.randn(2, 256, 4, 128, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    mask = train.make_block_mask(256, 100, "cuda") if backend == "flex" else None
    ref = naive_attention(q.float().cpu(), k.float().cpu(), v.float().cpu(), 100)
    torch.testing.assert_close(train.attention(q, k, v, 100, mask).float().cpu(), ref, atol=2e-2, rtol=2e-2)


class FakeKernel:
    """What kernels returns for Flash Attention 3: a module with flash_attn_interface.flash_attn_func."""

    def __init__(self, fails=False):
        self.calls = []
        kernel = self

        class Interface:
            @staticmethod
            def flash_attn_func(q, k, v, causal, window_size):
                kernel.calls.append((tuple(q.shape), causal, window_size))
                if fails:
                    raise RuntimeError("no kernel image is available for execution on the device")
                return q

        self.flash_attn_interface = Interface


@pytest.fixture
def on_fake_cuda(monkeypatch):
    """load_attention_backend as on a Hopper GPU, on this CPU: DEVICE_TYPE "cuda", capability 9.0, and the
    probe tensors it makes with device="cuda" made on the CPU. Returns `fake(fa3=..., flex=...)`, which installs
    a fa3 loader (a FakeKernel, or an exception it raises) and a flex probe (None passes, an exception fails),
    and returns the list of probes run."""
    monkeypatch.setattr(train, "DEVICE_TYPE", "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (9, 0))
    randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *shape, device=None, **kwargs: randn(*shape, **kwargs))
    probes = []

    def fake(fa3, flex=None, source="cache"):
        def load_flash_attention_3(capability):
            probes.append(("fa3", capability))
            if isinstance(fa3, Exception):
                raise fa3
            return fa3, prepare.flash_attention_repo(capability), source

        def check_flex_attention():
            probes.append(("flex",))
            if flex is not None:
                raise flex

        monkeypatch.setattr(train, "load_flash_attention_3", load_flash_attention_3)
        monkeypatch.setattr(train, "check_flex_attention", check_flex_attention)
        return probes

    return fake


@pytest.mark.parametrize("source, where", [("cache", "local cache"), ("hub", "hub")])
def test_flash_attention_3_is_used_when_it_loads_and_runs(on_fake_cuda, source, where):
    kernel = FakeKernel()
    probes = on_fake_cuda(fa3=kernel, source=source)
    backend, fa3, note = train.load_attention_backend()
    assert (backend, fa3) == ("fa3", kernel.flash_attn_interface)
    assert note == f"Flash Attention 3 from varunneal/flash-attention-3 ({where})"
    assert probes == [("fa3", (9, 0))]  # flex attention is never probed
    assert len(kernel.calls) == 1 and kernel.calls[0][1:] == (True, (128, 0))  # one causal sliding-window call


@pytest.mark.parametrize("fa3, reason", [(ImportError("No module named 'kernels'"), "ImportError"),
                                         (FileNotFoundError("no build for this torch"), "FileNotFoundError"),
                                         (FakeKernel(fails=True), "RuntimeError")])  # loads, fails on its first call
def test_without_a_working_flash_attention_3_flex_attention_is_next(on_fake_cuda, fa3, reason):
    probes = on_fake_cuda(fa3=fa3)
    backend, module, note = train.load_attention_backend()
    assert (backend, module) == ("flex", None)
    assert note == f"flex attention (Flash Attention 3 unavailable: {reason})"
    assert probes == [("fa3", (9, 0)), ("flex",)]


def test_when_flex_attention_fails_too_sdpa_is_last_and_the_note_gives_both_reasons(on_fake_cuda):
    probes = on_fake_cuda(fa3=FakeKernel(fails=True), flex=torch.OutOfMemoryError("CUDA out of memory"))
    backend, module, note = train.load_attention_backend()
    assert (backend, module) == ("sdpa", None)
    assert note == ("PyTorch SDPA with a mask (Flash Attention 3 unavailable: RuntimeError; "
                    "flex attention failed: OutOfMemoryError)")
    assert probes == [("fa3", (9, 0)), ("flex",)]


@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_off_cuda_sdpa_is_chosen_without_probing_a_kernel(on_fake_cuda, monkeypatch, device):
    probes = on_fake_cuda(fa3=FakeKernel())
    monkeypatch.setattr(train, "DEVICE_TYPE", device)
    assert train.load_attention_backend() == ("sdpa", None, f"no CUDA on {device}")
    assert probes == []


# -----------------------------------------------------------------------------
# Optimizer


def polar_reference(g, steps=5):
    X = g / (g.norm() * 1.02 + 1e-6)
    for a, b, c in train.POLAR_EXPRESS_COEFFS[:steps]:
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X


def muon_reference(p, g, lr, momentum, wd, beta2=0.95):
    """One Muon step from zero state, float32, one matrix at a time: what the spec says, written plainly."""
    rows, cols = p.shape
    buf = (1 - momentum) * g                         # momentum buffer from zero
    g = (1 - momentum) * g + momentum * buf          # Nesterov
    X = polar_reference(g) if rows <= cols else polar_reference(g.T).T
    red_dim = 1 if rows >= cols else 0               # second moment per row (tall/square) or per column (wide)
    v = (X**2).mean(dim=red_dim, keepdim=True)
    second = (1 - beta2) * v                         # EMA from zero
    U = X / second.clamp_min(1e-10).sqrt()
    U = U * X.norm() / U.norm()                      # same total norm as before normalisation
    lr = lr * max(1.0, rows / cols) ** 0.5
    decay = wd * p * ((U * p) >= 0)                  # cautious weight decay
    return p - lr * (U + decay)


def muon_update(ps, grads):
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    opt = train.MuonAdamW([dict(kind="muon", params=ps, lr=0.05, momentum=0.9, ns_steps=5, beta2=0.95, weight_decay=0.3)])
    before = [p.detach().clone() for p in ps]
    opt.step()
    return [p.detach() - b for p, b in zip(ps, before)]


@pytest.mark.parametrize("shape", [(16, 16), (48, 16), (16, 48)])
def test_muon_step_matches_the_reference_rules(shape, monkeypatch):
    torch.manual_seed(1)
    ps = [torch.nn.Parameter(torch.randn(shape) * 0.1) for _ in range(3)]
    grads = [torch.randn(shape) for _ in ps]
    expected = [muon_reference(p.detach().clone(), g, lr=0.05, momentum=0.9, wd=0.3) - p.detach()
                for p, g in zip(ps, grads)]
    # as specified, the orthogonalization runs in bf16: close to the float32 reference...
    for delta, ref in zip(muon_update([torch.nn.Parameter(p.detach().clone()) for p in ps], grads), expected):
        assert (delta - ref).norm() / ref.norm() < 0.1
        assert F.cosine_similarity(delta.flatten(), ref.flatten(), dim=0) > 0.995
    # ...and with bf16 swapped for float32 the same rules agree to float32 precision
    monkeypatch.setattr(torch.Tensor, "bfloat16", lambda t: t.float())
    for delta, ref in zip(muon_update(ps, grads), expected):
        torch.testing.assert_close(delta, ref, atol=1e-6, rtol=1e-4)


def test_adamw_groups_match_torch_adamw():
    torch.manual_seed(2)
    p1 = torch.nn.Parameter(torch.randn(10, 7))
    p2 = torch.nn.Parameter(p1.detach().clone())
    ours = train.MuonAdamW([dict(kind="adamw", params=[p1], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)])
    ref = torch.optim.AdamW([p2], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
    for step in range(5):
        g = torch.randn(10, 7)
        p1.grad, p2.grad = g.clone(), g.clone()
        ours.param_groups[0]["lr"] = ref.param_groups[0]["lr"] = 0.01 * (1 - step / 10)
        ours.step()
        ref.step()
    torch.testing.assert_close(p1.detach(), p2.detach(), atol=1e-6, rtol=1e-5)


def test_setup_optimizer_groups_and_learning_rates():
    model = train.GPT(train.GPTConfig(sequence_len=32, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=192))
    opt = model.setup_optimizer(unembedding_lr=0.004, embedding_lr=0.6, matrix_lr=0.04, weight_decay=0.2,
                                adam_betas=(0.8, 0.95), scalar_lr=0.5)
    scale = (192 / 768) ** -0.5
    adamw = [g for g in opt.param_groups if g["kind"] == "adamw"]
    assert [g["lr"] for g in adamw] == pytest.approx([0.004 * scale, 0.6 * scale, 0.6 * scale, 0.005, 0.5])
    assert adamw[4]["betas"] == (0.96, 0.95) and all(g["eps"] == 1e-10 and g["weight_decay"] == 0 for g in adamw)
    muon = [g for g in opt.param_groups if g["kind"] == "muon"]
    assert all(len({p.shape for p in g["params"]}) == 1 for g in muon)
    grouped = {id(p) for g in opt.param_groups for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters()}  # every parameter, once
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(42)
    model = train.GPT(train.GPTConfig(sequence_len=64, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights(42)
    opt = model.setup_optimizer(unembedding_lr=0.004, embedding_lr=0.6, matrix_lr=0.04, weight_decay=0.2,
                                adam_betas=(0.8, 0.95), scalar_lr=0.5)
    x = torch.randint(0, 256, (4, 64))
    y = torch.roll(x, -1, dims=1)
    losses = []
    for _ in range(15):
        loss = model(x, y)
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses


@pytest.mark.parametrize("warmup, warmdown, final, expected", [
    # the spec's defaults: 1 for the first half, then linear to 0
    (0.0, 0.5, 0.0, {0.0: 1.0, 0.25: 1.0, 0.5: 1.0, 0.75: 0.5, 1.0: 0.0}),
    # warm-up over the first 10%, 1 until 60%, then linear to 0.2: at 0.75, 0.625 of the way back up from 0.2
    (0.1, 0.4, 0.2, {0.0: 0.0, 0.05: 0.5, 0.1: 1.0, 0.25: 1.0, 0.5: 1.0, 0.6: 1.0, 0.75: 0.7, 0.9: 0.4, 1.0: 0.2}),
])
def test_lr_multiplier_follows_warmup_then_flat_then_linear_warmdown(monkeypatch, warmup, warmdown, final, expected):
    monkeypatch.setattr(train, "WARMUP_RATIO", warmup)
    monkeypatch.setattr(train, "WARMDOWN_RATIO", warmdown)
    monkeypatch.setattr(train, "FINAL_LR_FRAC", final)
    assert {p: train.lr_multiplier(p) for p in expected} == pytest.approx(expected)


def test_muon_momentum_ramps_from_0_85_to_0_95_over_300_steps_then_stays():
    expected = {0: 0.85, 30: 0.86, 150: 0.90, 299: 0.95 - 0.1 / 300, 300: 0.95, 1000: 0.95}
    assert {step: train.muon_momentum(step) for step in expected} == pytest.approx(expected)


def test_muon_weight_decay_falls_linearly_to_zero_over_the_budget(monkeypatch):
    monkeypatch.setattr(train, "WEIGHT_DECAY", 0.2)
    expected = {0.0: 0.2, 0.25: 0.15, 0.5: 0.1, 0.75: 0.05, 1.0: 0.0}
    assert {p: train.muon_weight_decay(p) for p in expected} == pytest.approx(expected)


# -----------------------------------------------------------------------------
# The real script

SUMMARY = [
    ("val_bpb", r"\d+\.\d{6}"), ("training_seconds", r"\d+\.\d"), ("total_seconds", r"\d+\.\d"),
    ("peak_vram_mb", r"\d+\.\d"), ("mfu_percent", r"\d+\.\d{2}"), ("total_tokens_M", r"\d+\.\d"),
    ("num_steps", r"\d+"), ("num_params_M", r"\d+\.\d"), ("depth", r"\d+"),
]  # the reference's nine keys, in its order; then the run's conditions (analysis.py compares only like with like)
CONDITIONS = [("seed", r"-?\d+"), ("attention", r"(?:fa3|flex|sdpa)"), ("device", r".+"),
              ("init_fingerprint", r"[0-9a-f]{12}"), ("time_budget", r"\d+(?:\.\d+)?"), ("eval_tokens", r"\d+"),
              ("dataset", r"climbmix|tinystories")]
OTHER_SEED = 43
EVAL_TOKENS = 3 * 2048 + 1000  # three rows of 2048 tokens, and a remainder left out
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # runs side by side share the 2 cores instead of fighting over them


def untrained_val_bpb(cache):
    """val_bpb of the model train.py starts from, scored on the same validation tokens as the run below."""
    tokenizer = prepare.Tokenizer.from_directory(str(cache / "tokenizer"))
    model = build_like_main(train.SEED, tokenizer.get_vocab_size())
    return prepare.Metric(cache, eval_tokens=EVAL_TOKENS).evaluate_bpb(model, tokenizer, train.DEVICE_BATCH_SIZE)


def build_like_main(seed, vocab=8192):
    """The initial model as train.main builds it off CUDA: in place, then seeded, then initialised."""
    model = train.GPT(train.build_model_config(train.DEPTH, vocab))
    torch.manual_seed(seed)
    model.init_weights(seed)
    return model


def summary_of(result):
    """key -> value of the block after the last `---` line."""
    out = result.stdout
    return dict(re.findall(r"^(\w+):\s+(.+)$", out[out.index("\n---\n"):], re.M))


@pytest.fixture(scope="module")
def seeded_run(prepared_cache, tmp_path_factory):
    """`python train.py` for 4 s under AUTORESEARCH_SEED=43, as a verdict's rerun runs it: one real run for the
    summary block, the learning and the seed override. Its micro-batches are one sequence (FAST_STEPS), so that the
    11 warm-up steps take ~10 s instead of ~35 s here; the model is train.py's."""
    env = {"AUTORESEARCH_TIME_BUDGET": "4", "AUTORESEARCH_EVAL_TOKENS": str(EVAL_TOKENS),
           "AUTORESEARCH_SEED": str(OTHER_SEED)}
    script = patched_train_py(tmp_path_factory.mktemp("seeded"), FAST_STEPS)
    r = run_script(script, cache=prepared_cache, timeout=600, extra_env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA defaults are too big for a test run")
def test_train_py_end_to_end_prints_the_summary_block_and_learns(seeded_run, prepared_cache):
    out = seeded_run.stdout
    evaluated = EVAL_TOKENS // prepare.MAX_SEQ_LEN * prepare.MAX_SEQ_LEN  # whole rows only
    assert evaluated < EVAL_TOKENS
    assert "attention:" in out and "time budget: 4s" in out and f"eval tokens: {evaluated:,}" in out
    block = out[out.index("\n---\n") + 5:].strip().splitlines()
    assert len(block) == len(SUMMARY) + len(CONDITIONS), block
    for line, (key, value) in zip(block, SUMMARY + CONDITIONS):
        assert re.fullmatch(rf"{key}:\s+{value}", line), line
        assert line.index(line.split()[1]) == 18  # values aligned in one column, as the agent's grep expects
    vocab = prepare.Tokenizer.from_directory(str(prepared_cache / "tokenizer")).get_vocab_size()
    assert block[len(SUMMARY):] == [
        f"seed:             {OTHER_SEED}", "attention:        sdpa", f"device:           {train.DEVICE_TYPE}",
        f"init_fingerprint: {train.init_fingerprint(build_like_main(OTHER_SEED, vocab))}",
        "time_budget:      4", f"eval_tokens:      {evaluated}", "dataset:          climbmix"]
    values = {line.split(":")[0]: float(line.split()[1]) for line in block[:len(SUMMARY)]}
    assert values["num_steps"] > 11 and values["training_seconds"] >= 4.0
    assert values["depth"] == train.DEPTH and values["num_params_M"] == 3.5
    assert values["val_bpb"] < untrained_val_bpb(prepared_cache) - 0.3
    step_lines = [l for l in out.splitlines() if l.startswith("step ")]
    assert step_lines and "\r" not in out  # redirected output: whole lines, no carriage returns


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA defaults are too big for a test run")
def test_the_seed_override_changes_the_initial_weights_and_nothing_else(seeded_run, prepared_cache):
    """AUTORESEARCH_SEED (the protocol's reruns) reaches torch.manual_seed and init_weights before the
    fingerprint: the run prints it, its fingerprint is the one of the model seeded with it (not SEED's), and the
    model, parameter and batch lines are the ones train.py's settings give under any seed."""
    vocab = prepare.Tokenizer.from_directory(str(prepared_cache / "tokenizer")).get_vocab_size()
    summary = summary_of(seeded_run)
    assert summary["seed"] == str(OTHER_SEED) and f"| seed: {OTHER_SEED} |" in seeded_run.stdout
    assert summary["init_fingerprint"] == train.init_fingerprint(build_like_main(OTHER_SEED, vocab))
    assert summary["init_fingerprint"] != train.init_fingerprint(build_like_main(train.SEED, vocab))
    model = build_like_main(train.SEED, vocab)
    lines = [l for l in seeded_run.stdout.splitlines() if l.startswith(("model:", "params:"))]
    assert lines[0] == f"model: {dataclasses.asdict(model.config)}"
    assert lines[1].startswith("params: " + ", ".join(f"{k} {v:,}" for k, v in model.num_params().items()))


def test_init_fingerprint_names_the_initial_weights():
    a, b, c = build_like_main(42), build_like_main(42), build_like_main(43)
    assert train.init_fingerprint(a) == train.init_fingerprint(b) != train.init_fingerprint(c)
    assert re.fullmatch(r"[0-9a-f]{12}", train.init_fingerprint(a))
    with torch.no_grad():
        b.lm_head.weight[0, 0] += 1e-3  # one weight of 3.5 million
    assert train.init_fingerprint(a) != train.init_fingerprint(b)


def no_random_numbers(*args, **kwargs):
    raise AssertionError("the dataloader drew a random number")


def test_the_data_does_not_depend_on_the_seed(prepared_cache, monkeypatch):
    """The seed decides the initial weights only: the loader draws no random numbers. Two passes under other
    global seeds (torch, numpy, random) give the same batches, with the usual random draws made to fail."""
    monkeypatch.setattr(prepare, "TOKENIZER_DIR", str(prepared_cache / "tokenizer"))
    monkeypatch.setattr(prepare, "DATA_DIR", str(prepared_cache / "data"))
    tokenizer = prepare.Tokenizer.from_directory()
    for module, names in [(torch, ["rand", "randn", "randint", "randperm", "multinomial", "bernoulli", "normal"]),
                          (np.random, ["rand", "randint", "random", "shuffle", "permutation", "choice", "default_rng"]),
                          (random, ["random", "randint", "randrange", "shuffle", "choice", "sample"])]:
        for name in names:
            monkeypatch.setattr(module, name, no_random_numbers)
    passes = []
    for seed in (42, 43):
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        loader = prepare.make_dataloader(tokenizer, 2, 256, "train", device="cpu")
        passes.append([next(loader) for _ in range(3)])
        loader.close()
    for (x1, y1, epoch1), (x2, y2, epoch2) in zip(*passes):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and epoch1 == epoch2


def patched_train_py(directory, *edits):
    """A copy of the repo's scripts in `directory` with edits to train.py, (old, new) pairs, as the agent makes them."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("prepare.py", "train.py"):
        shutil.copy(ROOT / name, directory / name)
    src = (directory / "train.py").read_text()
    for old, new in edits:
        assert old in src, old
        src = src.replace(old, new)
    (directory / "train.py").write_text(src)
    return directory / "train.py"


# on a CPU: micro-batches of one sequence, one per step, so a step takes a fraction of the time; the same loop
FAST_STEPS = ("TOTAL_BATCH_SIZE, DEVICE_BATCH_SIZE = 2**13, 4", "TOTAL_BATCH_SIZE, DEVICE_BATCH_SIZE = 2**11, 1")


@pytest.fixture(scope="module")
def quick_failures(prepared_cache, tmp_path_factory):
    """The runs of train.py that stop before or at the first step, side by side: name -> (workdir, result)."""
    root = tmp_path_factory.mktemp("quick_failures")
    oom = ("    check_settings()\n",
           '    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")\n')
    jobs = {  # name -> (script, cache, extra environment)
        "bad_setting": (patched_train_py(root / "bad_setting", ('WINDOW_PATTERN = "SSSL"', 'WINDOW_PATTERN = "SSXL"')),
                        root / "no-cache", {}),  # the main block: CUDA and small machines alike
        "out_of_memory": (patched_train_py(root / "out_of_memory", oom), root / "no-cache", {}),
        "nan_loss": (patched_train_py(root / "nan_loss", ("loss = model(x, y)", "loss = model(x, y) * float('nan')"),
                                      FAST_STEPS), prepared_cache, {}),
        "bad_seed": ("train.py", prepared_cache, {"AUTORESEARCH_SEED": "forty-two"}),
    }
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {name: pool.submit(run_script, script, cache=cache, timeout=300, extra_env={**env, **ONE_THREAD})
                   for name, (script, cache, env) in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


def test_a_bad_seed_override_is_one_error_line(quick_failures):
    r = quick_failures["bad_seed"]
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == "error: AUTORESEARCH_SEED='forty-two' must be an integer (unset it to use SEED = 42)\n"


def test_nan_loss_prints_fail_and_exits_non_zero(quick_failures):
    r = quick_failures["nan_loss"]
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "FAIL: loss is nan at step 0" in r.stdout and "\n---\n" not in r.stdout


# -----------------------------------------------------------------------------
# Faults: settings that cannot work, out of memory, the agent's kill

# the spec's CUDA values: what check_settings sees on a GPU (the module holds the small-machine ones on a CPU)
CUDA_SETTINGS = dict(TOTAL_BATCH_SIZE=2**19, DEVICE_BATCH_SIZE=128, WINDOW_PATTERN="SSSL", DEPTH=8, ASPECT_RATIO=64,
                     HEAD_DIM=128)
SMALL_SETTINGS = dict(CUDA_SETTINGS, TOTAL_BATCH_SIZE=2**13, DEVICE_BATCH_SIZE=4, DEPTH=2, HEAD_DIM=64)


@pytest.mark.parametrize("settings", [CUDA_SETTINGS, SMALL_SETTINGS], ids=["cuda", "small_machine"])
@pytest.mark.parametrize("bad, message", [
    (dict(DEVICE_BATCH_SIZE=3), "must be a multiple of DEVICE_BATCH_SIZE * MAX_SEQ_LEN = 3 * 2048 = 6144"),
    (dict(WINDOW_PATTERN="SSXL"), "WINDOW_PATTERN='SSXL' may contain only the letters S and L"),
    (dict(WINDOW_PATTERN=""), "WINDOW_PATTERN='' may contain only the letters S and L"),
    (dict(HEAD_DIM=63), "HEAD_DIM=63 must be a positive even number"),
    (dict(DEPTH=0), "DEPTH=0 and ASPECT_RATIO=64 must be positive"),
])
def test_each_impossible_setting_is_one_error_line_on_any_machine(monkeypatch, settings, bad, message):
    for name, value in {**settings, **bad}.items():
        monkeypatch.setattr(train, name, value)
    with pytest.raises(SystemExit) as exc:
        train.check_settings()
    text = str(exc.value.code)
    assert text.startswith("error: bad setting in train.py: ") and message in text and "\n" not in text, text


@pytest.mark.parametrize("settings", [CUDA_SETTINGS, SMALL_SETTINGS], ids=["cuda", "small_machine"])
def test_the_default_settings_pass_the_check(monkeypatch, settings):
    for name, value in settings.items():
        monkeypatch.setattr(train, name, value)
    train.check_settings()


def test_an_impossible_setting_stops_the_script_in_one_line_before_anything_is_built(quick_failures):
    r = quick_failures["bad_setting"]  # no cache at all: the settings are checked before the data
    assert r.returncode == 1 and r.stdout == "", r.stdout + r.stderr
    assert r.stderr == "error: bad setting in train.py: WINDOW_PATTERN='SSXL' may contain only the letters S and L\n"


def test_out_of_memory_says_to_lower_the_device_batch_size(quick_failures):
    r = quick_failures["out_of_memory"]
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "FAIL: out of memory" in r.stdout and "lower DEVICE_BATCH_SIZE" in r.stdout


class Lines:
    """The lines a process writes, read by a thread of their own, so that every wait on them has a timeout."""

    def __init__(self, stream):
        self.lines, self.ended, self.changed = [], False, threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream):
        for line in stream:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.ended = True
            self.changed.notify_all()

    def wait_for(self, prefix, timeout):
        """True once a line starts with `prefix`; False if the stream ends or `timeout` seconds pass first."""
        def seen():
            return any(line.startswith(prefix) for line in self.lines)
        with self.changed:
            self.changed.wait_for(lambda: seen() or self.ended, timeout)
            return seen()

    def text(self, timeout=30):
        self.thread.join(timeout)
        return "".join(self.lines)


def test_kill_during_training_exits_promptly_with_the_signals_status(prepared_cache, tmp_path,
                                                                    sigint_reaches_children):
    """The agent's kill mid-training, both signals at once on two runs: SIGINT (Ctrl-C) ends with one
    `interrupted` line and exit 130; SIGTERM (what `timeout 600` sends) with one `FAIL: stopped by SIGTERM` line,
    and then by the signal.
    Both within 30 s, with no summary, and nothing written where they ran or into the cache."""
    before = sorted(p.relative_to(prepared_cache) for p in prepared_cache.rglob("*"))
    env = script_env(prepared_cache, extra_env={"AUTORESEARCH_TIME_BUDGET": "600", **ONE_THREAD})
    script = patched_train_py(tmp_path / "src", FAST_STEPS)
    runs = {}  # signal -> (process, its output, where it ran)
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            workdir = tmp_path / sig.name
            workdir.mkdir()
            proc = subprocess.Popen([sys.executable, str(script)], cwd=workdir, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            runs[sig] = (proc, Lines(proc.stdout), workdir)
        for sig, (proc, lines, _) in runs.items():  # a run that died before training must not pass
            assert lines.wait_for("step 00001", timeout=300), f"{sig.name}: never reached step 1\n{lines.text(5)}"
        for sig, (proc, _, _) in runs.items():
            proc.send_signal(sig)
        for sig, (proc, lines, _) in runs.items():
            proc.wait(timeout=30)
    finally:
        for proc, _, _ in runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    interrupted, terminated = (runs[s][1].text() for s in (signal.SIGINT, signal.SIGTERM))
    assert runs[signal.SIGINT][0].returncode == 130, interrupted
    assert interrupted.rstrip().splitlines()[-1] == "interrupted" and "Traceback" not in interrupted, interrupted
    assert runs[signal.SIGTERM][0].returncode == -signal.SIGTERM, terminated
    assert terminated.rstrip().splitlines()[-1].startswith("FAIL: stopped by SIGTERM"), terminated
    assert "interrupted" not in terminated and "Traceback" not in terminated, terminated
    for out in (interrupted, terminated):
        assert "\n---\n" not in out, out
    for _, _, workdir in runs.values():
        assert list(workdir.iterdir()) == []  # nothing written where it ran
    assert sorted(p.relative_to(prepared_cache) for p in prepared_cache.rglob("*")) == before
