"""The main job on a fresh clone of the project with no network: it runs from the committed files alone."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.fixture
def clone(tmp_path):
    """The project's tracked files (what a `git clone` gets), copied into a new folder."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in files.decode().split("\0"):
        if name and os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(os.path.dirname(os.path.join(tmp_path, name)) or tmp_path, exist_ok=True)
            shutil.copy(os.path.join(ROOT, name), os.path.join(tmp_path, name))
    return tmp_path


def offline_env(tmp_path):
    """No tiktoken cache, an empty Hugging Face cache, and every download sent to a closed local port."""
    env = {k: v for k, v in os.environ.items() if k not in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")}
    closed = "http://127.0.0.1:9"  # the discard port: nothing listens there, so a connection fails at once
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), TMPDIR=str(tmp_path),
               http_proxy=closed, https_proxy=closed, HTTP_PROXY=closed, HTTPS_PROXY=closed, no_proxy="", NO_PROXY="")
    return env


def run_main(clone, *args):
    return subprocess.run([sys.executable, "train_gpt2.py", *args], cwd=clone, env=offline_env(clone),
                          capture_output=True, text=True, timeout=300)


def test_the_main_job_runs_offline_from_a_fresh_clone(clone):
    # the main job as the README gives it (no flags), cut to a few steps
    out = run_main(clone, "--max_steps", "3", "--eval_every", "3")
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
