"""The paths of GPUs without bf16 or 80 GB, simulated on the CPU: fp16 with a gradient scaler, a micro-batch
that fits (an injected torch.OutOfMemoryError), compile only where it works (a broken C++ compiler), samples
without padded ids, a --log_dir that holds another run, --eval, --temperature, and the README's GPU table."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from common import GPT2_VOCAB_SIZE, UserError
from conftest import DATA, ROOT
import checkpoints
import run_support
import train_gpt2
from test_checkpoint import RUN, log_lines, snapshot
from test_train import read_log
from train_gpt2 import GPT, GPTConfig

HELLASWAG = os.path.join(DATA, "hellaswag_val_cleaned.jsonl")


def train(shakespeare, log_dir, *extra):
    return train_gpt2.main(["--data", shakespeare, *RUN, "--log_dir", str(log_dir), *extra])


# --- the dtype ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device_type,has_bf16,requested,expected", [
    ("cuda", True, "auto", "bfloat16"), ("cuda", False, "auto", "float16"), ("cpu", False, "auto", "float32"),
    ("mps", False, "auto", "float32"), ("cuda", False, "float32", "float32"), ("cpu", False, "float16", "float16"),
    ("cpu", False, "bfloat16", "bfloat16"),
])
def test_auto_picks_bf16_then_fp16_on_gpus_and_fp32_elsewhere(monkeypatch, device_type, has_bf16, requested,
                                                              expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: has_bf16)
    reasons = []
    assert run_support.pick_dtype(device_type, requested, reasons) == expected
    assert len(reasons) == 1 and reasons[0].startswith(f"dtype: {expected}")
    if expected == "float16" and requested == "auto":
        assert "gradient scaler" in reasons[0] and "no bf16" in reasons[0]


@pytest.mark.parametrize("device_type,requested,message", [
    ("cuda", "bfloat16", "--dtype bfloat16, but this GPU has no bf16"), ("mps", "float16", "on MPS is not supported"),
])
def test_a_dtype_the_device_lacks_is_one_line(monkeypatch, device_type, requested, message):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    with pytest.raises(UserError, match=message):
        run_support.pick_dtype(device_type, requested, [])


def test_fp16_trains_and_resumes_exactly_with_its_loss_scale(tmp_path, shakespeare):
    # 8 steps straight through, and 4 + 4 resumed from the step-4 checkpoint: the same log and weights, bit for bit
    # (the same computation twice), the scaler's state included
    assert train(shakespeare, tmp_path / "a", "--dtype", "float16", "--max_steps", "8", "--eval_every", "4",
                 "--checkpoint_every", "4") == 0
    ckpt = checkpoints.load_checkpoint(str(tmp_path / "a" / "model_00004.pt"))
    assert ckpt["settings"]["dtype"] == "float16" and ckpt["scaler"]["scale"] > 0
    assert train(shakespeare, tmp_path / "b", "--dtype", "float16", "--max_steps", "8", "--eval_every", "4",
                 "--checkpoint_every", "4", "--resume", str(tmp_path / "a" / "model_00004.pt")) == 0
    full, resumed = log_lines(tmp_path / "a"), log_lines(tmp_path / "b")
    assert resumed == [l for l in full if int(l.split()[0]) > 4 or l.startswith("4 train")]
    a = checkpoints.load_checkpoint(str(tmp_path / "a" / "model_00008.pt"))
    b = checkpoints.load_checkpoint(str(tmp_path / "b" / "model_00008.pt"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) and a["scaler"] == b["scaler"]
    log = read_log(tmp_path / "a" / "log.txt")
    assert log[(8, "val")] < log[(0, "val")] - 0.2  # it learns


def test_fp16_overflow_skips_steps_and_the_clip_sees_true_gradients(tmp_path, shakespeare, monkeypatch, capsys):
    real_scaler = torch.amp.GradScaler
    # a loss scale so large that the first fp16 gradients overflow: the scaler skips those steps and halves it
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **k: real_scaler(*a, init_scale=2.0**30, **k))
    assert train(shakespeare, tmp_path / "fp16", "--dtype", "float16", "--max_steps", "24", "--eval_every", "0",
                 "--checkpoint_every", "0") == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("step ")]
    skipped = [l for l in lines if "skipped: fp16 gradients overflowed" in l]
    assert 1 <= len(skipped) < 20 and lines[0] in skipped  # the first steps, not all of them
    assert len(read_log(tmp_path / "fp16" / "log.txt")) == 24  # every step is logged, none taken as divergence
    assert train(shakespeare, tmp_path / "fp32", "--max_steps", "1", "--warmup_steps", "1", "--eval_every", "0",
                 "--checkpoint_every", "0") == 0
    fp32_norm = float(re.search(r"norm: ([\d.]+)", capsys.readouterr().out).group(1))
    taken = [float(re.search(r"norm: ([\d.]+)", l).group(1)) for l in lines if l not in skipped]
    # unscaled before the clip: the norm is the model's (~fp32's), not 2**20 times larger
    assert 0.2 * fp32_norm < taken[0] < 5 * fp32_norm, (taken[0], fp32_norm)


def test_fp16_overflowing_every_step_is_divergence(tmp_path, shakespeare, monkeypatch, capsys):
    real_scaler = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **k: real_scaler(*a, init_scale=2.0**100, **k))
    assert train(shakespeare, tmp_path, "--dtype", "float16", "--max_steps", "30", "--eval_every", "0",
                 "--checkpoint_every", "0") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(r"error: step 19: fp16 gradients overflowed 20 steps in a row", err[0]), err


def test_evaluations_and_samples_run_under_the_same_autocast(tmp_path, shakespeare, monkeypatch, capsys):
    seen = set()
    real_forward = GPT.forward

    def forward(self, idx, targets=None):
        if not self.training:  # validation, HellaSwag and the samples
            seen.add((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real_forward(self, idx, targets)

    monkeypatch.setattr(GPT, "forward", forward)
    assert train(shakespeare, tmp_path, "--dtype", "float16", "--max_steps", "2", "--eval_every", "2",
                 "--checkpoint_every", "0", "--hellaswag_every", "2", "--hellaswag_file", HELLASWAG,
                 "--hellaswag_examples", "4", "--sample_every", "2") == 0
    assert "sample 0:" in capsys.readouterr().out
    assert seen == {(True, torch.float16)}


# --- a micro-batch that fits ---------------------------------------------------------------------------------------

def out_of_memory_above(monkeypatch, limit):
    """The model runs out of memory in training for micro-batches above limit, as a small GPU would."""
    real_forward = GPT.forward

    def forward(self, idx, targets=None):
        if self.training and idx.size(0) > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {idx.size(0)} GiB (simulated)")
        return real_forward(self, idx, targets)

    monkeypatch.setattr(GPT, "forward", forward)


SMALL = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--device", "cpu", "--max_steps", "3",
         "--eval_every", "3", "--sample_every", "0", "--checkpoint_every", "0", "--val_tokens", "2048"]


def test_a_presets_micro_batch_shrinks_to_what_fits(tmp_path, shakespeare, monkeypatch, capsys):
    # the CPU preset: 8 x 128 tokens per micro-batch, 1024 per step; only 2 x 128 fit
    out_of_memory_above(monkeypatch, 2)
    assert train_gpt2.main(["--data", shakespeare, *SMALL, "--log_dir", str(tmp_path / "fit")]) == 0
    out = capsys.readouterr().out
    assert "batch_size: 2 instead of 8, which ran out of memory" in out
    assert "batch: 1,024 tokens per step = 2 x 128 tokens x 4 accumulation steps x 1 processes" in out
    monkeypatch.undo()
    assert train_gpt2.main(["--data", shakespeare, *SMALL, "--batch_size", "2", "--log_dir", str(tmp_path / "b2")]) == 0
    fit, b2 = read_log(tmp_path / "fit" / "log.txt"), read_log(tmp_path / "b2" / "log.txt")
    assert fit == b2  # the same run as asking for 2 (the same computation: bit for bit)
    assert json.load(open(tmp_path / "fit" / "config.json"))["settings"]["batch_size"] == 2


def test_a_users_micro_batch_that_does_not_fit_is_one_line_naming_one_that_does(tmp_path, shakespeare, monkeypatch,
                                                                                capsys):
    out_of_memory_above(monkeypatch, 2)
    assert train_gpt2.main(["--data", shakespeare, *SMALL, "--batch_size", "8", "--log_dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --batch_size 8 does not fit in memory") and \
        err[0].endswith("--batch_size 2 fits"), err
    assert not (tmp_path / "x").exists()  # nothing written


def test_a_model_that_fits_no_micro_batch_says_its_size_and_the_memory(tmp_path, shakespeare, monkeypatch, capsys):
    out_of_memory_above(monkeypatch, 0)
    assert train_gpt2.main(["--data", shakespeare, *SMALL, "--log_dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "even a micro-batch of 1 x 128 tokens does not fit" in err[0], err
    assert re.search(r"the model has [\d,]+ parameters .* this process has [\d.]+ GiB of memory", err[0]), err
    assert not (tmp_path / "x").exists()


def test_out_of_memory_during_the_run_is_one_line(tmp_path, shakespeare, monkeypatch, capsys):
    real_forward = GPT.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None):
        calls["n"] += 1
        if calls["n"] == 6:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real_forward(self, idx, targets)

    monkeypatch.setattr(GPT, "forward", forward)
    assert train_gpt2.main(["--data", shakespeare, *SMALL, "--log_dir", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: out of memory (CUDA out of memory.") and \
        "lower --batch_size" in err[0], err


# A training script for torchrun whose model runs out of memory above a micro-batch, on some ranks only
OOM_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {root!r})
import train_gpt2
real_forward = train_gpt2.GPT.forward
def forward(self, idx, targets=None):
    if self.training and idx.size(0) > {limit} and os.environ["RANK"] in {ranks!r}:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated on rank " + os.environ["RANK"] + ")")
    return real_forward(self, idx, targets)
train_gpt2.GPT.forward = forward
sys.exit(train_gpt2.main())
"""


def torchrun(tmp_path, nproc, script, args, name):
    path = tmp_path / f"{name}.py"
    path.write_text(script)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           str(path), *args, "--log_dir", name], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_one_process_short_of_memory_shrinks_every_process_without_a_hang(tmp_path, shakespeare):
    args = ["--data", shakespeare, *SMALL]
    # 2 processes, the preset's 8 x 128: rank 1 alone runs out of memory above 2
    two = torchrun(tmp_path, 2, OOM_SCRIPT.format(root=ROOT, limit=2, ranks=["1"]), args, "two")
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    # the preset's 8 first shrinks to 4 so that 2 processes share 1,024 tokens, then to what fits
    assert "batch_size: 2 instead of 4, which ran out of memory" in two.stdout
    assert "batch: 1,024 tokens per step = 2 x 128 tokens x 2 accumulation steps x 2 processes" in two.stdout
    one = torchrun(tmp_path, 1, OOM_SCRIPT.format(root=ROOT, limit=99, ranks=[]), args + ["--batch_size", "2"], "one")
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = read_log(tmp_path / "one" / "log.txt"), read_log(tmp_path / "two" / "log.txt")
    assert set(a) == set(b) and all(abs(a[k] - b[k]) < 1e-5 for k in a), (a, b)  # 1 vs 2 processes: fp32 rounding


# --- compile only where it works -----------------------------------------------------------------------------------

def test_compile_is_on_by_default_only_with_cuda_and_triton(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    for triton, expected in ((True, True), (False, False)):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: (object() if triton else None) if name == "triton" else real_find_spec(name, *a))
        reasons = []
        assert run_support.compile_by_default("cuda", reasons) is expected
        assert reasons[0].startswith(f"compile: {'on' if expected else 'off'}")
        if not triton:
            assert "Triton" in reasons[0]
    for device_type in ("cpu", "mps"):
        reasons = []
        assert run_support.compile_by_default(device_type, reasons) is False and reasons[0].startswith("compile: off")


def test_a_broken_compiler_means_one_line_and_an_uncompiled_run(tmp_path, shakespeare):
    args = [sys.executable, os.path.join(ROOT, "train_gpt2.py"), "--data", shakespeare, *SMALL, "--max_steps", "2",
            "--eval_every", "2"]
    # no C++ compiler for Inductor's CPU kernels, and no kernels cached from an earlier run
    env = dict(os.environ, CXX="/bin/false", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    broken = subprocess.run(args + ["--compile", "--log_dir", "broken"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert broken.returncode == 0, broken.stderr[-3000:]
    failed = [l for l in broken.stdout.splitlines() if l.startswith("compile: failed")]
    assert len(failed) == 1 and "training without it (--no-compile skips the attempt)" in failed[0], broken.stdout
    assert "Traceback" not in broken.stderr and "Traceback" not in broken.stdout
    plain = subprocess.run(args + ["--no-compile", "--log_dir", "plain"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    assert plain.returncode == 0, plain.stderr[-2000:]
    # the attempt changed nothing: the same computation as a run without it, bit for bit
    assert read_log(tmp_path / "broken" / "log.txt") == read_log(tmp_path / "plain" / "log.txt")


COMPILE_FAILS_ON_RANK_1 = """
import os, sys, torch
sys.path.insert(0, {root!r})
import train_gpt2
class FailsHere(torch.nn.Module):  # what torch.compile returns where compiling fails at the first call
    def __init__(self, model):
        super().__init__()
        self.model = model
    def forward(self, *args):
        if os.environ["RANK"] == "1":
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found (simulated)")
        return self.model(*args)
torch.compile = FailsHere
sys.exit(train_gpt2.main())
"""


def test_compile_failing_on_one_process_runs_every_process_uncompiled(tmp_path, shakespeare):
    args = ["--data", shakespeare, *SMALL, "--batch_size", "4", "--compile"]
    two = torchrun(tmp_path, 2, COMPILE_FAILS_ON_RANK_1.format(root=ROOT), args, "two")
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    assert "compile: failed (it failed on another process); training without it" in two.stdout
    assert "Traceback" not in two.stderr
    assert len(read_log(tmp_path / "two" / "log.txt")) == 3 + 2


# --- samples never hold a padded id ---------------------------------------------------------------------------------

class PaddedRowsWin(GPT):
    """A GPT whose padded vocabulary rows (50257..50303) get by far the largest logits, as can happen early on."""

    def forward(self, idx, targets=None):
        logits, loss = super().forward(idx, targets)
        logits = logits.clone()
        logits[..., GPT2_VOCAB_SIZE:] += 1e4
        return logits, loss


@pytest.mark.parametrize("top_k,temperature", [(50, 1.0), (1, 1.0), (50, 2.0), (50, 1e-6)])
def test_generate_never_draws_a_padded_id(top_k, temperature):
    torch.manual_seed(0)
    model = PaddedRowsWin(GPTConfig(block_size=32, vocab_size=50304, n_layer=1, n_head=2, n_embd=16))
    with torch.no_grad():
        assert model(torch.zeros(1, 1, dtype=torch.long))[0][0, -1].argmax() >= GPT2_VOCAB_SIZE  # they would win
    out = train_gpt2.generate(model, torch.zeros(8, 1, dtype=torch.long), 20, top_k=top_k,
                              generator=torch.Generator().manual_seed(0), temperature=temperature)
    assert out.max().item() < GPT2_VOCAB_SIZE


def test_sample_command_and_training_samples_with_dominant_padded_rows(tmp_path, shakespeare, monkeypatch, capsys):
    # a checkpoint whose padded rows dominate every logit: ln_f outputs its bias, the padded rows point along it
    model = GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=1, n_head=2, n_embd=32))
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight[GPT2_VOCAB_SIZE:] = 1.0
    path = str(tmp_path / "model_00001.pt")
    checkpoints.save_checkpoint(path, {"model": model.state_dict(), "config": dict(block_size=64, vocab_size=50304,
                                                                                     n_layer=1, n_head=2, n_embd=32)})
    assert train_gpt2.main(["--sample", path, "--num_samples", "3", "--max_new_tokens", "10", "--device", "cpu"]) == 0
    assert len([l for l in capsys.readouterr().out.splitlines() if l.startswith("sample ")]) == 3
    # during training: the samples at step 2 come from a model whose padded rows win (in evaluation only)
    real_forward = GPT.forward

    def forward(self, idx, targets=None):
        logits, loss = real_forward(self, idx, targets)
        if not self.training:
            logits = logits.clone()
            logits[..., GPT2_VOCAB_SIZE:] += 1e4
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward)
    assert train(shakespeare, tmp_path / "run", "--vocab_size", "50304", "--max_steps", "2", "--eval_every", "0",
                 "--checkpoint_every", "0", "--sample_every", "2") == 0
    assert len([l for l in capsys.readouterr().out.splitlines() if l.startswith("sample ")]) == 4


def test_temperature(capsys, tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=1, n_head=2, n_embd=32))
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # logits far apart: the temperature then changes which tokens are drawn
    path = str(tmp_path / "model_00001.pt")
    checkpoints.save_checkpoint(path, {"model": model.state_dict(), "config": dict(block_size=64, vocab_size=50304,
                                                                                     n_layer=1, n_head=2, n_embd=32)})

    def samples(*flags):
        assert train_gpt2.main(["--sample", path, "--num_samples", "3", "--max_new_tokens", "8", "--device", "cpu",
                                *flags]) == 0
        return [l for l in capsys.readouterr().out.splitlines() if l.startswith("sample ")]

    greedy = samples("--top_k", "1")
    assert len(set(s.split(": ", 1)[1] for s in greedy)) == 1
    assert samples("--temperature", "1e-6") == greedy  # near 0: greedy
    assert samples("--temperature", "0.5") != samples("--temperature", "2.0")  # the same seed, other distributions
    for bad in ("0", "-1", "nan"):
        assert train_gpt2.main(["--sample", path, "--temperature", bad, "--device", "cpu"]) == 2
        assert capsys.readouterr().err.startswith("error: --temperature must be a number above 0")


# --- a --log_dir that holds another run ----------------------------------------------------------------------------

@pytest.fixture
def other_run(tmp_path, shakespeare):
    log_dir = tmp_path / "log"
    assert train(shakespeare, log_dir, "--max_steps", "4", "--eval_every", "0", "--checkpoint_every", "1") == 0
    (log_dir / "notes.txt").write_text("mine")  # not a run's file: never touched
    return log_dir


def test_a_fresh_run_into_another_runs_folder_is_refused(shakespeare, other_run, capsys):
    before = snapshot(other_run)
    for extra in ([], ["--keep_checkpoints", "1"]):
        assert train(shakespeare, other_run, "--max_steps", "3", *extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--log_dir {other_run} holds another run" in err[0], err
        assert "--resume auto" in err[0] and "another --log_dir" in err[0] and "--overwrite" in err[0]
        assert snapshot(other_run) == before  # byte for byte, and not even touched


def test_overwrite_deletes_the_old_runs_log_and_checkpoints_only(shakespeare, other_run):
    old_log = (other_run / "log.txt").read_text()
    assert train(shakespeare, other_run, "--max_steps", "3", "--eval_every", "0", "--checkpoint_every", "3",
                 "--overwrite") == 0
    assert sorted(os.listdir(other_run)) == ["config.json", "log.txt", "model_00003.pt", "notes.txt"]
    assert (other_run / "notes.txt").read_text() == "mine"
    assert (other_run / "log.txt").read_text() != old_log and len(log_lines(other_run)) == 3


def test_resume_auto_and_keep_checkpoints_stay_within_the_run(tmp_path, shakespeare, other_run, capsys):
    # as if the run had died after step 2's checkpoint: --resume auto continues the run in the folder, and
    # --keep_checkpoints then deletes that run's older checkpoints
    os.remove(other_run / "model_00003.pt")
    os.remove(other_run / "model_00004.pt")
    assert train(shakespeare, other_run, "--max_steps", "4", "--eval_every", "0", "--checkpoint_every", "1",
                 "--resume", "auto", "--keep_checkpoints", "2") == 0
    assert sorted(n for n in os.listdir(other_run) if n.endswith(".pt")) == ["model_00003.pt", "model_00004.pt"]
    # a checkpoint from elsewhere resumed into the folder would mix two runs: refused
    elsewhere = tmp_path / "elsewhere"
    assert train(shakespeare, elsewhere, "--max_steps", "4", "--eval_every", "0", "--checkpoint_every", "2") == 0
    before = snapshot(other_run)
    assert train(shakespeare, other_run, "--max_steps", "4", "--resume", str(elsewhere / "model_00002.pt")) == 2
    assert "holds another run" in capsys.readouterr().err
    # going back to an older checkpoint of the folder's own run while newer ones are there: refused too
    assert train(shakespeare, other_run, "--max_steps", "4", "--resume", str(other_run / "model_00003.pt")) == 2
    assert "holds newer checkpoints of that run (model_00004.pt)" in capsys.readouterr().err
    assert train(shakespeare, other_run, "--max_steps", "4", "--resume", "auto", "--overwrite") == 2
    assert "does not go with --resume auto" in capsys.readouterr().err
    assert snapshot(other_run) == before


def test_resume_auto_without_a_checkpoint_starts_the_folders_run_afresh(tmp_path, shakespeare):
    log_dir = tmp_path / "log"
    assert train(shakespeare, log_dir, "--max_steps", "2", "--eval_every", "0", "--checkpoint_every", "0") == 0
    assert train(shakespeare, log_dir, "--max_steps", "2", "--eval_every", "0", "--checkpoint_every", "0",
                 "--resume", "auto") == 0  # a run that died before its first checkpoint, restarted
    assert len(log_lines(log_dir)) == 2


# --- --eval ----------------------------------------------------------------------------------------------------------

def test_eval_of_a_checkpoint_reproduces_the_logged_validation_and_hellaswag(tmp_path, shakespeare, capsys):
    assert train(shakespeare, tmp_path / "run", "--max_steps", "4", "--eval_every", "2", "--checkpoint_every", "2",
                 "--hellaswag_every", "2", "--hellaswag_file", HELLASWAG, "--hellaswag_examples", "24") == 0
    log = read_log(tmp_path / "run" / "log.txt")
    capsys.readouterr()
    for step in (2, 4):
        assert train_gpt2.main(["--eval", str(tmp_path / "run" / f"model_{step:05d}.pt")]) == 0
        out = capsys.readouterr().out
        val = float(re.search(r"validation loss ([\d.]+) over", out).group(1))
        hella = float(re.search(r"acc_norm ([\d.]+) over 24 examples", out).group(1))
        # the same model, chunks, order and dtype in one process as in the run: the same digits
        assert f"{val:.6f}" == f"{log[(step, 'val')]:.6f}" and hella == log[(step, "hella")], (out, log)


def test_eval_of_a_hugging_face_model_and_other_data(tmp_path, shakespeare, hf_model_dir, capsys):
    assert train_gpt2.main(["--eval", hf_model_dir, "--data", shakespeare, "--device", "cpu", "--batch_size", "2",
                            "--seq_len", "64", "--val_tokens", "512", "--hellaswag_file", HELLASWAG,
                            "--hellaswag_examples", "8"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"validation loss \d+\.\d{6} over 512 tokens of .*input.txt \(4 micro-batches of 2 x 64, "
                     r"float32, cpu\)", out), out
    assert re.search(r"HellaSwag acc 0\.\d{4} acc_norm 0\.\d{4} over 8 examples", out), out


def test_eval_without_a_hellaswag_file_says_where_to_get_one(tmp_path, shakespeare, hf_model_dir, capsys,
                                                             monkeypatch):
    import hellaswag

    monkeypatch.setattr(hellaswag, "DATA_DIR", str(tmp_path / "none"))
    assert train_gpt2.main(["--eval", hf_model_dir, "--data", shakespeare, "--device", "cpu", "--val_tokens",
                            "256", "--seq_len", "64"]) == 0
    assert "HellaSwag: not scored, no file at" in capsys.readouterr().out


def test_eval_bad_input_is_one_line(hf_model_dir, shakespeare, capsys):
    for args, message in ((["--eval", "no/such/model.pt"], "unknown model 'no/such/model.pt'"),
                          (["--eval", hf_model_dir, "--data", shakespeare, "--seq_len", "2048"],
                           "--seq_len at most the model's block size 128"),
                          (["--eval", hf_model_dir, "--data", "no/such/data.txt"], "--data no/such/data.txt does not")):
        assert train_gpt2.main([*args, "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


# --- the README's table ---------------------------------------------------------------------------------------------

def test_the_readmes_gpu_table_is_what_the_code_picks(monkeypatch):
    """Each row's dtype and compile columns, from the code given the GPU's compute capability (bf16 from 8.0)."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("## On your GPU", 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("|")]
    assert table[0].startswith("| GPU | compute capability | memory | dtype | compile |")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert len(rows) >= 7
    for name, capability, memory, dtype, compile_, batch in rows:
        device_type = "mps" if "Apple" in name else "cuda"
        bf16 = device_type == "cuda" and float(capability) >= 8.0
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
        assert dtype.startswith(run_support.pick_dtype(device_type, "auto", [])), (name, dtype)
        assert compile_.startswith("on" if device_type == "cuda" else "off"), (name, compile_)
