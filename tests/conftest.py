"""Shared test set-up: offline settings, paths to ../shared, and a tiny random Hugging Face GPT-2 on disk."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")
DATA = os.path.join(SHARED, "data")
sys.path.insert(0, ROOT)

# Nothing in the tests may wait on a network: use the local copies in ../shared (a user's own setting wins).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if os.path.isdir(os.path.join(SHARED, "tiktoken_cache")):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken_cache"))


def make_hf_model(n_layer=2, n_head=2, n_embd=64, n_positions=128, vocab_size=50257, seed=0):
    """A random transformers GPT2LMHeadModel in which every parameter, biases and LayerNorms included, has
    non-trivial random values (HF's own init leaves biases at 0 and LayerNorms at 1, which would hide a bias
    that was never copied)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                        vocab_size=vocab_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def hf_model_dir(tmp_path):
    """A folder with a saved tiny random GPT-2 (config.json + weights), as save_pretrained writes it."""
    model = make_hf_model()
    path = tmp_path / "tiny-gpt2"
    model.save_pretrained(path)
    return str(path)


@pytest.fixture
def shakespeare():
    path = os.path.join(DATA, "input.txt")
    assert os.path.isfile(path), f"{path} is missing: the tests need ../shared beside the project"
    return path


@pytest.fixture(autouse=True)
def restore_matmul_precision():
    """bench.py sets torch's process-wide fp32 matmul precision for its TF32 rows; a test that ran it must not
    leave "high" behind for the fp32 parity tests after it (on a CPU with reduced-precision fp32 matmuls, e.g.
    oneDNN's TF32 on AMX parts, they would fail only because of the test order)."""
    import torch

    precision = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(precision)


@pytest.fixture
def clone(tmp_path):
    """The project's tracked files (what a `git clone` gets), copied into a new folder."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in files.decode().split("\0"):
        if name and os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(os.path.dirname(os.path.join(tmp_path, name)) or tmp_path, exist_ok=True)
            shutil.copy(os.path.join(ROOT, name), os.path.join(tmp_path, name))
    return tmp_path


def offline_env(tmp_path):
    """No tiktoken cache, an empty Hugging Face cache, and every download sent to a closed local port."""
    env = {k: v for k, v in os.environ.items() if k not in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")}
    closed = "http://127.0.0.1:9"  # the discard port: nothing listens there, so a connection fails at once
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), TMPDIR=str(tmp_path),
               http_proxy=closed, https_proxy=closed, HTTP_PROXY=closed, HTTPS_PROXY=closed, no_proxy="", NO_PROXY="")
    return env
