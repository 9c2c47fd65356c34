"""
Model files: the checkpoints train_gpt2.py writes, and OpenAI's GPT-2 as Hugging Face serves it.

  1. Our checkpoints   a dict of tensors and plain values (train_gpt2.py's loop shows what it holds), written
                       atomically, read without trusting the file, found by step in a run's folder
  2. Hugging Face      GPT-2 from the hub or a local folder, with one-line errors offline; and one of our
                       checkpoints as a transformers GPT-2 (hellaswag.py scores it, --export_hf saves it)

transformers is imported only where a function needs it: it costs seconds, and training from scratch never does.
"""

import os
import pickle
import zipfile

import torch

from common import UserError, one_line

# -----------------------------------------------------------------------------
# 1. Our checkpoints
#
# torch.load(weights_only=True) refuses pickled classes and code, so opening a checkpoint from anywhere can never
# run anything: a checkpoint holds tensors and plain Python values (numbers, strings, lists, dicts) only.

CHECKPOINT_FORMAT = "train_gpt2 checkpoint v1"


def checkpoint_path(log_dir, step):
    return os.path.join(log_dir, f"model_{step:05d}.pt")


def checkpoint_step(path):
    """The step in a checkpoint's name (model_00290.pt: 290), or -1 for another name."""
    name = os.path.basename(path)
    digits = name[len("model_"):-len(".pt")]
    return int(digits) if name.startswith("model_") and name.endswith(".pt") and digits.isdigit() else -1


def list_checkpoints(log_dir):
    """Complete checkpoints in log_dir, oldest first (a file being written has a .tmp name and is not listed)."""
    if not os.path.isdir(log_dir):
        return []
    names = sorted((n for n in os.listdir(log_dir) if checkpoint_step(n) >= 0), key=checkpoint_step)  # by step:
    return [os.path.join(log_dir, n) for n in names]  # model_100000.pt after model_99999.pt


def save_checkpoint(path, state):
    """Write to a temporary name, flush it to disk, then rename: a crash or kill -9 at any moment leaves either
    the old files or the complete new one under the final name, never half a checkpoint."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": CHECKPOINT_FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except BaseException:  # a full disk, the folder gone, Ctrl-C: leave no half-written file behind either
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path):
    """Read a checkpoint without trusting it: tensors and plain values only. Any problem is a one-line UserError,
    in words of its own: torch's message would suggest loading with weights_only=False, which could run code."""
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder, not a checkpoint file: give a model_NNNNN.pt, or --resume auto with "
                        f"--log_dir {path} for the newest one there")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; its index is at the end of the file
        raise UserError(f"{path} is not a loadable checkpoint: not a file that torch.save writes (or one cut short)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only met something other than tensors and plain values
        raise UserError(f"{path} is not a loadable checkpoint: it holds Python objects that a checkpoint of "
                        f"train_gpt2.py never does, and loading those could run code, so it was not read") from e
    except Exception as e:  # a zip archive that is not torch's, or damaged: torch raises several kinds of errors
        raise UserError(f"{path} is not a loadable checkpoint (damaged, or not written by torch.save: "
                        f"{type(e).__name__})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a checkpoint written by train_gpt2.py")
    return ckpt


# -----------------------------------------------------------------------------
# 2. Hugging Face's GPT-2

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # OpenAI's four, on the Hugging Face hub


def load_hf_gpt2(name_or_path):
    """transformers' GPT2LMHeadModel: one of GPT2_NAMES (downloaded once into Hugging Face's cache) or a local
    folder written by save_pretrained. No network, an unknown name or a folder without a model: one line."""
    if name_or_path not in GPT2_NAMES and not os.path.isdir(name_or_path):
        raise UserError(f"unknown model '{name_or_path}': use one of {', '.join(GPT2_NAMES)}, or a folder with a "
                        f"GPT-2 checkpoint")
    from huggingface_hub.utils import enable_progress_bars
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' bar over reading the weights from disk (a second or two)...
    enable_progress_bars()  # ...but not the hub's download bars, which that turned off too
    try:
        return GPT2LMHeadModel.from_pretrained(name_or_path)
    except OSError as e:  # transformers reports "can't reach the hub" and "no such files" as OSError
        raise UserError(f"could not load '{name_or_path}' ({one_line(e)}); check the network or the folder") from e


def hf_model_from_checkpoint(ckpt, vocab_size=None):
    """A transformers GPT2LMHeadModel holding a checkpoint's weights (the keys are GPT-2's names in both). Its
    attention and MLP layers are Conv1D modules, whose weights are the transpose of our nn.Linear's. vocab_size
    cuts a padded vocabulary's rows (50304 -> 50257): those rows are never a training target, so training only
    pushes their logits down, and they never win a prediction that matters."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    c, sd = ckpt["config"], ckpt["model"]
    vocab_size = vocab_size or c["vocab_size"]
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=c["block_size"], n_embd=c["n_embd"],
                                    n_layer=c["n_layer"], n_head=c["n_head"], bos_token_id=50256,
                                    eos_token_id=50256))
    conv1d = {f"{name}.weight" for name, module in hf.named_modules() if isinstance(module, Conv1D)}
    with torch.no_grad():
        for k, p in hf.named_parameters():  # lm_head.weight is transformer.wte.weight: listed once
            src = sd[k].t() if k in conv1d else sd[k]
            p.copy_(src[:vocab_size] if k == "transformer.wte.weight" else src)
    return hf.eval()


def hf_model_from_file(path):
    """hf_model_from_checkpoint for a checkpoint file; a file whose weights do not fit is a UserError."""
    try:
        return hf_model_from_checkpoint(load_checkpoint(path))
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise UserError(f"{path}: its weights do not fit the model it describes ({one_line(e)})") from e
