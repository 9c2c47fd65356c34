"""
What every script of the project shares, without torch: fineweb.py and its worker processes import this file
alone (importing torch would cost each process 2-3 s and 180 MB on a 2-core CPU).

  1. Errors         UserError, the one-line command-line parser: a user's mistake is one line 'error: ...'
                    and exit status 2, in every script
  2. Downloads      checked (size and sha256), written to a temporary name, then renamed
  3. Tiny Shakespeare and GPT-2's tokenizer, from the committed files (downloaded again if deleted)
  4. Shards         the .npy token files that fineweb.py writes and DataLoaderLite reads
"""

import argparse
import functools
import hashlib
import http.client
import json
import os
import sys
import urllib.request

import numpy as np
import tiktoken
from tiktoken.load import read_file_cached
from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenizer regex
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# 1. Errors: one convention for train_gpt2.py, fineweb.py, hellaswag.py, bench.py and gpu_check.py


class UserError(Exception):
    """A mistake the user can fix (a flag, a path, a file, no network): printed as one line 'error: ...', exit 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a mistake on the command line is one line 'error: ...' and exit status 2, and a flag must be
    spelled out: argparse's abbreviations would read `--eval 1` as `--eval_every 1` without a word."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

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


# -----------------------------------------------------------------------------
# 2. Downloads


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


# -----------------------------------------------------------------------------
# 3. Tiny Shakespeare and GPT-2's tokenizer

TINY_SHAKESPEARE = os.path.join(HERE, "input.txt")  # committed: the default data needs no network
TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


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
GPT2_VOCAB_SIZE = 50257  # the token ids GPT-2's tokenizer can produce: 0 .. 50256 (<|endoftext|>)


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
    if as_json != ranks or encoder.get("<|endoftext|>") != GPT2_VOCAB_SIZE - 1:
        raise UserError("the GPT-2 tokenizer files disagree with each other: restore gpt2_tokenizer/")
    _tokenizer = tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                   special_tokens={"<|endoftext|>": GPT2_VOCAB_SIZE - 1},
                                   explicit_n_vocab=GPT2_VOCAB_SIZE)
    return _tokenizer


def encode_prompt(enc, text):
    """A prompt's tokens: "<|endoftext|>" in it is GPT-2's document separator, and an empty prompt is that token
    alone, which is how GPT-2 samples without a prompt."""
    return enc.encode(text, allowed_special={"<|endoftext|>"}) or [enc.eot_token]


# -----------------------------------------------------------------------------
# 4. Shards: what fineweb.py writes, 1-D uint16 .npy files of token ids, the first of them the val shard

FINEWEB_SHARDS = os.path.join(HERE, "edu_fineweb10B")  # where fineweb.py writes by default
FINEWEB_MANIFEST = "fineweb_manifest.json"  # fineweb.py's record of the shards it finished


def text_file_tokens(path):
    """The GPT-2 tokens of a UTF-8 text file, as a 1-D uint16 array (GPT-2's ids, below 50257, fit). Tokenized
    once per process and file version (the train and val loaders both ask)."""
    stat = os.stat(path)
    return _text_file_tokens(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _text_file_tokens(path, mtime_ns, size):
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"--data {path} is not UTF-8 text (byte {e.start:,} is not UTF-8); pass a UTF-8 text file or "
                        f"a folder of fineweb.py shards") from e
    except OSError as e:
        raise UserError(f"--data {path}: cannot read it ({e.strerror or e})") from e
    return np.array(get_tokenizer().encode_ordinary(text), dtype=np.uint16)


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
