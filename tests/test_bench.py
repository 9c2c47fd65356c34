"""bench.py on the CPU, at toy sizes: the table, the comparison with Hugging Face, the ladder, bad input."""
import re
import time

import pytest
import torch

import bench
import run_support
import train_gpt2

TOY = ["--device", "cpu", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--seq_len", "32",
       "--warmup", "1", "--steps", "2"]
ROW = re.compile(r"^(.+?)\s+(\d+)\s+([\d.]+)\s+([\d,]+)\s+([\d.]+)%\s+([\d.]+) GiB$")


def rows(out):
    return [ROW.match(line).groups() for line in out.splitlines() if ROW.match(line)]


def test_table_has_a_row_per_batch_size_with_consistent_numbers(capsys):
    assert bench.main([*TOY, "--vocab_size", "512", "--batch_sizes", "2", "4"]) == 0
    out = capsys.readouterr().out
    peak = float(re.search(r"fp32 (\d+) GFLOP/s", out).group(1)) * 1e9
    table = rows(out)
    assert [int(r[1]) for r in table] == [2, 4]
    config = train_gpt2.GPTConfig(block_size=1024, vocab_size=512, n_layer=2, n_head=2, n_embd=32)
    for label, B, ms, tokens_per_second, mfu, memory in table:
        assert label == "train_gpt2.py"
        # every printed number is rounded: ms to 0.05, tokens/s to 0.5, the peak to 0.5 GFLOP/s, MFU to 0.05%;
        # the bounds below are exactly what that rounding allows
        B, ms, tokens_per_second = int(B), float(ms), float(tokens_per_second.replace(",", ""))
        assert B * 32_000 / (ms + 0.05) - 0.5 <= tokens_per_second <= B * 32_000 / (ms - 0.05) + 0.5
        flops = 100 * run_support.flops_per_token(config, 32)
        low = flops * (tokens_per_second - 0.5) / (peak + 0.5e9) - 0.05
        high = flops * (tokens_per_second + 0.5) / (peak - 0.5e9) + 0.05
        assert low - 1e-9 <= float(mfu) <= high + 1e-9
        assert float(mfu) < 100 and float(memory) > 0  # (a toy step on a loaded machine can print 0.0%)


def test_cpu_peak_is_measured_once_however_the_arguments_are_spelled():
    # the machine line and the table's MFU call it differently; two measurements differ by noise (CI saw 10%)
    first = bench.cpu_matmul_flops(n=256)
    assert bench.cpu_matmul_flops(torch.float32, "highest", 256) == first
    assert bench.cpu_matmul_flops(dtype=torch.float32, n=256, precision="highest", repeats=5) == first


def test_compare_hf_runs_the_models_on_the_same_math(capsys):
    assert bench.main([*TOY, "--compare_hf", "--vocab_size", "512", "--batch_sizes", "2", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    steps = re.findall(r"loss ours ([\d.]+)\s+chunked ([\d.]+)\s+hf ([\d.]+)\s+ours\s+([\d.]+) ms\s+"
                       r"chunked\s+([\d.]+) ms\s+hf\s+([\d.]+) ms", out)
    assert len(steps) == 3
    # same weights, same batches: the same loss up to fp32 summation order (~1e-6); printed to 5 decimals, so
    # two equal losses can still print 1e-5 apart
    for ours, chunked, hf, *_ in steps:
        assert abs(float(ours) - float(hf)) <= 1.5e-5 and abs(float(chunked) - float(hf)) <= 1.5e-5, steps
    ours_ms, chunked_ms, hf_ms = (sorted(float(s[i]) for s in steps)[1] for i in (3, 4, 5))  # the medians
    ratios = re.search(r"ours takes ([\d.]+)x Hugging Face's time, --chunked_loss ([\d.]+)x ours", out)
    # the printed times are rounded to 0.05 ms and the ratios to 0.005: that bounds the difference
    for printed, a, b in ((ratios.group(1), ours_ms, hf_ms), (ratios.group(2), chunked_ms, ours_ms)):
        bound = a / b * (0.05 / a + 0.05 / b) + 0.005
        assert abs(float(printed) - a / b) <= bound


def test_ladder_adds_one_speed_up_per_rung(capsys, monkeypatch):
    monkeypatch.setenv("BENCH_CPU_BF16", "1")  # the bf16 rung is timed even where bf16 is emulated: a toy step
    assert bench.main([*TOY, "--ladder", "--rungs", "fp32", "tf32", "bf16", "--batch_sizes", "2"]) == 0
    labels = [r[0] for r in rows(capsys.readouterr().out)]
    assert labels == ["fp32, math attention, V=50257, plain loss", "+ TF32 matmuls", "+ bf16 autocast"]


@pytest.mark.parametrize("argv,message", [
    (["--rungs", "fp32"], "--rungs goes with --ladder"),
    (["--ladder", "--rungs", "fp16"], "unknown rung 'fp16'"),
    (["--n_embd", "33"], "must be a multiple of --n_head"),
    (["--batch_sizes", "0"], "--batch_sizes must all be at least 1"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    assert bench.main([*TOY, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


# -----------------------------------------------------------------------------
# The CPU's peak: measured only in the maths the run uses, in about a second; bf16 only where the CPU has units

LADDER_FP32, LADDER_BF16 = "fp32, math attention, V=50257, plain loss", "+ bf16 autocast"
FAKE_PEAKS = {torch.float32: 10e9, torch.bfloat16: 20e9}  # far apart, and small: the toy's MFU prints large


@pytest.fixture
def measured(monkeypatch):
    """A fresh cache of peaks, and a stand-in for the measurement that records what it is asked and answers
    FAKE_PEAKS at once: which maths get measured, and what each row's MFU divides by."""
    calls = []

    def fake(dtype, precision="highest", n=256, repeats=5, seconds=1.0):
        calls.append((dtype, precision))
        return FAKE_PEAKS[dtype], n, 1

    monkeypatch.setattr(bench, "_PEAKS", {})
    monkeypatch.setattr(bench, "measure_matmul_flops", fake)
    return calls


def assert_mfu_against(row, peak, vocab_size):
    """The row's printed MFU is its printed tokens/s times the toy's FLOPs per token over `peak`, up to rounding."""
    _, _, _, tokens_per_second, mfu, _ = row
    tokens_per_second = float(tokens_per_second.replace(",", ""))
    config = train_gpt2.GPTConfig(block_size=1024, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32)
    flops = 100 * run_support.flops_per_token(config, 32)
    low, high = flops * (tokens_per_second - 0.5) / peak - 0.05, flops * (tokens_per_second + 0.5) / peak + 0.05
    assert low - 1e-9 <= float(mfu) <= high + 1e-9, (row, peak)


def machine_line(out):
    return next(line for line in out.splitlines() if line.startswith("device: CPU"))


def test_cpu_without_bf16_units_skips_the_bf16_rows_and_their_peak(capsys, monkeypatch, measured):
    monkeypatch.setenv("BENCH_CPU_BF16", "0")  # what a CPU without bf16 units (AVX2 only, say) answers
    assert bench.main([*TOY, "--ladder", "--rungs", "fp32", "bf16", "--batch_sizes", "2"]) == 0
    out = capsys.readouterr().out
    table = rows(out)
    assert [r[0] for r in table] == [LADDER_FP32]
    assert_mfu_against(table[0], FAKE_PEAKS[torch.float32], 50257)
    assert re.search(r"^\+ bf16 autocast\s+2 skipped: this CPU has no bf16 units", out, re.MULTILINE), out
    assert measured == [(torch.float32, "highest")]  # no bf16 matmul was timed, not even for the machine line
    assert "fp32 10 GFLOP/s" in machine_line(out) and "bf16 not measured" in machine_line(out)


def cpuinfo_says_bf16():
    """Whether /proc/cpuinfo lists bf16 units (x86: avx512_bf16 or amx_bf16; Arm: bf16); None without it."""
    try:
        with open("/proc/cpuinfo") as f:
            words = set(f.read().split())
    except OSError:
        return None
    return bool(words & {"avx512_bf16", "amx_bf16", "bf16"})


def test_bf16_rows_follow_this_cpus_bf16_units(capsys, monkeypatch, measured):
    # whichever CPU this runs on: timed against the bf16 peak where it has bf16 units, skipped where not
    monkeypatch.delenv("BENCH_CPU_BF16", raising=False)
    has_units = bench.cpu_has_bf16_units()
    if cpuinfo_says_bf16() is not None:
        assert has_units == cpuinfo_says_bf16()
    assert bench.main([*TOY, "--ladder", "--rungs", "fp32", "bf16", "--batch_sizes", "2"]) == 0
    out = capsys.readouterr().out
    table = rows(out)
    assert_mfu_against(table[0], FAKE_PEAKS[torch.float32], 50257)
    if has_units:
        assert [r[0] for r in table] == [LADDER_FP32, LADDER_BF16]
        assert_mfu_against(table[1], FAKE_PEAKS[torch.bfloat16], 50257)
        assert [bench.math_key(*math) for math in measured] == [(torch.float32, "highest"), (torch.bfloat16, None)]
        assert "bf16 20 GFLOP/s" in machine_line(out)
    else:
        assert [r[0] for r in table] == [LADDER_FP32]
        assert re.search(r"^\+ bf16 autocast\s+2 skipped: this CPU has no bf16 units", out, re.MULTILINE), out
        assert measured == [(torch.float32, "highest")]
        assert "bf16 not measured" in machine_line(out)


@pytest.mark.parametrize("mode", [[], ["--compare_hf", "--steps", "1"]])
def test_an_fp32_run_measures_only_the_fp32_peak(capsys, monkeypatch, measured, mode):
    monkeypatch.setenv("BENCH_CPU_BF16", "1")  # even with bf16 units: no row uses them
    assert bench.main([*TOY, "--vocab_size", "512", "--batch_sizes", "2", *mode]) == 0
    assert measured == [(torch.float32, "highest")]
    line = machine_line(capsys.readouterr().out)
    assert "fp32 10 GFLOP/s" in line and "bf16" not in line and "'high'" not in line


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_peak_takes_about_a_second_to_measure(monkeypatch, dtype):
    # also where the math is emulated, as bf16 is without bf16 units (1.7 GFLOP/s on a 2-core AVX2 CPU: one 2048^3
    # matmul, 10 s) and fp16 is on most CPUs (2 GFLOP/s on a 2-core AVX-512 one): the size adapts to the rate
    monkeypatch.setattr(bench, "_PEAKS", {})
    t0 = time.perf_counter()
    flops = bench.cpu_matmul_flops(dtype)
    elapsed = time.perf_counter() - t0
    _, n, timed = bench._PEAKS[bench.math_key(dtype, "highest")]
    assert flops > 0 and n >= 256 and 1 <= timed <= 5
    assert elapsed < 5, f"{elapsed:.1f} s for n={n}, {timed} timed"  # about 1 s; one doubling too many is 8x the work


def test_a_bad_bf16_override_is_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.setenv("BENCH_CPU_BF16", "yes")
    assert bench.main(TOY) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "BENCH_CPU_BF16 must be 0 or 1" in err and err.count("\n") == 1
