"""
How fast is train_gpt2.py's training step? Milliseconds per step, tokens per second, MFU and peak memory.

  python bench.py                 # on a GPU: GPT-2 124M at T=1024 for B = 16, 32, 64
                                  # on a CPU: a 4-layer, 256-wide model at T=256 for B = 4, 8, 16
  python bench.py --compare_hf    # our step (and with --chunked_loss) against Hugging Face's, side by side
  python bench.py --ladder        # the lecture's speed-ups one at a time: fp32 -> TF32 -> bf16 -> compile -> ...

Each row times train_gpt2.py's training step, taken as its loop takes it (forward, loss, backward, gradient
clipping, AdamW), on random tokens, after a few warm-up steps (the first one compiles when --compile is on). MFU is measured
against the GPU's bf16 datasheet peak, or on a CPU against the matmul rate this machine reaches in the row's
math (fp32, or bf16 for bf16 rows), measured here at start in the maths the run uses, for about a second each.
On a CPU without bf16 units the bf16 rows say so instead of timing PyTorch's emulated bf16.
"""

import argparse
import contextlib
import dataclasses
import gc
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import run_support as rs
from chunked_loss import ChunkedLossGPT
from common import ArgumentParser, UserError
from train_gpt2 import GPT, GPTConfig

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


def cpu_has_bf16_units():
    """Whether this CPU multiplies bf16 in hardware: AVX512-BF16 or AMX-BF16 on x86, the BF16 extension on Arm
    (torch.cpu.get_capabilities, which asks cpuinfo). Without them PyTorch emulates bf16: matmuls ran at
    1.7 GFLOP/s on one 2-core AVX2 CPU (a 2048^3 one: 10 s), and bf16 autocast made a training step 21x slower
    than fp32 on one CPU, so bench.py does not time bf16 there.
    The environment variable BENCH_CPU_BF16=0 (or 1) overrides the answer: BENCH_CPU_BF16=0 shows what a CPU
    without bf16 units prints."""
    forced = os.environ.get("BENCH_CPU_BF16")
    if forced is not None:
        if forced not in ("0", "1"):
            raise UserError(f"BENCH_CPU_BF16 must be 0 or 1 (bf16 units absent or present), got '{forced}'")
        return forced == "1"
    capabilities = torch.cpu.get_capabilities()
    return any(capabilities.get(name, False) for name in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"))


def cpu_matmul_flops(dtype=torch.float32, precision="highest", n=256, repeats=5, seconds=1.0):
    """The FLOP/s this CPU reaches in square matmuls in `dtype`, with fp32 matmuls at `precision`
    (torch.set_float32_matmul_precision): the CPU's practical peak in that math, which MFU is measured against
    (a CPU has no datasheet number that PyTorch reaches). Some CPUs have bf16 units, so a row in bf16 is measured
    against the bf16 rate. The size starts at n and grows until one matmul is long enough to time; the whole
    measurement takes about `seconds` (measure_matmul_flops).
    Measured once per process for each math, (dtype, precision), however the arguments are spelled and whatever
    n, repeats and seconds are: the peak printed above the table is the one its MFU column divides by (two
    measurements differ by noise, 10% on a loaded machine). The precision only matters to fp32 matmuls."""
    key = math_key(dtype, precision)
    if key not in _PEAKS:
        _PEAKS[key] = measure_matmul_flops(dtype, precision, n, repeats, seconds)
    return _PEAKS[key][0]


_PEAKS = {}  # math_key: (FLOP/s, n, timed matmuls), this process's measurements


def math_key(dtype, precision):
    return dtype, (precision if dtype == torch.float32 else None)


def measure_matmul_flops(dtype, precision="highest", n=256, repeats=5, seconds=1.0):
    """Time (n, n) @ (n, n) matmuls: double n (up to 8192) until one takes at least seconds / 20, then time that
    size up to `repeats` more times while the whole measurement stays within `seconds` (at least once).
    Returns (FLOP/s of the fastest, n, how many were timed). A fixed size cannot fit every CPU: 2048^3 takes
    about 0.1 s in fp32 on a 2-core AVX-512 CPU, but 10 s in emulated bf16 at 1.7 GFLOP/s. At 50 ms (of a second) the
    clock and the threads' wake-up are noise; the sizing matmuls also warm up the threads and the memory.
    Each doubling is 8x the work, so if the rate holds one matmul takes at most 8 x seconds / 20, and the whole
    measurement about `seconds` (a new repeat starts only if it should end in time)."""
    previous = torch.get_float32_matmul_precision()
    if dtype == torch.float32:
        torch.set_float32_matmul_precision(precision)

    def one_matmul():
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)  # into one buffer: allocating the result each time adds page faults
        return time.perf_counter() - t0

    try:
        start = time.perf_counter()
        while True:
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            out = torch.empty(n, n, dtype=dtype)
            last = one_matmul()
            if last >= seconds / 20 or n >= 8192:
                break
            n *= 2
        times = []
        while len(times) < max(1, repeats) and (not times or time.perf_counter() - start + last <= seconds):
            times.append(one_matmul())
            last = times[-1]
    finally:
        torch.set_float32_matmul_precision(previous)
    return 2 * n**3 / min(times), n, len(times)


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


@dataclasses.dataclass
class Runtime:
    """Where a run is timed: one process (bench.py never runs DDP), the device and dtype train_gpt2.py would pick."""
    device: str
    device_type: str
    dtype: str  # "bfloat16" or "float16" (autocast), or "float32"
    peak_flops: float = None  # the GPU's bf16 dense peak, FLOP/s; None on CPUs and unknown GPUs

    def autocast(self):
        return torch.autocast(self.device_type, dtype=getattr(torch, self.dtype), enabled=self.dtype != "float32")

    def synchronize(self):
        if self.device_type == "cuda":
            torch.cuda.synchronize()  # GPU work is queued asynchronously: the step is done when the GPU is

    def peak_memory(self):
        return torch.cuda.max_memory_allocated(self.device)


def setup_runtime(requested_device):
    device_type, _ = rs.pick_device(requested_device, ddp=False)
    if device_type == "mps":
        raise UserError("bench.py times CUDA GPUs and CPUs; use --device cpu")
    peak = rs.gpu_peak_flops(torch.cuda.get_device_name()) if device_type == "cuda" else None
    return Runtime(device="cuda" if device_type == "cuda" else "cpu", device_type=device_type,
                   dtype=rs.pick_dtype(device_type, "auto", []), peak_flops=peak)


def train_step(model, optimizer, loader, grad_accum_steps, rt):
    """One optimizer step exactly as train_gpt2.py's training loop takes it (one process): micro-steps under
    autocast with the loss divided by their number, clipping at 1.0, AdamW, then one read-back of the loss and
    the gradient norm."""
    optimizer.zero_grad(set_to_none=True)
    loss_accum = torch.zeros((), device=rt.device)
    for _ in range(grad_accum_steps):
        x, y = loader.next_batch()
        x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
        with rt.autocast():
            _, loss = model(x, y)
        loss = loss / grad_accum_steps
        loss_accum += loss.detach()
        loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return torch.stack([loss_accum, norm.to(loss_accum.device)]).tolist()


@dataclasses.dataclass
class StepConfig:
    """What one timed configuration turns on. The defaults are train_gpt2.py's own choices on a GPU."""
    tf32: bool = True  # fp32 matmuls on TF32 tensor cores
    bf16: bool = True  # bf16 autocast
    compile: bool = True  # torch.compile
    flash: bool = True  # SDPA picks a fused kernel, e.g. flash (False: the math backend, which builds (T, T))
    vocab_size: int = 50304  # 50257 padded up to a multiple of 128
    fused_adamw: bool = True
    chunked_loss: bool = False  # chunked_loss.py's LinearCrossEntropy (False: the lecture's F.cross_entropy)


def step_math(cfg):
    """The (dtype, fp32 matmul precision) of a configuration's matmuls: what its MFU is measured against."""
    return (torch.bfloat16 if cfg.bf16 else torch.float32), ("high" if cfg.tf32 else "highest")


NO_BF16_UNITS = "skipped: this CPU has no bf16 units (emulated bf16 made a step 21x slower on one such CPU)"


def bench_step(args, rt, cfg, B, T):
    """Build a fresh model and optimizer for `cfg`, time its training steps; a dict for one table row."""
    if rt.device_type == "cpu" and cfg.bf16 and not cpu_has_bf16_units():
        return {"B": B, "T": T, "skipped": NO_BF16_UNITS}
    free_memory(rt)  # what the previous row left, and its peak
    torch.set_float32_matmul_precision("high" if cfg.tf32 else "highest")
    step_rt = dataclasses.replace(rt, dtype="bfloat16" if cfg.bf16 else "float32")
    torch.manual_seed(0)
    config = GPTConfig(block_size=max(1024, T), vocab_size=cfg.vocab_size, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd)
    model = GPT(config).to(rt.device)
    optimizer = model.configure_optimizers(0.1, 6e-4, rt.device_type, log=lambda *a: None, fused=cfg.fused_adamw)
    stepped = ChunkedLossGPT(model) if cfg.chunked_loss else model
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
        attention = sdpa_kernel([SDPBackend.MATH])
        # the lecture's hand-written attention ran in bf16 under autocast; the math backend would upcast to fp32
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)

    def step():
        train_step(stepped, optimizer, loader, args.grad_accum, step_rt)

    row = {"B": B, "T": T, "peak_flops": rt.peak_flops}
    if rt.device_type == "cpu":
        row["peak_flops"] = cpu_matmul_flops(*step_math(cfg))  # measured here if the machine line did not
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
                   flops_per_second=rs.flops_per_token(config, T) * tokens_per_second)
    return row  # the model and optimizer go with this frame: the caller frees their memory


def format_row(label, row):
    if "error" in row or "skipped" in row:
        return f"{label:<44} {row['B']:>4} {row.get('error') or row['skipped']}"
    mfu = rs.format_mfu(row["flops_per_second"], row["peak_flops"])
    return (f"{label:<44} {row['B']:>4} {row['ms']:>10.1f} {row['tokens_per_second']:>12,.0f} "
            f"{mfu:>7} {row['memory'] / 2**30:>9.2f} GiB")


HEADER = f"{'configuration':<44} {'B':>4} {'ms/step':>10} {'tokens/s':>12} {'MFU':>7} {'peak mem':>13}"


# -----------------------------------------------------------------------------
# 2. What to run


def describe_machine(rt, maths):
    """One line on the hardware and software, and the peak that MFU is measured against. On a CPU that peak is
    measured, for each (dtype, precision) in `maths` (the ones the run's rows use) and only those."""
    if rt.device_type == "cuda":
        name = torch.cuda.get_device_name(rt.device)
        memory = torch.cuda.get_device_properties(rt.device).total_memory
        peak = "MFU: '-' (add this GPU's bf16 dense peak to run_support.GPU_PEAK_FLOPS)" if rt.peak_flops is None \
            else f"MFU against the bf16 dense peak, {rt.peak_flops / 1e12:.1f} TFLOP/s"
        print(f"device: {name} ({memory / 2**30:.0f} GiB), driver {nvidia_driver_version()}, "
              f"torch {torch.__version__}, CUDA {torch.version.cuda}; {peak}")
        return
    rates = []
    for dtype, precision in {math_key(*math): math for math in maths}.values():
        if dtype == torch.bfloat16 and not cpu_has_bf16_units():
            rates.append("bf16 not measured (this CPU has no bf16 units: bf16 rows are skipped)")
            continue
        flops = cpu_matmul_flops(dtype, precision)
        _, n, timed = _PEAKS[math_key(dtype, precision)]
        name = "bf16" if dtype == torch.bfloat16 else "fp32" if precision == "highest" else \
            f"fp32 at precision '{precision}'"
        rates.append(f"{name} {flops / 1e9:.0f} GFLOP/s ({n}^3, best of {timed})")
    print(f"device: CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; this CPU's matmul rate in "
          "the math of the run (MFU divides by it), measured on n x n matmuls for about a second each: " +
          ", ".join(rates))


def nvidia_driver_version():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0].strip() if out.returncode == 0 and out.stdout else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def table_config(args, rt):
    """The default: train_gpt2.py's own configuration (timed at each batch size)."""
    on_gpu = rt.device_type == "cuda"
    return StepConfig(tf32=on_gpu, bf16=on_gpu and rt.dtype == "bfloat16", compile=args.compile,
                      fused_adamw=rt.device_type in ("cuda", "cpu"), vocab_size=args.vocab_size,
                      chunked_loss=args.chunked_loss)


def run_table(args, rt):
    cfg = table_config(args, rt)
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


def ladder_rungs(args):
    """(label, StepConfig) of each rung to time, in the ladder's order."""
    names = [name for name, _, _ in LADDER]
    wanted = args.rungs or names
    for name in wanted:
        if name not in names:
            raise UserError(f"--rungs: unknown rung '{name}'; the rungs are {', '.join(names)}")
    cfg = StepConfig(tf32=False, bf16=False, compile=False, flash=False, vocab_size=50257, fused_adamw=False,
                     chunked_loss=False)
    rungs = []
    for name, label, change in LADDER:
        cfg = dataclasses.replace(cfg, **change)
        if name in wanted:
            rungs.append((label, cfg))
    return rungs


def run_ladder(args, rt):
    print(f"the lecture's ladder: {args.n_layer} layers, {args.n_embd} wide, B={args.batch_sizes[0]}, "
          f"T={args.seq_len}; {args.warmup} warm-up steps, median of {args.steps}")
    print(HEADER)
    for label, cfg in ladder_rungs(args):
        row = bench_step(args, rt, cfg, args.batch_sizes[0], args.seq_len)
        print(format_row(label, row), flush=True)


def compare_hf(args, rt):
    """Our training step against Hugging Face's GPT2LMHeadModel at the same shape, with the same weights and the
    same batches: forward, cross-entropy, backward, clipping, AdamW. Ours runs twice: as `python train_gpt2.py`
    runs it (GPT.forward's F.cross_entropy) and with --chunked_loss. The three take turns step by step (who goes
    first rotates too), so a machine that slows down for a while slows them all."""
    from transformers import GPT2Config, GPT2LMHeadModel

    B, T, V = args.batch_sizes[0], args.seq_len, args.vocab_size
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=max(1024, T), n_embd=args.n_embd,
                                    n_layer=args.n_layer, n_head=args.n_head, activation_function="gelu_new",
                                    bos_token_id=min(50256, V - 1), eos_token_id=min(50256, V - 1),
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))  # our model has no dropout
    with tempfile.TemporaryDirectory() as folder:  # the same starting weights: the losses below must agree
        hf.save_pretrained(folder)
        ours, ours_chunked = GPT.from_pretrained(folder), GPT.from_pretrained(folder)
    chunked = ChunkedLossGPT(ours_chunked)
    steps = {
        "ours": (ours, lambda x, y: ours(x, y)[1]),
        "chunked": (ours_chunked, lambda x, y: chunked(x, y)[1]),
        "hf": (hf, lambda x, y: F.cross_entropy(hf(x).logits.view(-1, V), y.view(-1))),
    }
    runners = {}
    for name, (model, loss_fn) in steps.items():
        model.to(rt.device)
        # the same AdamW and parameter groups for all (configure_optimizers only reads model.parameters())
        optimizer = GPT.configure_optimizers(model, 0.1, 6e-4, rt.device_type, log=lambda *a: None)
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
    print(f"our GPT (as train_gpt2.py runs it, and with --chunked_loss) vs Hugging Face GPT2LMHeadModel (attention: "
          f"{hf.config._attn_implementation}): {args.n_layer} layers, {args.n_embd} wide, {args.n_head} heads, "
          f"vocab {V}, B={B}, T={T}, {rt.dtype}; {args.warmup} warm-up steps each, then {args.steps} in turn")
    times = {name: [] for name in runners}
    names = list(runners)
    for i in range(args.warmup + args.steps):
        losses = {}
        for name in names[i % 3:] + names[:i % 3]:
            rt.synchronize()
            t0 = time.perf_counter()
            losses[name] = runners[name]()
            rt.synchronize()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
        tolerance = 1e-3 if rt.dtype == "float32" else 2e-2  # bf16 keeps 8 bits of mantissa; they round differently
        for name in ("ours", "chunked"):
            if abs(losses[name] - losses["hf"]) > tolerance * abs(losses["hf"]):
                raise RuntimeError(f"step {i}: the loss of {name} ({losses[name]:.6f}) and HF's ({losses['hf']:.6f}) "
                                   "differ: the models are not doing the same math")
        timed = "" if i < args.warmup else "".join(f"  {n} {1000 * times[n][-1]:7.1f} ms" for n in names)
        print(f"step {i:3d}  loss ours {losses['ours']:.5f}  chunked {losses['chunked']:.5f}  hf {losses['hf']:.5f}"
              f"{timed}", flush=True)
    ours_s, chunked_s, hf_s = (statistics.median(times[n]) for n in names)
    print(f"median: ours {1000 * ours_s:.1f} ms, ours with --chunked_loss {1000 * chunked_s:.1f} ms, Hugging Face "
          f"{1000 * hf_s:.1f} ms per step: ours takes {ours_s / hf_s:.2f}x Hugging Face's time, "
          f"--chunked_loss {chunked_s / ours_s:.2f}x ours")
    return ours_s / hf_s


# -----------------------------------------------------------------------------
# 3. Command line


def build_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto: cuda if there is one")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--compare_hf", action="store_true",
                      help="time our step against Hugging Face GPT2LMHeadModel's (default: a small model with GPT-2's vocabulary, 4 layers x 256 wide)")
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
    p.add_argument("--chunked_loss", action=argparse.BooleanOptionalAction, default=False,
                   help="opt-in, as in train_gpt2.py: the loss of chunked_loss.py instead of GPT.forward's F.cross_entropy")
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
    if rt.device_type == "cpu":
        cpu_has_bf16_units()  # a bad BENCH_CPU_BF16 is an error even in a run with no bf16 row


def run_maths(args, rt):
    """The (dtype, fp32 matmul precision) of every step the run will time: the machine line measures the CPU's
    peak in those and no other (each costs about a second)."""
    if args.compare_hf:  # both models run in rt.dtype at the current precision (no MFU: only for the record)
        return [(torch.bfloat16 if rt.dtype == "bfloat16" else torch.float32, torch.get_float32_matmul_precision())]
    configs = [cfg for _, cfg in ladder_rungs(args)] if args.ladder else [table_config(args, rt)]
    return [step_math(cfg) for cfg in configs]


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        rt = setup_runtime(args.device)
        resolve(args, rt)
        describe_machine(rt, run_maths(args, rt))
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
