"""Checkpoints: exact resume, atomic saves, safe loading, stopping on signals and on NaN, bad input."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from common import UserError
from conftest import ROOT
import checkpoints
import model_commands
import train_gpt2
from test_train import TINY, run_torchrun, write_shards

RUN = [*TINY, "--batch_size", "2", "--seq_len", "32", "--total_batch_size", "128", "--warmup_steps", "2",
       "--val_tokens", "320", "--sample_every", "0", "--hellaswag_every", "0"]


def run(shakespeare, log_dir, *extra):
    return train_gpt2.main(["--data", shakespeare, *RUN, "--log_dir", str(log_dir), *extra])


def log_lines(log_dir):
    return open(os.path.join(log_dir, "log.txt")).read().splitlines()


def test_resumed_run_logs_bitwise_the_same_losses(tmp_path, shakespeare):
    # 8 steps straight through, saving at step 4; then a second run resumes from that step-4 checkpoint
    assert run(shakespeare, tmp_path / "a", "--max_steps", "8", "--eval_every", "2", "--checkpoint_every", "4") == 0
    ckpt = tmp_path / "a" / "model_00004.pt"
    assert ckpt.exists() and (tmp_path / "a" / "model_00008.pt").exists()
    assert run(shakespeare, tmp_path / "b", "--max_steps", "8", "--eval_every", "2", "--checkpoint_every", "4",
               "--resume", str(ckpt)) == 0
    full, resumed = log_lines(tmp_path / "a"), log_lines(tmp_path / "b")
    second_half = [l for l in full if int(l.split()[0]) > 4 or (l.startswith("4 ") and "train" in l)]
    # the same computation twice (same shapes, same process, same kernels): bit for bit on any CPU
    assert resumed == second_half  # the same text: bitwise-equal losses (to the printed digits)
    a = torch.load(tmp_path / "a" / "model_00008.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "model_00008.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # and bitwise-equal weights


def test_resume_appends_to_the_log_and_auto_picks_the_newest(tmp_path, shakespeare):
    log_dir = tmp_path / "log"
    # --resume auto with no checkpoint: a fresh start
    assert run(shakespeare, log_dir, "--max_steps", "4", "--eval_every", "0", "--checkpoint_every", "2",
               "--resume", "auto") == 0
    assert len(log_lines(log_dir)) == 4
    os.remove(log_dir / "model_00004.pt")  # as if the run had been stopped after step 2's checkpoint
    lines = log_lines(log_dir)
    with open(log_dir / "log.txt", "w") as f:
        f.write("\n".join(lines[:2]) + "\n")
    assert run(shakespeare, log_dir, "--max_steps", "4", "--eval_every", "0", "--checkpoint_every", "2",
               "--resume", "auto") == 0
    assert log_lines(log_dir) == lines  # appended the steps after 2, identical to the first run's


def test_resume_from_1_to_2_processes(tmp_path, shakespeare):
    args = ["--data", shakespeare, *RUN, "--max_steps", "6", "--eval_every", "3", "--checkpoint_every", "3"]
    whole = run_torchrun(1, args + ["--log_dir", "whole"], tmp_path)
    assert whole.returncode == 0, whole.stderr[-2000:]
    second = run_torchrun(2, args + ["--log_dir", "second", "--resume", "whole/model_00003.pt"], tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    expected = {tuple(l.split()[:2]): float(l.split()[2]) for l in log_lines(tmp_path / "whole")
                if int(l.split()[0]) >= 3 and not l.startswith("3 val")}
    got = {tuple(l.split()[:2]): float(l.split()[2]) for l in log_lines(tmp_path / "second")}
    assert set(got) == set(expected) and len(got) == 4  # train 3, 4, 5 and val 6
    for k in got:
        assert abs(got[k] - expected[k]) < 1e-5, (k, got[k], expected[k])


def test_keep_checkpoints(tmp_path, shakespeare):
    assert run(shakespeare, tmp_path, "--max_steps", "5", "--eval_every", "0", "--checkpoint_every", "1",
               "--keep_checkpoints", "2") == 0
    assert sorted(os.listdir(tmp_path)) == ["config.json", "log.txt", "model_00004.pt", "model_00005.pt"]


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "model_00001.pt"
    checkpoints.save_checkpoint(str(path), {"format": checkpoints.CHECKPOINT_FORMAT, "step": 1})
    real_save = torch.save

    def dying_save(obj, f):
        real_save(obj, f)
        f.seek(f.tell() // 2)
        f.truncate()  # half the bytes are on disk, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(str(tmp_path / "model_00002.pt"), {"format": checkpoints.CHECKPOINT_FORMAT,
                                                                      "step": 2, "w": torch.zeros(1000)})
    # no partial file under the final name, nor the temporary one (an exception cleans up after itself)
    assert sorted(os.listdir(tmp_path)) == ["model_00001.pt"]
    assert checkpoints.load_checkpoint(str(path))["step"] == 1
    # a process killed with SIGKILL cannot clean up: its half-written .tmp is never listed, and refused if named
    monkeypatch.undo()
    checkpoints.save_checkpoint(str(tmp_path / "model_00002.pt"), {"step": 2, "w": torch.zeros(1000)})
    data = (tmp_path / "model_00002.pt").read_bytes()
    os.remove(tmp_path / "model_00002.pt")
    (tmp_path / "model_00002.pt.tmp").write_bytes(data[:len(data) // 2])
    assert checkpoints.list_checkpoints(str(tmp_path)) == [str(path)]
    with pytest.raises(UserError, match="model_00002.pt.tmp"):
        checkpoints.load_checkpoint(str(tmp_path / "model_00002.pt.tmp"))


def test_sigterm_saves_a_checkpoint_that_resumes_exactly(tmp_path, shakespeare):
    args = ["--data", shakespeare, *RUN, "--max_steps", "16", "--eval_every", "0", "--checkpoint_every", "0"]
    cmd = [sys.executable, os.path.join(ROOT, "train_gpt2.py"), *args]
    full = subprocess.run(cmd + ["--log_dir", "full"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    cmd += ["--log_dir", "stopped"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until training is under way
        if line.startswith("step     3"):
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopping at step" in out and "SIGTERM" in out
    ckpts = checkpoints.list_checkpoints(str(tmp_path / "stopped"))
    assert len(ckpts) == 1
    step = checkpoints.load_checkpoint(ckpts[0])["step"]
    assert 4 <= step < 16
    resumed = subprocess.run(cmd + ["--resume", "auto"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert log_lines(tmp_path / "stopped") == log_lines(tmp_path / "full")


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoints.CHECKPOINT_FORMAT, "model": Evil()}, path)
    with pytest.raises(UserError, match="not a loadable checkpoint"):
        checkpoints.load_checkpoint(str(path))
    with pytest.raises(UserError):
        model_commands.load_model(str(path), train_gpt2.GPT, train_gpt2.GPTConfig)
    assert not marker.exists()


def test_checkpoint_of_another_shape_or_format_is_refused(tmp_path):
    model = train_gpt2.GPT(train_gpt2.GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=16, vocab_size=100))
    sd = model.state_dict()
    config = {"block_size": 32, "vocab_size": 100, "n_layer": 1, "n_head": 2, "n_embd": 32}  # lies about the width
    torch.save({"format": checkpoints.CHECKPOINT_FORMAT, "model": sd, "config": config}, tmp_path / "a.pt")
    with pytest.raises(UserError, match="do not fit"):
        model_commands.load_model(str(tmp_path / "a.pt"), train_gpt2.GPT, train_gpt2.GPTConfig)
    torch.save({"weights": sd}, tmp_path / "b.pt")
    with pytest.raises(UserError, match="not a checkpoint written by train_gpt2.py"):
        model_commands.load_model(str(tmp_path / "b.pt"), train_gpt2.GPT, train_gpt2.GPTConfig)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, shakespeare, monkeypatch, capsys):
    real_forward = train_gpt2.GPT.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None):
        logits, loss = real_forward(self, idx, targets)
        if self.training and targets is not None:
            calls["n"] += 1
            # one trial of the micro-batch before the first step, then 2 micro-steps per step: the 10th
            # training forward is step 4's first
            if calls["n"] == 10:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(train_gpt2.GPT, "forward", forward)
    code = run(shakespeare, tmp_path, "--max_steps", "10", "--eval_every", "0", "--checkpoint_every", "2",
               "--no-chunked_loss")  # the loss GPT.forward computes (the patched one above)
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: step 4: the loss is nan")
    assert [os.path.basename(p) for p in checkpoints.list_checkpoints(str(tmp_path))] == ["model_00002.pt",
                                                                                         "model_00004.pt"]
    ckpt = checkpoints.load_checkpoint(str(tmp_path / "model_00004.pt"))
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert [l.split()[0] for l in log_lines(tmp_path)] == ["0", "1", "2", "3"]


# --- bad input: one line, exit status 2, no file touched -----------------------------------------------------------

def snapshot(folder):
    return {p: (os.path.getmtime(os.path.join(folder, p)), open(os.path.join(folder, p), "rb").read())
            for p in sorted(os.listdir(folder))}


@pytest.fixture
def existing_run(tmp_path, shakespeare):
    """A log folder holding an earlier run's files, which no failed command may touch."""
    log_dir = tmp_path / "log"
    assert run(shakespeare, log_dir, "--max_steps", "1", "--warmup_steps", "1", "--eval_every", "0",
               "--checkpoint_every", "1") == 0
    return log_dir


def bad_inputs(tmp_path, shakespeare):
    shards = tmp_path / "shards"
    write_shards(shards, [1000])
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {}
    for name, writer in {
        "truncated": lambda p: p.write_bytes(b"\x93NUMPY\x01\x00v\x00{'descr': '<u2', 'fortran_order': False, "
                                             b"'shape': (1000,), }" + b" " * 50 + b"\n" + b"\x00" * 10),
        "int32": lambda p: np.save(p, np.arange(100, dtype=np.int32)),
        "text": lambda p: p.write_text("hello"),
    }.items():
        folder = tmp_path / name
        folder.mkdir()
        writer(folder / "edufineweb_train_000001.npy")
        cases[f"shard-{name}"] = (["--data", str(folder)], "edufineweb_train_000001.npy")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"garbage")
    ok = ["--data", shakespeare]
    cases.update({
        "data-missing": (["--data", str(tmp_path / "nope.txt")], "does not exist"),
        "no-shards": (["--data", str(empty)], "no train shards"),
        "seq-len": (ok + ["--seq_len", "128", "--total_batch_size", "256"], "longer than the model's block size"),
        "indivisible": (ok + ["--total_batch_size", "100"], "must be divisible"),
        # a GPU this machine lacks: CUDA, or on a CUDA machine Apple's MPS
        "no-gpu": (ok + ["--device", ABSENT_GPU], f"--device {ABSENT_GPU}, but this machine has no"),
        "zero-steps": (ok + ["--max_steps", "0"], "--max_steps must be positive"),
        "negative-batch": (ok + ["--batch_size", "-2"], "--batch_size must be positive"),
        "resume-missing": (ok + ["--resume", str(tmp_path / "missing.pt")], "does not exist"),
        "resume-corrupt": (ok + ["--resume", str(corrupt)], "not a loadable checkpoint"),
        "init-from": (ok + ["--init_from", "gpt5"], "--init_from gpt5"),
        "log-dir-is-a-file": (ok + ["--log_dir", str(corrupt / "log")], "is not a folder this process can write to"),
    })
    return cases


ABSENT_GPU = "mps" if torch.cuda.is_available() else "cuda"


def test_bad_input_is_one_line_and_exit_2_and_touches_nothing(tmp_path, shakespeare, existing_run, capsys):
    before = snapshot(existing_run)
    for name, (args, message) in bad_inputs(tmp_path, shakespeare).items():
        # --overwrite: bad input must be found before it deletes anything of the run in the folder
        argv = [*RUN, "--max_steps", "3", "--log_dir", str(existing_run), "--overwrite", *args]
        assert train_gpt2.main(argv) == 2, name
        out = capsys.readouterr()
        lines = out.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (name, out.err)
        assert snapshot(existing_run) == before, name


def test_bad_input_from_the_command_line(tmp_path, existing_run):
    before = snapshot(existing_run)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "train_gpt2.py"), "--data", "nope.txt",
                          "--log_dir", str(existing_run)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == ["error: --data nope.txt does not exist; pass a text file or a "
                                               "folder of fineweb.py shards"]
    assert snapshot(existing_run) == before


def test_resume_with_other_math_is_refused(tmp_path, shakespeare, existing_run, capsys):
    ckpt = str(existing_run / "model_00001.pt")
    code = run(shakespeare, tmp_path / "other", "--max_steps", "1", "--warmup_steps", "1", "--max_lr", "1e-3",
               "--resume", ckpt)
    assert code == 2
    assert "--max_lr is 0.001 but the checkpoint was trained with" in capsys.readouterr().err


def test_checkpoints_are_ordered_by_step_not_by_name(tmp_path):
    for step in (99_999, 100_000, 5):
        checkpoints.save_checkpoint(checkpoints.checkpoint_path(str(tmp_path), step),
                                    {"format": checkpoints.CHECKPOINT_FORMAT, "step": step})
    assert [os.path.basename(p) for p in checkpoints.list_checkpoints(str(tmp_path))] == [
        "model_00005.pt", "model_99999.pt", "model_100000.pt"]  # --resume auto takes the last one


def test_a_gradient_norm_that_is_not_finite_stops_the_run(tmp_path, shakespeare, monkeypatch, capsys):
    real_clip = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def clip(parameters, max_norm):
        norm = real_clip(parameters, max_norm)
        calls["n"] += 1
        return norm * float("inf") if calls["n"] == 4 else norm  # step 3: a finite loss, an infinite gradient

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    code = run(shakespeare, tmp_path, "--max_steps", "10", "--eval_every", "0", "--checkpoint_every", "2")
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: step 3: the gradient norm is inf"), err
    assert [os.path.basename(p) for p in checkpoints.list_checkpoints(str(tmp_path))] == ["model_00002.pt"]


def test_a_tiny_val_tokens_still_validates_one_micro_batch(tmp_path, shakespeare):
    assert run(shakespeare, tmp_path, "--max_steps", "1", "--warmup_steps", "1", "--eval_every", "1",
               "--checkpoint_every", "0",
               "--val_tokens", "1") == 0
    val = [float(l.split()[2]) for l in log_lines(tmp_path) if " val " in l]
    assert len(val) == 2 and all(10 < v < 11.5 for v in val)  # one micro-batch each time, a finite loss


def test_fine_tuning_records_the_pretrained_shape(tmp_path, shakespeare, hf_model_dir, capsys):
    # the CPU preset's shape (4 layers, 128 wide) must not be what config.json says of a 2-layer, 64-wide model
    def fine_tune(log_dir, *extra):
        return train_gpt2.main(["--data", shakespeare, "--device", "cpu", "--init_from", hf_model_dir, "--batch_size",
                                "2", "--seq_len", "32", "--total_batch_size", "64", "--max_steps", "1",
                                "--eval_every", "0", "--sample_every", "0", "--checkpoint_every", "1",
                                "--log_dir", str(log_dir), *extra])

    assert fine_tune(tmp_path / "ft", "--n_layer", "2") == 0  # a shape flag that agrees is fine
    import json
    settings = json.load(open(tmp_path / "ft" / "config.json"))["settings"]
    assert (settings["n_layer"], settings["n_head"], settings["n_embd"], settings["vocab_size"],
            settings["block_size"]) == (2, 2, 64, 50257, 128)
    ckpt = checkpoints.load_checkpoint(str(tmp_path / "ft" / "model_00001.pt"))
    assert ckpt["config"] == {"block_size": 128, "vocab_size": 50257, "n_layer": 2, "n_head": 2, "n_embd": 64}
    capsys.readouterr()
    # a shape flag that disagrees with the pretrained model is a user error
    assert fine_tune(tmp_path / "bad", "--n_embd", "96") == 2
    assert "--n_embd 96, but --init_from" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
