"""Tests of fineweb.py: shards equal an independent tiktoken tokenization, whatever the worker count, and stay
so across interruptions (a clean stop, SIGKILL, Ctrl-C); user mistakes are one-line errors.

The script runs as a subprocess over local jsonl files (--data_files): the shared FineWeb-Edu sample at
../shared/data beside the repository, and synthetic documents written per test.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO_ROOT, "..", "shared")
SAMPLE = os.path.join(SHARED, "data", "fineweb_edu_sample.jsonl")
SCRIPT = os.path.join(REPO_ROOT, "fineweb.py")
if os.path.isdir(os.path.join(SHARED, "tiktoken_cache")) and "TIKTOKEN_CACHE_DIR" not in os.environ:
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(os.path.join(SHARED, "tiktoken_cache"))
# The script's environment: the tests never need the hub, so it fails fast instead of retrying the network
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **os.environ}
sys.path.insert(0, REPO_ROOT)
import fineweb  # noqa: E402  (importing it must start nothing: test_import_and_default_out checks that)
from common import UserError  # noqa: E402

EOT = 50256
SYNTHETIC = [
    "Hello, I'm a language model,",
    "A document that mentions <|endoftext|> in its text: ordinary encoding keeps it as plain text.",
    "",
    "Unicode: naïve café, 日本語のテキスト, emoji 🎉🚀, Ελληνικά, עברית.",
    "   \n\n\t  ",
] + [f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (i % 7 * 40 + 1) for i in range(40)]


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def enc():
    import tiktoken
    return tiktoken.get_encoding("gpt2")


def read_docs(path):
    assert os.path.isfile(path), f"missing test data {path} (the shared folder beside the repository)"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def write_docs(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    return str(path)


def expected_stream(enc, docs):
    """The token stream computed independently: EOT, then the document's ordinary tokens, for each document."""
    ids = []
    for doc in docs:
        ids.append(EOT)
        ids.extend(enc.encode_ordinary(doc))
    return np.array(ids, dtype=np.uint16)


def run_fineweb(*args, cwd=REPO_ROOT):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=120)


# fineweb.py with a 50 ms pause after each shard it writes, for the tests that interrupt a run: without it the
# last ~35 shards of big_input can all be written within a few ms (one worker's batch, a fast disk), and the
# run could end between two polls of the manifest
SLOW_SHARDS = """
import sys, time, fineweb
write_shard = fineweb.ShardWriter.write_shard
def slow_write_shard(self, *args):
    write_shard(self, *args)
    time.sleep(0.05)
fineweb.ShardWriter.write_shard = slow_write_shard
sys.exit(fineweb.main(sys.argv[1:]))
"""


def start_fineweb(*args):
    return subprocess.Popen([sys.executable, "-c", SLOW_SHARDS, *map(str, args)], cwd=REPO_ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def shard_names(out):
    return sorted(n for n in os.listdir(out) if n.endswith(".npy"))


def check_whole_shards(out, shard_size):
    """Every file under a final name is a whole shard: loads as 1-D uint16 of exactly shard_size tokens."""
    for name in shard_names(out):
        tokens = np.load(os.path.join(out, name))
        assert tokens.dtype == np.uint16 and tokens.shape == (shard_size,), name


def check_shards(out, expected, shard_size):
    """The folder holds exactly the shards of `expected`, named val then train, and nothing half-written."""
    n = -(-len(expected) // shard_size)
    assert shard_names(out) == sorted(["edufineweb_val_000000.npy"] +
                                      [f"edufineweb_train_{k:06d}.npy" for k in range(1, n)])
    shards = [np.load(os.path.join(out, name)) for name in sorted(shard_names(out), key=lambda s: s[-10:])]
    for shard in shards:
        assert shard.dtype == np.uint16 and shard.ndim == 1
    assert [len(s) for s in shards[:-1]] == [shard_size] * (n - 1)
    assert 0 < len(shards[-1]) <= shard_size
    np.testing.assert_array_equal(np.concatenate(shards), expected)
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]
    manifest = json.load(open(os.path.join(out, "fineweb_manifest.json")))
    assert manifest["complete"] and len(manifest["shards"]) == n and manifest["tokens"] == len(expected)


def file_bytes(out):
    return {name: open(os.path.join(out, name), "rb").read() for name in shard_names(out)}


def ok(result):
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


def assert_user_error(result, status=2):
    assert result.returncode == status, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error:"), result.stderr


# ----------------------------------------------------------------------------------------------------------
# The shards are the tokenization, whatever the worker count
# ----------------------------------------------------------------------------------------------------------

def test_sample_shards_match_tiktoken_and_workers_agree(tmp_path, enc):
    expected = expected_stream(enc, read_docs(SAMPLE))
    r1 = ok(run_fineweb("--data_files", SAMPLE, "--out", tmp_path / "w1", "--shard_size", 20000, "--workers", 1))
    ok(run_fineweb("--data_files", SAMPLE, "--out", tmp_path / "w2", "--shard_size", 20000, "--workers", 2))
    check_shards(tmp_path / "w1", expected, 20000)
    assert file_bytes(tmp_path / "w1") == file_bytes(tmp_path / "w2")
    summary = r1.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"summary: 150 documents, {len(expected):,} tokens, 5 shards"), summary
    assert "tokens/s" in summary


def test_synthetic_documents_tiny_shards(tmp_path, enc):
    docs = write_docs(tmp_path / "docs.jsonl", SYNTHETIC)
    expected = expected_stream(enc, SYNTHETIC)
    assert np.count_nonzero(expected == EOT) == len(SYNTHETIC)  # the literal <|endoftext|> is not special
    ok(run_fineweb("--data_files", docs, "--out", tmp_path / "w1", "--shard_size", 1000, "--workers", 1))
    ok(run_fineweb("--data_files", docs, "--out", tmp_path / "w2", "--shard_size", 1000, "--workers", 2))
    check_shards(tmp_path / "w1", expected, 1000)
    assert file_bytes(tmp_path / "w1") == file_bytes(tmp_path / "w2")


def test_parquet_input_with_other_columns(tmp_path, enc):
    """Parquet, as the hub serves it, with more columns than the text: only the text field is tokenized."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = str(tmp_path / "docs.parquet")
    pq.write_table(pa.table({"id": [str(i) for i in range(len(SYNTHETIC))], "body": SYNTHETIC}), path,
                   row_group_size=7)
    ok(run_fineweb("--data_files", path, "--text_field", "body", "--out", tmp_path / "out", "--shard_size", 1000))
    check_shards(tmp_path / "out", expected_stream(enc, SYNTHETIC), 1000)


def test_to_uint16_refuses_ids_that_do_not_fit():
    np.testing.assert_array_equal(fineweb.to_uint16(np.array([0, EOT, 65535])), [0, EOT, 65535])
    assert fineweb.to_uint16(np.array([], dtype=np.int64)).dtype == np.uint16
    for bad in ([1, 2**16, 3], [70000], [-1]):
        with pytest.raises(UserError, match="uint16"):
            fineweb.to_uint16(np.array(bad, dtype=np.int64))


def test_errors_cross_from_a_worker_with_their_status():
    """A worker's error reaches the main process as the same UserError, message and exit status included."""
    import multiprocessing as mp
    import pickle
    with mp.Pool(1, initializer=fineweb.init_worker) as pool:
        with pytest.raises(UserError, match="token id 70000 does not fit in uint16") as info:
            list(pool.imap(fineweb.to_uint16, [np.array([1, 2]), np.array([70000])]))
    assert fineweb.exit_status(info.value) == 2
    failure = pickle.loads(pickle.dumps(fineweb.outside_failure("the hub is unreachable")))
    assert type(failure) is UserError and str(failure) == "the hub is unreachable"
    assert fineweb.exit_status(failure) == 1


def test_tokenize_batch_prefixes_each_document_with_eot(enc):
    tokens, lengths = fineweb.tokenize_batch(["Hello, I'm a language model,", ""])
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == [EOT, 15496, 11, 314, 1101, 257, 3303, 2746, 11, EOT]
    assert lengths.tolist() == [9, 1]


# ----------------------------------------------------------------------------------------------------------
# Interrupted runs resume into exactly the uninterrupted files
# ----------------------------------------------------------------------------------------------------------

def test_max_shards_then_resume(tmp_path, enc):
    docs = write_docs(tmp_path / "docs.jsonl", SYNTHETIC)
    out = tmp_path / "out"
    r = ok(run_fineweb("--data_files", docs, "--out", out, "--shard_size", 1000, "--max_shards", 2))
    assert "--max_shards" in r.stdout
    check_whole_shards(out, 1000)
    manifest = json.load(open(out / "fineweb_manifest.json"))
    assert len(shard_names(out)) == 2 and not manifest["complete"]
    assert manifest["next_doc_offset"] > 0  # a document straddles shards 1 and 2: the restart must split it
    assert "nothing to do" in ok(run_fineweb("--data_files", docs, "--out", out, "--shard_size", 1000,
                                             "--max_shards", 2)).stdout
    ok(run_fineweb("--data_files", docs, "--out", out, "--shard_size", 1000))
    check_shards(out, expected_stream(enc, SYNTHETIC), 1000)
    before = file_bytes(out)
    r = ok(run_fineweb("--data_files", docs, "--out", out, "--shard_size", 1000))
    assert "already complete" in r.stdout and file_bytes(out) == before


@pytest.fixture(scope="module")
def big_input(tmp_path_factory, enc):
    """The sample 4 times over (~360k tokens): a run long enough to interrupt in the middle."""
    docs = read_docs(SAMPLE) * 4
    path = write_docs(tmp_path_factory.mktemp("big") / "big.jsonl", docs)
    return path, expected_stream(enc, docs)


def interrupt_after(process, out, n_shards, sig):
    """Send `sig` once the manifest lists n_shards finished shards; the run must still have been going."""
    manifest = os.path.join(out, "fineweb_manifest.json")
    deadline = time.time() + 60
    while time.time() < deadline and process.poll() is None:
        try:
            if len(json.load(open(manifest))["shards"]) >= n_shards:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=60)
    assert not json.load(open(manifest))["complete"]
    return process.returncode, stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_midway_then_resume(tmp_path, big_input, workers):
    path, expected = big_input
    out = tmp_path / "out"
    args = ("--data_files", path, "--out", out, "--shard_size", 10000, "--workers", workers)
    status, _ = interrupt_after(start_fineweb(*args), out, 2, signal.SIGKILL)
    assert status == -signal.SIGKILL
    check_whole_shards(out, 10000)  # whatever the moment of the kill, a final name holds a whole shard
    with open(out / "edufineweb_train_000099.npy.tmp", "wb") as f:  # as a kill during a write leaves it
        f.write(b"partial")
    ok(run_fineweb(*args))
    check_shards(out, expected, 10000)


def test_ctrl_c_exits_130_then_resume(tmp_path, big_input):
    path, expected = big_input
    out = tmp_path / "out"
    args = ("--data_files", path, "--out", out, "--shard_size", 10000, "--workers", 2)
    status, stderr = interrupt_after(start_fineweb(*args), out, 1, signal.SIGINT)
    assert status == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("error: interrupted"), stderr
    check_whole_shards(out, 10000)
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]
    ok(run_fineweb(*args))
    check_shards(out, expected, 10000)


# ----------------------------------------------------------------------------------------------------------
# The default folder, and user mistakes
# ----------------------------------------------------------------------------------------------------------

def test_import_and_default_out(tmp_path):
    """From another directory: --help works, the default --out is next to the script, importing starts nothing."""
    default_out = os.path.join(REPO_ROOT, "edu_fineweb10B")
    existed = os.path.exists(default_out)
    r = ok(run_fineweb("--help", cwd=tmp_path))
    for flag in ("--dataset", "--name", "--split", "--data_files", "--text_field", "--out", "--shard_size",
                 "--workers", "--max_shards"):
        assert flag in r.stdout
    code = ("import multiprocessing, sys; sys.path.insert(0, sys.argv[1]); import fineweb; "
            "print(fineweb.parse_args([]).out); print('datasets' in sys.modules, multiprocessing.active_children())")
    r = ok(subprocess.run([sys.executable, "-c", code, REPO_ROOT], cwd=tmp_path, capture_output=True, text=True))
    assert r.stdout.splitlines() == [default_out, "False []"]
    assert os.listdir(tmp_path) == [] and os.path.exists(default_out) == existed


def test_importing_fineweb_leaves_train_gpt2_out():
    """Imports flow one way: fineweb.py -> common.py, never to the training script."""
    code = "import sys; sys.path.insert(0, sys.argv[1]); import fineweb; print('train_gpt2' in sys.modules)"
    r = ok(subprocess.run([sys.executable, "-c", code, REPO_ROOT], capture_output=True, text=True, timeout=120))
    assert r.stdout.split() == ["False"]


def test_bad_arguments_are_one_line_errors(tmp_path):
    docs = write_docs(tmp_path / "docs.jsonl", SYNTHETIC[:3])
    out = tmp_path / "out"
    for args in (["--data_files", tmp_path / "missing.jsonl"],
                 ["--data_files", docs, "--shard_size", 0],
                 ["--data_files", docs, "--shard_size", -5],
                 ["--data_files", docs, "--workers", 0],
                 ["--data_files", docs, "--max_shards", 0],
                 ["--data_files", docs, "--shard_size", "lots"],
                 ["--data_files", docs, "--no_such_flag"]):
        assert_user_error(run_fineweb(*args, "--out", out))
    assert not out.exists()


def test_bad_output_input_and_sizes_are_one_line_errors_that_leave_nothing(tmp_path):
    docs = write_docs(tmp_path / "docs.jsonl", SYNTHETIC[:3])
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    not_json = tmp_path / "not.jsonl"
    not_json.write_text("this is not JSON {\n")
    for args, message in ((["--data_files", docs, "--out", a_file], "is a file"),
                          (["--data_files", docs, "--out", a_file / "out"], "is not a folder this process can write"),
                          (["--data_files", docs, "--out", "/proc/no_shards_here"], "--out /proc/no_shards_here"),
                          (["--data_files", empty, "--out", tmp_path / "o1"], "no documents in them"),
                          (["--data_files", docs, "--out", tmp_path / "o2", "--shard_size", 10**13], "needs"),
                          (["--data_files", not_json, "--out", tmp_path / "o3"], "cannot read the documents")):
        r = run_fineweb(*args)
        assert_user_error(r)
        assert message in r.stderr.strip().splitlines()[-1], r.stderr
        assert "rerun to continue" not in r.stderr  # a rerun cannot help any of these
    assert sorted(os.listdir(tmp_path)) == ["a_file", "docs.jsonl", "empty.jsonl", "not.jsonl"]


def test_a_damaged_shard_of_the_right_size_is_found(tmp_path):
    docs = write_docs(tmp_path / "docs.jsonl", SYNTHETIC)
    out = tmp_path / "out"
    ok(run_fineweb("--data_files", docs, "--out", out, "--shard_size", 1000))
    shard = out / "edufineweb_train_000002.npy"
    tokens = np.load(shard)
    tokens[500] ^= 1  # one bit of one token: the same size, other tokens
    np.save(shard, tokens)
    r = run_fineweb("--data_files", docs, "--out", out, "--shard_size", 1000)
    assert_user_error(r)
    assert "edufineweb_train_000002.npy" in r.stderr and "sha256" in r.stderr


def test_settings_mismatch_is_refused(tmp_path):
    """Another --shard_size, input or --text_field into a finished folder, or a damaged folder: refused."""
    docs = write_docs(tmp_path / "docs.jsonl", SYNTHETIC)
    out = tmp_path / "out"
    ok(run_fineweb("--data_files", docs, "--out", out, "--shard_size", 1000))
    before = file_bytes(out)
    assert_user_error(run_fineweb("--data_files", docs, "--out", out, "--shard_size", 500))
    assert_user_error(run_fineweb("--data_files", SAMPLE, "--out", out, "--shard_size", 1000))
    assert_user_error(run_fineweb("--data_files", docs, "--out", out, "--shard_size", 1000, "--text_field", "t"))
    assert file_bytes(out) == before
    os.remove(out / "edufineweb_train_000003.npy")  # a listed shard gone: refuse rather than skip over it
    assert_user_error(run_fineweb("--data_files", docs, "--out", out, "--shard_size", 1000))


def test_missing_text_field(tmp_path):
    """No such field at all: nothing is written; a document without text later on: only whole shards stay."""
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"content": "some text"}) + "\n")
    assert_user_error(run_fineweb("--data_files", other, "--out", tmp_path / "out1"))
    assert not (tmp_path / "out1").exists()
    docs = write_docs(tmp_path / "docs.jsonl", [f"Short document number {i}." for i in range(3000)])
    with open(docs, "a") as f:  # past the first batches of documents, so some shards are done before it
        f.write(json.dumps({"text": None}) + "\n")
    r = run_fineweb("--data_files", docs, "--out", tmp_path / "out2", "--shard_size", 1000, "--workers", 2)
    assert_user_error(r)
    assert "document 3000 " in r.stderr
    assert len(shard_names(tmp_path / "out2")) >= 2
    check_whole_shards(tmp_path / "out2", 1000)
    assert not [name for name in os.listdir(tmp_path / "out2") if name.endswith(".tmp")]


def test_hub_without_network_is_a_one_line_error(tmp_path):
    env = dict(ENV, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")  # as good as no network, and fast
    r = subprocess.run([sys.executable, SCRIPT, "--out", tmp_path / "out"], cwd=REPO_ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert_user_error(r, status=1)
    assert "network" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()
