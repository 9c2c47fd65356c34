"""Several processes and several nodes, simulated on one CPU: rank 0 decides and every process follows, any number of
processes can share the batch, and two `torchrun` launches as two nodes (each in its own working directory, so
nothing on disk is shared unless copied) train exactly like one process."""
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from common import UserError
from conftest import ROOT
import run_support
import train_gpt2
from test_train import read_log

TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "64", "--device", "cpu",
        "--batch_size", "2", "--seq_len", "32", "--total_batch_size", "256", "--warmup_steps", "2",
        "--val_tokens", "640", "--sample_every", "0", "--hellaswag_every", "0"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readme_multinode_command():
    """The README's several-nodes command, word for word (a test of the README as much as of the code)."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    line = next(l for l in readme.splitlines() if l.startswith("torchrun --nnodes=2"))
    return line.split("#")[0].split()


def run_nodes(tmp_path, args, timeout=240):
    outputs = []
    procs = launch_nodes_async(tmp_path, args)
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        outputs.append((p.returncode, out))
    return outputs


def launch_nodes_async(tmp_path, args):
    """The README's command on two 'nodes': two torchrun launches on this machine, one working directory each
    (node0/, node1/, each with its own copy of input.txt unless the test put something there), with
    --nproc_per_node=1 instead of 8 and the local address. c10d numbers the nodes in the order their launchers
    started (it sorts them by host, then process id), so node 0 is started first."""
    port = free_port()
    command = readme_multinode_command()
    assert command[:2] == ["torchrun", "--nnodes=2"] and command[-1] == "train_gpt2.py", command
    command = [a.replace("HOST:29500", f"127.0.0.1:{port}").replace("--nproc_per_node=8", "--nproc_per_node=1")
               for a in command[1:-1]]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = []
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir(exist_ok=True)
        if not (cwd / "input.txt").exists():
            shutil.copy(os.path.join(ROOT, "input.txt"), cwd / "input.txt")
        cmd = [sys.executable, "-m", "torch.distributed.run", *command, f"--node_rank={node}",
               os.path.join(ROOT, "train_gpt2.py"), *args]
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
        time.sleep(1.0)  # node 0's launcher first: it gets the lower process id, so c10d makes it node 0
    return procs


def run_one_process(tmp_path, args):
    cwd = tmp_path / "single"
    cwd.mkdir(exist_ok=True)
    shutil.copy(os.path.join(ROOT, "input.txt"), cwd / "input.txt")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "train_gpt2.py"), *args], cwd=cwd, capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    return cwd


def assert_same_log(got, expected):
    assert set(got) == set(expected), (sorted(got), sorted(expected))
    for key in got:
        assert abs(got[key] - expected[key]) < 1e-5, (key, got[key], expected[key])


def test_two_nodes_log_the_same_losses_as_one_process(tmp_path):
    args = ["--data", "input.txt", *TINY, "--max_steps", "4", "--eval_every", "2", "--checkpoint_every", "0"]
    single = run_one_process(tmp_path, args)
    (code0, out0), (code1, out1) = run_nodes(tmp_path, args)
    assert code0 == 0 and code1 == 0, (out0[-2000:], out1[-2000:])
    assert "ddp: 2 processes, backend gloo" in out0
    assert not (tmp_path / "node1" / "log").exists()  # only rank 0 writes
    expected = read_log(single / "log" / "log.txt")
    assert len(expected) == 4 + 3  # train 0-3, val 0, 2, 4
    assert_same_log(read_log(tmp_path / "node0" / "log" / "log.txt"), expected)


def test_resume_on_two_nodes_needs_the_checkpoint_on_both(tmp_path):
    args = ["--data", "input.txt", *TINY, "--max_steps", "6", "--eval_every", "3", "--checkpoint_every", "3",
            "--resume", "auto"]
    single = run_one_process(tmp_path, args)
    ckpt = single / "log" / "model_00003.pt"
    (tmp_path / "node0" / "log").mkdir(parents=True)
    shutil.copy(ckpt, tmp_path / "node0" / "log")
    # only node 0 holds it (no shared filesystem): both nodes stop at once with the same line, and nothing is written
    t0 = time.time()
    results = run_nodes(tmp_path, args, timeout=120)
    assert time.time() - t0 < 90
    line = "error: node 1 ("
    for code, out in results:
        assert code != 0, out[-2000:]
        errors = [l for l in out.splitlines() if l.startswith("error: ")]
        assert len(errors) == 1 and errors[0].startswith(line), out[-3000:]
        assert "checkpoint log/model_00003.pt does not exist" in errors[0]
    assert sorted(os.listdir(tmp_path / "node0" / "log")) == ["model_00003.pt"]  # no log.txt, no config.json
    # with a copy on node 1 too, the run continues exactly where the single process was at step 3
    (tmp_path / "node1" / "log").mkdir()
    shutil.copy(ckpt, tmp_path / "node1" / "log")
    for code, out in run_nodes(tmp_path, args):
        assert code == 0, out[-2000:]
    got = read_log(tmp_path / "node0" / "log" / "log.txt")
    expected = {k: v for k, v in read_log(single / "log" / "log.txt").items() if k[0] >= 3 and k != (3, "val")}
    assert len(expected) == 4  # train 3, 4, 5 and val 6
    assert_same_log(got, expected)


def test_a_node_without_the_data_stops_every_node_with_one_line(tmp_path):
    # on node 1, input.txt is an empty folder (no shards): rank 0 chose a text file that node 1 cannot read
    (tmp_path / "node1" / "input.txt").mkdir(parents=True)
    args = ["--data", "input.txt", *TINY, "--max_steps", "2", "--eval_every", "0", "--checkpoint_every", "0"]
    t0 = time.time()
    results = run_nodes(tmp_path, args, timeout=120)
    assert time.time() - t0 < 90
    for code, out in results:
        assert code != 0
        errors = [l for l in out.splitlines() if l.startswith("error: ")]
        assert len(errors) == 1 and errors[0].startswith("error: node 1 ("), out[-3000:]
        assert "input.txt" in errors[0]


# --- any number of processes ----------------------------------------------------------------------------------------

def settings_for(world_size, tmp_path, *argv):
    """rank 0's settings for a GPU run on FineWeb-Edu shards with world_size processes (no process started)."""
    from test_train import write_shards

    write_shards(tmp_path, [100])
    args = run_support.build_parser(train_gpt2.GPT2_124M_FINEWEB).parse_args(["--data", str(tmp_path), *argv])
    reasons = []
    s, _ = run_support.decide_settings(args, train_gpt2.GPT2_124M_FINEWEB, "cuda", world_size, reasons)
    return s, reasons


@pytest.mark.parametrize("world_size,batch_size", [(1, 64), (2, 64), (8, 64), (16, 32), (64, 8), (512, 1)])
def test_the_lectures_batch_fits_any_power_of_two_gpus(tmp_path, world_size, batch_size):
    s, reasons = settings_for(world_size, tmp_path)
    assert s.total_batch_size == 2**19 and s.seq_len == 1024 and s.batch_size == batch_size
    assert s.total_batch_size % (s.batch_size * s.seq_len * world_size) == 0
    shrunk = [r for r in reasons if r.startswith("batch_size:")]
    assert bool(shrunk) == (batch_size != 64)
    if shrunk:
        assert f"batch_size: {batch_size} instead of the preset's 64" in shrunk[0]


def test_a_batch_no_micro_batch_can_split_names_one_that_works(tmp_path):
    with pytest.raises(UserError, match=r"must be divisible by seq_len x processes = 1024 x 3 = 3072.*"
                                                    r"--total_batch_size 525312 would fit"):
        settings_for(3, tmp_path)
    # a micro-batch the user chose is never changed behind their back: an error that says what would fit
    with pytest.raises(UserError, match="--batch_size 32 would fit"):
        settings_for(16, tmp_path, "--batch_size", "64")


def test_three_processes_read_the_same_tokens_as_one(tmp_path):
    """A real 3-process gloo run: the small preset's micro-batch of 8 x 128 shrinks to fit 3 processes (4 each), the
    single process's to 6; every step reads the same 1,536 tokens, so the losses agree."""
    args = ["--data", "input.txt", "--device", "cpu", "--n_layer", "2", "--n_head", "2", "--n_embd", "32",
            "--total_batch_size", "1536", "--max_steps", "3", "--eval_every", "3", "--val_tokens", "1536",
            "--sample_every", "0", "--checkpoint_every", "0"]
    single = run_one_process(tmp_path, args)
    cwd = tmp_path / "three"
    cwd.mkdir()
    shutil.copy(os.path.join(ROOT, "input.txt"), cwd / "input.txt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
           os.path.join(ROOT, "train_gpt2.py"), *args]
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "batch_size: 4 instead of the preset's 8" in out.stdout
    assert "gradient accumulation: 1 micro-steps per process (1536 / (4 x 128 x 3))" in out.stdout
    single_config = open(single / "log" / "config.json").read()
    assert '"grad_accum_steps": 2' in single_config  # one process: 6 x 128 x 2
    assert_same_log(read_log(cwd / "log" / "log.txt"), read_log(single / "log" / "log.txt"))


def test_an_error_all_processes_share_is_printed_once_per_node(tmp_path):
    """Two processes on one node, a checkpoint that does not exist: both stop, and the node prints one line."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train_gpt2.py"), "--data", os.path.join(ROOT, "input.txt"), *TINY, "--max_steps", "2",
           "--resume", "missing.pt"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode != 0
    errors = [l for l in (out.stdout + out.stderr).splitlines() if l.startswith("error: ")]
    assert errors == ["error: node 0 (%s, rank 0): checkpoint missing.pt does not exist" % socket.gethostname()], \
        out.stderr[-3000:]
