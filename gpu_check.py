"""
One-command acceptance check for a GPU machine: does train_gpt2.py learn, is it fast, and do compile, DDP and
the evaluations work, on one H100/H200-class GPU, offline, within 8 minutes (the target: not yet run on a GPU)?

  python gpu_check.py                                   # all six checks on the GPU
  python gpu_check.py --only learning table             # some of them
  python gpu_check.py --out docs/gpu_check_output.txt   # also keep the raw output of every command
  python gpu_check.py --dry_run                         # the same script with a tiny model on the CPU

It runs the project's own command lines (train_gpt2.py, bench.py, torchrun train_gpt2.py) as subprocesses and
reads their output, so it checks exactly what a user runs. Nothing is downloaded: the model starts from random
weights, the data is the committed input.txt (Tiny Shakespeare), the tokenizer is gpt2_tokenizer/, and HellaSwag
comes from a local file (--hellaswag_file).

  learning  the lecture's first learning check at full size: GPT-2 124M, 50 steps of 16 x 1024 tokens of Tiny
            Shakespeare, bf16 autocast + torch.compile; the loss goes from ~10.9 (random weights) to below 7,
            and every step reports its MFU
  compile   the step-0 loss with torch.compile and without agree within bf16's rounding
  table     bench.py's table (B = 16, 32, 64 at T=1024) with the lecture's loss and with the chunked loss: every
            batch size runs, and the best reaches 50% MFU
  ddp       torchrun with one process (NCCL) logs the same losses as plain python
  eval      validation loss and HellaSwag (200 examples) of the random model, and how long each takes
  fp16      the path of GPUs without bf16 (T4, V100), on any GPU: --dtype float16 with its gradient scaler learns,
            and a run resumed from its checkpoint logs the same losses (the scaler's state included)

Each check prints one line, 'PASS name: numbers' or 'FAIL name: numbers (why)', then a summary; the exit status
is 0 if every check passed, 1 if one failed, 2 for a mistake on the command line. docs/gpu_check.md explains
each check and how to read a FAIL.
"""

import argparse
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import namedtuple

import torch

from common import ArgumentParser, UserError, report_user_errors

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKS = ("learning", "compile", "table", "ddp", "eval", "fp16")
DEFAULT_HELLASWAG = [os.path.join(HERE, "..", "shared", "data", "hellaswag_val_cleaned.jsonl"),
                     os.path.join(HERE, "hellaswag_data", "hellaswag_val.jsonl")]

# -----------------------------------------------------------------------------
# 1. What each mode runs
#
# The GPU mode is GPT-2 124M at the lecture's shapes. The dry run is a tiny model on the CPU that goes through
# the same commands and the same parsing in 1-2 minutes on a 2-core CPU, so that the script itself is tested
# where there is no GPU; its thresholds only ask that every step ran and printed its numbers.


NO_EVALUATION = ("--eval_every", "0", "--hellaswag_every", "0")


class Mode:
    def __init__(self, dry):
        self.dry = dry
        self.device = "cpu" if dry else "cuda"
        self.backend = "gloo" if dry else "nccl"  # what torch.distributed uses on the device (train_gpt2.py)
        if dry:
            self.model = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--vocab_size", "50304"]
            self.B, self.T = 2, 32
            self.learning_steps, self.max_lr, self.warmup = 10, 3e-3, 2  # a tiny model learns visibly at 3e-3
            self.bench_batch_sizes = [2, 4]
            self.bench_extra = ["--warmup", "1", "--steps", "2"]
            self.hellaswag_examples = 20
            # torch.compile is not exercised: compiling even the 2-layer model took 77 s on a 2-core CPU (with
            # other jobs running), most of the time a dry run may take
            self.compile = "--no-compile"
            self.timeouts = dict(learning=300, compile=300, table=300, ddp=300, eval=300, fp16=300)
            self.fp16_steps = 6
        else:
            self.model = ["--n_layer", "12", "--n_head", "12", "--n_embd", "768", "--vocab_size", "50304"]
            self.B, self.T = 16, 1024
            self.learning_steps, self.max_lr, self.warmup = 50, 6e-4, 10  # the lecture's first learning check
            self.bench_batch_sizes = [16, 32, 64]
            self.bench_extra = []  # bench.py's GPU defaults: 5 warm-up steps, median of 20
            self.hellaswag_examples = 200
            self.compile = "--compile"
            # generous: a hang becomes a FAIL with its reason, not a check that never ends
            self.timeouts = dict(learning=420, compile=300, table=420, ddp=300, eval=300, fp16=300)
            self.fp16_steps = 20
        self.val_tokens = 20 * self.B * self.T  # 20 micro-batches, as the lecture's validation (capped at the split)

    def train_args(self, log_dir, max_steps, compile_flag=None, evaluation=NO_EVALUATION, extra=()):
        """A train_gpt2.py command line with every setting that matters given, so that no preset decides it."""
        return ["train_gpt2.py", "--device", self.device, "--data", "input.txt", *self.model,
                "--batch_size", str(self.B), "--seq_len", str(self.T), "--total_batch_size", str(self.B * self.T),
                "--max_steps", str(max_steps), "--warmup_steps", str(min(self.warmup, max_steps)), "--max_lr", str(self.max_lr),
                "--seed", "1337", compile_flag or self.compile, "--no-chunked_loss", *evaluation,
                "--sample_every", "0", "--checkpoint_every", "0", "--log_dir", log_dir, *extra]


# -----------------------------------------------------------------------------
# 2. Running a command: its output line by line with the time each line arrived, a timeout, a log


Result = namedtuple("Result", "argv rc output lines wall timed_out")  # lines: [(seconds since start, text)]


class Runner:
    def __init__(self, out_file=None):
        self.out = out_file
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")  # lines arrive when printed: their times mean something
        self.python = sys.executable
        self.torchrun = self.find_torchrun()

    def find_torchrun(self):
        """The torchrun beside this Python (a virtual environment's), else the one on PATH, else its module."""
        beside = os.path.join(os.path.dirname(sys.executable), "torchrun")
        if os.path.isfile(beside) and os.access(beside, os.X_OK):
            return [beside]
        found = shutil.which("torchrun")
        return [found] if found else [sys.executable, "-m", "torch.distributed.run"]

    def display(self, argv):
        """The command as a user would type it (python, torchrun) for the raw output."""
        names = {self.python: "python", (self.torchrun[0] if len(self.torchrun) == 1 else None): "torchrun"}
        return shlex.join(names.get(a, a) for a in argv)

    def log(self, text):
        if self.out is not None:
            self.out.write(text)
            self.out.flush()

    def run(self, argv, timeout):
        self.log(f"\n$ {self.display(argv)}\n")
        start = time.monotonic()
        # its own process group: on a timeout, torchrun and its workers are stopped together
        proc = subprocess.Popen(argv, cwd=HERE, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", bufsize=1, start_new_session=True)
        lines = []

        def read():
            for line in proc.stdout:
                lines.append((time.monotonic() - start, line.rstrip("\n")))
                self.log(line)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
            stop_leftovers(proc)
        except subprocess.TimeoutExpired:
            timed_out = True
            stop_group(proc)
        except BaseException:  # Ctrl-C: leave nothing running
            stop_group(proc)
            raise
        wall = time.monotonic() - start
        reader.join(timeout=10)
        self.log(f"[exit status {proc.returncode}{', timed out' if timed_out else ''}, {wall:.1f} s]\n")
        return Result(argv, proc.returncode, "\n".join(t for _, t in lines), list(lines), wall, timed_out)

    def python_cmd(self, args, timeout):
        return self.run([self.python, *args], timeout)

    def torchrun_cmd(self, args, timeout):
        return self.run([*self.torchrun, "--standalone", "--nproc_per_node=1", *args], timeout)


def stop_group(proc):
    """SIGTERM to the command's process group (train_gpt2.py then finishes its step and exits), SIGKILL 10 s later."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError, AttributeError):
            if sig == signal.SIGKILL:
                proc.kill()
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def stop_leftovers(proc):
    """After the command exited: anything it started and left running in its process group (a worker that
    outlived it) is stopped, so it neither holds the GPU for the next command nor keeps the output pipe open."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, AttributeError):
        pass  # the usual case: nothing left


class CheckFailed(Exception):
    """A check cannot go on (a command failed, or its output lacks what the check reads): FAIL with this reason."""

    def __init__(self, numbers, why):
        super().__init__(why)
        self.numbers, self.why = numbers, why


def require_success(result, what):
    """Stop the check unless the command exited with status 0: the numbers name the command, the reason is its
    last line of output (the error, or the end of a traceback)."""
    if result.timed_out:
        raise CheckFailed(f"{what}: stopped after {result.wall:.0f} s", "timed out: a hang, or far slower than "
                                                                           "expected; --out shows how far it got")
    if result.rc != 0:
        last = next((t for _, t in reversed(result.lines) if t.strip()), "no output")
        raise CheckFailed(f"{what}: exit status {result.rc} after {result.wall:.1f} s", last.strip())


def read_text(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


# -----------------------------------------------------------------------------
# 3. Reading the output (pure functions of the text: tests/test_gpu_check.py feeds them GPU-like output)

Verdict = namedtuple("Verdict", "ok numbers why")

STEP_LINE = re.compile(r"^step\s+(?P<step>\d+) \| loss: (?P<loss>\S+) \| lr \S+ \| norm: (?P<norm>\S+) \| "
                       r"dt: (?P<ms>[\d.]+)ms \| tok/sec: \S+(?: \| mfu: (?P<mfu>\S+))?\s*$", re.M)
TABLE_ROW = re.compile(r"^(?P<label>.*?)\s+(?P<B>\d+)\s+(?P<ms>\d+(?:\.\d+)?)\s+(?P<tokens>[\d,]+)\s+"
                       r"(?P<mfu>\d+(?:\.\d+)?%|-)\s+(?P<memory>\d+(?:\.\d+)?) GiB\s*$")
TABLE_ERROR_ROW = re.compile(r"^(?P<label>.*?)\s+(?P<B>\d+)\s+(?P<error>(?:out of memory|skipped|error)\b.*)$")


def step_lines(output):
    """{step: dict(loss, norm, ms, mfu)} from train_gpt2.py's step lines; mfu is a percentage, '-' or None."""
    steps = {}
    for m in STEP_LINE.finditer(output):
        steps[int(m["step"])] = dict(loss=float(m["loss"]), norm=float(m["norm"]), ms=float(m["ms"]), mfu=m["mfu"])
    return steps


def log_losses(log_text):
    """{step: loss} from the 'N train LOSS' lines of log.txt."""
    losses = {}
    for line in log_text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == "train":
            losses[int(parts[0])] = float(parts[2])
    return losses


def percent(mfu):
    return float(mfu.rstrip("%")) if mfu and mfu.endswith("%") else None


def judge_learning(output, log_text, steps, dry, dtype="bfloat16"):
    """50 steps (dry: 10): the first loss is that of random weights, the last is below 7 (dry: below the first),
    every step printed its line with an MFU, log.txt holds the same losses, and the GPU run used the autocast
    dtype train_gpt2.py picks for it (bfloat16; float16 on a GPU without bf16)."""
    lines = step_lines(output)
    missing = [s for s in range(steps) if s not in lines]
    if missing:
        return Verdict(False, f"{len(lines)} of {steps} step lines", f"no line for step {missing[0]}")
    first, last = lines[0]["loss"], lines[steps - 1]["loss"]
    later = [lines[s] for s in range(min(10, steps // 2), steps)]  # after compilation and warm-up
    ms = statistics.median(x["ms"] for x in later)
    mfus = [percent(x["mfu"]) for x in later if percent(x["mfu"]) is not None]
    mfu = f"{statistics.median(mfus):.1f}%" if mfus else "-"
    span = f"steps {min(10, steps // 2)}-{steps - 1}"
    numbers = f"loss {first:.4f} at step 0 -> {last:.4f} at step {steps - 1}, median MFU {mfu} and " \
              f"{ms:.1f} ms/step ({span})"
    logged = log_losses(log_text)
    if any(not math.isfinite(x["loss"]) for x in lines.values()):
        return Verdict(False, numbers, "a loss is not finite")
    if any(abs(logged.get(s, math.inf) - lines[s]["loss"]) > 1e-6 for s in range(steps)):
        return Verdict(False, numbers, "log.txt does not hold the losses of the step lines")
    no_mfu = [s for s in range(steps) if lines[s]["mfu"] is None or (not dry and percent(lines[s]["mfu"]) is None)]
    if no_mfu:
        return Verdict(False, numbers, f"step {no_mfu[0]} printed no MFU (mfu '{lines[no_mfu[0]]['mfu']}'): "
                                       "is this GPU in run_support.GPU_PEAK_FLOPS?")
    if dry:
        if not last < first:
            return Verdict(False, numbers, "the loss did not fall")
        return Verdict(True, numbers, None)
    if not re.search(rf"^dtype: {dtype}", output, re.M):
        return Verdict(False, numbers, f"the run did not use {dtype} autocast (see its 'dtype:' line)")
    if not 10.5 <= first <= 11.3:
        return Verdict(False, numbers, "the step-0 loss of random weights should be about 10.9 (ln 50304 = 10.83 "
                                       "plus the spread of the initial logits), between 10.5 and 11.3")
    if not last < 7:
        return Verdict(False, numbers, f"the loss should be below 7 after {steps} steps")
    return Verdict(True, numbers, None)


def judge_compile(compiled_output, eager_output, dry=False):
    """The step-0 loss with and without torch.compile: the same weights and the same batch, so they may differ
    only by rounding. bf16 keeps 8 significant bits (a relative step of 2^-8 = 0.4%), and the compiled graph
    rounds at other places than eager PyTorch (a fused kernel keeps its intermediates in fp32), so the logits
    differ by up to ~0.4% each; the loss, a mean over 16,384 tokens, moves far less. |diff| < 0.02 (0.2% of
    10.9) allows that and catches a compiled model that computes something else (NaN, other weights). A subtle
    error in the compiled backward shows in the learning check, which trains through the compiled graph."""
    a, b = step_lines(compiled_output).get(0), step_lines(eager_output).get(0)
    if a is None or b is None:
        return Verdict(False, "-", f"no step-0 line from the {'eager' if a else 'compiled'} run")
    diff = abs(a["loss"] - b["loss"])
    first = "eager" if dry else "compiled"  # the dry run does not compile (see Mode)
    second = "eager again" if dry else "eager"
    numbers = f"step-0 loss {first} {a['loss']:.6f}, {second} {b['loss']:.6f}, |diff| {diff:.6f}; " \
              f"gradient norm {first} {a['norm']:.4f}, {second} {b['norm']:.4f}"
    if not (math.isfinite(a["loss"]) and math.isfinite(b["loss"])):
        return Verdict(False, numbers, "a loss is not finite")
    if not diff < 0.02:
        return Verdict(False, numbers, "they differ by more than bf16 rounding explains (|diff| < 0.02: bf16 keeps "
                                       "8 bits of mantissa, about 2-3 significant digits per value)")
    return Verdict(True, numbers, None)


def table_rows(output):
    """bench.py's table: [dict(B, ms, mfu, memory) or dict(B, error)], from the rows after its header line."""
    rows, in_table = [], False
    for line in output.splitlines():
        if "ms/step" in line and "tokens/s" in line:
            in_table = True
            continue
        if not in_table:
            continue
        m = TABLE_ROW.match(line)
        if m:
            rows.append(dict(B=int(m["B"]), ms=float(m["ms"]), mfu=m["mfu"], memory=float(m["memory"])))
            continue
        m = TABLE_ERROR_ROW.match(line)
        if m:
            rows.append(dict(B=int(m["B"]), error=m["error"].strip()))
    return rows


def judge_table(outputs, batch_sizes, dry, target=50.0):
    """outputs: {loss name: bench.py output}. Every batch size has a timed row in every table (an out-of-memory
    row fails), and the best MFU of all the rows reaches the target (not in a dry run: a CPU's MFU is measured
    against its own matmul rate and has no target)."""
    parts, problems, best_overall = [], [], None
    for name, output in outputs.items():
        rows = {r["B"]: r for r in table_rows(output)}
        for B in batch_sizes:
            if B not in rows:
                problems.append(f"{name}: no row for B={B}")
            elif "error" in rows[B]:
                problems.append(f"{name}: B={B} {rows[B]['error']}")
        timed = [rows[B] for B in batch_sizes if B in rows and "error" not in rows[B]]
        if not timed:
            parts.append(f"{name}: no timed row")
            continue
        best = max(timed, key=lambda r: (percent(r["mfu"]) or -1, -r["ms"]))  # the highest MFU (or fastest step)
        parts.append(f"{name}: best B={best['B']} MFU {best['mfu']} {best['ms']:.1f} ms/step")
        if percent(best["mfu"]) is not None and (best_overall is None or percent(best["mfu"]) > best_overall):
            best_overall = percent(best["mfu"])
        if not dry and percent(best["mfu"]) is None:
            problems.append(f"{name}: no MFU (is this GPU in run_support.GPU_PEAK_FLOPS?)")
    numbers = "; ".join(parts)
    if problems:
        return Verdict(False, numbers, "; ".join(problems))
    if not dry and (best_overall is None or best_overall < target):
        return Verdict(False, numbers, f"the best MFU is below the {target:.0f}% target")
    return Verdict(True, numbers, None)


LOSSES_DIFFER = "the losses differ"


def judge_ddp(plain_output, plain_log, ddp_output, ddp_log, steps, backend, atol=1e-5):
    """torchrun with one process and plain python log the same losses (one process averages over itself: the
    all-reduce changes no bit), and torchrun did run DDP on the expected backend."""
    a, b = log_losses(plain_log), log_losses(ddp_log)
    if sorted(a) != list(range(steps)) or sorted(b) != list(range(steps)):
        return Verdict(False, f"log.txt train lines: python {len(a)}, torchrun {len(b)}",
                       f"each log.txt should hold steps 0-{steps - 1}")
    diffs = [abs(a[s] - b[s]) for s in range(steps)]
    worst = max(range(steps), key=lambda s: diffs[s])
    numbers = f"{steps} losses, python {a[0]:.6f} ... {a[steps - 1]:.6f}, torchrun {b[0]:.6f} ... " \
              f"{b[steps - 1]:.6f}, max |diff| {diffs[worst]:.1e} (step {worst})"
    expected = f"ddp: 1 processes, backend {backend}"
    if expected not in ddp_output:
        return Verdict(False, numbers, f"torchrun's output lacks '{expected}'")
    if "ddp:" in plain_output:
        return Verdict(False, numbers, "plain python ran DDP too: the comparison would compare DDP with itself")
    if diffs[worst] > atol:
        return Verdict(False, numbers, f"{LOSSES_DIFFER} by more than {atol:g} from step {worst}")
    return Verdict(True, numbers, None)


def eval_timing(lines):
    """(validation seconds, HellaSwag seconds) of the second evaluation (after step 0: warm, nothing first-time in
    it), from the times the lines arrived: step 0's line -> 'validation loss' -> 'HellaSwag accuracy'."""
    def times(prefix, after=0.0):
        return [t for t, text in lines if text.startswith(prefix) and t >= after]

    steps = times("step     0 |")
    if not steps:
        return None, None
    val = times("validation loss:", steps[0])
    hella = times("HellaSwag accuracy:", val[0]) if val else []
    return (val[0] - steps[0] if val else None), (hella[0] - val[0] if val and hella else None)


def judge_eval(output, lines, wall, examples, dry):
    """The random model's validation loss is that of random weights, its HellaSwag accuracy is near chance
    (1 in 4 endings); both print their numbers, and their time is measured."""
    vals = [float(x) for x in re.findall(r"^validation loss: (\S+)$", output, re.M)]
    accs = [float(x) for x in re.findall(r"^HellaSwag accuracy: (\S+)$", output, re.M)]
    tokens = re.search(r"val loss over \d+ micro-batches \(([\d,]+) tokens\)", output)
    counted = re.search(r"^hellaswag: ([\d,]+) val examples", output, re.M)
    if len(vals) < 2 or len(accs) < 2:
        return Verdict(False, f"{len(vals)} validation and {len(accs)} HellaSwag lines",
                       "expected two of each (at step 0 and at the end)")
    val_s, hella_s = eval_timing(lines)
    seconds = lambda s: "?" if s is None else f"{s:.1f} s"  # noqa: E731
    numbers = (f"validation loss {vals[0]:.4f} over {tokens[1] if tokens else '?'} tokens in {seconds(val_s)}, "
               f"HellaSwag acc_norm {accs[0]:.4f} over {counted[1] if counted else '?'} examples in "
               f"{seconds(hella_s)} (second evaluation); whole command {wall:.1f} s")
    if counted is None or int(counted[1].replace(",", "")) != examples:
        return Verdict(False, numbers, f"HellaSwag should score {examples} examples")
    if not math.isfinite(vals[0]) or not 0 <= accs[0] <= 1:
        return Verdict(False, numbers, "the loss is not finite or the accuracy is not a fraction")
    if dry:
        return Verdict(True, numbers, None)
    if not 10.5 <= vals[0] <= 11.3:
        return Verdict(False, numbers, "random weights should give a validation loss of about 10.9-11.0")
    if not 0.15 <= accs[0] <= 0.35:
        return Verdict(False, numbers, "random weights should score near chance, 0.25 (0.15-0.35 over 200 "
                                       "examples is 3 standard deviations)")
    return Verdict(True, numbers, None)


# -----------------------------------------------------------------------------
# 4. The checks: run the commands, then judge their output


def check_learning(run, mode, tmp, args):
    log_dir = os.path.join(tmp, "learning")
    r = run.python_cmd(mode.train_args(log_dir, mode.learning_steps), mode.timeouts["learning"])
    require_success(r, "train_gpt2.py")
    dtype = "bfloat16" if mode.dry or torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
    return judge_learning(r.output, read_text(os.path.join(log_dir, "log.txt")), mode.learning_steps, mode.dry, dtype)


def check_compile(run, mode, tmp, args):
    # the same shape as the learning check: torch.compile's cache serves the compiled run when that one ran first
    compiled = run.python_cmd(mode.train_args(os.path.join(tmp, "compiled"), 1), mode.timeouts["compile"])
    require_success(compiled, "the compiled run")
    eager = run.python_cmd(mode.train_args(os.path.join(tmp, "eager"), 1, "--no-compile"), mode.timeouts["compile"])
    require_success(eager, "the eager run")
    return judge_compile(compiled.output, eager.output, mode.dry)


def check_table(run, mode, tmp, args):
    outputs = {}
    for name, flag in (("lecture's loss", "--no-chunked_loss"), ("chunked loss", "--chunked_loss")):
        r = run.python_cmd(["bench.py", "--device", mode.device, "--batch_sizes", *map(str, mode.bench_batch_sizes),
                            "--seq_len", str(mode.T), *mode.model, mode.compile, flag, *mode.bench_extra],
                           mode.timeouts["table"])
        require_success(r, f"bench.py {flag}")
        outputs[name] = r.output
    return judge_table(outputs, mode.bench_batch_sizes, mode.dry)


def check_ddp(run, mode, tmp, args):
    steps = 5
    logs = {name: os.path.join(tmp, f"ddp_{name}") for name in ("python", "torchrun", "python_again")}
    plain = run.python_cmd(mode.train_args(logs["python"], steps), mode.timeouts["ddp"])
    require_success(plain, "python train_gpt2.py")
    ddp = run.torchrun_cmd(mode.train_args(logs["torchrun"], steps), mode.timeouts["ddp"])
    require_success(ddp, "torchrun train_gpt2.py")
    verdict = judge_ddp(plain.output, read_text(os.path.join(logs["python"], "log.txt")), ddp.output,
                        read_text(os.path.join(logs["torchrun"], "log.txt")), steps, mode.backend)
    if verdict.ok or not verdict.why.startswith(LOSSES_DIFFER):
        return verdict
    # Still a FAIL, but say whether the same command without DDP differs from itself too (nondeterministic
    # kernels) or only DDP changes the losses (a real difference).
    again = run.python_cmd(mode.train_args(logs["python_again"], steps), mode.timeouts["ddp"])
    noise = "?"
    if again.rc == 0:
        a, b = log_losses(read_text(os.path.join(logs["python"], "log.txt"))), \
            log_losses(read_text(os.path.join(logs["python_again"], "log.txt")))
        if sorted(a) == sorted(b) == list(range(steps)):
            noise = f"{max(abs(a[s] - b[s]) for s in range(steps)):.1e}"
    return Verdict(False, verdict.numbers, f"{verdict.why}; plain python run twice differs by {noise}")


def check_eval(run, mode, tmp, args):
    evaluation = ["--eval_every", "1", "--val_tokens", str(mode.val_tokens), "--hellaswag_every", "1",
                  "--hellaswag_file", args.hellaswag_file, "--hellaswag_examples", str(mode.hellaswag_examples)]
    # evaluation runs the uncompiled model either way; --no-compile spares the one training step a compilation
    r = run.python_cmd(mode.train_args(os.path.join(tmp, "eval"), 1, "--no-compile", evaluation),
                       mode.timeouts["eval"])
    require_success(r, "train_gpt2.py")
    return judge_eval(r.output, r.lines, r.wall, mode.hellaswag_examples, mode.dry)


def judge_fp16(straight_output, straight_log, resumed_log, steps, atol):
    """--dtype float16: a scaler in use, every loss finite and falling, and the second half resumed from the
    half-way checkpoint logs the losses of the straight run (within atol: a GPU may not be bit for bit
    deterministic)."""
    straight, resumed = log_losses(straight_log), log_losses(resumed_log)
    half = steps // 2
    if sorted(straight) != list(range(steps)) or sorted(resumed) != list(range(half, steps)):
        return Verdict(False, f"{len(straight)} and {len(resumed)} train lines", "a run did not log every step")
    diff = max(abs(straight[s] - resumed[s]) for s in resumed)
    skipped = straight_output.count("skipped: fp16 gradients overflowed")
    numbers = f"loss {straight[0]:.4f} at step 0 -> {straight[steps - 1]:.4f} at step {steps - 1}, {skipped} " \
              f"step(s) skipped by the scaler; resumed at step {half}: max |diff| {diff:.1e}"
    if not re.search(r"^dtype: float16 \(--dtype\)", straight_output, re.M):
        return Verdict(False, numbers, "the run did not say it used float16 (its 'dtype:' line)")
    if not all(math.isfinite(x) for x in straight.values()) or not straight[steps - 1] < straight[0]:
        return Verdict(False, numbers, "a loss is not finite, or the loss did not fall")
    if skipped >= half:
        return Verdict(False, numbers, "the scaler skipped most steps: fp16 gradients keep overflowing")
    if not diff <= atol:
        return Verdict(False, numbers, f"the resumed run's losses differ by more than {atol}: the scaler's or the "
                                       f"optimizer's state did not resume")
    return Verdict(True, numbers, None)


def check_fp16(run, mode, tmp, args):
    steps, half = mode.fp16_steps, mode.fp16_steps // 2
    straight_dir, resumed_dir = os.path.join(tmp, "fp16"), os.path.join(tmp, "fp16_resumed")
    # uncompiled: what it checks is the scaler, and the runs stay short
    straight = run.python_cmd(mode.train_args(straight_dir, steps, "--no-compile", extra=(
        "--dtype", "float16", "--checkpoint_every", str(half))), mode.timeouts["fp16"])
    require_success(straight, "train_gpt2.py --dtype float16")
    resumed = run.python_cmd(mode.train_args(resumed_dir, steps, "--no-compile", extra=(
        "--dtype", "float16", "--resume", os.path.join(straight_dir, f"model_{half:05d}.pt"))), mode.timeouts["fp16"])
    require_success(resumed, "train_gpt2.py --dtype float16 --resume")
    return judge_fp16(straight.output, read_text(os.path.join(straight_dir, "log.txt")),
                      read_text(os.path.join(resumed_dir, "log.txt")), steps, atol=0.0 if mode.dry else 1e-3)


CHECK_FUNCTIONS = dict(learning=check_learning, compile=check_compile, table=check_table, ddp=check_ddp,
                       eval=check_eval, fp16=check_fp16)


# -----------------------------------------------------------------------------
# 5. Command line


def build_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=CHECKS, metavar="NAME",
                   help=f"run only these checks, of: {', '.join(CHECKS)} (default: all)")
    p.add_argument("--hellaswag_file", default=None,
                   help="a local HellaSwag val jsonl for the eval check (default: ../shared/data/"
                        "hellaswag_val_cleaned.jsonl if it exists, else hellaswag_data/hellaswag_val.jsonl)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="also write the raw output of every command there, as it comes (e.g. "
                        "docs/gpu_check_output.txt)")
    p.add_argument("--dry_run", action="store_true",
                   help="the same checks with a tiny model on the CPU (gloo, no compile, no MFU target): "
                        "tests this script where there is no GPU")
    return p


def describe_machine(dry):
    if dry:
        return f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__} (dry run: a 2-layer, 32-wide " \
               f"model, no targets)"
    versions = f"torch {torch.__version__}, CUDA {torch.version.cuda}"
    try:  # nvidia-smi, so that this process never holds GPU memory while the commands measure theirs
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
        gpus = [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []
    except (OSError, subprocess.SubprocessError):
        gpus = []
    if not gpus:
        return f"{torch.cuda.device_count()} CUDA GPU(s), {versions}"
    return f"{gpus[0]} (name, memory, driver), {len(gpus)} GPU(s) visible, {versions}"


def main(argv=None):
    args = build_parser().parse_args(argv)
    return report_user_errors(run_checks, args)


def run_checks(args):
    start = time.monotonic()
    if not args.dry_run and not torch.cuda.is_available():
        raise UserError("no CUDA GPU here; use --dry_run to check the script on the CPU")
    checks = [c for c in CHECKS if args.only is None or c in args.only]
    if "eval" in checks:
        if args.hellaswag_file is None:
            args.hellaswag_file = next((p for p in DEFAULT_HELLASWAG if os.path.isfile(p)), DEFAULT_HELLASWAG[-1])
        if not os.path.isfile(args.hellaswag_file):
            raise UserError(f"--hellaswag_file {args.hellaswag_file} does not exist; the eval check needs a local "
                            f"HellaSwag val jsonl (hellaswag.py downloads it to hellaswag_data/)")
        args.hellaswag_file = os.path.abspath(args.hellaswag_file)
    out = None
    if args.out is not None:
        try:
            out = open(args.out, "w")
        except OSError as e:
            raise UserError(f"--out {args.out}: cannot write there ({e.strerror})") from e
    mode = Mode(args.dry_run)
    runner = Runner(out)
    machine = describe_machine(args.dry_run)
    header = f"gpu_check{' --dry_run' if args.dry_run else ''}: {machine}; checks: {', '.join(checks)}"
    print(header, flush=True)
    runner.log(f"{header}\n$ {runner.display([sys.executable, *sys.argv])}\n")
    if not args.dry_run and shutil.which("nvidia-smi"):
        runner.run(["nvidia-smi"], 60)  # the GPU, driver, clocks and other processes, for the record
    passed = []
    try:
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
            for name in checks:
                t0 = time.monotonic()
                try:
                    verdict = CHECK_FUNCTIONS[name](runner, mode, tmp, args)
                except CheckFailed as e:
                    verdict = Verdict(False, e.numbers, e.why)
                except Exception as e:  # a bug of this script, or output it cannot read: the other checks still run
                    verdict = Verdict(False, "-", f"gpu_check.py: {type(e).__name__}: {e}")
                numbers = f"{verdict.numbers}; {time.monotonic() - t0:.0f} s"
                line = f"PASS {name}: {numbers}" if verdict.ok else f"FAIL {name}: {numbers} ({verdict.why})"
                print(line, flush=True)
                runner.log(f"\n{line}\n")
                if verdict.ok:
                    passed.append(name)
        failed = [c for c in checks if c not in passed]
        summary = f"summary: {len(passed)} of {len(checks)} checks passed" + \
                  (f" (FAIL: {', '.join(failed)})" if failed else "") + f" in {time.monotonic() - start:.1f} s"
        print(summary, flush=True)
        runner.log(f"{summary}\n")
    finally:
        if out is not None:
            out.close()
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
