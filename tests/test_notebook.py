"""play.ipynb: executed headless and offline on a tiny training run, on a log with train lines only, and stored
without outputs. Offline, a small random GPT-2 stands in for OpenAI's in the lecture's sections 1-7, and their
printed numbers are checked."""
import os
import re

import nbformat
import tiktoken
from nbclient import NotebookClient

from conftest import ROOT
import checkpoints
import train_gpt2

NOTEBOOK = os.path.join(ROOT, "play.ipynb")
PROMPT = "Hello, I'm a language model,"


def run_notebook(monkeypatch, tmp_path, log_file, figure, checkpoint=None, input_txt=None):
    """Execute play.ipynb in a fresh python3 kernel (it inherits os.environ) in the repository root, offline and
    with an empty Hugging Face cache; a failing cell raises. Returns the executed notebook."""
    monkeypatch.setenv("PLAY_LOG_FILE", str(log_file))
    monkeypatch.setenv("PLAY_FIGURE", str(figure))
    for name, value in (("PLAY_CHECKPOINT", checkpoint), ("PLAY_INPUT_TXT", input_txt)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(value))
    # offline whatever the caller's settings, and without a cached gpt2: the random stand-in is what runs
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")  # not a user's GUI backend
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    return nb


def printed(nb, cell_id=None):
    """All the text that the cells (or the one cell with that id) printed or displayed."""
    cells = [cell for cell in nb.cells if cell_id is None or cell.get("id") == cell_id]
    assert cells, f"play.ipynb has no cell with id {cell_id!r}"
    text = []
    for cell in cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                text.append(out["text"])
            elif "data" in out and "text/plain" in out["data"]:
                text.append(out["data"]["text/plain"])
    return "\n".join(text)


def has_image(nb, cell_id):
    return any("image/png" in out.get("data", {}) for cell in nb.cells if cell.get("id") == cell_id
               for out in cell.get("outputs", []))


def check_png(path):
    assert os.path.isfile(path), "the notebook did not save the figure"
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "the saved figure is not a PNG"
    assert len(data) > 10_000, f"the saved figure is suspiciously small ({len(data)} bytes)"


def number(pattern, text):
    match = re.search(pattern, text)
    assert match, f"no match for {pattern!r} in:\n{text}"
    return float(match.group(1))


def check_lecture_sections(nb, shakespeare):
    """Sections 1-7, as they run offline: every check is on what the cells printed."""
    # 1. the download fails offline, the notebook says so, and lists the stand-in's state_dict: GPT-2's names,
    # SMALL_GPT2's shapes (2 layers, 64 wide, GPT-2's 1024 positions and 50257 tokens)
    out = printed(nb, "state-dict")
    assert re.search(r"^could not download gpt2 \(OSError: .+\): using a small random GPT-2 instead; "
                     r"the numbers below are not OpenAI's$", out, re.M), out
    for name, shape in (("transformer.wte.weight", "50257, 64"), ("transformer.wpe.weight", "1024, 64"),
                        ("transformer.h.1.attn.c_attn.weight", "64, 192"), ("transformer.h.1.mlp.c_proj.weight", "256, 64"),
                        ("transformer.ln_f.bias", "64,"), ("lm_head.weight", "50257, 64")):
        assert re.search(rf"^{re.escape(name)}\s+\({shape}\)$", out, re.M), f"{name} ({shape}) is not listed:\n{out}"
    assert "transformer.h.2." not in out, "the stand-in has 2 layers"

    # 2. the position embeddings: the matrix and its plots
    assert "transformer.wpe.weight: (1024, 64) = (positions, channels)" in printed(nb, "wpe")
    assert has_image(nb, "wpe"), "the position embeddings were not plotted"

    # 3. sampling: 5 different continuations of the prompt from the pipeline, and 5 by hand
    assert f"{PROMPT!r} -> [15496, 11, 314, 1101, 257, 3303, 2746, 11]" in printed(nb, "sampling")
    for cell_id, label in (("pipeline", "pipeline"), ("sampling", "by hand")):
        out = printed(nb, cell_id)
        samples = re.findall(rf"^{label} \d: (.*)$", out, re.M)
        assert len(samples) == 5, f"expected 5 samples from the {label} cell:\n{out}"
        assert all(s.startswith(repr(PROMPT)[:-1]) for s in samples), out  # printed with repr()
        assert len(set(samples)) == 5, f"the {label} samples are not sampled (all alike):\n{out}"

    # 4. Tiny Shakespeare: its first 1000 characters, its tokens, and x, y = the same 25 tokens shifted by one
    with open(shakespeare, encoding="utf-8") as f:
        text = f.read()
    tokens = tiktoken.get_encoding("gpt2").encode(text)
    assert text[:1000] in printed(nb, "shakespeare")
    assert f"{len(tokens):,} tokens" in printed(nb, "tokens")
    out = printed(nb, "batch")
    x_text, rest = out.split("x (inputs):\n", 1)[1].split("y (targets):\n", 1)
    y_text = rest.split("after ", 1)[0]
    assert x_text.count("[") == 5 and y_text.count("[") == 5, f"x and y are not printed as (4, 6) tensors:\n{out}"
    x = [int(v) for v in re.findall(r"\d+", x_text)]
    y = [int(v) for v in re.findall(r"\d+", y_text)]
    assert x == tokens[:24] and y == tokens[1:25], out
    assert "after 'First' comes ' Citizen'" in out

    # 5. weight tying: one Parameter, and the parameters it saves
    out = printed(nb, "tying")
    assert "lm_head.weight is transformer.wte.weight: True" in out
    assert "lm_head.weight.data_ptr() == transformer.wte.weight.data_ptr(): True" in out
    assert "50257 * 768 = 38,597,376 parameters" in out
    tied = number(r"this small GPT: (\d+) parameters", out.replace(",", ""))
    untied = number(r"without the tie it would have (\d+)", out.replace(",", ""))
    assert untied - tied == 50257 * 64, out

    # 6. the residual stream: std ~ sqrt(100) = 10 without scaling, ~1 with it; c_proj weights at 0.02 / sqrt(4)
    out = printed(nb, "residual")
    assert 8.5 < number(r"additions of std 1:\s+std ([\d.]+)", out) < 11.5, out
    assert 0.85 < number(r"additions scaled by n \*\* -0\.5:\s+std ([\d.]+)", out) < 1.15, out
    out = printed(nb, "init")
    stds = {name: float(std) for name, std in re.findall(r"^(transformer\.h\.0\.\S+)\s+std ([\d.]+)$", out, re.M)}
    assert len(stds) == 4, out
    for name, std in stds.items():
        expected = 0.01 if name.endswith("c_proj.weight") else 0.02
        assert abs(std - expected) < 0.1 * expected, f"{name}: std {std}, expected {expected}\n{out}"
    assert "0.02 / sqrt(2 * n_layer) = 0.02 / sqrt(4) = 0.0100" in out

    # 7. gradient accumulation: the same gradient as one big batch with the division, 4x without it
    out = printed(nb, "grad-accum")
    assert number(r"max difference ([\d.e+-]+)", out) < 1e-5, out  # relative to the largest: fp32 rounding
    assert number(r"the gradient is ([\d.]+)x", out) == 4.0, out
    assert "equal to 4 * big to fp32 rounding: True" in out


def test_notebook_on_a_tiny_run(tmp_path, monkeypatch, shakespeare):
    log_dir = tmp_path / "log"
    rc = train_gpt2.main(["--data", shakespeare, "--n_layer", "2", "--n_head", "2", "--n_embd", "32",
                          "--block_size", "64", "--device", "cpu", "--batch_size", "2", "--seq_len", "32",
                          "--total_batch_size", "64", "--max_steps", "6", "--eval_every", "3", "--val_tokens", "256",
                          "--sample_every", "0", "--checkpoint_every", "6", "--log_dir", str(log_dir)])
    assert rc == 0
    saved = checkpoints.list_checkpoints(str(log_dir))
    assert saved, "the training run saved no checkpoint"
    # a HellaSwag line, as --hellaswag_every writes it, so that the right panel is drawn too
    with open(log_dir / "log.txt", "a") as f:
        f.write("5 hella 0.2600\n")
    figure = tmp_path / "figure.png"

    # CHECKPOINT None: the newest one in log_dir; Tiny Shakespeare from PLAY_INPUT_TXT
    nb = run_notebook(monkeypatch, tmp_path, log_dir / "log.txt", figure, input_txt=shakespeare)
    out = printed(nb)

    check_lecture_sections(nb, shakespeare)
    check_png(figure)
    assert "min train loss:" in out and "last val loss:" in out and "max HellaSwag acc_norm: 0.2600" in out
    assert "no validation lines" not in out and "no HellaSwag lines" not in out
    assert saved[-1] in out, "the notebook did not pick the newest checkpoint next to the log"
    samples = [line for line in out.splitlines() if line.startswith("sample ")]
    assert len(samples) == 4 and all(PROMPT in line for line in samples), out


def test_notebook_on_a_log_with_train_lines_only(tmp_path, monkeypatch, shakespeare):
    log_file = tmp_path / "log.txt"
    log_file.write_text("".join(f"{step} train {10.9 - 0.1 * step:.6f}\n" for step in range(20)))
    figure = tmp_path / "figure.png"

    # no checkpoint next to the log; Tiny Shakespeare found by the notebook itself (input.txt or ../shared)
    nb = run_notebook(monkeypatch, tmp_path, log_file, figure)
    out = printed(nb)

    check_lecture_sections(nb, shakespeare)
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
    # the lecture's sections 1-7 come first, then the training run (8: curves, 9: samples)
    headings = [int(m) for cell in nb.cells if cell.cell_type == "markdown"
                for m in re.findall(r"^## (\d+)\. ", cell.source, re.M)]
    assert headings == list(range(1, 10)), headings
