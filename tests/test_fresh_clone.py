"""The main job on a fresh clone of the project with no network: it runs from the committed files alone."""
import os
import shutil
import subprocess
import sys

from conftest import offline_env


def run_main(clone, *args):
    return subprocess.run([sys.executable, "train_gpt2.py", *args], cwd=clone, env=offline_env(clone),
                          capture_output=True, text=True, timeout=300)


def test_the_main_job_runs_offline_from_a_fresh_clone(clone):
    # the main job as the README gives it (no flags), cut to a few steps
    out = run_main(clone, "--max_steps", "3", "--eval_every", "3", "--val_tokens", "4096")
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"data: {clone}/input.txt" in out.stdout and "preset: small" in out.stdout
    assert "step     2 | loss: " in out.stdout and "validation loss:" in out.stdout
    assert "sample 0: Hello, I'm a language model," in out.stdout


def test_without_input_txt_it_says_it_could_not_download_it(clone):
    os.remove(clone / "input.txt")
    out = run_main(clone, "--max_steps", "1")
    assert out.returncode == 2
    errors = [l for l in out.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and "input.txt is missing and could not be downloaded" in errors[0], out.stderr
    assert "Traceback" not in out.stderr and not os.path.exists(clone / "input.txt")


def test_without_the_tokenizer_files_it_says_it_could_not_load_the_tokenizer(clone):
    shutil.rmtree(clone / "gpt2_tokenizer")
    out = run_main(clone, "--max_steps", "1")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not load the GPT-2 tokenizer"), out.stderr
