"""Using a trained model: --sample from the command line, --export_hf to a standard transformers folder."""
import os

import pytest
import torch

import checkpoints
import train_gpt2
from train_gpt2 import GPT, GPTConfig


@pytest.fixture
def checkpoint(tmp_path):
    """A checkpoint of ours with the padded vocabulary (50304), every weight random and non-trivial."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = str(tmp_path / "model_00010.pt")
    checkpoints.save_checkpoint(path, {"step": 10,
                                      "model": model.state_dict(), "config": {"block_size": 64, "vocab_size": 50304,
                                                                              "n_layer": 2, "n_head": 2, "n_embd": 32}})
    return path, model.eval()


def test_export_matches_our_logits_and_loads_everywhere(tmp_path, checkpoint, capsys):
    from transformers import GPT2LMHeadModel, pipeline

    path, model = checkpoint
    out = str(tmp_path / "hf")
    assert train_gpt2.main(["--export_hf", path, out]) == 0
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= set(os.listdir(out))
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf.config.vocab_size == 50257
    idx = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    rel = ((ours[..., :50257] - theirs).abs().max() / theirs.abs().max()).item()
    assert rel < 1e-5, rel
    back = GPT.from_pretrained(out).eval()  # and it loads back into our GPT
    with torch.no_grad():
        torch.testing.assert_close(back(idx)[0], theirs, rtol=1e-5, atol=1e-5)
    generator = pipeline("text-generation", model=out)
    text = generator("Hello, I'm a language model,", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("Hello, I'm a language model,") and len(text) > len("Hello, I'm a language model,")


def test_export_refuses_a_non_empty_folder(tmp_path, checkpoint, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert train_gpt2.main(["--export_hf", checkpoint[0], str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert os.listdir(out) == ["keep.txt"]


def test_sample_from_a_checkpoint_is_seeded(checkpoint, capsys):
    args = ["--sample", checkpoint[0], "--prompt", "Once upon a time", "--num_samples", "3",
            "--max_new_tokens", "12"]
    assert train_gpt2.main(args + ["--seed", "7"]) == 0
    first = capsys.readouterr().out.splitlines()
    assert train_gpt2.main(args + ["--seed", "7"]) == 0
    again = capsys.readouterr().out.splitlines()
    assert train_gpt2.main(args + ["--seed", "8"]) == 0
    other = capsys.readouterr().out.splitlines()
    samples = [l for l in first if l.startswith("sample ")]
    assert len(samples) == 3 and all(l.split(": ", 1)[1].startswith("Once upon a time") for l in samples)
    assert first == again and first != other


def test_sample_from_a_hugging_face_folder(hf_model_dir, capsys):
    assert train_gpt2.main(["--sample", hf_model_dir, "--num_samples", "2", "--max_new_tokens", "5"]) == 0
    assert len([l for l in capsys.readouterr().out.splitlines() if l.startswith("sample ")]) == 2


def test_sample_bad_input(tmp_path, checkpoint, capsys):
    assert train_gpt2.main(["--sample", str(tmp_path / "nope.pt")]) == 2
    assert train_gpt2.main(["--sample", checkpoint[0], "--max_new_tokens", "500"]) == 2
    assert train_gpt2.main(["--sample", checkpoint[0], "--num_samples", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(l.startswith("error: ") for l in err)
