"""bench.py on the CPU, at toy sizes: the table, the comparison with Hugging Face, the ladder, bad input."""
import re

import pytest
import torch

import bench
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
        flops = 100 * train_gpt2.flops_per_token(config, 32)
        low = flops * (tokens_per_second - 0.5) / (peak + 0.5e9) - 0.05
        high = flops * (tokens_per_second + 0.5) / (peak - 0.5e9) + 0.05
        assert low - 1e-9 <= float(mfu) <= high + 1e-9
        assert float(mfu) < 100 and float(memory) > 0  # (a toy step on a loaded machine can print 0.0%)


def test_cpu_peak_is_measured_once_however_the_arguments_are_spelled():
    # the machine line and the table's MFU call it differently; two measurements differ by noise (CI saw 10%)
    first = bench.cpu_matmul_flops(n=256)
    assert bench.cpu_matmul_flops(torch.float32, "highest", 256) == first
    assert bench.cpu_matmul_flops(dtype=torch.float32, n=256, precision="highest", repeats=5) == first


def test_compare_hf_runs_both_models_on_the_same_math(capsys):
    assert bench.main([*TOY, "--compare_hf", "--vocab_size", "512", "--batch_sizes", "2", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    steps = re.findall(r"loss ours ([\d.]+)\s+hf ([\d.]+)\s+ours\s+([\d.]+) ms\s+hf\s+([\d.]+) ms", out)
    assert len(steps) == 3
    # same weights, same batches: the same loss up to fp32 summation order (~1e-6); printed to 5 decimals, so
    # two equal losses can still print 1e-5 apart
    assert all(abs(float(ours) - float(hf)) <= 1.5e-5 for ours, hf, _, _ in steps), steps
    ours_ms = sorted(float(s[2]) for s in steps)[1]
    hf_ms = sorted(float(s[3]) for s in steps)[1]
    ratio = float(re.search(r"ours takes ([\d.]+)x Hugging Face's time", out).group(1))
    # the printed times are rounded to 0.05 ms and the ratio to 0.005: that bounds the difference
    bound = ours_ms / hf_ms * (0.05 / ours_ms + 0.05 / hf_ms) + 0.005
    assert abs(ratio - ours_ms / hf_ms) <= bound


def test_ladder_adds_one_speed_up_per_rung(capsys):
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
