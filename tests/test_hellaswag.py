"""Tests of hellaswag.py, offline: a tiny random GPT-2 built here stands in for OpenAI's weights, and the
HellaSwag examples come from ../shared/data/hellaswag_val_cleaned.jsonl (which must exist: no skipping)."""

import dataclasses
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import urllib.error

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, "..", "shared")
VAL_FILE = os.path.join(SHARED, "data", "hellaswag_val_cleaned.jsonl")
# before tiktoken and transformers are imported: both read these once
os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken_cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, REPO)

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import hellaswag  # noqa: E402
import checkpoints  # noqa: E402
import common  # noqa: E402
import train_gpt2  # noqa: E402


# -----------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def enc():
    return common.get_tokenizer()


@pytest.fixture(scope="module")
def val_examples():
    assert os.path.isfile(VAL_FILE), f"{VAL_FILE} is missing: these tests need the shared HellaSwag val file"
    examples = hellaswag.load_examples(data_file=VAL_FILE)
    assert len(examples) == 10_042
    return examples


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A random 2-layer GPT-2 with GPT-2's vocabulary, saved to a folder: (folder, model in eval mode).
    Weights drawn with std 0.1 instead of 0.02 make its predictions far from uniform, so that the losses of the
    four endings are well apart (on the examples used here) and rounding cannot flip which one is lowest."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=50257, n_positions=256, initializer_range=0.1)
    model = GPT2LMHeadModel(config)
    folder = str(tmp_path_factory.mktemp("tiny_gpt2"))
    model.save_pretrained(folder)
    return folder, model.eval()


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "hellaswag.py"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


# -----------------------------------------------------------------------------
# rendering

EXAMPLE = {"ctx": "A man is sitting on a roof. he", "label": 3,
           "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                       "is holding a rubik's cube.", "starts pulling up roofing on a roof."]}


def test_render_example(enc):
    tokens, mask, label = hellaswag.render_example(EXAMPLE, enc)
    ctx = enc.encode(EXAMPLE["ctx"])
    ends = [enc.encode(" " + e) for e in EXAMPLE["endings"]]
    L = len(ctx) + max(len(e) for e in ends)
    assert label == 3
    assert tokens.shape == mask.shape == (4, L) and tokens.dtype == torch.long
    for i, end in enumerate(ends):
        n = len(ctx) + len(end)
        assert tokens[i].tolist() == ctx + end + [0] * (L - n)
        assert mask[i].tolist() == [0] * len(ctx) + [1] * len(end) + [0] * (L - n)


def test_render_example_crops_the_oldest_context(enc):
    ctx = enc.encode(EXAMPLE["ctx"])
    ends = [enc.encode(" " + e) for e in EXAMPLE["endings"]]  # 11, 6, 8 and 8 tokens
    tokens, mask, _ = hellaswag.render_example(EXAMPLE, enc, max_len=10)
    assert tokens.shape == (4, 10)
    for i, end in enumerate(ends):
        if len(end) < 10:  # the whole ending, after the newest context tokens that fit
            assert tokens[i].tolist() == (ctx + end)[-10:] and mask[i].tolist() == [0] * (10 - len(end)) + [1] * len(end)
        else:  # an ending too long for the window keeps one context token and its own first 9 tokens
            assert tokens[i].tolist() == ctx[-1:] + end[:9] and mask[i].tolist() == [0] + [1] * 9


def test_an_empty_context_scores_every_token_of_the_endings(enc, val_examples):
    example = {"ctx": "", "label": 0, "endings": ["Hello", "a b c", "x", "two words"]}
    tokens, mask, _ = hellaswag.render_example(example, enc)
    for i, ending in enumerate(example["endings"]):
        end = enc.encode_ordinary(" " + ending)
        assert tokens[i, 0].item() == enc.eot_token  # <|endoftext|>, GPT-2's start of a document, predicts them
        assert tokens[i, 1:1 + len(end)].tolist() == end and mask[i, 1:].sum().item() == len(end)
    torch.manual_seed(0)
    model = train_gpt2.GPT(train_gpt2.GPTConfig(block_size=32, n_layer=1, n_head=1, n_embd=16))
    with torch.no_grad():
        sum_loss, mean_loss = hellaswag.per_ending_losses(model, tokens, mask)
    assert torch.isfinite(mean_loss).all()  # a one-token ending is scored on its one token, not on none


def test_an_empty_ending_is_a_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"ctx": "A man", "label": 0, "endings": ["runs.", "", "sits.", "eats."]}) + "\n")
    with pytest.raises(common.UserError, match="line 1 .* 4 non-empty 'endings'"):
        hellaswag.load_examples(data_file=str(path))


def test_evaluate_crops_for_a_model_with_a_short_block_size(val_examples):
    torch.manual_seed(0)
    model = train_gpt2.GPT(train_gpt2.GPTConfig(block_size=32, n_layer=1, n_head=1, n_embd=16))
    examples = [ex for ex in val_examples[:200] if len(ex["ctx"]) > 190][:4]  # about 40 tokens or more
    assert len(examples) == 4
    assert hellaswag.evaluate(model, examples, "cpu")[2] == 4  # would raise in the model without cropping


# -----------------------------------------------------------------------------
# scoring


def reference_losses(model, enc, example):
    """Sum and mean loss of each ending, one sequence at a time, straight from the transformers model."""
    ctx = enc.encode(example["ctx"])
    sums, means = [], []
    for ending in example["endings"]:
        ids = torch.tensor(ctx + enc.encode(" " + ending))
        with torch.no_grad():
            logits = model(ids[None]).logits[0]  # (T, V)
        losses = F.cross_entropy(logits[len(ctx) - 1:-1], ids[len(ctx):], reduction="none")
        sums.append(losses.sum().item())
        means.append(losses.mean().item())
    return torch.tensor(sums), torch.tensor(means)


def test_losses_match_an_independent_computation(tiny_hf, enc, val_examples):
    _, model = tiny_hf
    examples = val_examples[:4]
    # all 4 examples in one padded batch of 16 rows
    tokens, mask, _ = hellaswag.collate([hellaswag.render_example(ex, enc) for ex in examples])
    with torch.no_grad():
        sum_loss, mean_loss = hellaswag.per_ending_losses(model, tokens, mask)
    for i, ex in enumerate(examples):
        ref_sum, ref_mean = reference_losses(model, enc, ex)
        torch.testing.assert_close(sum_loss[4 * i:4 * i + 4], ref_sum, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(mean_loss[4 * i:4 * i + 4], ref_mean, rtol=1e-5, atol=1e-5)


def assert_clear_winners(model, enc, examples, margin=1e-3):
    """Batches pad examples to other lengths, and other shapes round differently (AVX2 and AVX-512 too), so losses
    agree only to fp32 rounding (~1e-6). Predictions (argmin) and counts agree exactly on every CPU only where the
    best ending wins by far more than that: check it for the examples a test compares."""
    for ex in examples:
        tokens, mask, _ = hellaswag.render_example(ex, enc, hellaswag.max_positions(model))
        with torch.no_grad():
            for losses in hellaswag.per_ending_losses(model, tokens, mask):  # sum, then mean
                best, second = losses.sort().values[:2].tolist()
                assert second - best > margin, (ex["ctx"], losses)


def test_batched_and_one_at_a_time_agree(tiny_hf, enc, val_examples):
    _, model = tiny_hf
    examples = val_examples[:8]
    assert_clear_winners(model, enc, examples)
    rendered = [hellaswag.render_example(ex, enc) for ex in examples]
    tokens, mask, labels = hellaswag.collate(rendered)
    with torch.no_grad():
        batched = hellaswag.per_ending_losses(model, tokens, mask)  # one padded batch of 32 rows
        singles = [hellaswag.per_ending_losses(model, t, m) for t, m, _ in rendered]  # 4 rows, no padding
    # the same losses and predictions, example by example...
    predictions = []
    for i, single in enumerate(singles):
        for b, s in zip(batched, single):  # sum, then mean
            torch.testing.assert_close(b[4 * i:4 * i + 4], s, rtol=1e-5, atol=1e-4)
            assert b[4 * i:4 * i + 4].argmin() == s.argmin()
        predictions.append((single[0].argmin().item(), single[1].argmin().item()))
    # ...and the same counts from evaluate in batches (of 3: the last one is short) as one at a time
    one_at_a_time = (sum(p == label for (p, _), label in zip(predictions, labels.tolist())),
                     sum(p == label for (_, p), label in zip(predictions, labels.tolist())), 8)
    assert hellaswag.evaluate(model, examples, "cpu", batch_size=3) == one_at_a_time
    assert hellaswag.evaluate(model, examples[:4], "cpu", batch_size=1) == hellaswag.evaluate(model, examples[:4], "cpu")


def test_evaluate_restores_mode_and_needs_no_grad(tiny_hf, val_examples):
    _, model = tiny_hf
    grad_enabled = []
    hook = model.register_forward_hook(lambda *_: grad_enabled.append(torch.is_grad_enabled()))
    try:
        model.train()
        hellaswag.evaluate(model, val_examples[:4], "cpu", progress=True)
        assert model.training
        model.eval()
        hellaswag.evaluate(model, val_examples[:4], "cpu")
        assert not model.training
    finally:
        hook.remove()
    assert grad_enabled == [False, False]


def test_our_gpt_scores_like_transformers(tiny_hf, enc, val_examples):
    folder, model_hf = tiny_hf
    model = train_gpt2.GPT.from_pretrained(folder)
    examples = val_examples[:16]
    assert_clear_winners(model_hf, enc, examples)  # two implementations: fp32 rounding apart
    assert hellaswag.evaluate(model, examples, "cpu", batch_size=8) == hellaswag.evaluate(model_hf, examples, "cpu", batch_size=8)


def test_cli_scores_a_checkpoint_of_ours_like_the_transformers_folder(tiny_hf, val_examples, tmp_path, capsys):
    folder, model_hf = tiny_hf
    model = train_gpt2.GPT.from_pretrained(folder)
    path = str(tmp_path / "model.pt")  # what train_gpt2.py would write, less the optimizer and data state
    torch.save({"format": checkpoints.CHECKPOINT_FORMAT, "model": model.state_dict(),
                "config": dataclasses.asdict(model.config), "step": 0}, path)
    # both are the same transformers model with the same weights, run the same way: bit for bit on any CPU
    num_correct, num_correct_norm, n = hellaswag.evaluate(model_hf, val_examples[:8], "cpu")
    expected = f"acc {num_correct / n:.4f} acc_norm {num_correct_norm / n:.4f} over 8 examples"
    for name in (path, folder):
        hellaswag.main(["-m", name, "-d", "cpu", "--data_file", VAL_FILE, "--limit", "8"])
        assert capsys.readouterr().out.splitlines()[-1] == expected


def test_cli_200_examples_offline(tiny_hf):
    folder, _ = tiny_hf
    result = run_cli("-m", folder, "-d", "cpu", "--data_file", VAL_FILE, "--limit", "200")
    assert result.returncode == 0, result.stderr
    last = result.stdout.splitlines()[-1]
    match = re.fullmatch(r"acc (\d\.\d{4}) acc_norm (\d\.\d{4}) over (\d+) examples", last)
    assert match, last
    acc, acc_norm, n = float(match[1]), float(match[2]), int(match[3])
    assert n == 200
    assert 0.15 <= acc <= 0.35 and 0.15 <= acc_norm <= 0.35  # a random model is near chance (0.25)
    assert "hellaswag" in result.stderr and "acc_norm=" in result.stderr  # the progress bar


# -----------------------------------------------------------------------------
# precision: fp32 unless asked for bf16


def record_forward(model):
    """A forward hook on model that records, per forward pass, whether autocast was on and the logits' dtype."""
    seen = []

    def hook(module, inputs, out):
        logits = out[0] if isinstance(out, tuple) else out.logits
        seen.append((torch.is_autocast_enabled("cpu"), logits.dtype))

    model.register_forward_hook(hook)
    return seen


def test_evaluate_scores_in_fp32_by_default(val_examples):
    import inspect

    # fp32 on every device, CUDA included (where this test cannot run the model): bf16 must be asked for
    assert inspect.signature(hellaswag.evaluate).parameters["autocast_dtype"].default is torch.float32
    torch.manual_seed(0)
    model = train_gpt2.GPT(train_gpt2.GPTConfig(block_size=256, n_layer=1, n_head=1, n_embd=16))
    seen = record_forward(model)
    hellaswag.evaluate(model, val_examples[:2], "cpu")
    hellaswag.evaluate(model, val_examples[:2], "cpu", autocast_dtype=torch.bfloat16)
    assert seen == [(False, torch.float32), (True, torch.bfloat16)]


@pytest.mark.parametrize("flags, autocast, dtype, precision", [
    ([], False, torch.float32, "fp32"),
    (["--bf16"], True, torch.bfloat16, "bf16 autocast"),
])
def test_cli_scores_in_fp32_unless_bf16(tiny_hf, monkeypatch, capsys, flags, autocast, dtype, precision):
    folder, _ = tiny_hf
    get_model, evaluate = hellaswag.get_model, hellaswag.evaluate
    passed, seen = [], []

    def recording_get_model(name, device):
        model = get_model(name, device)
        seen.append(record_forward(model))
        return model

    def recording_evaluate(*args, **kwargs):
        passed.append(kwargs["autocast_dtype"])  # the command line always says which precision it wants
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(hellaswag, "get_model", recording_get_model)
    monkeypatch.setattr(hellaswag, "evaluate", recording_evaluate)
    hellaswag.main(["-m", folder, "-d", "cpu", "--data_file", VAL_FILE, "--limit", "3", "--batch_size", "2", *flags])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("parameters on cpu; 3 examples; " + precision), lines[0]
    assert re.fullmatch(r"acc \d\.\d{4} acc_norm \d\.\d{4} over 3 examples", lines[-1]), lines[-1]
    assert passed == [dtype]
    assert seen == [[(autocast, dtype)] * 2]  # two forward passes (3 examples, 2 per pass), as asked


def test_cli_help_names_the_precision():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "--bf16" in text and "TF32" in text and "0.2955" in text


def test_importing_hellaswag_leaves_the_training_code_out():
    """Imports flow one way: train_gpt2.py -> run_support.py -> hellaswag.py -> checkpoints.py -> common.py."""
    project = ('train_gpt2', 'run_support', 'model_commands', 'chunked_loss', 'checkpoints', 'common')
    code = f"import sys, hellaswag; print(sorted(m for m in sys.modules if m in {project}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["['checkpoints',", "'common']"]


# -----------------------------------------------------------------------------
# data: checks, downloads, bad input


def test_verify_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"hello\n")
    good = hashlib.sha256(b"hello\n").hexdigest()
    common.verify_file(str(path), 6, good)
    with pytest.raises(common.UserError, match="sha256"):
        common.verify_file(str(path), 6, "0" * 64)
    with pytest.raises(common.UserError, match="bytes"):
        common.verify_file(str(path), 7, good)


class FakeResponse(io.BytesIO):
    """What urlopen returns, serving bytes from memory. On every read it checks that nothing is at the final
    path yet and that the bytes go to a temporary file in the same folder."""

    def __init__(self, data, final_path):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}
        self.final_path = final_path

    def read(self, n=-1):
        assert not os.path.exists(self.final_path)
        name = os.path.basename(self.final_path)
        assert any(f.startswith(name + ".tmp") for f in os.listdir(os.path.dirname(self.final_path)))
        return super().read(min(n, 7))  # small pieces, so that reads happen while the file is being written


def test_download_writes_a_temporary_file_then_renames_it(tmp_path, monkeypatch):
    data = b'{"ctx": "A man", "endings": ["a.", "b.", "c.", "d."], "label": 1}\n' * 3
    path = str(tmp_path / "hellaswag_train.jsonl")
    urls = []  # (the fake reads `path` when called: it checks whichever file is being downloaded)
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: urls.append(url) or FakeResponse(data, path))
    hellaswag.download("https://example.com/x", path, len(data), hashlib.sha256(data).hexdigest())
    assert open(path, "rb").read() == data and os.listdir(tmp_path) == ["hellaswag_train.jsonl"]
    # a download whose hash is wrong is deleted, and nothing appears at the final path
    os.remove(path)
    with pytest.raises(common.UserError, match="sha256"):
        hellaswag.download("https://example.com/x", path, len(data), "0" * 64)
    assert os.listdir(tmp_path) == []
    # load_examples downloads into DATA_DIR from the rowanz/hellaswag URL, and checks the val file
    monkeypatch.setattr(hellaswag, "DATA_DIR", str(tmp_path))
    assert hellaswag.load_examples("train")[0]["label"] == 1
    assert urls[-1] == "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_train.jsonl"
    path = str(tmp_path / "hellaswag_val.jsonl")
    with pytest.raises(common.UserError, match="12,246,618"):
        hellaswag.load_examples("val")
    assert not os.path.exists(path)


def test_network_failure_is_one_clear_error(tmp_path, monkeypatch):
    def no_network(url, timeout):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(hellaswag, "DATA_DIR", str(tmp_path))
    with pytest.raises(common.UserError, match="connect to the network, or use a local copy .* --data_file"):
        hellaswag.load_examples("val")
    assert os.listdir(tmp_path) == []


def test_bad_data_file_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"ctx": "A man", "endings": ["a.", "b.", "c.", "d."]}\n')  # no label, like the test split
    with pytest.raises(common.UserError, match="line 1 .* not a labelled HellaSwag example"):
        hellaswag.load_examples(data_file=str(path))


@pytest.mark.parametrize("args", [
    ["--data_file", "no/such/file.jsonl"],
    ["--data_file", VAL_FILE, "--limit", "0"],
    ["--data_file", VAL_FILE, "--limit", "-3"],
    ["--data_file", VAL_FILE, "--limit", "many"],
    ["--data_file", VAL_FILE, "-m", "no-such-model-here", "--limit", "1"],
    ["--data_file", VAL_FILE, "-m", VAL_FILE, "--limit", "1"],  # a file, but not a checkpoint
    ["--data_file", VAL_FILE, "-d", "nonsense"],
])
def test_cli_user_mistakes(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        hellaswag.main(["-d", "cpu", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err


def test_cli_user_mistake_has_no_traceback():
    result = run_cli("--data_file", "no/such/file.jsonl", "-d", "cpu")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: data file no/such/file.jsonl does not exist"]
