"""Faults survived, simulated on the CPU with gloo: a worker killed mid-run restarts and continues exactly, a
stopped peer ends every process after --dist_timeout, SIGTERM saves a checkpoint, a save that fails stops every
process with one line, log.txt holds each step once, two runs cannot share a --log_dir, a diverged run keeps
finite weights only, and the campaign of bad input ends in one line with nothing half-written."""
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from conftest import DATA, ROOT
import checkpoints
import train_gpt2
from test_checkpoint import RUN, log_lines
from test_multinode import launch_nodes_async
from test_train import read_log

SCRIPT = os.path.join(ROOT, "train_gpt2.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
TWO = ["--data", os.path.join(DATA, "input.txt"), *RUN, "--eval_every", "4", "--checkpoint_every", "2"]


def torchrun(*args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def children(pid):
    """The processes whose parent is pid (torchrun's workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return sorted(found)


def wait_for_line(proc, prefix, timeout=120):
    """Read proc's output until a line starts with prefix; return all lines read. A process that prints nothing
    for `timeout` seconds (a hang) is stopped, with the processes it started, and the test fails."""
    found, lines = threading.Event(), []

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(prefix):
                found.set()
                return
        found.set()  # the output ended

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(timeout):
        for pid in children(proc.pid) + [proc.pid]:
            os.kill(pid, signal.SIGKILL)
        pytest.fail(f"no line starting with {prefix!r} within {timeout} s:\n{''.join(lines)[-3000:]}")
    assert lines and lines[-1].startswith(prefix), "".join(lines)[-3000:]
    return lines


def assert_same_log(got, expected):
    assert sorted(got) == sorted(expected), (sorted(got), sorted(expected))
    for key in got:
        assert abs(got[key] - expected[key]) < 1e-5, (key, got[key], expected[key])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The 2-process run that never failed: 12 steps, checkpoints every 2, validation every 4."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    out = subprocess.run(torchrun(SCRIPT, *TWO, "--max_steps", "12", "--log_dir", "log"), cwd=folder, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return read_log(folder / "log" / "log.txt")


# --- a worker killed mid-run: torchrun restarts the group, which continues from the newest checkpoint ---------------

def test_a_killed_worker_restarts_and_the_run_ends_as_if_it_never_failed(tmp_path, uninterrupted):
    rng = random.Random(0)
    for attempt, victim in enumerate((0, 1)):  # rank 0's worker, then rank 1's; each at a random step
        kill_step = rng.randint(3, 8)  # of 12: the run cannot end before the kill
        proc = subprocess.Popen(torchrun("--max-restarts=1", SCRIPT, *TWO, "--max_steps", "12", "--resume", "auto",
                                         "--log_dir", f"log{attempt}"), cwd=tmp_path, env=ENV, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_for_line(proc, f"step {kill_step:5d}")
        os.kill(children(proc.pid)[victim], signal.SIGKILL)  # no warning, no cleanup: as the OOM killer does
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
        assert "resumed from step" in out, out[-3000:]
        # each step's lines once, with the values of the run that never failed
        assert_same_log(read_log(tmp_path / f"log{attempt}" / "log.txt"), uninterrupted)


def test_resume_drops_the_lines_written_after_the_checkpoint(tmp_path, shakespeare):
    full = tmp_path / "full"
    assert train_gpt2.main(["--data", shakespeare, *RUN, "--max_steps", "6", "--eval_every", "2",
                            "--checkpoint_every", "2", "--log_dir", str(full)]) == 0
    crashed = tmp_path / "crashed"  # as if killed during step 5: after the step-4 checkpoint, with a torn last line
    crashed.mkdir()
    for name in ("model_00002.pt", "model_00004.pt"):
        (crashed / name).write_bytes((full / name).read_bytes())
    lines = log_lines(full)
    torn = [l for l in lines if int(l.split()[0]) <= 5][:-1] + ["5 tr"]
    (crashed / "log.txt").write_text("\n".join(torn) + "\n")
    assert train_gpt2.main(["--data", shakespeare, *RUN, "--max_steps", "6", "--eval_every", "2",
                            "--checkpoint_every", "2", "--log_dir", str(crashed), "--resume", "auto"]) == 0
    assert log_lines(crashed) == lines  # each line once: the step-4 evaluations kept, step 4's training redone


# --- a peer that stops answering -------------------------------------------------------------------------------------

def test_a_stopped_peer_ends_every_process_after_the_dist_timeout(tmp_path):
    args = ["--data", "input.txt", *RUN, "--max_steps", "500", "--eval_every", "0", "--checkpoint_every", "0",
            "--dist_timeout", "5"]
    procs = launch_nodes_async(tmp_path, args)
    wait_for_line(procs[0], "step     3")
    worker = children(procs[1].pid)[0]  # node 1's worker (the node that does not host the rendezvous)
    os.kill(worker, signal.SIGSTOP)
    t0 = time.time()
    try:
        out0, _ = procs[0].communicate(timeout=60)  # node 0: its worker, then its torchrun, end
        ended = time.time() - t0
    finally:
        os.kill(worker, signal.SIGKILL)  # node 1's torchrun would wait 30 s more for its stopped worker
        for p in procs:
            if p.poll() is None:
                p.communicate(timeout=60)
    assert ended < 30 and all(p.returncode != 0 for p in procs), ended  # the 5 s timeout, and the shutdown
    errors = [l for l in out0.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: another process stopped answering at step "), out0
    assert "no reply within --dist_timeout 5 s" in errors[0]
    # no traceback of the project's code (torchrun itself reports a failed worker with one of its own)
    assert 'train_gpt2.py", line' not in out0 and 'run_support.py", line' not in out0


def test_dist_timeout_is_printed_and_checked(tmp_path, shakespeare, capsys):
    assert train_gpt2.main(["--data", shakespeare, *RUN, "--max_steps", "1", "--warmup_steps", "1",
                            "--eval_every", "0", "--checkpoint_every", "0", "--log_dir", str(tmp_path / "a")]) == 0
    assert "--dist_timeout 600" in capsys.readouterr().out


# --- SIGTERM: what schedulers send before they preempt ---------------------------------------------------------------

@pytest.mark.parametrize("who", ["torchrun", "every process"])
def test_sigterm_saves_a_checkpoint_and_resume_auto_continues_exactly(tmp_path, uninterrupted, who):
    cmd = torchrun(SCRIPT, *TWO, "--max_steps", "12", "--resume", "auto", "--log_dir", "log")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for_line(proc, "step     4")
    # torchrun forwards SIGTERM to its workers; a scheduler that signals the whole job reaches each worker twice
    targets = [proc.pid] + (children(proc.pid) if who == "every process" else [])
    for pid in targets:
        os.kill(pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out[-3000:]  # torchrun's own status after a signal (the workers exit 143)
    assert "(SIGTERM): saving a checkpoint to resume from" in out, out[-3000:]
    stopped_at = checkpoints.load_checkpoint(checkpoints.list_checkpoints(str(tmp_path / "log"))[-1])["step"]
    assert 5 <= stopped_at < 12
    resumed = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_log(read_log(tmp_path / "log" / "log.txt"), uninterrupted)


# --- a save that fails -------------------------------------------------------------------------------------------------

FAILING_SAVE = """
import builtins, errno, sys
sys.path.insert(0, {root!r})
import checkpoints, train_gpt2


class FullDisk:  # a file on a disk with 100 KB left: a write past that fails, as the operating system's would
    def __init__(self, f):
        self.f = f
    def write(self, data):
        if self.f.tell() + len(data) > 100_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(data)
    def __getattr__(self, name):
        return getattr(self.f, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return self.f.__exit__(*exc)


saves = []
def open_on_a_full_disk(path, *args, **kwargs):  # the disk fills up before the second checkpoint
    f = builtins.open(path, *args, **kwargs)
    if str(path).endswith(".pt.tmp"):
        saves.append(path)
        if len(saves) == 2:
            return FullDisk(f)
    return f
checkpoints.open = open_on_a_full_disk
sys.exit(train_gpt2.main())
"""


def test_a_save_that_fails_stops_every_process_with_one_line(tmp_path):
    script = tmp_path / "failing_save.py"
    script.write_text(FAILING_SAVE.format(root=ROOT))
    t0 = time.time()
    out = subprocess.run(torchrun(str(script), *TWO, "--max_steps", "12", "--log_dir", "log"), cwd=tmp_path,
                         env=ENV, capture_output=True, text=True, timeout=120)
    assert time.time() - t0 < 60 and out.returncode != 0
    errors = [l for l in (out.stdout + out.stderr).splitlines() if l.startswith("error: ")]
    assert len(errors) == 1, out.stderr[-3000:]  # the two processes share it: their node prints it once
    assert errors[0].startswith("error: could not save checkpoint log/model_00004.pt (No space left on device)")
    assert "the newest checkpoint is log/model_00002.pt" in errors[0]
    # no traceback of the project's code (torchrun itself reports a failed worker with one of its own)
    assert 'train_gpt2.py", line' not in out.stderr and 'run_support.py", line' not in out.stderr
    assert sorted(n for n in os.listdir(tmp_path / "log") if n.startswith("model_")) == ["model_00002.pt"]
    assert checkpoints.load_checkpoint(str(tmp_path / "log" / "model_00002.pt"))["step"] == 2


def test_a_save_into_a_folder_that_went_away(tmp_path, shakespeare, monkeypatch, capsys):
    real_save = checkpoints.save_checkpoint
    log_dir = tmp_path / "log"

    def save(path, state):
        if state["step"] == 4:
            for name in os.listdir(log_dir):
                os.remove(log_dir / name)
            os.rmdir(log_dir)
        return real_save(path, state)

    monkeypatch.setattr(checkpoints, "save_checkpoint", save)
    monkeypatch.setattr(train_gpt2.rs, "save_checkpoint", save)
    assert train_gpt2.main(["--data", shakespeare, *RUN, "--max_steps", "6", "--eval_every", "0",
                            "--checkpoint_every", "2", "--log_dir", str(log_dir)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not save checkpoint" in err[0] and "No such file or directory" in err[0], err


# --- two runs in one folder ------------------------------------------------------------------------------------------

def test_a_second_run_into_a_folder_in_use_stops_and_a_dead_runs_lock_does_not_block(tmp_path, shakespeare):
    cmd = [sys.executable, SCRIPT, "--data", shakespeare, *RUN, "--max_steps", "500", "--eval_every", "0",
           "--checkpoint_every", "2", "--resume", "auto", "--log_dir", "log"]
    first = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_line(first, "step     3")
        second = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        errors = second.stderr.strip().splitlines()
        assert len(errors) == 1 and errors[0].startswith("error: --log_dir log is in use by a run that is still "
                                                         f"going (pid {first.pid} on "), second.stderr
        fresh = subprocess.run(cmd[:-4] + ["--log_dir", "log"], cwd=tmp_path, env=ENV, capture_output=True,
                               text=True, timeout=120)  # without --resume auto: refused the same way
        assert fresh.returncode == 2 and "is in use by a run that is still going" in fresh.stderr
    finally:
        first.kill()  # SIGKILL: the lock file stays, but no process holds it any more
        first.wait()
    assert os.path.exists(tmp_path / "log" / ".lock")
    resumed = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        lines = wait_for_line(resumed, "step ")
        assert any(l.startswith("resumed from step") for l in lines), "".join(lines)
    finally:
        resumed.kill()
        resumed.wait()


# --- a diverged run keeps finite weights only -------------------------------------------------------------------------

def test_weights_that_are_not_finite_are_never_saved(tmp_path, shakespeare, monkeypatch, capsys):
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):  # the third update leaves NaN weights behind, with a finite loss before it
        result = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    assert train_gpt2.main(["--data", shakespeare, *RUN, "--max_steps", "6", "--eval_every", "0",
                            "--checkpoint_every", "1", "--log_dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: step 3: the weights are not finite, so they were not saved; stopping. Checkpoints hold "
                   f"finite weights only: the newest checkpoint is {tmp_path / 'model_00002.pt'}"], err
    assert [os.path.basename(p) for p in checkpoints.list_checkpoints(str(tmp_path))] == ["model_00001.pt",
                                                                                         "model_00002.pt"]


def test_the_divergence_message_names_the_checkpoint_it_keeps(tmp_path, shakespeare, capsys):
    # a learning rate 10^8 times too large: the loss explodes within a few steps
    code = train_gpt2.main(["--data", shakespeare, *RUN, "--max_steps", "20", "--max_lr", "6e4", "--eval_every",
                            "1", "--checkpoint_every", "1", "--log_dir", str(tmp_path)])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: step "), err
    kept = checkpoints.list_checkpoints(str(tmp_path))
    assert err[0].endswith(f"the newest checkpoint is {kept[-1]}" if kept else "no checkpoint was saved"), err
    for path in kept:  # whatever was kept holds finite weights
        ckpt = checkpoints.load_checkpoint(path)
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


# --- the campaign of bad input: one line, exit 2, nothing written ------------------------------------------------------

def bad_data(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Ça été un été très chaud, à Noël aussi.\n".encode("latin-1") * 200)
    binary = tmp_path / "binary.bin"
    binary.write_bytes(bytes(range(256)) * 40)
    wide = tmp_path / "wide_ids"  # shards written by something else, with ids up to 65535
    os.makedirs(wide)
    for split in ("train", "val"):
        np.save(wide / f"mine_{split}_000000.npy", (np.arange(5000) * 13 % 65536).astype(np.uint16))
    not_a_checkpoint = tmp_path / "random.pt"
    not_a_checkpoint.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(4096)))
    return {
        "latin1": (["--data", str(latin1)], "is not UTF-8 text (byte 0 is not UTF-8)"),
        "binary": (["--data", str(binary)], "is not UTF-8 text"),
        "vocab": (["--vocab_size", "1000"], "but the model's embedding has --vocab_size 1,000 rows"),
        "wide-ids": (["--data", str(wide)], "holds token id 64,987, but"),
        "seed": (["--seed", "-1"], "--seed must be a whole number from 0 to 2**32 - 1"),
        "block-size": (["--block_size", "1000000000"], "GiB for its weights, gradients and AdamW state, more than"),
        "warmup": (["--warmup_steps", "5"], "--warmup_steps 5 is more than --max_steps 3"),
        "max-lr-inf": (["--max_lr", "inf"], "--max_lr must be a finite number"),
        "weight-decay-nan": (["--weight_decay", "nan"], "--weight_decay must be a finite number"),
        "resume-random": (["--resume", str(not_a_checkpoint)], "not a file that torch.save writes"),
        "resume-text": (["--resume", os.path.join(ROOT, "input.txt")], "not a file that torch.save writes"),
        "resume-folder": (["--resume", str(tmp_path)], "is a folder, not a checkpoint file"),
        "dist-timeout": (["--dist_timeout", "0"], "--dist_timeout must be a positive number"),
    }


def test_bad_input_campaign_is_one_line_and_writes_nothing(tmp_path, shakespeare, capsys):
    log_dir = tmp_path / "log"
    for name, (args, message) in bad_data(tmp_path).items():
        argv = ["--data", shakespeare, *RUN, "--max_steps", "3", "--log_dir", str(log_dir), *args]
        code = train_gpt2.main(argv)
        out = capsys.readouterr()
        lines = out.err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], \
            (name, out.err)
        assert "weights_only" not in lines[0]  # never torch's advice to load a file as code
        assert not log_dir.exists(), name


def test_a_resume_names_the_setting_that_differs_and_checks_the_data_by_content(tmp_path, shakespeare, capsys):
    data = tmp_path / "data.txt"
    data.write_text(open(shakespeare).read())
    assert train_gpt2.main(["--data", str(data), *RUN, "--max_steps", "4", "--eval_every", "0", "--checkpoint_every",
                            "2", "--log_dir", str(tmp_path / "a")]) == 0
    ckpt = str(tmp_path / "a" / "model_00002.pt")
    # another --block_size: named, not a state_dict message
    assert train_gpt2.main(["--data", str(data), *RUN, "--block_size", "128", "--max_steps", "4",
                            "--log_dir", str(tmp_path / "b"), "--resume", ckpt]) == 2
    assert "--block_size is 128 but the checkpoint was trained with 64" in capsys.readouterr().err
    # the same file by a relative path: the same data
    os.chdir(tmp_path)
    assert train_gpt2.main(["--data", "data.txt", *RUN, "--max_steps", "4", "--eval_every", "0", "--log_dir",
                            str(tmp_path / "c"), "--resume", ckpt]) == 0
    capsys.readouterr()
    # the file edited in place: refused, even with --resume auto in the run's own folder
    with open(data, "a") as f:
        f.write("One more line of Shakespeare.\n")
    assert train_gpt2.main(["--data", str(data), *RUN, "--max_steps", "4", "--log_dir", str(tmp_path / "a"),
                            "--resume", "auto"]) == 2
    assert "is not the data the checkpoint was trained on" in capsys.readouterr().err


@pytest.mark.parametrize("script,args", [
    ("train_gpt2.py", ["--eval_ev", "1"]), ("fineweb.py", ["--shard", "10"]), ("hellaswag.py", ["--lim", "5"]),
    ("bench.py", ["--ladd"]), ("gpu_check.py", ["--dry"]),
])
def test_flags_must_be_spelled_out(script, args):
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: unrecognized arguments:"), out.stderr


# Ctrl-C during the setup, and twice during validation: a slow setup and a slow validation made by a wrapper
SLOW = """
import sys, time
sys.path.insert(0, {root!r})
import run_support, train_gpt2
real_examples, real_forward = run_support.load_hellaswag_examples, train_gpt2.GPT.forward
def slow_setup(s):
    print("setting up", flush=True)
    time.sleep({setup_sleep})
    return real_examples(s)
def slow_validation(self, idx, targets=None):
    if not self.training:
        print("validating", flush=True)
        time.sleep(0.5)
    return real_forward(self, idx, targets)
run_support.load_hellaswag_examples = slow_setup
train_gpt2.GPT.forward = slow_validation
sys.exit(train_gpt2.main())
"""


@pytest.mark.parametrize("when,signals,expected", [("setting up", 1, "during the setup"),
                                                   ("validating", 2, "at step 0")])
def test_ctrl_c_is_one_line(tmp_path, shakespeare, when, signals, expected):
    script = tmp_path / "slow.py"
    script.write_text(SLOW.format(root=ROOT, setup_sleep=30 if when == "setting up" else 0))
    proc = subprocess.Popen([sys.executable, str(script), "--data", shakespeare, *RUN, "--max_steps", "3",
                             "--eval_every", "1", "--log_dir", "log"], cwd=tmp_path, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_line(proc, when)
    for _ in range(signals):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: interrupted {expected} (Ctrl-C)"), err


def test_sample_from_an_empty_prompt_and_from_endoftext(tmp_path, capsys):
    model = train_gpt2.GPT(train_gpt2.GPTConfig(block_size=64, vocab_size=50304, n_layer=1, n_head=2, n_embd=32))
    path = str(tmp_path / "model_00001.pt")
    checkpoints.save_checkpoint(path, {"model": model.state_dict(), "config": dict(block_size=64, vocab_size=50304,
                                                                                     n_layer=1, n_head=2, n_embd=32)})
    for prompt in ("", "<|endoftext|>"):
        assert train_gpt2.main(["--sample", path, "--prompt", prompt, "--num_samples", "2", "--max_new_tokens", "5",
                                "--device", "cpu"]) == 0
        samples = [l for l in capsys.readouterr().out.splitlines() if l.startswith("sample ")]
        assert len(samples) == 2 and all(s.startswith("sample 0: <|endoftext|>") or s.startswith("sample 1: <|endo")
                                         for s in samples), samples


@pytest.mark.parametrize("where", ["a file", "under a file", "unwritable"])
def test_export_into_a_place_it_cannot_write_is_one_line(tmp_path, capsys, where):
    model = train_gpt2.GPT(train_gpt2.GPTConfig(block_size=64, vocab_size=50304, n_layer=1, n_head=2, n_embd=32))
    path = str(tmp_path / "model_00001.pt")
    checkpoints.save_checkpoint(path, {"model": model.state_dict(), "config": dict(block_size=64, vocab_size=50304,
                                                                                     n_layer=1, n_head=2, n_embd=32)})
    (tmp_path / "afile").write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    # root writes into a read-only folder: /proc refuses even root
    unwritable = locked / "hf" if not os.access(locked, os.W_OK) else "/proc/hf_export"
    out = {"a file": tmp_path / "afile", "under a file": tmp_path / "afile" / "hf", "unwritable": unwritable}[where]
    try:
        assert train_gpt2.main(["--export_hf", path, str(out)]) == 2
    finally:
        os.chmod(locked, 0o700)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    assert not os.path.exists(str(out) + ".tmp")
