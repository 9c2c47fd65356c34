"""
How fast is train_gpt2.py's training step? Milliseconds per step, tokens per second, MFU and peak memory.

  python bench.py                 # on a GPU: GPT-2 124M at T=1024 for B = 16, 32, 64
                                  # on a CPU: a 4-layer, 256-wide model at T=256 for B = 4, 8, 16
  python bench.py --compare_hf    # our step against Hugging Face GPT2LMHeadModel's, side by side (a CPU target)
  python bench.py --ladder        # the lecture's speed-ups one at a time: fp32 -> TF32 -> bf16 -> compile -> ...

Each row times the real training step of train_gpt2.py (train_step: forward, loss, backward, gradient clipping,
AdamW) on random tokens, after a few warm-up steps (the first one compiles when --compile is on). MFU is measured
against the GPU's bf16 datasheet peak, or on a CPU against the matmul rate this machine reaches in the row's
math (fp32, or bf16 for bf16 rows), measured here.
"""

import argparse
import contextlib
import dataclasses
import functools
import gc
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch
from torch.nn import functional as F

import train_gpt2
from train_gpt2 import GPT, GPTConfig, UserError

# -----------------------------------------------------------------------------
# 1. Measuring


class RandomTokens:
    """Micro-batches of random tokens, with DataLoaderLite's next_batch(): no data file needed, and the
    same batches for every model that is given the same seed."""

    def __init__(self, B, T, vocab_size, seed=0):
        self.B, self.T, self.vocab_size = B, T, min(vocab_size, 50257)  # real data never has the padding tokens
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self):
        buf = torch.randint(0, self.vocab_size, (self.B * self.T + 1,), generator=self.generator)  # (B*T+1,)
        return buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)  # (B, T), (B, T)


def time_steps(step, warmup, steps, synchronize):
    """Run step() warmup times untimed, then `steps` times; the seconds of each timed step."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        synchronize()
        t0 = time.perf_counter()
        step()
        synchronize()  # GPU work is asynchronous: the step is done when the GPU is
        times.append(time.perf_counter() - t0)
    return times


def cpu_matmul_flops(dtype=torch.float32, precision="highest", n=2048, repeats=5):
    """The FLOP/s of one large (n, n) @ (n, n) matmul on this CPU in `dtype`, with fp32 matmuls at `precision`
    (torch.set_float32_matmul_precision), best of `repeats`: the CPU's practical peak in that math, which MFU is
    measured against (a CPU has no datasheet number that PyTorch reaches). Some CPUs have bf16 units, so a row
    in bf16 is measured against the bf16 rate. Measured once per process: the peak printed above the table is
    the one its MFU column divides by."""
    # lru_cache keys on how the arguments are spelled (f() and f(torch.float32) are two entries), so the cached
    # function takes them all positionally
    return _cpu_matmul_flops(dtype, precision, n, repeats)


@functools.lru_cache
def _cpu_matmul_flops(dtype, precision, n, repeats):
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm up: first use of the BLAS threads
        best = min(time_steps(lambda: a @ b, 0, repeats, lambda: None))
    finally:
        torch.set_float32_matmul_precision(previous)
    return 2 * n**3 / best


def peak_memory(rt):
    """GPU: the most memory tensors held at once since the last reset. CPU: the process's peak resident set so far
    (Linux reports it in KiB): it never goes down, so the rows run from the smallest batch up."""
    if rt.device_type == "cuda":
        return rt.peak_memory()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def free_memory(rt):
    gc.collect()
    if rt.device_type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class PlainLoss(torch.nn.Module):
    """The lecture's loss: build the (B, T, V) logits, then cross-entropy. For the ladder's rungs before our
    LinearCrossEntropy (which model(x, y) uses)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx, targets):
        logits, _ = self.model(idx)  # (B, T, V)
        return logits, F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


@dataclasses.dataclass
class StepConfig:
    """What one timed configuration turns on. The defaults are train_gpt2.py's own choices on a GPU."""
    tf32: bool = True  # fp32 matmuls on TF32 tensor cores
    bf16: bool = True  # bf16 autocast
    compile: bool = True  # torch.compile
    flash: bool = True  # SDPA picks a fused kernel, e.g. flash (False: the math backend, which builds (T, T))
    vocab_size: int = 50304  # 50257 padded up to a multiple of 128
    fused_adamw: bool = True
    chunked_loss: bool = True  # LinearCrossEntropy (False: PlainLoss)


def bench_step(args, rt, cfg, B, T):
    """Build a fresh model and optimizer for `cfg`, time its training steps; a dict for one table row."""
    free_memory(rt)  # what the previous row left, and its peak
    torch.set_float32_matmul_precision("high" if cfg.tf32 else "highest")
    step_rt = dataclasses.replace(rt, dtype="bfloat16" if cfg.bf16 else "float32")
    torch.manual_seed(0)
    config = GPTConfig(block_size=max(1024, T), vocab_size=cfg.vocab_size, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd)
    model = GPT(config).to(rt.device)
    optimizer = train_gpt2.configure_optimizer(model, 0.1, 6e-4, rt.device_type, log=lambda *a: None,
                                               fused=cfg.fused_adamw)
    stepped = model if cfg.chunked_loss else PlainLoss(model)
    if cfg.compile:
        # each configuration compiles afresh, with no on-disk cache either: the cache's key leaves out the SDPA
        # backend, so the "flash" rung would get the math rung's compiled code back
        torch._dynamo.reset()
        torch.compiler.config.force_disable_caches = True
        warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")  # that is the point
        stepped = torch.compile(stepped)
    loader = RandomTokens(B, T, cfg.vocab_size)
    attention = contextlib.nullcontext()
    if not cfg.flash:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        attention = sdpa_kernel([SDPBackend.MATH])
        # the lecture's hand-written attention ran in bf16 under autocast; the math backend would upcast to fp32
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)

    def step():
        train_gpt2.train_step(stepped, optimizer, loader, args.grad_accum, 6e-4, 1.0, step_rt, contextlib.nullcontext)

    row = {"B": B, "T": T, "peak_flops": rt.peak_flops}
    if rt.device_type == "cpu":
        row["peak_flops"] = cpu_matmul_flops(torch.bfloat16 if cfg.bf16 else torch.float32,
                                             "high" if cfg.tf32 else "highest")
    try:
        with attention:
            times = time_steps(step, args.warmup, args.steps, rt.synchronize)
    except Exception as e:  # out of memory while compiling arrives wrapped in the compiler's own error
        if not isinstance(e, torch.OutOfMemoryError) and not isinstance(e.__cause__, torch.OutOfMemoryError):
            raise
        row["error"] = "out of memory"
    else:
        seconds = statistics.median(times)
        tokens_per_second = B * T * args.grad_accum / seconds
        row.update(ms=1000 * seconds, tokens_per_second=tokens_per_second, memory=peak_memory(rt),
                   flops_per_second=train_gpt2.flops_per_token(config, T) * tokens_per_second)
    return row  # the model and optimizer go with this frame: the caller frees their memory


def format_row(label, row):
    if "error" in row:
        return f"{label:<44} {row['B']:>4} {row['error']}"
    mfu = train_gpt2.format_mfu(row["flops_per_second"], row["peak_flops"])
    return (f"{label:<44} {row['B']:>4} {row['ms']:>10.1f} {row['tokens_per_second']:>12,.0f} "
            f"{mfu:>7} {row['memory'] / 2**30:>9.2f} GiB")


HEADER = f"{'configuration':<44} {'B':>4} {'ms/step':>10} {'tokens/s':>12} {'MFU':>7} {'peak mem':>13}"


# -----------------------------------------------------------------------------
# 2. What to run


def describe_machine(rt):
    """One line on the hardware and software, and the peak that MFU is measured against."""
    if rt.device_type == "cuda":
        name = torch.cuda.get_device_name(rt.device)
        memory = torch.cuda.get_device_properties(rt.device).total_memory
        peak = "MFU: '-' (add this GPU's bf16 dense peak to train_gpt2.GPU_PEAK_FLOPS)" if rt.peak_flops is None \
            else f"MFU against the bf16 dense peak, {rt.peak_flops / 1e12:.1f} TFLOP/s"
        print(f"device: {name} ({memory / 2**30:.0f} GiB), driver {nvidia_driver_version()}, "
              f"torch {torch.__version__}, CUDA {torch.version.cuda}; {peak}")
        return
    rates = {"fp32": cpu_matmul_flops(), "fp32 at precision 'high'": cpu_matmul_flops(precision="high"),
             "bf16": cpu_matmul_flops(torch.bfloat16)}
    print(f"device: CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; MFU against this CPU's "
          "measured matmul rate in each row's math (2048 x 2048 x 2048, best of 5): " +
          ", ".join(f"{name} {rate / 1e9:.0f} GFLOP/s" for name, rate in rates.items()))


def nvidia_driver_version():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0].strip() if out.returncode == 0 and out.stdout else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_table(args, rt):
    """The default: train_gpt2.py's own configuration at each batch size."""
    on_gpu = rt.device_type == "cuda"
    cfg = StepConfig(tf32=on_gpu, bf16=on_gpu and rt.dtype == "bfloat16", compile=args.compile,
                     fused_adamw=on_gpu, vocab_size=args.vocab_size)
    print(f"model: {args.n_layer} layers, {args.n_head} heads, {args.n_embd} wide, vocab {args.vocab_size}; "
          f"T={args.seq_len}; grad_accum {args.grad_accum}; {args.warmup} warm-up steps, median of {args.steps}")
    print(f"configuration: {cfg}")
    print(HEADER)
    for B in args.batch_sizes:
        print(format_row("train_gpt2.py", bench_step(args, rt, cfg, B, args.seq_len)), flush=True)


# The lecture's ladder, in its order: each rung keeps the ones before it and adds one speed-up.
LADDER = [
    ("fp32", "fp32, math attention, V=50257, plain loss", {}),
    ("tf32", "+ TF32 matmuls", {"tf32": True}),
    ("bf16", "+ bf16 autocast", {"bf16": True}),
    ("compile", "+ torch.compile", {"compile": True}),
    ("flash", "+ flash attention (SDPA's fused kernels)", {"flash": True}),
    ("vocab", "+ vocab padded to 50304", {"vocab_size": 50304}),
    ("fused", "+ fused AdamW", {"fused_adamw": True}),
    ("chunked", "+ loss without the logits", {"chunked_loss": True}),
]


def run_ladder(args, rt):
    names = [name for name, _, _ in LADDER]
    wanted = args.rungs or names
    for name in wanted:
        if name not in names:
            raise UserError(f"--rungs: unknown rung '{name}'; the rungs are {', '.join(names)}")
    print(f"the lecture's ladder: {args.n_layer} layers, {args.n_embd} wide, B={args.batch_sizes[0]}, "
          f"T={args.seq_len}; {args.warmup} warm-up steps, median of {args.steps}")
    print(HEADER)
    cfg = StepConfig(tf32=False, bf16=False, compile=False, flash=False, vocab_size=50257, fused_adamw=False,
                     chunked_loss=False)
    for name, label, change in LADDER:
        cfg = dataclasses.replace(cfg, **change)
        if name in wanted:
            row = bench_step(args, rt, cfg, args.batch_sizes[0], args.seq_len)
            print(format_row(label, row), flush=True)


def compare_hf(args, rt):
    """Our training step against Hugging Face's GPT2LMHeadModel at the same shape, with the same weights and the
    same batches: forward, cross-entropy, backward, clipping, AdamW. The two alternate step by step (who goes
    first alternates too), so a machine that slows down for a while slows both."""
    from transformers import GPT2Config, GPT2LMHeadModel

    B, T, V = args.batch_sizes[0], args.seq_len, args.vocab_size
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=max(1024, T), n_embd=args.n_embd,
                                    n_layer=args.n_layer, n_head=args.n_head, activation_function="gelu_new",
                                    bos_token_id=min(50256, V - 1), eos_token_id=min(50256, V - 1),
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))  # our model has no dropout
    ours = GPT(GPTConfig(block_size=max(1024, T), vocab_size=V, n_layer=args.n_layer, n_head=args.n_head,
                         n_embd=args.n_embd))
    train_gpt2.copy_hf_weights(hf, ours)  # the same starting weights: the losses below must agree
    hf.to(rt.device), ours.to(rt.device)
    steps = {
        "ours": (ours, lambda x, y: ours(x, y)[1]),
        "hf": (hf, lambda x, y: F.cross_entropy(hf(x).logits.view(-1, V), y.view(-1))),
    }
    runners = {}
    for name, (model, loss_fn) in steps.items():
        optimizer = train_gpt2.configure_optimizer(model, 0.1, 6e-4, rt.device_type, log=lambda *a: None)
        loader = RandomTokens(B, T, V, seed=1)

        def run(model=model, loss_fn=loss_fn, optimizer=optimizer, loader=loader):
            x, y = (t.to(rt.device) for t in loader.next_batch())
            optimizer.zero_grad(set_to_none=True)
            with rt.autocast():  # bf16 on a GPU that has it, as in training
                loss = loss_fn(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            return loss.item()

        runners[name] = run
    print(f"our GPT vs Hugging Face GPT2LMHeadModel (attention: {hf.config._attn_implementation}): "
          f"{args.n_layer} layers, {args.n_embd} wide, {args.n_head} heads, vocab {V}, B={B}, T={T}, "
          f"{rt.dtype}; {args.warmup} warm-up steps each, then {args.steps} alternating")
    times = {name: [] for name in runners}
    for i in range(args.warmup + args.steps):
        order = ["ours", "hf"] if i % 2 == 0 else ["hf", "ours"]
        losses = {}
        for name in order:
            rt.synchronize()
            t0 = time.perf_counter()
            losses[name] = runners[name]()
            rt.synchronize()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
        tolerance = 1e-3 if rt.dtype == "float32" else 2e-2  # bf16 keeps 8 bits of mantissa; they round differently
        if abs(losses["ours"] - losses["hf"]) > tolerance * abs(losses["hf"]):
            raise RuntimeError(f"step {i}: our loss {losses['ours']:.6f} and HF's {losses['hf']:.6f} differ: "
                               "the two models are not doing the same math")
        timed = "" if i < args.warmup else \
            f"  ours {1000 * times['ours'][-1]:7.1f} ms  hf {1000 * times['hf'][-1]:7.1f} ms"
        print(f"step {i:3d}  loss ours {losses['ours']:.5f}  hf {losses['hf']:.5f}{timed}", flush=True)
    ours_s, hf_s = statistics.median(times["ours"]), statistics.median(times["hf"])
    print(f"median: ours {1000 * ours_s:.1f} ms, Hugging Face {1000 * hf_s:.1f} ms per step: "
          f"ours takes {ours_s / hf_s:.2f}x Hugging Face's time")
    return ours_s / hf_s


# -----------------------------------------------------------------------------
# 3. Command line


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto: cuda if there is one")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--compare_hf", action="store_true",
                      help="time our step against Hugging Face GPT2LMHeadModel's (default shape: issue 8's CPU one)")
    mode.add_argument("--ladder", action="store_true",
                      help="time the lecture's speed-ups one at a time, at the first B")
    p.add_argument("--rungs", nargs="+", default=None, help="with --ladder: time only these rungs (they still add up)")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=None,
                   help="micro-batch sizes B (default: 16 32 64 on a GPU, 4 8 16 on a CPU; --compare_hf: 8)")
    p.add_argument("--seq_len", type=int, default=None, help="T (default: 1024 on a GPU, 256 on a CPU)")
    p.add_argument("--n_layer", type=int, default=None, help="default: 12 on a GPU (GPT-2 124M), 4 on a CPU")
    p.add_argument("--n_head", type=int, default=None, help="default: 12 on a GPU, 4 on a CPU")
    p.add_argument("--n_embd", type=int, default=None, help="default: 768 on a GPU, 256 on a CPU")
    p.add_argument("--vocab_size", type=int, default=50304, help="50257 padded to a multiple of 128")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-steps per timed step")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on with CUDA, as in train_gpt2.py)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 5 on a GPU, 2 on a CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 on a GPU, 5 on a CPU; "
                                                           "--compare_hf: 10)")
    return p


def resolve(args, rt):
    gpu = rt.device_type == "cuda"
    defaults = dict(seq_len=1024 if gpu else 256, n_layer=12 if gpu else 4, n_head=12 if gpu else 4,
                    n_embd=768 if gpu else 256, compile=gpu, warmup=5 if gpu else 2,
                    steps=10 if args.compare_hf else 20 if gpu else 5,
                    batch_sizes=[8] if args.compare_hf else [16, 32, 64] if gpu else [4, 8, 16])
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("seq_len", "n_layer", "n_head", "n_embd", "vocab_size", "grad_accum", "steps"):
        if getattr(args, k) < 1:
            raise UserError(f"--{k} must be at least 1, got {getattr(args, k)}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be 0 or more, got {args.warmup}")
    if min(args.batch_sizes) < 1:
        raise UserError(f"--batch_sizes must all be at least 1, got {args.batch_sizes}")
    if args.n_embd % args.n_head:
        raise UserError(f"--n_embd ({args.n_embd}) must be a multiple of --n_head ({args.n_head})")
    if args.rungs and not args.ladder:
        raise UserError("--rungs goes with --ladder")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        rt = train_gpt2.setup_runtime(args.device, reasons=[])  # one process: bench.py never runs DDP
        if rt.device_type == "mps":
            raise UserError("bench.py times CUDA GPUs and CPUs; use --device cpu")
        resolve(args, rt)
        describe_machine(rt)
        if args.compare_hf:
            compare_hf(args, rt)
        elif args.ladder:
            run_ladder(args, rt)
        else:
            run_table(args, rt)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
