"""The GPT-2 model: parity with Hugging Face, parameter counts, initialisation, sampling, the tokenizer."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, make_hf_model
import chunked_loss
import common
import train_gpt2
from train_gpt2 import GPT, GPTConfig


# --- parity with Hugging Face's GPT-2 -------------------------------------------------------------------------

@pytest.mark.parametrize("n_layer,n_head,n_embd", [(2, 2, 64), (3, 4, 96), (4, 4, 128)])
def test_logits_and_loss_match_hugging_face(tmp_path, n_layer, n_head, n_embd):
    hf = make_hf_model(n_layer, n_head, n_embd, seed=n_layer)
    hf.save_pretrained(tmp_path)
    model = GPT.from_pretrained(str(tmp_path)).eval()
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd) == (n_layer, n_head, n_embd)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 50257, (3, 40), generator=g)
    with torch.no_grad():
        logits, no_loss = model(idx)
        out = hf(idx, labels=idx)
        # HF's loss predicts idx[t+1] from position t; ours takes explicit targets: give it the same pairs
        shifted_logits, shifted_loss = model(idx[:, :-1], targets=idx[:, 1:].contiguous())
    assert no_loss is None
    rel = ((logits - out.logits).abs().max() / out.logits.abs().max()).item()
    assert rel < 1e-5, rel
    assert abs(shifted_loss.item() - out.loss.item()) < 1e-5
    # with targets the model still returns its logits (B, T, V), and the loss is the lecture's cross-entropy on them
    assert shifted_logits.shape == (3, 39, 50257)
    # 39 positions and 40 run the matmuls and attention at other shapes, which CPU kernels block and vectorise
    # differently (AVX2 and AVX-512 differ too): the same logits to fp32 rounding, not bit for bit
    rel = ((shifted_logits - logits[:, :-1]).abs().max() / logits.abs().max()).item()
    assert rel < 1e-5, rel
    # the same cross-entropy call on the same logits, run twice: bit for bit on any CPU
    expected = F.cross_entropy(shifted_logits.reshape(-1, 50257), idx[:, 1:].reshape(-1))
    assert shifted_loss.item() == expected.item()


# --- the loss without the (B*T, V) logits ----------------------------------------------------------------------

def _loss_and_grads(loss_fn, x0, w0, autocast=False):
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = loss_fn(x, w)
    (loss * 0.25).backward()  # a scaled loss, as gradient accumulation makes it
    return loss.detach(), x.grad, w.grad


def _max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("chunk_rows", [1, 10, 37, 100])
def test_linear_cross_entropy_matches_the_plain_loss_and_its_gradients(chunk_rows):
    g = torch.Generator().manual_seed(0)
    N, C, V = 37, 16, 101  # 37 rows: chunks of 10 leave a ragged last chunk
    x0, w0 = torch.randn(N, C, generator=g), torch.randn(V, C, generator=g)
    t = torch.randint(0, V, (N,), generator=g)
    ref = _loss_and_grads(lambda x, w: F.cross_entropy(F.linear(x, w), t), x0, w0)
    out = _loss_and_grads(lambda x, w: chunked_loss.LinearCrossEntropy.apply(x, w, t, chunk_rows, True), x0, w0)
    for got, want in zip(out, ref):
        assert _max_rel(got, want) < 2e-6
    with torch.no_grad():  # validation: the same loss, and no gradients to keep
        assert abs(chunked_loss.LinearCrossEntropy.apply(x0, w0, t, chunk_rows, False).item() - ref[0].item()) < 1e-5


def test_validation_loss_skips_the_gradient_matmuls(monkeypatch):
    calls = []
    matmul_into = chunked_loss._matmul_into
    monkeypatch.setattr(chunked_loss, "_matmul_into", lambda *a, **k: calls.append(1) or matmul_into(*a, **k))
    model = chunked_loss.ChunkedLossGPT(GPT(GPTConfig(block_size=32, vocab_size=101, n_layer=1, n_head=2, n_embd=16)))
    idx = torch.randint(0, 101, (2, 32))  # 64 rows: one chunk
    with torch.no_grad():
        _, val_loss = model(idx, idx)
    assert len(calls) == 1  # the logits only
    _, loss = model(idx, idx)
    assert len(calls) == 1 + 3  # the logits, then the gradients of x and of the weight
    assert abs(loss.item() - val_loss.item()) < 1e-6


@pytest.mark.parametrize("bf16", [False, True])
def test_chunked_loss_model_gives_the_lectures_loss_and_gradients(bf16):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=301, n_layer=2, n_head=2, n_embd=32))
    chunked = chunked_loss.ChunkedLossGPT(model)
    chunked.LOSS_CHUNK_ELEMENTS = 128 * 301  # 128-row chunks: 3 chunks of the 320 rows, the last one ragged
    assert list(chunked.parameters()) == list(model.parameters())  # it adds no weights of its own
    idx, targets = torch.randint(0, 301, (2, 10, 32))
    results = []
    for m in (model, chunked):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, loss = m(idx, targets)
        (loss / 4).backward()  # scaled, as gradient accumulation does
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()], logits))
    (plain_loss, plain_grads, plain_logits), (chunked_value, chunked_grads, no_logits) = results
    assert plain_logits.shape == (10, 32, 301) and no_logits is None
    # the logits in chunks of 128 rows or all at once: other matmul shapes, so equal to rounding only (1 ulp of the
    # loss, 4.8e-7, seen in fp32 on AVX-512 and on AVX2 kernels); bf16: the same, the logits rounded to bf16 in both
    assert abs(plain_loss - chunked_value) < (1e-5 if bf16 else 2e-6)
    for a, b in zip(chunked_grads, plain_grads):
        # fp32: rounding only; bf16: each rounds the logits' gradient to bf16 at a different place (2**-8)
        assert _max_rel(a, b) < (2e-2 if bf16 else 1e-5)


def test_linear_cross_entropy_under_bf16_autocast_matches_the_plain_loss():
    g = torch.Generator().manual_seed(1)
    N, C, V = 64, 32, 300
    x0, w0 = torch.randn(N, C, generator=g), torch.randn(V, C, generator=g) * 0.3
    t = torch.randint(0, V, (N,), generator=g)
    # the lecture's way under autocast: bf16 logits, a fp32 loss
    ref = _loss_and_grads(lambda x, w: F.cross_entropy(F.linear(x, w).float(), t), x0, w0, autocast=True)
    out = _loss_and_grads(lambda x, w: chunked_loss.LinearCrossEntropy.apply(x, w, t, 16, True), x0, w0, autocast=True)
    assert [a.dtype for a in out] == [torch.float32] * 3  # fp32 loss, gradients in the dtype of x and W
    assert _max_rel(out[0], ref[0]) < 1e-6  # the same bf16 logits, the same fp32 softmax
    # the gradients differ by where each rounds to bf16: about bf16's 2**-8 relative precision
    assert _max_rel(out[1], ref[1]) < 2e-2 and _max_rel(out[2], ref[2]) < 2e-2


@pytest.mark.parametrize("bf16", [False, True])  # bf16 autocast + compile is what a GPU run does
def test_compiled_model_gives_the_eager_loss_and_gradients(bf16):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=101, n_layer=2, n_head=2, n_embd=16))
    idx = torch.randint(0, 101, (2, 32))
    grads = []
    for m in (model, torch.compile(model)):  # torch.compile's default backend, Inductor, on the CPU
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            _, loss = m(idx, idx)
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = grads
    assert abs(eager_loss - compiled_loss) < 1e-5
    for a, b in zip(compiled_grads, eager_grads):
        assert _max_rel(a, b) < 1e-4


def test_greedy_continuation_matches_hf_generate(hf_model_dir):
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(hf_model_dir).eval()
    model = GPT.from_pretrained(hf_model_dir)
    prompt = [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    expected = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20, pad_token_id=50256)
    tokens, _ = train_gpt2.sample(model, prompt, num_return_sequences=1, max_length=len(prompt) + 20, top_k=1)
    assert tokens[0] == expected[0].tolist()


@pytest.mark.parametrize("damage,error,key", [
    ("missing", common.UserError, r"no weight: 'transformer\.h\.1\.mlp\.c_fc\.bias'"),
    ("extra", common.UserError, r"no place for: 'transformer\.h\.1\.mlp\.extra'"),
    ("shape", common.UserError, r"'transformer\.wpe\.weight' is \(256, 64\)"),
])
def test_from_pretrained_names_the_missing_or_mismatched_key(monkeypatch, damage, error, key):
    hf = make_hf_model()
    if damage == "missing":  # a checkpoint that lacks one weight
        del hf.transformer.h[1].mlp.c_fc.bias
        hf.transformer.h[1].mlp.c_fc.register_parameter("bias", None)
    elif damage == "extra":  # one with a weight our GPT has no place for
        hf.transformer.h[1].mlp.register_parameter("extra", torch.nn.Parameter(torch.zeros(3)))
    else:  # one whose weight disagrees with its own config
        hf.transformer.wpe.weight = torch.nn.Parameter(torch.zeros(256, 64))
    monkeypatch.setattr(train_gpt2, "load_hf_gpt2", lambda name: hf)
    with pytest.raises(error, match=key):
        GPT.from_pretrained("a damaged checkpoint")


def test_from_pretrained_unknown_name_is_a_user_error():
    with pytest.raises(common.UserError, match="unknown model 'gpt3'"):
        GPT.from_pretrained("gpt3")


def test_from_pretrained_offline_is_a_one_line_user_error(tmp_path):
    # offline, with an empty Hugging Face cache (HF_HOME: a user's own cache may hold gpt2), from the command line
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "train_gpt2.py"), "--sample", "gpt2"], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not load 'gpt2'"), out.stderr


# --- the 124M shape ---------------------------------------------------------------------------------------------

def test_parameter_counts_of_the_124M_model():
    with torch.device("meta"):  # shapes only: no memory, no time
        counts = {v: sum(p.numel() for p in GPT(GPTConfig(vocab_size=v)).parameters()) for v in (50257, 50304)}
    assert counts == {50257: 124_439_808, 50304: 124_475_904}  # the tied matrix is counted once


# --- initialisation ----------------------------------------------------------------------------------------------

def test_weight_tying_is_one_tensor():
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_fresh_model_loss_is_near_uniform():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64))
    idx, targets = torch.randint(0, 50257, (2, 4, 64))  # independent targets (idx itself would favour the
    _, loss = model(idx, targets)                           # tied embedding row of each input token)
    assert abs(loss.item() - math.log(50257)) < 0.3


def test_initialisation_stds():
    torch.manual_seed(0)
    n_layer = 6
    model = GPT(GPTConfig(block_size=256, n_layer=n_layer, n_head=4, n_embd=256))
    resid = 0.02 / math.sqrt(2 * n_layer)
    for block in model.transformer.h:
        for w in (block.attn.c_proj.weight, block.mlp.c_proj.weight):
            assert abs(w.std().item() - resid) / resid < 0.05
        assert abs(block.mlp.c_fc.weight.std().item() - 0.02) < 0.001
        assert block.attn.c_attn.bias.abs().max().item() == 0.0
    assert abs(model.transformer.wte.weight.std().item() - 0.02) < 0.001
    assert abs(model.transformer.wpe.weight.std().item() - 0.01) < 0.0005


def test_sequence_longer_than_block_size_raises():
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=1, n_embd=16))
    with pytest.raises(AssertionError, match="17.*16"):
        model(torch.zeros(1, 17, dtype=torch.long))


# --- sampling ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32))


def test_sampling_is_seeded(small_model):
    prompt = "Hello, I'm a language model,"
    a, texts = train_gpt2.sample(small_model, prompt, num_return_sequences=3, max_length=20, seed=42)
    b, _ = train_gpt2.sample(small_model, prompt, num_return_sequences=3, max_length=20, seed=42)
    c, _ = train_gpt2.sample(small_model, prompt, num_return_sequences=3, max_length=20, seed=43)
    assert a == b and a != c
    assert all(len(t) == 20 for t in a) and all(t.startswith(prompt) for t in texts)
    assert a[0][:8] == [15496, 11, 314, 1101, 257, 3303, 2746, 11]


def test_top_k_never_leaves_the_top_k(small_model):
    prompt = torch.tensor([[15496, 11, 314, 1101]])
    g = torch.Generator().manual_seed(0)
    k = 5
    idx = prompt.repeat(64, 1)
    out = train_gpt2.generate(small_model, idx, 1, top_k=k, generator=g)
    with torch.no_grad():
        logits, _ = small_model(prompt)
    allowed = set(torch.topk(logits[0, -1], k).indices.tolist())
    drawn = set(out[:, -1].tolist())
    assert drawn <= allowed and len(drawn) > 1  # sampled (not greedy), and only from the top k


def test_sampling_crops_to_block_size(small_model):
    idx = torch.randint(0, 50257, (1, 60))
    out = train_gpt2.generate(small_model, idx, 10, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 70)
    assert small_model.training  # generate restores the mode it found


# --- tokenizer and import ---------------------------------------------------------------------------------------

def test_tokenizer_ids():
    enc = common.get_tokenizer()
    assert enc.encode("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert enc.eot_token == 50256


def test_tokenizer_from_the_committed_files_is_tiktokens_gpt2(shakespeare):
    import tiktoken

    ours, theirs = common.get_tokenizer(), tiktoken.get_encoding("gpt2")  # theirs: from TIKTOKEN_CACHE_DIR
    assert ours._mergeable_ranks == theirs._mergeable_ranks and ours._pat_str == theirs._pat_str
    assert ours._special_tokens == theirs._special_tokens == {"<|endoftext|>": 50256}
    text = open(shakespeare).read()
    assert ours.encode_ordinary(text) == theirs.encode_ordinary(text)
    assert len(ours.encode_ordinary(text)) == 338_025
    for name, (_, sha256) in common.GPT2_TOKENIZER_FILES.items():  # the committed copies are OpenAI's files
        assert common.sha256_of(os.path.join(ROOT, "gpt2_tokenizer", name)) == sha256
    assert common.sha256_of(os.path.join(ROOT, "input.txt")) == common.TINY_SHAKESPEARE_SHA256


def test_import_does_nothing():
    out = subprocess.run([sys.executable, "-c", "import train_gpt2"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout == "" and out.stderr == ""
