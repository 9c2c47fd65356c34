"""gpu_check.py: its dry run (the same checks with a tiny model on the CPU) passes end to end, its command line
refuses what it cannot do in one line, and its verdicts fail on GPU-like output that misses a target."""
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from conftest import DATA, ROOT

import gpu_check

HELLASWAG = os.path.join(DATA, "hellaswag_val_cleaned.jsonl")
CHECKS = ("learning", "compile", "table", "ddp", "eval", "fp16")


def run(*args, timeout=120):
    return subprocess.run([sys.executable, os.path.join(ROOT, "gpu_check.py"), *args], cwd=ROOT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)


def test_dry_run_passes_every_check(tmp_path):
    assert os.path.isfile(HELLASWAG), f"{HELLASWAG} is missing: the tests need ../shared beside the project"
    out_file = tmp_path / "raw.txt"
    r = run("--dry_run", "--hellaswag_file", HELLASWAG, "--out", str(out_file), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    for name in CHECKS:
        assert any(line.startswith(f"PASS {name}: ") for line in lines), r.stdout
    assert not any(line.startswith("FAIL") for line in lines), r.stdout
    assert re.fullmatch(r"summary: 6 of 6 checks passed in \d+\.\d s", lines[-1]), r.stdout
    # the raw output holds every command with its output and exit status, and the verdicts
    raw = out_file.read_text()
    assert "$ python train_gpt2.py --device cpu" in raw
    assert "$ torchrun --standalone --nproc_per_node=1 train_gpt2.py" in raw
    assert "ddp: 1 processes, backend gloo" in raw
    assert raw.count("$ python bench.py") == 2
    assert raw.count("[exit status 0, ") >= 8
    assert lines[-1] in raw


def test_without_cuda_one_line_error_or_help():
    if not torch.cuda.is_available():
        r = run()
        assert r.returncode == 2
        assert r.stdout == ""
        assert r.stderr == "error: no CUDA GPU here; use --dry_run to check the script on the CPU\n"
    else:  # a GPU machine runs the real checks; here only what the command line offers
        r = run("--help")
        assert r.returncode == 0, r.stderr
        for flag in ("--dry_run", "--only", "--hellaswag_file", "--out", *CHECKS):
            assert flag in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--dry_run", "--only", "nosuch"], "argument --only: invalid choice: 'nosuch'"),
    (["--dry_run", "--only", "eval", "--hellaswag_file", "no/such/file.jsonl"],
     "--hellaswag_file no/such/file.jsonl does not exist"),
    (["--dry_run", "--only", "learning", "--out", "no/such/folder/out.txt"], "--out no/such/folder/out.txt"),
])
def test_mistakes_are_one_line_errors(args, message):
    r = run(*args)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr


# -----------------------------------------------------------------------------
# The verdicts on output as a GPU run prints it (the dry run never reaches the GPU thresholds)


def step_line(step, loss, mfu="41.2%", ms=349.82, norm=1.3898):
    """A step line in train_gpt2.py's format."""
    return (f"step {step:5d} | loss: {loss:.6f} | lr 1.7546e-03 | norm: {norm:.4f} | dt: {ms:.2f}ms | "
            f"tok/sec: 2927.00 | mfu: {mfu}")


def learning_run(last_loss=6.05, mfu="41.2%", steps=50):
    losses = [10.95 - (10.95 - last_loss) * s / (steps - 1) for s in range(steps)]
    output = "\n".join(["dtype: bfloat16 autocast (this GPU supports bf16)"] +
                       [step_line(s, x, mfu) for s, x in enumerate(losses)])
    log = "\n".join(f"{s} train {x:.6f}" for s, x in enumerate(losses))
    return output, log


def test_learning_verdict():
    v = gpu_check.judge_learning(*learning_run(), steps=50, dry=False)
    assert v.ok, v
    assert "loss 10.9500 at step 0 -> 6.0500 at step 49" in v.numbers and "median MFU 41.2%" in v.numbers
    assert not gpu_check.judge_learning(*learning_run(last_loss=7.2), steps=50, dry=False).ok
    assert not gpu_check.judge_learning(*learning_run(mfu="-"), steps=50, dry=False).ok  # an unknown GPU
    output, log = learning_run()
    assert not gpu_check.judge_learning(output.replace("dtype: bfloat16", "dtype: float32"), log, steps=50,
                                        dry=False).ok
    output, log = learning_run()
    assert not gpu_check.judge_learning(output.rsplit("\n", 1)[0], log, steps=50, dry=False).ok  # step 49 missing
    assert not gpu_check.judge_learning(output, log.replace("49 train", "48 trian"), steps=50, dry=False).ok
    assert gpu_check.judge_learning(*learning_run(mfu="-", last_loss=10.5, steps=10), steps=10, dry=True).ok
    assert not gpu_check.judge_learning(*learning_run(last_loss=10.95, steps=10), steps=10, dry=True).ok
    # a GPU without bf16: the run must use float16, which train_gpt2.py picks there
    output, log = learning_run()
    fp16 = output.replace("dtype: bfloat16 autocast", "dtype: float16 autocast with a gradient scaler")
    assert gpu_check.judge_learning(fp16, log, steps=50, dry=False, dtype="float16").ok
    assert not gpu_check.judge_learning(output, log, steps=50, dry=False, dtype="float16").ok


def fp16_runs(steps=20, skipped=2, resumed_shift=0.0, last_loss=9.0):
    losses = [10.95 - (10.95 - last_loss) * s / (steps - 1) for s in range(steps)]
    output = "\n".join(["dtype: float16 (--dtype)"] + [
        step_line(s, x) + (" | skipped: fp16 gradients overflowed, loss scale now 32768" if s < skipped else "")
        for s, x in enumerate(losses)])
    straight = "\n".join(f"{s} train {x:.6f}" for s, x in enumerate(losses))
    resumed = "\n".join(f"{s} train {x + resumed_shift:.6f}" for s, x in enumerate(losses) if s >= steps // 2)
    return output, straight, resumed


def test_fp16_verdict():
    v = gpu_check.judge_fp16(*fp16_runs(), steps=20, atol=1e-3)
    assert v.ok and "2 step(s) skipped by the scaler" in v.numbers and "max |diff| 0.0e+00" in v.numbers, v
    assert not gpu_check.judge_fp16(*fp16_runs(resumed_shift=0.01), steps=20, atol=1e-3).ok  # resume not exact
    assert not gpu_check.judge_fp16(*fp16_runs(skipped=15), steps=20, atol=1e-3).ok  # the scaler keeps skipping
    assert not gpu_check.judge_fp16(*fp16_runs(last_loss=11.0), steps=20, atol=1e-3).ok  # no learning
    output, straight, resumed = fp16_runs()
    assert not gpu_check.judge_fp16(output.replace("float16", "bfloat16"), straight, resumed, 20, 1e-3).ok
    assert not gpu_check.judge_fp16(output, straight, resumed.rsplit("\n", 1)[0], 20, 1e-3).ok  # a step missing


def test_compile_verdict():
    assert gpu_check.judge_compile(step_line(0, 10.9512), step_line(0, 10.9433)).ok
    v = gpu_check.judge_compile(step_line(0, 10.9512), step_line(0, 10.9212))
    assert not v.ok and "|diff| 0.030000" in v.numbers
    assert not gpu_check.judge_compile(step_line(0, float("nan")), step_line(0, 10.9)).ok
    assert not gpu_check.judge_compile("Traceback ...", step_line(0, 10.9)).ok


TABLE_HEADER = f"{'configuration':<44} {'B':>4} {'ms/step':>10} {'tokens/s':>12} {'MFU':>7} {'peak mem':>13}"


def table(*rows):
    """bench.py's table: rows of (B, ms, MFU) or (B, error)."""
    lines = ["device: NVIDIA H100 80GB HBM3 (79 GiB)", TABLE_HEADER]
    for row in rows:
        if len(row) == 2:
            lines.append(f"{'train_gpt2.py':<44} {row[0]:>4} {row[1]}")
        else:
            B, ms, mfu = row
            lines.append(f"{'train_gpt2.py':<44} {B:>4} {ms:>10.1f} {B * 1024 / ms * 1000:>12,.0f} {mfu:>7} "
                         f"{0.9 * B:>9.2f} GiB")
    return "\n".join(lines)


def test_table_verdict():
    good = table((16, 40.1, "43.0%"), (32, 70.2, "52.0%"), (64, 139.0, "51.0%"))
    v = gpu_check.judge_table({"lecture's loss": good, "chunked loss": good}, [16, 32, 64], dry=False)
    assert v.ok, v
    assert "best B=32 MFU 52.0% 70.2 ms/step" in v.numbers
    slow = table((16, 60.0, "30.0%"), (32, 110.0, "33.0%"), (64, 220.0, "33.5%"))
    assert not gpu_check.judge_table({"lecture's loss": slow, "chunked loss": slow}, [16, 32, 64], dry=False).ok
    oom = table((16, 40.1, "43.0%"), (32, 70.2, "52.0%"), (64, "out of memory"))
    v = gpu_check.judge_table({"lecture's loss": good, "chunked loss": oom}, [16, 32, 64], dry=False)
    assert not v.ok and "B=64 out of memory" in v.why
    missing = table((16, 40.1, "43.0%"), (32, 70.2, "52.0%"))
    assert not gpu_check.judge_table({"lecture's loss": missing}, [16, 32, 64], dry=False).ok
    unknown_gpu = table((16, 40.1, "-"), (32, 70.2, "-"), (64, 139.0, "-"))
    assert not gpu_check.judge_table({"lecture's loss": unknown_gpu}, [16, 32, 64], dry=False).ok
    assert gpu_check.judge_table({"lecture's loss": slow}, [16, 32, 64], dry=True).ok  # no MFU target on a CPU


def test_ddp_verdict():
    losses = [10.95, 10.41, 9.87, 9.52, 9.20]
    log = "\n".join(f"{s} train {x:.6f}" for s, x in enumerate(losses))
    nccl = "ddp: 1 processes, backend nccl\nstep ..."
    assert gpu_check.judge_ddp("step ...", log, nccl, log, 5, "nccl").ok
    off = log.replace("9.200000", "9.200020")
    v = gpu_check.judge_ddp("step ...", log, nccl, off, 5, "nccl")
    assert not v.ok and "from step 4" in v.why and "max |diff| 2.0e-05 (step 4)" in v.numbers
    assert gpu_check.judge_ddp("step ...", log, nccl, log.replace("9.200000", "9.200008"), 5, "nccl").ok
    assert not gpu_check.judge_ddp("step ...", log, "ddp: 1 processes, backend gloo", log, 5, "nccl").ok
    assert not gpu_check.judge_ddp(nccl, log, nccl, log, 5, "nccl").ok  # plain python must not run DDP
    assert not gpu_check.judge_ddp("step ...", log, nccl, log.rsplit("\n", 1)[0], 5, "nccl").ok


def eval_output(val=10.9617, acc=0.2550):
    lines = ["data: input.txt: 304,222 train tokens in 1 shard(s), 33,803 val tokens; val loss over 2 micro-batches "
             "(32,768 tokens)", "hellaswag: 200 val examples every 1 steps",
             f"validation loss: {val:.4f}", f"HellaSwag accuracy: {acc:.4f}", step_line(0, 10.95),
             f"validation loss: {val - 0.1:.4f}", f"HellaSwag accuracy: {acc:.4f}", "done: 1 steps in 9.0s"]
    times = [1.0, 1.1, 3.0, 6.0, 7.0, 7.5, 9.5, 9.6]
    return "\n".join(lines), list(zip(times, lines))


def test_eval_verdict():
    v = gpu_check.judge_eval(*eval_output(), wall=20.0, examples=200, dry=False)
    assert v.ok, v
    assert "validation loss 10.9617 over 32,768 tokens in 0.5 s" in v.numbers
    assert "HellaSwag acc_norm 0.2550 over 200 examples in 2.0 s" in v.numbers
    assert not gpu_check.judge_eval(*eval_output(acc=0.45), wall=20.0, examples=200, dry=False).ok
    assert not gpu_check.judge_eval(*eval_output(val=3.5), wall=20.0, examples=200, dry=False).ok
    assert not gpu_check.judge_eval(*eval_output(), wall=20.0, examples=100, dry=False).ok
    assert gpu_check.judge_eval(*eval_output(acc=0.45), wall=20.0, examples=200, dry=True).ok


def test_a_hanging_command_is_stopped_with_its_children():
    """A command that hangs (here a process waiting on a child that sleeps, as torchrun waits on its workers) is
    stopped at its timeout, children included, and the check fails with that reason instead of hanging."""
    runner = gpu_check.Runner()
    hang = "import subprocess, sys; print('started', flush=True); " \
           "subprocess.run([sys.executable, '-c', 'import time; time.sleep(120)'])"
    t0 = time.monotonic()
    result = runner.run([sys.executable, "-c", hang], timeout=3)
    assert result.timed_out and result.output == "started"
    assert time.monotonic() - t0 < 30  # SIGTERM stops both at once; SIGKILL would follow 10 s later
    with pytest.raises(gpu_check.CheckFailed, match="timed out"):
        gpu_check.require_success(result, "python -c")
    failed = runner.run([sys.executable, "-c", "import sys; print('error: no such thing'); sys.exit(2)"], timeout=30)
    with pytest.raises(gpu_check.CheckFailed) as e:
        gpu_check.require_success(failed, "python -c")
    assert e.value.why == "error: no such thing" and "exit status 2" in e.value.numbers
