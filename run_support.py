"""
What a real training run needs beyond the lecture's script, kept out of train_gpt2.py's reading path.

train_gpt2.py calls these by name; fineweb.py, hellaswag.py and bench.py share the first two sections.

  1. User errors        UserError, a one-line argparse, run_training: 'error: ...' and exit status 2
  2. Files              checked downloads, Tiny Shakespeare, GPT-2's tokenizer from the committed files
  3. Settings           the flags, the presets for machines without the lecture's GPUs or data, the checks,
                        and rank 0's decisions that every process follows
  4. Device and speed   device and dtype choice, where the chunked loss is on by default, MFU
  5. Checkpoints        safe loading, atomic saving, exact resume, log.txt and config.json
  6. Stopping           Ctrl-C and SIGTERM end the run cleanly, on every process together
  7. Using a model      --sample and --export_hf, Hugging Face conversion (also for hellaswag.py)

Imports flow one way: train_gpt2.py -> hellaswag.py -> run_support.py (and train_gpt2.py -> chunked_loss.py).
This file imports no project file, and
torch only inside the functions that use it: fineweb.py uses sections 1 and 2 and needs no torch (importing it
costs a process 2-3 s and 180 MB on a 2-core CPU).
"""

import argparse
import hashlib
import http.client
import json
import os
import signal
import socket
import sys
import urllib.request
from dataclasses import asdict

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# 1. User errors: one convention for train_gpt2.py, fineweb.py, hellaswag.py and bench.py


class UserError(Exception):
    """A mistake the user can fix (a flag, a path, a file, no network): printed as one line 'error: ...', exit 2."""


class SharedUserError(UserError):
    """A UserError that every process of a DDP job raises together: each node prints it once (its local rank 0)."""


class TrainingDiverged(Exception):
    """The loss became NaN or infinite: the run stops with exit status 1, the last good checkpoint stays as it is."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a mistake on the command line is one line 'error: ...' and exit status 2."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def report_user_errors(fn, *args, **kwargs):
    """Run fn; a UserError becomes one line 'error: ...' on stderr and the return value 2."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def one_line(e):
    """The first line of an exception's message (or its type's name), for an error that must fit on one line."""
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def run_training(train, args):
    """train(args), with the exit statuses of the command line: 0 done, 1 diverged, 2 a user's mistake, 128+N
    stopped by signal N. DDP processes leave together: none tears its process group down while another uses it."""
    import torch.distributed as dist

    try:
        code = train(args)
        if dist.is_initialized():
            dist.barrier()
        return code
    except UserError as e:
        if not isinstance(e, SharedUserError) or int(os.environ.get("LOCAL_RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        StopRequest.restore_handlers()
        if dist.is_initialized():
            dist.destroy_process_group()


# -----------------------------------------------------------------------------
# 2. Files: checked downloads, Tiny Shakespeare, GPT-2's tokenizer


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_file(path, size, sha256, name=None):
    """Raise UserError unless the file has exactly this size and sha256 (the size first: it costs nothing)."""
    name = name or path
    actual = os.path.getsize(path)
    if size is not None and actual != size:
        raise UserError(f"{name} has {actual:,} bytes, not the expected {size:,}")
    digest = sha256_of(path)
    if digest != sha256:
        raise UserError(f"{name} has sha256 {digest}, not the expected {sha256}")


def download(url, path, size=None, sha256=None, hint="connect to the network"):
    """Download url to path with a progress bar. The bytes go to a temporary file beside path, which is checked
    (when sha256 is given) and only then renamed to path: an interrupted or corrupted download never leaves a
    file at path that a later run would trust. `hint` ends the error message when the download fails."""
    from tqdm import tqdm

    tmp = f"{path}.tmp{os.getpid()}"  # one per process: several processes may download at once
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None  # the bar has no end without it
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {os.path.basename(path)}") as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        if sha256 is not None:
            verify_file(tmp, size, sha256, name=f"the download of {url}")
        os.replace(tmp, path)  # atomic: path is either absent or complete
    except (OSError, http.client.HTTPException) as e:  # no network, timeout, HTTP error, dropped connection
        raise UserError(f"could not download {url} ({e}); {hint}") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


TINY_SHAKESPEARE = os.path.join(HERE, "input.txt")  # committed: the default data needs no network
TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
FINEWEB_SHARDS = os.path.join(HERE, "edu_fineweb10B")  # where fineweb.py writes by default


def ensure_tiny_shakespeare(path=TINY_SHAKESPEARE):
    """The committed input.txt; if it was deleted, download it again (checked) or say why not."""
    if os.path.exists(path):
        return
    print(f"downloading Tiny Shakespeare to {path}", flush=True)
    try:
        download(TINY_SHAKESPEARE_URL, path, sha256=TINY_SHAKESPEARE_SHA256)
    except UserError as e:  # the network's error, or a download that failed its checksum
        raise UserError(f"{os.path.basename(path)} is missing and could not be downloaded from {TINY_SHAKESPEARE_URL} "
                        f"({e.__cause__ or e}); restore it (git checkout {os.path.basename(path)}), connect to the "
                        f"network, or pass --data PATH") from e


# GPT-2's BPE tokenizer: OpenAI's two files, committed in gpt2_tokenizer/ (Hugging Face calls them vocab.json and
# merges.txt). tiktoken downloads the same files from these URLs and checks the same sha256.
TOKENIZER_DIR = os.path.join(HERE, "gpt2_tokenizer")
GPT2_TOKENIZER_FILES = {
    "encoder.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                     "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "vocab.bpe": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                  "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}


def tokenizer_file(name):
    """The bytes of one GPT-2 tokenizer file: the committed copy when it is there and intact, else tiktoken's
    cache or a download (both checked by tiktoken against the same sha256)."""
    url, sha256 = GPT2_TOKENIZER_FILES[name]
    path = os.path.join(TOKENIZER_DIR, name)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() == sha256:
            return data
    from tiktoken.load import read_file_cached

    return read_file_cached(url, sha256)


def gpt2_byte_symbols():
    """GPT-2's printable stand-in for each byte (GPT-2's encoder.py, bytes_to_unicode): the 188 printable bytes
    stand for themselves, the other 68 (controls, space, ...) for the characters 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}, printable + others


_tokenizer = None


def get_tokenizer():
    """tiktoken's "gpt2" encoding, built from OpenAI's files (see tokenizer_file): the same ranks, pattern and
    <|endoftext|> token as tiktoken.get_encoding("gpt2"), without its download."""
    global _tokenizer
    if _tokenizer is not None:
        return _tokenizer
    import tiktoken

    try:
        merges, encoder = tokenizer_file("vocab.bpe").decode(), json.loads(tokenizer_file("encoder.json"))
    except Exception as e:  # no committed files, no cache and no network: requests' or tiktoken's errors
        raise UserError(f"could not load the GPT-2 tokenizer ({type(e).__name__}): restore gpt2_tokenizer/, "
                        f"connect to the network, or set TIKTOKEN_CACHE_DIR to a folder holding its files") from e
    symbol_of, byte_order = gpt2_byte_symbols()
    byte_of = {s: b for b, s in symbol_of.items()}
    # rank 0..255: the single bytes, in GPT-2's order; then one rank per merge, in the order they were learned
    ranks = {bytes([b]): i for i, b in enumerate(byte_order)}
    for line in merges.split("\n")[1:]:  # the first line is a version comment
        if line:
            first, second = line.split()
            ranks[bytes(byte_of[c] for c in first + second)] = len(ranks)
    # encoder.json holds the same ranks, spelled with the stand-in characters: check that they agree
    as_json = {bytes(byte_of[c] for c in k): v for k, v in encoder.items() if k not in ("<|endoftext|>", "<|startoftext|>")}
    if as_json != ranks or encoder.get("<|endoftext|>") != 50256:
        raise UserError("the GPT-2 tokenizer files disagree with each other: restore gpt2_tokenizer/")
    from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenizer regex

    _tokenizer = tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                   special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)
    return _tokenizer


def find_shards(folder, split):
    """The .npy shards of a split ('train' or 'val') in a folder written by fineweb.py, in name order."""
    paths = [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.endswith(".npy") and split in n]
    if not paths:
        raise UserError(f"no {split} shards (*{split}*.npy) in {folder}; write them with fineweb.py "
                        f"or pass --data with a text file")
    return paths


def load_shard(path):
    """A shard as a read-only memory map: a 1-D uint16 array of token ids (mapping reads only the header, so
    opening every shard up front is cheap). Anything else is a UserError naming the file."""
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # truncated file, not numpy at all, a pickle: numpy raises several kinds of errors
        raise UserError(f"shard {path} is not a readable .npy file ({e}); rerun fineweb.py to rewrite it") from e
    if tokens.ndim != 1 or tokens.dtype != np.uint16:
        raise UserError(f"shard {path} holds a {tokens.ndim}-D {tokens.dtype} array; a shard must be a 1-D uint16 "
                        f"array of token ids (as fineweb.py writes it)")
    return tokens


# -----------------------------------------------------------------------------
# 3. Settings: flags, presets, checks, and rank 0's decisions

# The runs `python train_gpt2.py` picks when it cannot run the lecture's (train_gpt2.GPT2_124M_FINEWEB): flags
# given on the command line win over all of them.
PRESETS = {
    # a GPU without FineWeb-Edu shards: the 124M model on Tiny Shakespeare, a quick look at learning at full size
    "gpt2-124M-shakespeare": dict(
        n_layer=12, n_head=12, n_embd=768, vocab_size=50304, total_batch_size=16 * 1024, batch_size=16,
        seq_len=1024, max_lr=6e-4, warmup_steps=10, max_steps=50,  # the lecture's first learning check
        eval_every=25, hellaswag_every=0, sample_every=50, checkpoint_every=50, val_tokens=10**9,
    ),
    # CPU (or MPS): a small model that learns Tiny Shakespeare in minutes on a laptop
    "small": dict(
        n_layer=4, n_head=4, n_embd=128, vocab_size=50304, total_batch_size=8 * 128, batch_size=8, seq_len=128,
        max_lr=2e-3,  # small models tolerate (and need) a larger learning rate than 124M
        # 290 x 1024 tokens: just under one pass over the 304K training tokens (a second pass overfits: the
        # validation loss went from 5.66 at step 300 up to 5.88 at step 400 in a 400-step run on a CPU)
        warmup_steps=20, max_steps=290,
        eval_every=100, hellaswag_every=0, sample_every=290, checkpoint_every=290, val_tokens=10**9,
    ),
}


def build_parser(lecture_run):
    p = ArgumentParser(
        description="Reproduce GPT-2 (124M): train a GPT-2 model from scratch (or fine-tune one), on a CPU, one GPU, "
                    "or many with torchrun. With no flags it picks a run for this machine and says why.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # Flags whose default is None are filled from the chosen preset and reported at start.
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help="a text file (90%% train, 10%% val) or a folder of fineweb.py shards; default: "
                        "edu_fineweb10B/ next to train_gpt2.py if it has shards, else input.txt (Tiny Shakespeare)")
    g.add_argument("--val_tokens", type=int, default=None, help="validation tokens per evaluation (capped at the split)")
    g = p.add_argument_group("model")
    g.add_argument("--init_from", default="scratch",
                   help="'scratch', or a GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or folder to fine-tune")
    g.add_argument("--n_layer", type=int, default=None, help="transformer blocks")
    g.add_argument("--n_head", type=int, default=None, help="attention heads")
    g.add_argument("--n_embd", type=int, default=None, help="model width")
    g.add_argument("--vocab_size", type=int, default=None,
                   help=f"rows of the embedding and output layer (the lecture: {lecture_run['vocab_size']}, GPT-2's "
                        f"50257 padded to a multiple of 128)")
    g.add_argument("--block_size", type=int, default=1024, help="longest sequence the model takes (GPT-2: 1024)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--total_batch_size", type=int, default=None, help="tokens per optimizer step")
    g.add_argument("--batch_size", "-B", type=int, default=None,
                   help="micro-batch size per process (a preset's is lowered if the processes cannot share the batch)")
    g.add_argument("--seq_len", "-T", type=int, default=None, help="sequence length")
    g.add_argument("--max_steps", type=int, default=None, help="optimizer steps")
    g.add_argument("--warmup_steps", type=int, default=None, help="linear warmup steps")
    g.add_argument("--max_lr", type=float, default=None, help="peak learning rate")
    g.add_argument("--min_lr", type=float, default=None, help="final learning rate (default: 10%% of max_lr)")
    g.add_argument("--weight_decay", type=float, default=0.1, help="AdamW weight decay (GPT-3: 0.1)")
    g.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm to this (GPT-3: 1.0)")
    g.add_argument("--seed", type=int, default=1337, help="seed of the weights and of the data order")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="where to train")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on with CUDA, off elsewhere)")
    g.add_argument("--chunked_loss", action=argparse.BooleanOptionalAction, default=None,
                   help="compute the output layer and the loss in chunks (chunked_loss.py) instead of the lecture's "
                        "F.cross_entropy (default: on for CPUs in fp32 without compile, where it was measured faster)")
    g = p.add_argument_group("evaluation, logging and checkpoints")
    g.add_argument("--eval_every", type=int, default=None, help="validation loss every N steps (0: never)")
    g.add_argument("--hellaswag_every", type=int, default=None, help="HellaSwag accuracy every N steps (0: never)")
    g.add_argument("--hellaswag_file", default=None, help="a local HellaSwag val jsonl (default: download it once)")
    g.add_argument("--hellaswag_batch_size", type=int, default=16, help="HellaSwag examples per forward pass")
    g.add_argument("--hellaswag_examples", type=int, default=0,
                   help="score only the first N HellaSwag val examples (0: all 10,042), for quick runs")
    g.add_argument("--sample_every", type=int, default=None, help="print samples every N steps (0: never)")
    g.add_argument("--checkpoint_every", type=int, default=None, help="save a checkpoint every N steps (0: never)")
    g.add_argument("--keep_checkpoints", type=int, default=0, help="keep only the newest N checkpoints (0: all)")
    g.add_argument("--log_dir", default="log", help="where log.txt, config.json and checkpoints go")
    g.add_argument("--resume", default=None,
                   help="continue from a checkpoint file, or 'auto': the newest one in --log_dir (fresh start if none)")
    g = p.add_argument_group("using a trained model (instead of training)")
    g.add_argument("--sample", metavar="MODEL", default=None,
                   help="print samples from a checkpoint of ours or a GPT-2 name/folder, then exit")
    g.add_argument("--prompt", default="Hello, I'm a language model,", help="with --sample: the text to continue")
    g.add_argument("--num_samples", type=int, default=4, help="with --sample: how many continuations")
    g.add_argument("--max_new_tokens", type=int, default=64, help="with --sample: tokens to add to the prompt")
    g.add_argument("--top_k", type=int, default=50, help="with --sample: sample from the k most likely tokens")
    g.add_argument("--export_hf", nargs=2, metavar=("CHECKPOINT", "OUT_DIR"), default=None,
                   help="write a checkpoint as a Hugging Face GPT-2 folder (safetensors + tokenizer), then exit")
    return p


# the settings that change the math of a run: a resumed run must use the same ones
MATH_SETTINGS = ("data", "total_batch_size", "batch_size", "seq_len", "max_steps", "warmup_steps", "max_lr",
                 "min_lr", "weight_decay", "grad_clip", "seed", "n_layer", "n_head", "n_embd", "vocab_size",
                 "init_from")


def decide_settings(args, lecture_run, device_type, world_size):
    """Fill the flags left unset from the run chosen for this machine and data, and check every value (on rank 0,
    whose choice all processes follow). Returns (settings, reasons, path of the checkpoint to resume or None)."""
    # the training settings: every flag but those of --sample and --export_hf, which never reach a training run
    model_command_flags = ("sample", "prompt", "num_samples", "max_new_tokens", "top_k", "export_hf")
    s = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in model_command_flags})
    reasons = []
    if s.data is None:
        if os.path.isdir(FINEWEB_SHARDS) and any(n.endswith(".npy") and "train" in n for n in os.listdir(FINEWEB_SHARDS)):
            s.data = FINEWEB_SHARDS
            reasons.append(f"data: {FINEWEB_SHARDS} (FineWeb-Edu shards found there)")
        else:
            s.data = TINY_SHAKESPEARE
            reasons.append(f"data: {TINY_SHAKESPEARE} (no FineWeb-Edu shards in {FINEWEB_SHARDS}: run fineweb.py "
                           f"for the real thing)")
            ensure_tiny_shakespeare()
    if not os.path.exists(s.data):
        raise UserError(f"--data {s.data} does not exist; pass a text file or a folder of fineweb.py shards")
    if s.init_from != "scratch":
        adopt_pretrained_shape(s)
    if device_type != "cuda":
        name = "small"  # the 124M model would need weeks on a CPU: a small model shows learning in minutes
    else:
        name = "gpt2-124M-fineweb" if os.path.isdir(s.data) else "gpt2-124M-shakespeare"
    preset = lecture_run if name == "gpt2-124M-fineweb" else PRESETS[name]
    filled = [k for k, v in preset.items() if getattr(s, k) is None]
    for k in filled:
        setattr(s, k, preset[k])
    if filled:
        reasons.append(f"preset: {name} for {', '.join(filled)} (data is "
                       f"{'a shard folder' if os.path.isdir(s.data) else 'a text file'}, device {device_type})")
    if s.min_lr is None:
        s.min_lr = 0.1 * s.max_lr  # GPT-3 decays to 10% of the peak
    if s.compile is None:
        s.compile = device_type == "cuda"
        reasons.append(f"compile: {'on' if s.compile else 'off'} (default: on with CUDA only, where it pays off)")
    check_values(s)
    if s.chunked_loss is None:
        s.chunked_loss = chunked_loss_by_default(device_type, pick_dtype(device_type, []), s.compile)
        reasons.append(f"chunked loss: {'on' if s.chunked_loss else 'off'} (default: on for CPUs in fp32 without "
                       f"compile, where it was measured faster; elsewhere the lecture's F.cross_entropy)")
    fit_micro_batch(s, world_size, "batch_size" in filled, reasons)
    resume_path = s.resume
    if s.resume == "auto":
        found = list_checkpoints(s.log_dir)
        resume_path = found[-1] if found else None
        reasons.append(f"resume: {resume_path or f'no checkpoint in {s.log_dir}, starting fresh'}")
    return s, reasons, resume_path


def check_values(s):
    for name in ("total_batch_size", "batch_size", "seq_len", "max_steps", "n_layer", "n_head", "n_embd",
                 "vocab_size", "block_size", "val_tokens", "hellaswag_batch_size"):
        if getattr(s, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(s, name)}")
    for name in ("warmup_steps", "eval_every", "hellaswag_every", "sample_every", "checkpoint_every",
                 "keep_checkpoints", "weight_decay", "hellaswag_examples"):
        if getattr(s, name) < 0:
            raise UserError(f"--{name} must be 0 or more, got {getattr(s, name)}")
    if not s.max_lr > 0 or not 0 <= s.min_lr <= s.max_lr or not s.grad_clip > 0:
        raise UserError(f"need 0 < --max_lr, 0 <= --min_lr <= --max_lr and --grad_clip > 0 "
                        f"(got {s.max_lr}, {s.min_lr}, {s.grad_clip})")
    if s.n_embd % s.n_head != 0:
        raise UserError(f"--n_embd {s.n_embd} must be a multiple of --n_head {s.n_head}")
    if s.seq_len > s.block_size:
        raise UserError(f"--seq_len {s.seq_len} is longer than the model's block size {s.block_size}")
    if s.hellaswag_every > 0 and s.hellaswag_file is not None and not os.path.isfile(s.hellaswag_file):
        raise UserError(f"--hellaswag_file {s.hellaswag_file} does not exist")
    check_log_dir(s.log_dir)


def check_log_dir(log_dir):
    """--log_dir must be a folder that exists or can be made, and be writable: found now, not at the first save."""
    path = os.path.abspath(log_dir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"--log_dir {log_dir}: {path} is not a folder this process can write to")


def fit_micro_batch(s, world_size, from_preset, reasons):
    """Each step is total_batch_size tokens = batch_size x seq_len x processes x accumulation steps. A preset's
    micro-batch that does not divide it (16 GPUs: 524,288 / (64 x 1024 x 16) is not whole) shrinks to the largest
    one that does; the tokens of a step stay the same (see train_gpt2.py's data section)."""
    per_sequence = s.seq_len * world_size
    if s.total_batch_size % (s.batch_size * per_sequence) != 0:
        fits = [b for b in range(s.batch_size, 0, -1) if s.total_batch_size % (b * per_sequence) == 0]
        if not fits:
            works = -(-s.total_batch_size // per_sequence) * per_sequence
            raise UserError(f"--total_batch_size {s.total_batch_size} must be divisible by seq_len x processes = "
                            f"{s.seq_len} x {world_size} = {per_sequence} (times a whole micro-batch); "
                            f"--total_batch_size {works} would fit")
        if not from_preset:
            raise UserError(f"--total_batch_size {s.total_batch_size} must be divisible by batch_size x seq_len x "
                            f"processes = {s.batch_size} x {s.seq_len} x {world_size} = {s.batch_size * per_sequence}; "
                            f"--batch_size {fits[0]} would fit")
        reasons.append(f"batch_size: {fits[0]} instead of the preset's {s.batch_size}, the largest micro-batch with "
                       f"which {world_size} processes x {s.seq_len} tokens divide {s.total_batch_size:,} tokens")
        s.batch_size = fits[0]
    grad_accum = s.total_batch_size // (s.batch_size * per_sequence)
    reasons.append(f"gradient accumulation: {grad_accum} micro-steps per process "
                   f"({s.total_batch_size} / ({s.batch_size} x {s.seq_len} x {world_size}))")


def adopt_pretrained_shape(s):
    """Fine-tuning (--init_from NAME or FOLDER): the model's shape is the pretrained model's, so the settings (and
    config.json and the checkpoints) record that shape; a shape flag that disagrees with it is an error."""
    names = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
    if s.init_from not in names and not os.path.isdir(s.init_from):
        raise UserError(f"--init_from {s.init_from}: not 'scratch', a GPT-2 name ({', '.join(names)}) "
                        f"or a folder with a Hugging Face GPT-2 checkpoint")
    from transformers import GPT2Config

    try:
        c = GPT2Config.from_pretrained(s.init_from)
    except (OSError, ValueError) as e:  # offline without a cached copy, or a folder without a config.json
        raise UserError(f"--init_from {s.init_from}: could not read its config ({one_line(e)}); check the network "
                        f"or the folder") from e
    shape = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, vocab_size=c.vocab_size, block_size=c.n_positions)
    for k, v in shape.items():
        given = getattr(s, k)
        if k != "block_size" and given is not None and given != v:
            raise UserError(f"--{k} {given}, but --init_from {s.init_from} has {k} {v}; leave it out when fine-tuning")
        setattr(s, k, v)


def broadcast_from_rank0(obj):
    """Rank 0's obj on every process (any picklable value); obj itself without DDP."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree_on_errors(error):
    """Every process passes its error (None, or (kind, message)); if any process has one, all of them raise the
    first, naming that process's node: a node that cannot go on stops the whole job instead of leaving the others
    waiting in a collective until it times out."""
    import torch.distributed as dist

    node = os.environ.get("GROUP_RANK", "0")  # torchrun's number of this node
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, (node, socket.gethostname(), dist.get_rank(), error))
    for node, host, rank, error in errors:
        if error is not None:
            kind, message = error
            message = f"node {node} ({host}, rank {rank}): {message}"
            raise SharedUserError(message) if kind == "user" else RuntimeError(message)


def as_error(e):
    return ("user", str(e)) if isinstance(e, UserError) else ("bug", f"{type(e).__name__}: {one_line(e)}")


def on_every_node(fn):
    """fn() on every process, each node's local rank 0 first (it does the node's downloads, and the others then
    find the files). If fn fails on any process, every process raises the same one-line error naming that node."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return fn()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    result = None
    for turn in (0, 1):  # turn 0: the local ranks 0; turn 1: all the others
        error = None
        if (local_rank == 0) == (turn == 0):
            try:
                result = fn()
            except Exception as e:  # whatever it is, the other processes must hear of it
                error = as_error(e)
        agree_on_errors(error)  # (also the barrier between the turns)
    return result


def resolve_settings(args, lecture_run, device_type, ddp_rank, ddp_world_size, reasons):
    """Rank 0 decides the settings (data, preset, micro-batch, the checkpoint to resume) and every process follows.
    Each node then loads that checkpoint from its own disk; a node without it stops the whole job. Returns the
    settings and the loaded checkpoint (None for a fresh start)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        s, more_reasons, resume_path = decide_settings(args, lecture_run, device_type, ddp_world_size)
    else:
        decision = None
        if ddp_rank == 0:
            try:
                decision = ("ok", decide_settings(args, lecture_run, device_type, ddp_world_size))
            except Exception as e:  # whatever it is, the other processes must hear of it
                decision = ("error", as_error(e))
        decision = broadcast_from_rank0(decision)
        if decision[0] == "error":
            kind, message = decision[1]
            raise SharedUserError(message) if kind == "user" else RuntimeError(message)
        s, more_reasons, resume_path = decision[1]
    reasons.extend(more_reasons)

    def load_here():
        if s.data == TINY_SHAKESPEARE:
            ensure_tiny_shakespeare()
        if not os.path.exists(s.data):
            raise UserError(f"--data {s.data} does not exist here; every node needs the data at that path")
        if resume_path is None:
            return None
        ckpt = load_checkpoint(resume_path)
        check_resume(s, ckpt, resume_path)
        return ckpt

    return s, on_every_node(load_here)


def check_resume(s, ckpt, path):
    """A resumed run must do the same math as the run that wrote the checkpoint."""
    saved = ckpt.get("settings", {})
    for k in MATH_SETTINGS:
        if k in saved and saved[k] != getattr(s, k):
            raise UserError(f"--resume {path}: --{k} is {getattr(s, k)!r} but the checkpoint was trained with "
                            f"{saved[k]!r}; use the same value (or start a new run in another --log_dir)")


def hellaswag_examples(s, load_examples):
    """The HellaSwag val examples the run scores (the first --hellaswag_examples of them), or None if it does not."""
    if s.hellaswag_every <= 0:
        return None
    examples = load_examples("val", s.hellaswag_file)
    return examples[:s.hellaswag_examples] if s.hellaswag_examples > 0 else examples


# -----------------------------------------------------------------------------
# 4. Device and speed


def pick_device(requested, ddp):
    """The device type to train on ('cuda', 'mps' or 'cpu'), and the reasons for an automatic choice."""
    import torch

    reasons = []
    has_mps = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but this machine has no CUDA GPU that PyTorch can use; use --device cpu")
    if requested == "mps" and not has_mps:
        raise UserError("--device mps, but this machine has no Apple GPU (MPS) that PyTorch can use; use --device cpu")
    device_type = requested
    if requested == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
        reasons.append(f"device: {device_type} (auto: the fastest one this machine has)")
    if ddp and device_type == "mps":
        raise UserError("DDP (torchrun) is not supported on MPS; run one process, or use --device cpu")
    return device_type, reasons


def pick_dtype(device_type, reasons):
    """'bfloat16' (autocast) on GPUs that have bf16 (Ampere and newer), else 'float32'; the reason goes to reasons."""
    import torch

    if device_type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        reasons.append("dtype: bfloat16 autocast (this GPU supports bf16)")
        return "bfloat16"
    why = {"cuda": "this GPU has no bf16 support", "mps": "bf16 autocast on MPS is not worth it",
           "cpu": "bf16 autocast measured 21x slower on one CPU, 1.6x faster on one with bf16 units: "
                  "docs/benchmarks.md"}[device_type]
    reasons.append(f"dtype: float32 ({why})")
    return "float32"


def chunked_loss_by_default(device_type, dtype, compile):
    """Where the chunked loss was measured faster than the lecture's: a CPU in fp32 without torch.compile
    (README, "How fast"). Under bf16 + compile the lecture's compiled F.cross_entropy won on that CPU."""
    return device_type == "cpu" and dtype == "float32" and not compile


# Model FLOPs utilisation (MFU, PaLM paper, appendix B): the FLOPs the model needs per second, as a fraction of
# what the hardware can do. It counts the model's arithmetic, not the GPU's (recomputation or padding don't count).

# bf16 dense peaks (no sparsity) from NVIDIA's datasheets, FLOP/s; the first name found in the device name wins
GPU_PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H100": 989.4e12, "H200": 989.4e12,
                  "A100": 312e12}


def gpu_peak_flops(device_name):
    """The bf16 peak of a GPU from its name (torch.cuda.get_device_name), or None if we don't know it."""
    for key, peak in GPU_PEAK_FLOPS.items():
        if key in device_name:
            return peak
    return None


def flops_per_token(config, T):
    """Training FLOPs per token, forward and backward: 6N + 12*L*H*Q*T (PaLM paper, appendix B; H*Q = C).
    6N: every weight does a multiply-add (2 FLOPs) per token forward and two backward (input and weight
    gradients); N leaves out the position embeddings, which are looked up, not multiplied (the padding rows of a
    padded vocabulary count: 0.03% at V=50304). 12*L*C*T: attention's q @ k^T and att @ v, which have no
    weights. GPT-2 124M at T=1024: about 0.855 GFLOP per token."""
    N = config.vocab_size * config.n_embd + config.n_layer * (12 * config.n_embd**2 + 13 * config.n_embd) \
        + 2 * config.n_embd
    return 6 * N + 12 * config.n_layer * config.n_embd * T


def format_mfu(flops_per_second, peak_flops):
    return "-" if peak_flops is None else f"{100 * flops_per_second / peak_flops:.1f}%"


# -----------------------------------------------------------------------------
# 5. Checkpoints
#
# A checkpoint is a dict of tensors and plain Python values (numbers, strings, lists, dicts), saved with
# torch.save and read back with torch.load(weights_only=True): that loader refuses pickled classes and code,
# so opening a checkpoint from anywhere can never run anything. It holds all that a resumed run needs to
# continue exactly as if it had never stopped: weights, optimizer state, the step, the data position, the
# random generators, and the settings that decide the math.

CHECKPOINT_FORMAT = "train_gpt2 checkpoint v1"


def checkpoint_path(log_dir, step):
    return os.path.join(log_dir, f"model_{step:05d}.pt")


def list_checkpoints(log_dir):
    """Complete checkpoints in log_dir, oldest first (a file being written has a .tmp name and is not listed)."""
    if not os.path.isdir(log_dir):
        return []
    names = [n for n in os.listdir(log_dir) if n.startswith("model_") and n.endswith(".pt")
             and n[len("model_"):-len(".pt")].isdigit()]
    names.sort(key=lambda n: int(n[len("model_"):-len(".pt")]))  # by step: model_100000.pt after model_99999.pt
    return [os.path.join(log_dir, n) for n in names]


def save_checkpoint(path, state):
    """Write to a temporary name, flush it to disk, then rename: a crash or kill -9 at any moment leaves either
    the old files or the complete new one under the final name, never half a checkpoint."""
    import torch

    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX and Windows


def load_checkpoint(path):
    """Read a checkpoint without trusting it: tensors and plain values only. Any problem is a one-line UserError."""
    import torch

    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, or a pickle that weights_only refuses to run
        raise UserError(f"{path} is not a loadable checkpoint ({one_line(e)})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a checkpoint written by train_gpt2.py")
    return ckpt


def load_weights(model, ckpt):
    """Put a checkpoint's weights into the model (nothing to do for a fresh start: ckpt None)."""
    if ckpt is None:
        return
    try:
        model.load_state_dict(ckpt["model"])
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise UserError(f"the checkpoint's weights do not fit this model ({one_line(e)})") from e


def rng_state(device_type, device):
    import torch

    state = {"cpu": torch.get_rng_state()}
    if device_type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_training_state(ckpt, optimizer, train_loader, device_type, device):
    """Continue where a checkpoint stopped: optimizer state, data position, random generators. Returns the step to
    start from and the last validation loss (0 and None for a fresh start)."""
    import torch

    if ckpt is None:
        return 0, None
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"--resume: the checkpoint does not fit this model ({one_line(e)})") from e
    train_loader.load_state_dict(ckpt["loader"])
    torch.set_rng_state(ckpt["rng"]["cpu"])
    if device_type == "cuda" and "cuda" in ckpt["rng"]:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    return ckpt["step"], ckpt["val_loss"]


class RunLog:
    """The files of a run in --log_dir, written by rank 0 only: config.json (the settings and why they were chosen),
    log.txt (the lecture's format: '{step} train|val|hella {value}'; a fresh run starts it anew, a resumed run
    appends), and the checkpoints."""

    def __init__(self, s, master_process, resumed, config):
        self.s, self.master_process = s, master_process
        self.log_file = os.path.join(s.log_dir, "log.txt")
        if master_process:
            os.makedirs(s.log_dir, exist_ok=True)
            if not resumed:
                open(self.log_file, "w").close()
            with open(os.path.join(s.log_dir, "config.json"), "w") as f:
                json.dump({"settings": vars(s), **config}, f, indent=2)

    def line(self, text):
        if self.master_process:
            with open(self.log_file, "a") as f:
                f.write(text + "\n")

    def save_checkpoint(self, step, raw_model, optimizer, train_loader, val_loss, device_type, device):
        if not self.master_process:
            return
        path = checkpoint_path(self.s.log_dir, step)
        save_checkpoint(path, {
            "format": CHECKPOINT_FORMAT,
            "step": step,  # the number of optimizer steps done: a resumed run continues with this step
            "model": raw_model.state_dict(),
            "config": asdict(raw_model.config),
            "optimizer": optimizer.state_dict(),
            "loader": train_loader.state_dict(),
            "rng": rng_state(device_type, device),
            "settings": {k: getattr(self.s, k) for k in MATH_SETTINGS},
            "val_loss": val_loss,
        })
        print(f"saved checkpoint {path}", flush=True)
        if self.s.keep_checkpoints > 0:
            for p in list_checkpoints(self.s.log_dir)[:-self.s.keep_checkpoints]:
                os.remove(p)


# -----------------------------------------------------------------------------
# 6. Stopping: Ctrl-C (SIGINT) or SIGTERM (a scheduler's preemption) only sets a flag; the current step finishes,
# a checkpoint is written, and the run exits with 128 + the signal's number. A second Ctrl-C stops at once.


class StopRequest:
    _previous = {}  # the handlers before the first StopRequest, put back by restore_handlers

    def __init__(self):
        self.signum = None  # the signal this process received
        self.agreed = False  # some process received one: all of them stop after this step
        for sig in (signal.SIGINT, signal.SIGTERM):
            StopRequest._previous.setdefault(sig, signal.getsignal(sig))
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def flag(self, device):
        """1 if this process was asked to stop: summed over the processes with the step's loss, so that they all
        see the request at the same step (a signal may reach only some of them)."""
        import torch

        return torch.tensor(float(self.signum is not None), device=device)

    def vote(self, votes):
        if votes > 0:
            self.agreed = True
            self.signum = self.signum or signal.SIGTERM

    @property
    def name(self):
        return signal.Signals(self.signum).name

    @property
    def exit_status(self):
        return 128 + self.signum

    @classmethod
    def restore_handlers(cls):
        for sig, handler in cls._previous.items():
            signal.signal(sig, handler)
        cls._previous = {}


# -----------------------------------------------------------------------------
# 7. Using a trained model: --sample, --export_hf, and Hugging Face conversion

# OpenAI's checkpoints (and so Hugging Face's) store these four as Conv1D layers, whose weight is the
# transpose of an nn.Linear weight: (in, out) instead of (out, in).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def load_hf_gpt2(name_or_path, names):
    """transformers' GPT2LMHeadModel from one of the names (downloaded from the Hugging Face hub) or a local folder."""
    if name_or_path not in names and not os.path.isdir(name_or_path):
        raise UserError(f"unknown model '{name_or_path}': use one of {', '.join(names)}, or a folder with a GPT-2 "
                        f"checkpoint")
    from transformers import GPT2LMHeadModel  # imported here: slow to import, and only this path needs it

    try:
        return GPT2LMHeadModel.from_pretrained(name_or_path)
    except OSError as e:  # transformers reports "can't reach the hub" and "no such files" as OSError
        raise UserError(f"could not load '{name_or_path}' ({one_line(e)}); check the network or the folder") from e


def hf_model_from_checkpoint(ckpt, vocab_size=None):
    """A transformers GPT2LMHeadModel holding a checkpoint's weights (keys are GPT-2's names in both). vocab_size
    cuts a padded vocabulary's rows (50304 -> 50257): those rows are never a training target, so training only
    pushes their logits down, and they never win a prediction that matters."""
    import torch

    from transformers import GPT2Config, GPT2LMHeadModel

    c, sd = ckpt["config"], ckpt["model"]
    vocab_size = vocab_size or c["vocab_size"]
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=c["block_size"], n_embd=c["n_embd"],
                                    n_layer=c["n_layer"], n_head=c["n_head"], bos_token_id=50256,
                                    eos_token_id=50256))
    buffers_hf = {name for name, _ in hf.named_buffers()}
    sd_hf = hf.state_dict()
    with torch.no_grad():
        for k in sd_hf:
            if k in buffers_hf:
                continue
            src = sd[k].t() if k.endswith(CONV1D_WEIGHTS) else sd[k]
            if k in ("transformer.wte.weight", "lm_head.weight"):
                src = src[:vocab_size]
            sd_hf[k].copy_(src)
    return hf.eval()


def hf_model_from_file(path):
    """hf_model_from_checkpoint for a checkpoint file; a file whose weights do not fit is a UserError."""
    try:
        return hf_model_from_checkpoint(load_checkpoint(path))
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise UserError(f"{path}: its weights do not fit the model it describes ({one_line(e)})") from e


def load_model(name_or_path, GPT, GPTConfig, device="cpu"):
    """Our GPT from one of our checkpoint files, or from a Hugging Face GPT-2 name or folder."""
    if not os.path.isfile(name_or_path):
        return GPT.from_pretrained(name_or_path).to(device)
    ckpt = load_checkpoint(name_or_path)
    config = ckpt.get("config")
    if not isinstance(config, dict) or set(config) != set(GPTConfig.__dataclass_fields__):
        raise UserError(f"{name_or_path} has no valid model config")
    model = GPT(GPTConfig(**config))
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError, TypeError) as e:
        raise UserError(f"{name_or_path}: its weights do not fit the model it describes ({one_line(e)})") from e
    return model.to(device)


def run_model_command(args, GPT, GPTConfig, sample):
    """--sample MODEL or --export_hf CHECKPOINT OUT_DIR; returns the exit status."""
    return report_user_errors(sample_command if args.sample is not None else export_hf, args, GPT, GPTConfig, sample)


def sample_command(args, GPT, GPTConfig, sample):
    """--sample: print samples from one of our checkpoints or a Hugging Face GPT-2 name/folder."""
    if min(args.num_samples, args.max_new_tokens, args.top_k) <= 0:
        raise UserError("--num_samples, --max_new_tokens and --top_k must be positive")
    device, _ = pick_device(args.device, ddp=False)  # --device, or the fastest this machine has
    model = load_model(args.sample, GPT, GPTConfig, device)
    enc = get_tokenizer()
    max_length = len(enc.encode(args.prompt)) + args.max_new_tokens
    if max_length > model.config.block_size:
        raise UserError(f"prompt + --max_new_tokens = {max_length} tokens, more than the model's block size "
                        f"{model.config.block_size}; ask for fewer tokens")
    _, texts = sample(model, args.prompt, num_return_sequences=args.num_samples, max_length=max_length,
                      top_k=args.top_k, seed=args.seed, device=device, enc=enc)
    for i, text in enumerate(texts):
        print(f"sample {i}: {text}")
    return 0


def export_hf(args, GPT, GPTConfig, sample):
    """--export_hf: write one of our checkpoints as a standard transformers GPT-2 folder (config.json,
    model.safetensors and the tokenizer files), loadable by GPT2LMHeadModel.from_pretrained and
    pipeline("text-generation")."""
    checkpoint, out_dir = args.export_hf
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise UserError(f"{out_dir} exists and is not empty; choose a new folder")
    model = load_model(checkpoint, GPT, GPTConfig, "cpu")  # checks the checkpoint
    vocab_size = 50257  # GPT-2's real vocabulary
    if model.config.vocab_size < vocab_size:
        raise UserError(f"{checkpoint} has a vocabulary of {model.config.vocab_size}, smaller than GPT-2's {vocab_size}")
    hf = hf_model_from_checkpoint({"config": asdict(model.config), "model": model.state_dict()}, vocab_size)
    tmp = out_dir.rstrip("/\\") + ".tmp"
    hf.save_pretrained(tmp)  # config.json + model.safetensors
    for hf_name, ours in (("vocab.json", "encoder.json"), ("merges.txt", "vocab.bpe")):
        with open(os.path.join(tmp, hf_name), "wb") as f:
            f.write(tokenizer_file(ours))
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "GPT2Tokenizer", "model_max_length": model.config.block_size,
                   "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, f)
    if os.path.exists(out_dir):
        os.rmdir(out_dir)  # empty, checked above
    os.replace(tmp, out_dir)
    print(f"exported {checkpoint} to {out_dir}")
    return 0
