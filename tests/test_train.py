"""Training: the data loader, the LR schedule, the optimizer groups, gradient accumulation, DDP, learning."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from common import UserError
from conftest import DATA, ROOT
import run_support
import train_gpt2
from train_gpt2 import GPT, GPTConfig, DataLoaderLite

TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "64", "--device", "cpu"]


def write_shards(folder, sizes, split="train", start=0, first_index=0):
    """Shards whose tokens are consecutive integers: token i of the whole stream is start + i."""
    os.makedirs(folder, exist_ok=True)
    arrays = []
    for k, n in enumerate(sizes):
        a = (np.arange(n) + start).astype(np.uint16)
        np.save(os.path.join(folder, f"edufineweb_{split}_{first_index + k:06d}.npy"), a)
        start += n
        arrays.append(a)
    return arrays


def read_log(path):
    rows = {}
    for line in open(path):
        step, kind, value = line.split()
        rows[(int(step), kind)] = float(value)
    return rows


# --- DataLoaderLite ----------------------------------------------------------------------------------------------

def test_targets_are_inputs_shifted_by_one(tmp_path):
    write_shards(tmp_path, [1000])
    loader = DataLoaderLite(str(tmp_path), B=2, T=8)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (2, 8)
    assert torch.equal(x.flatten(), torch.arange(16)) and torch.equal(y.flatten(), torch.arange(1, 17))
    x2, _ = loader.next_batch()
    assert x2.flatten()[0].item() == 16  # the next chunk starts where the last one's inputs ended


def test_ranks_read_disjoint_chunks_that_cover_the_data(tmp_path):
    write_shards(tmp_path, [700, 500])
    B, T, W = 2, 10, 3
    loaders = [DataLoaderLite(str(tmp_path), B, T, process_rank=r, num_processes=W) for r in range(W)]
    seen = []
    for _ in range(4):  # 4 rounds x 3 ranks = 12 chunks = 240 tokens
        for loader in loaders:
            x, _ = loader.next_batch()
            seen.append(x.flatten())
    seen = torch.cat(seen)
    assert torch.equal(seen.sort().values, torch.arange(12 * B * T))  # disjoint, and no token skipped


def test_chunks_cross_shard_boundaries_without_dropping_tokens(tmp_path):
    write_shards(tmp_path, [25, 7, 30])  # 62 tokens: the 7-token shard is smaller than a chunk
    loader = DataLoaderLite(str(tmp_path), B=1, T=10)
    xs = [loader.next_batch() for _ in range(6)]
    assert torch.equal(torch.cat([x.flatten() for x, _ in xs]), torch.arange(60))
    assert xs[2][0].flatten().tolist() == list(range(20, 30)) and xs[2][1].flatten()[-1].item() == 30
    # the 7th chunk runs past the end of the pass: it wraps into the next pass (shards reshuffled)
    x, y = loader.next_batch()
    assert x.flatten()[:2].tolist() == [60, 61]


def test_later_passes_reshuffle_the_shard_order(tmp_path):
    write_shards(tmp_path, [10] * 8)
    a = DataLoaderLite(str(tmp_path), B=1, T=10, seed=1)
    orders = [a.shard_order(e) for e in range(4)]
    assert orders[0] == list(range(8))
    assert all(sorted(o) == list(range(8)) for o in orders)
    assert orders[1] != orders[0] and orders[2] != orders[1]
    b = DataLoaderLite(str(tmp_path), B=1, T=10, seed=1)
    assert [b.shard_order(e) for e in range(4)] == orders  # fixed by the seed
    c = DataLoaderLite(str(tmp_path), B=1, T=10, seed=2)
    assert [c.shard_order(e) for e in range(1, 4)] != orders[1:]


def test_a_step_reads_the_same_tokens_on_1_and_2_processes(tmp_path):
    write_shards(tmp_path, [3000, 2000])
    B, T, K = 2, 16, 4  # 4 micro-batches per step in all
    one = DataLoaderLite(str(tmp_path), B, T)
    two = [DataLoaderLite(str(tmp_path), B, T, process_rank=r, num_processes=2) for r in range(2)]
    for step in range(5):
        single = torch.cat([one.next_batch()[0] for _ in range(K)])
        pair = torch.cat([loader.next_batch()[0] for loader in two for _ in range(K // 2)])
        assert torch.equal(single.flatten().sort().values, pair.flatten().sort().values)


def test_text_file_splits_90_10(shakespeare):
    train = DataLoaderLite(shakespeare, B=4, T=32, split="train")
    val = DataLoaderLite(shakespeare, B=4, T=32, split="val")
    assert train.total + val.total == 338_025  # Tiny Shakespeare in GPT-2 tokens
    assert train.total == int(0.9 * 338_025)


@pytest.mark.parametrize("content,match", [
    (lambda p: np.save(p, np.arange(10, dtype=np.int32)), "1-D uint16"),
    (lambda p: np.save(p, np.zeros((2, 5), dtype=np.uint16)), "2-D uint16"),
    (lambda p: open(p, "wb").write(b"not numpy at all"), "not a readable .npy"),
])
def test_a_bad_shard_is_a_user_error_naming_the_file(tmp_path, content, match):
    path = str(tmp_path / "edufineweb_train_000001.npy")
    content(path)
    with pytest.raises(UserError, match=match) as e:
        DataLoaderLite(str(tmp_path), B=1, T=4)
    assert "edufineweb_train_000001.npy" in str(e.value)


def test_truncated_shard_is_a_user_error(tmp_path):
    path = tmp_path / "edufineweb_train_000001.npy"
    np.save(path, np.arange(1000, dtype=np.uint16))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="edufineweb_train_000001.npy"):
        DataLoaderLite(str(tmp_path), B=1, T=4)


# --- schedule and optimizer --------------------------------------------------------------------------------------

def test_get_lr():
    kw = dict(max_lr=6e-4, min_lr=6e-5, warmup_steps=10, max_steps=110)
    assert train_gpt2.get_lr(0, **kw) == pytest.approx(6e-5)  # (0 + 1) / 10 of the peak
    assert train_gpt2.get_lr(9, **kw) == pytest.approx(6e-4)  # end of warmup: the peak
    assert train_gpt2.get_lr(10, **kw) == pytest.approx(6e-4)  # cosine starts at the peak
    assert train_gpt2.get_lr(60, **kw) == pytest.approx((6e-4 + 6e-5) / 2)  # half way: the middle
    last = 6e-5 + 0.5 * (1 + math.cos(math.pi * 99 / 100)) * (6e-4 - 6e-5)  # the last step: just above the floor
    assert train_gpt2.get_lr(109, **kw) == pytest.approx(last) and last < 6.02e-5
    assert train_gpt2.get_lr(110, **kw) == 6e-5 and train_gpt2.get_lr(10_000, **kw) == 6e-5  # beyond: the floor
    lrs = [train_gpt2.get_lr(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # decays monotonically


def test_optimizer_groups_of_the_124M_model():
    lines = []
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=50304))
    opt = model.configure_optimizers(0.1, 6e-4, "cpu", log=lines.append)
    decay, no_decay = opt.param_groups
    assert (len(decay["params"]), sum(p.numel() for p in decay["params"])) == (50, 124_354_560)
    assert (len(no_decay["params"]), sum(p.numel() for p in no_decay["params"])) == (98, 121_344)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8
    assert opt.defaults["fused"]  # on CPUs too: see configure_optimizers
    assert "50 tensors, 124,354,560 parameters" in lines[0] and "98 tensors, 121,344 parameters" in lines[0]


# --- gradient accumulation ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunked", ["--chunked_loss", "--no-chunked_loss"])
def test_gradient_accumulation_equals_one_big_batch(tmp_path, monkeypatch, chunked):
    """One step of 8 x 16 tokens, as 1 micro-batch of 8, 4 of 2 and 8 of 1, through train_gpt2.main's own loop:
    the same loss, and the same gradients when they are clipped (read there, before the optimizer uses them)."""
    write_shards(tmp_path, [5000])
    write_shards(tmp_path, [500], split="val")
    real_clip = torch.nn.utils.clip_grad_norm_
    seen = []

    def clip(parameters, max_norm):
        parameters = list(parameters)
        norm = real_clip(parameters, max_norm)
        seen.append((norm.item(), torch.cat([p.grad.flatten() for p in parameters])))
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    losses = []
    for B in (8, 2, 1):
        log_dir = str(tmp_path / f"log{B}")
        assert train_gpt2.main(["--data", str(tmp_path), *TINY, "--vocab_size", "5120", "--batch_size", str(B),
                                "--seq_len", "16", "--total_batch_size", "128", "--max_steps", "1", chunked,
                                "--grad_clip", "1e9", "--eval_every", "0", "--hellaswag_every", "0",
                                "--sample_every", "0", "--checkpoint_every", "0", "--log_dir", log_dir]) == 0
        losses.append(read_log(os.path.join(log_dir, "log.txt"))[(0, "train")])
    assert len(seen) == 3
    for loss, (norm, grads) in zip(losses[1:], seen[1:]):
        assert loss == pytest.approx(losses[0], rel=1e-6)
        assert norm == pytest.approx(seen[0][0], rel=1e-5)
        torch.testing.assert_close(grads, seen[0][1], rtol=1e-5, atol=1e-7)


# --- whole runs --------------------------------------------------------------------------------------------------

def test_help_exits_0():
    out = subprocess.run([sys.executable, "train_gpt2.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "--total_batch_size" in out.stdout and "--init_from" in out.stdout


def test_learning_happens_on_tiny_shakespeare(tmp_path, shakespeare, capsys):
    log_dir = str(tmp_path / "log")
    code = train_gpt2.main(["--data", shakespeare, *TINY, "--batch_size", "4", "--seq_len", "64",
                            "--total_batch_size", "256", "--max_steps", "50", "--warmup_steps", "5",
                            "--max_lr", "1e-2", "--eval_every", "50", "--val_tokens", "2560",
                            "--sample_every", "50", "--checkpoint_every", "0", "--log_dir", log_dir])
    assert code == 0
    log = read_log(os.path.join(log_dir, "log.txt"))
    first = log[(0, "train")]
    last = sum(log[(s, "train")] for s in range(45, 50)) / 5
    assert first > 10.5 and last < 7.2, (first, last)
    assert log[(50, "val")] < log[(0, "val")] - 3
    out = capsys.readouterr().out
    assert "sample 0: Hello, I'm a language model," in out
    assert "step    49 | loss: " in out and "| tok/sec: " in out
    assert "| mfu: -" in out and "peak GPU memory" not in out  # a CPU has no datasheet peak, and no GPU memory


# --- MFU -----------------------------------------------------------------------------------------------------------

def test_flops_per_token_of_the_124M_model():
    with torch.device("meta"):
        model = GPT(GPTConfig())
    # counted from the model itself: every parameter but the position embeddings does 6 FLOPs per token
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    expected = 6 * n + 12 * 12 * 768 * 1024
    assert run_support.flops_per_token(model.config, 1024) == expected
    assert abs(expected - 0.855e9) < 0.001e9  # "about 0.855 GFLOP per token", as flops_per_token documents
    # at 50% MFU one H100 would train on 989.4e12 * 0.5 / expected tokens per second: about 580K
    assert 575e3 < 989.4e12 * 0.5 / expected < 585e3


def test_gpu_peak_is_looked_up_by_name():
    assert run_support.gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert run_support.gpu_peak_flops("NVIDIA H200") == 989.4e12
    assert run_support.gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert run_support.gpu_peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
    assert run_support.gpu_peak_flops("NVIDIA GeForce RTX 4090") is None
    assert run_support.format_mfu(494.7e12, 989.4e12) == "50.0%"
    assert run_support.format_mfu(1e12, None) == "-"


def test_overfitting_one_batch_drives_the_loss_to_zero(tmp_path):
    write_shards(tmp_path, [65])  # exactly one chunk of B*T+1 tokens: every step sees the same batch
    write_shards(tmp_path, [65], split="val")
    log_dir = str(tmp_path / "log")
    code = train_gpt2.main(["--data", str(tmp_path), *TINY, "--vocab_size", "128", "--batch_size", "2",
                            "--seq_len", "32", "--total_batch_size", "64", "--max_steps", "150",
                            "--warmup_steps", "1", "--max_lr", "1e-2", "--eval_every", "0",
                            "--hellaswag_every", "0", "--sample_every", "0", "--checkpoint_every", "0",
                            "--log_dir", log_dir])
    assert code == 0
    log = read_log(os.path.join(log_dir, "log.txt"))
    assert log[(0, "train")] > 4.0 and log[(149, "train")] < 0.05


def run_torchrun(nproc, args, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, "train_gpt2.py"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_ddp_on_2_processes_logs_the_same_losses_and_hellaswag_as_1(tmp_path, shakespeare):
    hella = os.path.join(DATA, "hellaswag_val_cleaned.jsonl")
    args = ["--data", shakespeare, *TINY, "--batch_size", "2", "--seq_len", "32", "--total_batch_size", "256",
            "--max_steps", "4", "--warmup_steps", "2", "--eval_every", "2", "--val_tokens", "640",
            "--sample_every", "0", "--checkpoint_every", "0", "--hellaswag_every", "4",
            # one example per forward pass: each example is then computed at the same shape on 1 and 2 processes,
            # so the counts agree exactly on any CPU (batches pad examples to lengths that depend on the split)
            "--hellaswag_file", hella, "--hellaswag_examples", "41", "--hellaswag_batch_size", "1"]
    one = run_torchrun(1, args + ["--log_dir", "one"], tmp_path)
    two = run_torchrun(2, args + ["--log_dir", "two"], tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    assert "ddp: 2 processes, backend gloo" in two.stdout
    a, b = read_log(tmp_path / "one" / "log.txt"), read_log(tmp_path / "two" / "log.txt")
    assert sorted(a) == sorted(b) and len(a) == 4 + 3 + 2  # 4 train lines, val at steps 0, 2, 4, hella at 0, 4
    for key in a:
        assert abs(a[key] - b[key]) < 1e-5, (key, a[key], b[key])
    # HellaSwag: each process scored every other example (41 is odd: the split is uneven), the counts were summed
    assert a[(0, "hella")] == b[(0, "hella")] and a[(4, "hella")] == b[(4, "hella")]
    assert "hellaswag: 41 val examples" in two.stdout
    assert "gradient accumulation: 4 micro-steps" in one.stdout and "2 micro-steps" in two.stdout
