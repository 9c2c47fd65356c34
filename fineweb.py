"""FineWeb-Edu -> GPT-2 token shards for train_gpt2.py.

Streams a text dataset (by default HuggingFaceFW/fineweb-edu, config sample-10BT, about 10B tokens), tokenizes
every document with GPT-2's tokenizer as <|endoftext|> (50256) followed by the document's tokens, and writes
the token stream in order into shards of exactly --shard_size tokens (the last one holds what is left), each a
1-D uint16 .npy file. Shard 0 is the validation shard, the rest train:

    edu_fineweb10B/edufineweb_val_000000.npy, edufineweb_train_000001.npy, ...

Run it once (hours for the default: a tokenizer process on every core but one, which reads and writes):

    python fineweb.py                                   # the default dataset, next to this script
    python fineweb.py --name sample-100BT --out edu_fineweb100B
    python fineweb.py --data_files docs.jsonl --out shards_try --shard_size 20000   # offline, local files
    python fineweb.py --max_shards 2                    # a small try; rerun without it to carry on

Interrupted (Ctrl-C, a crash, a kill), run the same command again: it carries on and ends with exactly the
files an uninterrupted run writes. A shard is written under a temporary name and renamed once complete, so a
final name always holds a whole shard; a manifest (fineweb_manifest.json) records the finished shards, where
the next shard starts in the dataset, and the settings, so a rerun with other settings is refused.
The shards do not depend on --workers: documents are tokenized in parallel but written in dataset order.

The tokenizer is tiktoken's "gpt2" encoding built from the committed gpt2_tokenizer/ files
(common.get_tokenizer): nothing is downloaded for it.
"""
import argparse
import hashlib
import json
import multiprocessing as mp
import os
import signal
import sys
import time

import numpy as np

from common import ArgumentParser, UserError, get_tokenizer, one_line

EOT = 50256  # GPT-2's <|endoftext|>: it starts every document, so the model sees where documents begin
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "edu_fineweb10B")
MANIFEST = "fineweb_manifest.json"
TMP = ".tmp"  # suffix of files being written: not .npy, so the training loader never picks one up
DOCS_PER_TASK = 256  # documents per task: big enough that pickling and messages cost little
TASKS_PER_MESSAGE = 8  # imap's chunksize: a worker has this much work in hand while we read the next tasks

# Errors are common.UserError: one line `error: ...` on stderr and exit status 2, like the other scripts.
# A failure outside the command itself (the hub, the network, reading the dataset) exits with status 1 instead,
# so that a script around this one can tell "rerun later" (1) from "change the command" (2); Ctrl-C exits 130.


def outside_failure(message):
    """A UserError with exit status 1. The status is an attribute of the exception, so it also survives the trip
    from a worker process (imap re-raises a worker's exception here; pickling keeps an exception's attributes)."""
    error = UserError(message)
    error.status = 1
    return error


def exit_status(error):
    return getattr(error, "status", 2)


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

def positive_int(text):
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return int(text)


def parse_args(argv=None):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    p = ArgumentParser(description="Tokenize FineWeb-Edu (or local jsonl/parquet files) into GPT-2 uint16 .npy "
                                   "shards.")
    p.add_argument("--dataset", default="HuggingFaceFW/fineweb-edu", help="Hugging Face hub dataset")
    p.add_argument("--name", default="sample-10BT", help="dataset config, e.g. sample-100BT")
    p.add_argument("--split", default="train", help="dataset split")
    p.add_argument("--data_files", nargs="+", metavar="FILE",
                   help="local .jsonl/.json/.parquet files to read instead of the hub (offline use, tests)")
    p.add_argument("--text_field", default="text", help="the field holding each document's text")
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: edu_fineweb10B next to this script)")
    p.add_argument("--shard_size", type=positive_int, default=10**8, help="tokens per shard")
    p.add_argument("--workers", type=positive_int, default=max(1, cores - 1),
                   help="tokenizer processes (default: all cores but one)")
    p.add_argument("--max_shards", type=positive_int, help="stop once the folder holds this many shards")
    args = p.parse_args(argv)
    if args.data_files:
        args.data_files = [os.path.abspath(f) for f in args.data_files]
        for f in args.data_files:
            if not os.path.isfile(f):
                raise UserError(f"--data_files: no such file: {f}")
        kinds = {"parquet" if f.endswith(".parquet") else "json" for f in args.data_files}
        if len(kinds) > 1:
            raise UserError("--data_files: give either .jsonl/.json files or .parquet files, not both")
        args.format = kinds.pop()
    return args


# ----------------------------------------------------------------------------------------------------------
# Tokenization (runs in the worker processes)
# ----------------------------------------------------------------------------------------------------------

def init_worker():
    # Ctrl-C reaches every process of the terminal's group: only the main process handles it and stops the
    # workers, instead of each worker printing its own KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def to_uint16(tokens):
    """Token ids as uint16, refusing ids that do not fit (a cast would silently wrap them around)."""
    tokens = np.asarray(tokens)
    if tokens.size and not (0 <= tokens.min() and tokens.max() < 2**16):
        raise UserError(f"token id {tokens.max()} does not fit in uint16 (is this a tokenizer with more "
                        f"than 65,536 tokens?)")
    return tokens.astype(np.uint16)


def tokenize_batch(texts):
    """A list of documents -> (their tokens, each prefixed with EOT, as one uint16 array; each document's length)."""
    enc = get_tokenizer()  # built once per process; forked workers inherit the main process's
    ids, lengths = [], np.empty(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        doc = enc.encode_ordinary(text)  # ordinary: "<|endoftext|>" written inside a document is just text
        ids.append(EOT)
        ids.extend(doc)
        lengths[i] = len(doc) + 1
    return to_uint16(np.array(ids, dtype=np.int64)), lengths


# ----------------------------------------------------------------------------------------------------------
# The output folder: atomic files and the manifest
# ----------------------------------------------------------------------------------------------------------

def write_atomic(path, write):
    """Write a file under a temporary name, flush it to disk, then rename it: `path` is whole or absent."""
    with open(path + TMP, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + TMP, path)
    if os.name == "posix":  # make the rename itself survive a power cut
        fd = os.open(os.path.dirname(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_manifest(out, manifest):
    write_atomic(os.path.join(out, MANIFEST), lambda f: f.write(json.dumps(manifest, indent=1).encode()))


def remove_temp_files(out):
    for name in os.listdir(out):
        if name.endswith(TMP) and (name.startswith("edufineweb_") or name.startswith(MANIFEST)):
            os.remove(os.path.join(out, name))


def load_manifest(out, settings):
    """The manifest of an earlier run into `out` (checked against these settings), or a fresh one.

    It holds the settings, the finished shards (name, tokens, sha256 of the token bytes), their total tokens,
    where the next shard starts (next_doc: documents wholly consumed before it; next_doc_offset: tokens of
    document next_doc already in finished shards) and whether the whole dataset is done (complete)."""
    path = os.path.join(out, MANIFEST)
    if not os.path.exists(path):
        if os.path.isdir(out) and any(n.startswith("edufineweb_") and n.endswith(".npy") for n in os.listdir(out)):
            raise UserError(f"{out} holds shards but no {MANIFEST}; use another --out or delete that folder")
        return {"settings": settings, "shards": [], "tokens": 0, "next_doc": 0, "next_doc_offset": 0,
                "complete": False}
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}); delete the folder {out} and rerun")
    for key, value in settings.items():
        if manifest["settings"].get(key) != value:
            raise UserError(f"{out} holds shards made with {key}={manifest['settings'].get(key)!r}, not "
                            f"{value!r}; use another --out or delete that folder")
    for shard in manifest["shards"]:  # every token is read once: a shard of the right size can still be damaged
        try:
            tokens = np.load(os.path.join(out, shard["name"]), mmap_mode="r")
            intact = tokens.shape == (shard["tokens"],) and \
                hashlib.sha256(np.ascontiguousarray(tokens).data).hexdigest() == shard["sha256"]
        except (OSError, ValueError):
            intact = False
        if not intact:
            raise UserError(f"shard {shard['name']} in {out} is missing or damaged (its size or its tokens' sha256 "
                            f"differ from {MANIFEST}); delete the folder and rerun")
    return manifest


# ----------------------------------------------------------------------------------------------------------
# Reading the dataset
# ----------------------------------------------------------------------------------------------------------

def open_dataset(args):
    """The documents as a streaming dataset: nothing is downloaded or read up front."""
    # datasets imports torch (2 s, and memory in every worker) when it can; tokenizing needs neither torch nor TF
    os.environ.setdefault("USE_TORCH", "0")
    os.environ.setdefault("USE_TF", "0")
    import datasets
    datasets.disable_progress_bars()
    if args.data_files:
        # json: parse 1 MB at a time (default 10 MB) so the workers get their first documents sooner
        extra = {"chunksize": 1 << 20} if args.format == "json" else {}
        try:
            ds = datasets.load_dataset(args.format, data_files={args.split: args.data_files}, split=args.split,
                                       streaming=True, **extra)
        except StopIteration as e:  # datasets reads the first rows to learn the fields: there are none
            raise UserError(f"--data_files {' '.join(args.data_files)}: no documents in them") from e
    else:
        try:
            ds = datasets.load_dataset(args.dataset, name=args.name, split=args.split, streaming=True)
        except Exception as e:
            raise outside_failure(f"could not open {args.dataset} ({args.name}, {args.split}) on the Hugging Face "
                                  f"hub: {one_line(e)}. This needs the network; offline, pass --data_files") from e
    if ds.column_names is not None:  # known up front for most formats: then read only the text column
        if args.text_field not in ds.column_names:
            raise UserError(f"no field {args.text_field!r} in the documents (fields: {ds.column_names}); "
                            f"choose one with --text_field")
        ds = ds.select_columns([args.text_field])
    return ds


def text_batches(ds, args, first_doc):
    """Lists of DOCS_PER_TASK texts, in dataset order, starting at document `first_doc`."""
    if first_doc:
        ds = ds.skip(first_doc)
    batches, doc = iter(ds.iter(batch_size=DOCS_PER_TASK)), first_doc
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:  # a broken connection, a malformed file: report it, keep the finished shards
            if args.data_files:  # a local file that cannot be read will not read better on a rerun
                raise UserError(f"--data_files: cannot read the documents near document {doc} ({one_line(e)}); "
                                f"fix that file (finished shards are kept)") from e
            raise outside_failure(f"reading the dataset failed near document {doc} (this needs the network): "
                                  f"{one_line(e)}; finished shards are kept, rerun to continue") from e
        texts = batch.get(args.text_field) or [None]
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise UserError(f"document {doc + bad} has no text in field {args.text_field!r}")
        doc += len(texts)
        yield texts


# ----------------------------------------------------------------------------------------------------------
# Writing shards
# ----------------------------------------------------------------------------------------------------------

class ShardWriter:
    """Cuts the token stream into shards and records, after each, where in the dataset the next one starts.

    Positions count tokens from the start of the whole stream. A restart re-tokenizes from the first document
    not wholly inside finished shards (`next_doc`) and drops that document's first `next_doc_offset` tokens,
    which the previous run already wrote."""

    def __init__(self, out, shard_size, manifest, max_shards):
        self.out, self.size, self.manifest, self.max_shards = out, shard_size, manifest, max_shards
        self.buf, self.fill = np.empty(shard_size, dtype=np.uint16), 0  # one buffer, reused for every shard
        self.written = len(manifest["shards"]) * shard_size  # the stream position of buf[0]
        self.pos = self.written - manifest["next_doc_offset"]  # the stream position of the next batch
        self.doc = manifest["next_doc"]  # the dataset index of the next batch's first document

    def add(self, tokens, lengths):
        """Append a batch of documents; return True once --max_shards shards are done."""
        i = max(0, self.written + self.fill - self.pos)  # skip what is already written (after a restart)
        while i < len(tokens):
            take = min(len(tokens) - i, self.size - self.fill)
            self.buf[self.fill:self.fill + take] = tokens[i:i + take]
            self.fill, i = self.fill + take, i + take
            if self.fill == self.size:
                ends = np.cumsum(lengths)
                j = int(np.searchsorted(ends, i, side="right"))  # the document holding the next shard's start
                offset = i - int(ends[j] - lengths[j]) if j < len(lengths) else 0
                self.write_shard(self.doc + j, offset)
                if self.max_shards and len(self.manifest["shards"]) >= self.max_shards:
                    return True
        self.pos += len(tokens)
        self.doc += len(lengths)
        return False

    def finish(self):
        """The stream ended: write what is left as the last shard and mark the folder complete."""
        self.manifest["complete"] = True
        if self.fill:
            self.write_shard(self.doc, 0)
        else:
            self.manifest["next_doc"] = self.doc
            save_manifest(self.out, self.manifest)

    def write_shard(self, next_doc, next_doc_offset):
        k = len(self.manifest["shards"])
        if k == 0:  # the settings go down before any shard: a shard is never in the folder without them
            save_manifest(self.out, self.manifest)
        name = f"edufineweb_{'val' if k == 0 else 'train'}_{k:06d}.npy"
        tokens = self.buf[:self.fill]
        write_atomic(os.path.join(self.out, name), lambda f: np.save(f, tokens))
        self.manifest["shards"].append({"name": name, "tokens": self.fill, "max_token": int(tokens.max()),
                                        "sha256": hashlib.sha256(tokens.data).hexdigest()})  # of the tokens
        self.manifest.update(tokens=self.manifest["tokens"] + self.fill, next_doc=next_doc,
                             next_doc_offset=next_doc_offset)
        save_manifest(self.out, self.manifest)  # only now is the shard done: a crash before this redoes it
        self.written += self.fill
        self.fill = 0


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------

def check_out(out):
    """--out must be a folder, or a path where one can be made, that this process can write to."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file; choose a folder for the shards")
    path = out
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {path} is not a folder this process can write to")


def physical_memory():
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def run(args):
    settings = {k: getattr(args, k) for k in ("dataset", "name", "split", "data_files", "text_field", "shard_size")}
    out = os.path.abspath(args.out)
    check_out(out)
    memory = physical_memory()
    if memory is not None and 2 * args.shard_size > memory // 2:  # one shard's buffer, 2 bytes a token
        raise UserError(f"--shard_size {args.shard_size:,} needs {2 * args.shard_size / 2**30:,.1f} GiB for one "
                        f"shard's buffer, more than half of this machine's {memory / 2**30:.1f} GiB; the default is "
                        f"{10**8:,} (200 MB)")
    manifest = load_manifest(out, settings)
    done = len(manifest["shards"])
    if manifest["complete"]:
        print(f"{out} is already complete ({done} shards, {manifest['tokens']:,} tokens): nothing to do")
        return 0
    if args.max_shards and done >= args.max_shards:
        print(f"{out} already holds {done} shards (--max_shards {args.max_shards}): nothing to do")
        return 0
    get_tokenizer()  # before the workers start: they inherit it, and a missing tokenizer fails early
    try:
        writer = ShardWriter(out, args.shard_size, manifest, args.max_shards)
    except MemoryError as e:
        raise UserError(f"--shard_size {args.shard_size:,}: no memory for one shard's buffer; use a smaller one") from e
    created = not os.path.isdir(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot make that folder ({e.strerror or e})") from e
    remove_temp_files(out)  # left by a killed run
    t0, tokens0, docs0 = time.time(), writer.written, writer.doc
    # Workers tokenize while this process reads the dataset and writes shards (so even --workers 1 gets a
    # worker: reading and tokenizing then overlap). A task is a batch of documents and a message to a worker
    # TASKS_PER_MESSAGE tasks; imap hands results back in task order, whatever finishes first, which keeps
    # the shards independent of the worker count. imap reads ahead only as far as the pipe to the workers
    # holds (a message or so per worker), so memory stays flat however big the dataset. The pool starts
    # before the dataset opens: forked workers then inherit neither datasets' memory nor its threads.
    pool, bar = mp.Pool(args.workers, initializer=init_worker), None
    try:
        batches = text_batches(open_dataset(args), args, manifest["next_doc"])
        from tqdm import tqdm
        bar = tqdm(unit="tok", unit_scale=True, initial=writer.written,
                   desc=f"tokens, {args.workers} worker{'s' * (args.workers > 1)}")
        stopped = False
        for tokens, lengths in pool.imap(tokenize_batch, batches, chunksize=TASKS_PER_MESSAGE):
            before = writer.written + writer.fill
            stopped = writer.add(tokens, lengths)
            bar.update(writer.written + writer.fill - before)
            bar.set_postfix(shards=len(manifest["shards"]), refresh=False)
            if stopped:
                break
        if not stopped:
            writer.finish()
            bar.set_postfix(shards=len(manifest["shards"]))
    finally:
        if bar is not None:
            bar.close()
        pool.terminate()  # workers may still be busy with batches past --max_shards or an error
        remove_temp_files(out)  # the shard being written when an error or Ctrl-C struck
        if created and not os.listdir(out):
            os.rmdir(out)  # failed before the first shard: leave no empty folder behind
    seconds, tokens = time.time() - t0, writer.written - tokens0
    docs = writer.doc - docs0 if not stopped else manifest["next_doc"] - docs0
    print(f"summary: {docs:,} documents, {tokens:,} tokens, {len(manifest['shards']) - done} shards "
          f"({len(manifest['shards'])} in {out}), {seconds:.1f} s, {tokens / max(seconds, 1e-9):,.0f} tokens/s")
    if stopped:
        print(f"stopped at --max_shards {args.max_shards}; rerun without it to continue")
    return 0


def main(argv=None):
    try:
        return run(parse_args(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_status(e)
    except KeyboardInterrupt:
        print("error: interrupted; the finished shards are kept, rerun the same command to continue",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
