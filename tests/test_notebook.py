"""play.ipynb: executed headless on a tiny training run, on a log with train lines only, and stored without outputs."""
import os

import nbformat
from nbclient import NotebookClient

from conftest import ROOT
import train_gpt2

NOTEBOOK = os.path.join(ROOT, "play.ipynb")
PROMPT = "Hello, I'm a language model,"


def run_notebook(monkeypatch, log_file, figure, checkpoint=None):
    """Execute play.ipynb in a fresh python3 kernel (it inherits os.environ) in the repository root; a failing
    cell raises. Returns all the text the cells printed."""
    monkeypatch.setenv("PLAY_LOG_FILE", str(log_file))
    monkeypatch.setenv("PLAY_FIGURE", str(figure))
    if checkpoint is None:
        monkeypatch.delenv("PLAY_CHECKPOINT", raising=False)
    else:
        monkeypatch.setenv("PLAY_CHECKPOINT", str(checkpoint))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")  # not a user's GUI backend
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                text.append(out["text"])
            elif "data" in out and "text/plain" in out["data"]:
                text.append(out["data"]["text/plain"])
    return "\n".join(text)


def check_png(path):
    assert os.path.isfile(path), "the notebook did not save the figure"
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "the saved figure is not a PNG"
    assert len(data) > 10_000, f"the saved figure is suspiciously small ({len(data)} bytes)"


def test_notebook_on_a_tiny_run(tmp_path, monkeypatch, shakespeare):
    log_dir = tmp_path / "log"
    rc = train_gpt2.main(["--data", shakespeare, "--n_layer", "2", "--n_head", "2", "--n_embd", "32",
                          "--block_size", "64", "--device", "cpu", "--batch_size", "2", "--seq_len", "32",
                          "--total_batch_size", "64", "--max_steps", "6", "--eval_every", "3", "--val_tokens", "256",
                          "--sample_every", "0", "--checkpoint_every", "6", "--log_dir", str(log_dir)])
    assert rc == 0
    checkpoints = train_gpt2.list_checkpoints(str(log_dir))
    assert checkpoints, "the training run saved no checkpoint"
    # a HellaSwag line, as --hellaswag_every writes it, so that the right panel is drawn too
    with open(log_dir / "log.txt", "a") as f:
        f.write("5 hella 0.2600\n")
    figure = tmp_path / "figure.png"

    out = run_notebook(monkeypatch, log_dir / "log.txt", figure)  # CHECKPOINT None: the newest one in log_dir

    check_png(figure)
    assert "min train loss:" in out and "last val loss:" in out and "max HellaSwag acc_norm: 0.2600" in out
    assert "no validation lines" not in out and "no HellaSwag lines" not in out
    assert checkpoints[-1] in out, "the notebook did not pick the newest checkpoint next to the log"
    samples = [line for line in out.splitlines() if line.startswith("sample ")]
    assert len(samples) == 4 and all(PROMPT in line for line in samples), out


def test_notebook_on_a_log_with_train_lines_only(tmp_path, monkeypatch):
    log_file = tmp_path / "log.txt"
    log_file.write_text("".join(f"{step} train {10.9 - 0.1 * step:.6f}\n" for step in range(20)))
    figure = tmp_path / "figure.png"

    out = run_notebook(monkeypatch, log_file, figure)  # and no checkpoint next to it

    check_png(figure)
    assert "min train loss: 9.0000" in out
    assert "this log has no validation lines: run with --eval_every N to get them" in out
    assert "this log has no HellaSwag lines: run with --hellaswag_every N to get them" in out
    assert "no checkpoint:" in out and "sample 0" not in out


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, "play.ipynb has no code cells"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, "clear play.ipynb's outputs before committing"
    settings = code[0].source
    assert 'LOG_FILE = "log/log.txt"' in settings and "CHECKPOINT = None" in settings
