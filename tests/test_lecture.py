"""What runs is what you read: the default run trains on GPT.forward as train_gpt2.py writes it, the lecture's
hyperparameters are in plain sight, every deliberate difference from the lecture is marked, and the files
around the script import one way."""
import ast
import json
import os
import re
import subprocess
import sys

from conftest import ROOT, offline_env
import run_support
import train_gpt2
from test_train import read_log

PROJECT_MODULES = {os.path.splitext(n)[0] for n in os.listdir(ROOT) if n.endswith(".py")}


def run_default(folder, *args):
    """`python train_gpt2.py` as a learner runs it on a laptop (no flags: the CPU preset), cut to 3 steps."""
    out = subprocess.run([sys.executable, "train_gpt2.py", "--max_steps", "3", "--eval_every", "0",
                          "--sample_every", "0", "--checkpoint_every", "0", *args], cwd=folder,
                         env=offline_env(folder), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout, read_log(os.path.join(folder, args[args.index("--log_dir") + 1], "log.txt"))


def test_the_default_run_is_gpt_forward_and_the_chunked_loss_is_opt_in(clone):
    before, original = run_default(clone, "--log_dir", "original")
    assert "--chunked_loss False" in before  # the settings line: the lecture's loss, not the wrapper
    assert run_support.build_parser(train_gpt2.GPT2_124M_FINEWEB).parse_args([]).chunked_loss is False
    # --chunked_loss: the same losses, to fp32 rounding (the logits in chunks of rows: other matmul shapes)
    out_chunked, chunked = run_default(clone, "--log_dir", "chunked", "--chunked_loss")
    assert "--chunked_loss True" in out_chunked and set(chunked) == set(original) and len(original) == 3
    for k in original:
        assert abs(original[k] - chunked[k]) < 1e-5 * abs(original[k]), (k, original[k], chunked[k])
    # a learner's edit to GPT.forward, sharper logits: the losses of the default run change with it
    source = (clone / "train_gpt2.py").read_text()
    line = "        logits = self.lm_head(x)  # (B, T, C) @ (C, V) -> (B, T, V)"
    assert source.count(line) == 1
    (clone / "train_gpt2.py").write_text(source.replace(line, "        logits = 2 * self.lm_head(x)  # edited"))
    _, edited = run_default(clone, "--log_dir", "edited")
    assert set(edited) == set(original)
    assert all(abs(edited[k] - original[k]) > 1e-3 for k in original), (original, edited)


def test_the_lectures_hyperparameters_are_in_plain_sight():
    run = train_gpt2.GPT2_124M_FINEWEB
    assert run == dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, total_batch_size=2**19,
                       batch_size=64, seq_len=1024, max_lr=6e-4, min_lr=6e-5, warmup_steps=715, max_steps=19073,
                       weight_decay=0.1, grad_clip=1.0, eval_every=250, hellaswag_every=250, sample_every=250,
                       checkpoint_every=5000, val_tokens=20 * 64 * 1024 * 8)
    parser = run_support.build_parser(run)
    flags = {a.dest for a in parser._actions}
    assert set(run) <= flags  # every key is named as its flag
    for preset in run_support.PRESETS.values():  # every run the script can pick sets the same keys
        assert set(preset) == set(run)


def test_flags_override_the_lectures_values(tmp_path):
    from test_train import write_shards

    write_shards(tmp_path, [100])
    args = run_support.build_parser(train_gpt2.GPT2_124M_FINEWEB).parse_args(
        ["--data", str(tmp_path), "--weight_decay", "0.05", "--grad_clip", "0.5", "--min_lr", "1e-5",
         "--block_size", "2048", "--log_dir", str(tmp_path / "log")])
    s, _ = run_support.decide_settings(args, train_gpt2.GPT2_124M_FINEWEB, "cuda", 1, [])
    assert (s.weight_decay, s.grad_clip, s.min_lr, s.block_size) == (0.05, 0.5, 1e-5, 2048)
    assert (s.max_lr, s.warmup_steps, s.max_steps) == (6e-4, 715, 19073)  # the rest: the lecture's


def test_from_pretrained_names_the_transposed_conv1d_weights():
    source = ast.get_source_segment(open(os.path.join(ROOT, "train_gpt2.py")).read(),
                                    next(n for n in ast.walk(ast.parse(open(os.path.join(ROOT, "train_gpt2.py")).read()))
                                         if isinstance(n, ast.FunctionDef) and n.name == "from_pretrained"))
    assert ('transposed = ["attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"]'
            in source)


def test_the_checkpoint_the_loop_saves_is_written_out_there():
    source = open(os.path.join(ROOT, "train_gpt2.py")).read()
    saved = source[source.index("run_folder.save_checkpoint(step, {"):]
    saved = saved[:saved.index("})")]
    for key in ("model", "config", "step", "val_loss", "optimizer", "loader", "rng", "settings"):
        assert f'"{key}":' in saved, key


# Each deliberate difference from the lecture, found by the line of code that starts with it: a "# lecture:" comment
# must stand on that line, at most 3 lines above it or (below a def's docstring) 4 lines below. (One test of many: a new difference needs its comment, too.)
DIFFERENCES = [
    "std = 0.01 if module is self.transformer.wpe else 0.02",  # wpe at std 0.01
    "while val_loader.chunk < val_chunks",  # validation's shape
    "dist.all_reduce(val_loss_accum)",  # its summed reduction
    "loss_and_stop = torch.stack([loss_accum, stop.flag(device)])",  # the loss and the stop flag in one all-reduce
    "s, resume_path = rs.decide_settings(",  # rank 0 decides the settings
    "loss_sum, stop_votes, norm = torch.cat(",  # one read-back per step
    "for step in range(start_step, s.max_steps + 1):",  # one iteration more than steps
    "raw_model = model",  # the uncompiled model
    "model = torch.compile(model) if rs.compile_works(",  # compile on by default (on CUDA), tried first
    "B = rs.fit_batch_to_memory(",  # the micro-batch that fits
    "scaler = torch.amp.GradScaler(",  # fp16's gradient scaler
    "scaler.scale(loss).backward()",
    'logits[:, GPT2_VOCAB_SIZE:] = -float("inf")',  # samples never draw a padded row
    "divergence = rs.DivergenceCheck(",  # NaN stops the run
    "device_type, reasons = rs.pick_device(",  # device choice
    "def autocast():",  # the dtype: no bf16 on CPUs, fp16 on GPUs without bf16
    "def get_lr(step, max_lr, min_lr, warmup_steps, max_steps):",  # arguments, not globals
    "model_hf = load_hf_gpt2(model_type)",  # from_pretrained's loading
    "_, num_correct_norm, num_total = hellaswag.evaluate(",  # batched HellaSwag
    "GPT2_124M_FINEWEB = dict(",  # hyperparameters as a dict, overridden by flags
    "run_folder.save_checkpoint(step, {",  # what and where the checkpoint saves
]


def test_every_difference_from_the_lecture_is_marked():
    lines = open(os.path.join(ROOT, "train_gpt2.py")).read().splitlines()
    for code in DIFFERENCES:
        at = [i for i, line in enumerate(lines) if line.strip().startswith(code)]
        assert len(at) == 1, f"{code!r} found {len(at)} times"
        near = lines[max(0, at[0] - 3):at[0] + 5]
        assert any("# lecture:" in line for line in near), f"no '# lecture:' comment at {code!r}"
    marked = [line for line in lines if "# lecture:" in line]
    assert len(marked) >= len(DIFFERENCES)
    assert all(re.search(r"# lecture: \S", line) for line in marked)  # each says something


def test_train_gpt2_stays_short():
    assert len(open(os.path.join(ROOT, "train_gpt2.py")).read().splitlines()) <= 650


# --- the files around the script ----------------------------------------------------------------------------

def project_imports(path):
    """The project modules a file imports, and the names it imports torch under inside functions."""
    tree = ast.parse(open(path).read())
    imported, torch_in_functions = set(), []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            imported |= {n.split(".")[0] for n in names} & PROJECT_MODULES
    for func in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        for node in ast.walk(func):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "torch" for a in node.names):
                torch_in_functions.append(func.name)
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
                torch_in_functions.append(func.name)
    return imported, torch_in_functions


def test_imports_flow_one_way_and_torch_is_imported_at_the_top():
    graph = {}
    for module in PROJECT_MODULES:
        graph[module], torch_in_functions = project_imports(os.path.join(ROOT, module + ".py"))
        assert not torch_in_functions, f"{module}.py imports torch inside {torch_in_functions}"

    def reachable(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    for module in graph:
        assert module not in reachable(module), f"{module}.py imports itself through {sorted(reachable(module))}"
    assert graph["common"] == set() and graph["fineweb"] == {"common"}


def test_fineweb_and_common_import_without_torch():
    # torch made unimportable: fineweb.py (and so its worker processes, which import only what it does) still loads
    code = ("import sys; sys.modules['torch'] = None; sys.path.insert(0, sys.argv[1]); import fineweb, common; "
            f"print(sorted(m for m in sys.modules if m in {sorted(PROJECT_MODULES)}))")
    out = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["['common',", "'fineweb']"]


def test_the_notebook_reads_only_what_ships_and_agrees_with_the_readme():
    nb = json.load(open(os.path.join(ROOT, "play.ipynb")))
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert not re.search(r"[\"'/]shared\b", code) and "tiktoken.get_encoding" not in code and "read_file_cached" not in code
    assert 'vocab="gpt2_tokenizer/encoder.json", merges="gpt2_tokenizer/vocab.bpe"' in code
    assert "get_tokenizer()" in code  # the project's own tokenizer
    readme = open(os.path.join(ROOT, "README.md")).read()
    published = re.search(r"\| GPT-2 124M, HellaSwag acc_norm \| ([\d.]+) \|", readme).group(1)
    hella = re.findall(r"0\.29\d+", "".join("".join(c["source"]) for c in nb["cells"]))  # GPT-2's acc_norm
    assert len(hella) >= 3 and set(hella) == {published}, hella
    assert "GPT2_VAL_LOSS = 3.2924" in code and "| GPT-2 124M, FineWeb-Edu val loss | 3.2924 |" in readme
