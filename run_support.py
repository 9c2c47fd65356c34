"""
What a real training run needs beyond the lecture's script, in the order train_gpt2.py's train() uses it:

  1. Exit statuses      run_to_exit_status: 0 done, 1 the run failed (diverged, out of memory, a save that
                        failed, a process that stopped answering), 2 a user's mistake, 128+N a signal: each
                        one line; DivergenceCheck; restart_safe_store (torchrun's restarts)
  2. The command line   build_parser: every flag, with help
  3. Device             pick_device
  4. Settings           decide_settings: rank 0 fills the flags left unset (a preset for this machine and data,
                        the dtype, compile), checks every value, fits the micro-batch to the processes, picks
                        the checkpoint to resume, and every process follows
  5. Every node         load_on_every_node (each node's local rank 0 first; a failure anywhere stops every
                        process with one line), check_token_ids, data_fingerprint, load_resume_checkpoint,
                        load_hellaswag_examples
  6. The first step    fit_batch_to_memory (a micro-batch that fits on every process), compile_works
                        (torch.compile tried on a small function first, else the run goes on uncompiled)
  7. Resuming           load_weights, restore_training_state, rng_state
  8. The run's folder   RunFolder: log.txt, config.json and the checkpoints of --log_dir, under a FolderLock
  9. MFU                flops_per_token, gpu_peak_flops, format_mfu
 10. Stopping           StopRequest: Ctrl-C or SIGTERM ends the run cleanly, on every process together

Imports flow one way: train_gpt2.py -> run_support.py -> hellaswag.py -> checkpoints.py -> common.py.
"""

import argparse
import datetime
import importlib.util
import json
import math
import os
import signal
import socket
import sys
import time

import torch
import torch.distributed as dist
from torch.nn import functional as F

from checkpoints import (GPT2_NAMES, checkpoint_path, checkpoint_step, list_checkpoints, load_checkpoint,
                         save_checkpoint)
from common import (FINEWEB_MANIFEST, FINEWEB_SHARDS, GPT2_VOCAB_SIZE, TINY_SHAKESPEARE, ArgumentParser, UserError,
                    ensure_tiny_shakespeare, find_shards, one_line, sha256_of)
from hellaswag import load_examples as load_hellaswag_file

# -----------------------------------------------------------------------------
# 1. Exit statuses


class SharedUserError(UserError):
    """A UserError that every process of a DDP job raises together: each node prints it once (its local rank 0)."""


class RunFailed(Exception):
    """The run cannot go on (a save failed, another process stopped answering): one line 'error: ...', exit
    status 1. shared: every process raises it together, and each node prints it once (its local rank 0)."""

    shared = False


class TrainingDiverged(RunFailed):
    """The loss or the weights became NaN or infinite: exit status 1; checkpoints hold finite weights only."""


class DivergenceCheck:
    """Stops a run whose loss or gradient norm is not finite, before NaN weights could be saved; every process sees
    the same loss and norm, so all stop at the same step. In fp16 a step whose gradients overflowed is normal: the
    gradient scaler skipped it and scales less from then on. Only MAX_SKIPS of those in a row (the scale halved
    each time, from 65536 down to 1/16) mean the run diverged."""

    MAX_SKIPS = 20

    def __init__(self, scaler, newest_checkpoint):  # newest_checkpoint: RunFolder's, a phrase naming it
        self.scaler, self.newest_checkpoint, self.skips = scaler, newest_checkpoint, 0

    def diverged(self, step, what):
        error = TrainingDiverged(f"step {step}: {what}; stopping. Checkpoints hold finite weights only: "
                                 f"{self.newest_checkpoint()}")
        error.shared = True
        return error

    def check(self, step, loss, norm):
        """Raise TrainingDiverged, or return whether the scaler skipped this step."""
        if not math.isfinite(loss):
            raise self.diverged(step, f"the loss is {loss}")
        if math.isfinite(norm):
            self.skips = 0
            return False
        if not self.scaler.is_enabled():
            raise self.diverged(step, f"the gradient norm is {norm}")
        self.skips += 1
        if self.skips >= self.MAX_SKIPS:
            raise self.diverged(step, f"fp16 gradients overflowed {self.skips} steps in a row (loss scale now "
                                      f"{self.scaler.get_scale():g})")
        return True


def step_of(error):
    """The step train() was at when the error was raised (read from its frame), or None during the setup."""
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "train" and "step" in tb.tb_frame.f_locals:
            return tb.tb_frame.f_locals["step"]
        tb = tb.tb_next
    return None


# What a collective raises when another process is gone: gloo's timeouts ("Timed out waiting 600000ms for recv
# operation", "Application timeout caused pair closure") and closed connections; NCCL's errors
PEER_TIMED_OUT = ("timed out", "application timeout")  # compared in lower case
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused")


def lost_peer_message(error, args):
    """One line for an error a collective raised because another process stopped answering, or None."""
    text = str(error)
    if not dist.is_initialized() or not isinstance(error, RuntimeError):
        return None
    step = step_of(error)
    where = f"at step {step}" if step is not None else "during the setup"
    if any(m in text for m in PEER_GONE):
        return f"another process ended {where} (its connection closed): its own output says why"
    if any(m in text.lower() for m in PEER_TIMED_OUT) or isinstance(error, dist.DistBackendError):
        return (f"another process stopped answering {where}: no reply within --dist_timeout {args.dist_timeout:g} s "
                f"(stopped, deadlocked, or its node gone)")
    return None


def run_to_exit_status(train, args):
    """train(args), with the exit statuses of the command line: 0 done, 1 diverged, out of memory, a save that
    failed or another process that stopped answering, 2 a user's mistake, 128+N stopped by signal N, 130 a second
    Ctrl-C. DDP processes leave together: none tears its process group down while another uses it."""
    try:
        code = train(args)
        if dist.is_initialized():
            dist.barrier()
        return code
    except UserError as e:
        if not isinstance(e, SharedUserError) or int(os.environ.get("LOCAL_RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        if not e.shared or int(os.environ.get("LOCAL_RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 1
    except torch.OutOfMemoryError as e:  # after the micro-batch was fitted: an evaluation, or fragmented memory
        print(f"error: out of memory ({one_line(e)}); lower --batch_size, --hellaswag_batch_size or --val_tokens, "
              f"and continue with --resume auto", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C during the setup, or a second one during a step
        step = step_of(e)
        print(f"error: interrupted {f'at step {step}' if step is not None else 'during the setup'} (Ctrl-C); "
              f"the newest checkpoint is where --resume auto continues", file=sys.stderr)
        return 130
    except RuntimeError as e:
        message = lost_peer_message(e, args)
        if message is None:
            raise
        print(f"error: {message}; the newest checkpoint is where --resume auto continues", file=sys.stderr)
        return 1
    finally:
        StopRequest.restore_handlers()
        release_log_dirs()
        if dist.is_initialized():
            dist.destroy_process_group()


def restart_safe_store(args):
    """torchrun (PyTorch 2.13) keeps one key-value store for the whole job, and each restart of the workers
    (--max-restarts) writes the same keys to it as the attempt before. A restarted process can then read a dead
    one's address and fail ("Gloo connectFullMesh failed ... Connection refused") or wait forever: restarts after
    a SIGKILLed worker failed or hung in 15 of 24 tries on a 2-core Intel Xeon (gloo), and in 0 of 25 with keys
    of its own per attempt. So init_process_group gets the store with a prefix per attempt; without torchrun's
    shared store, nothing (the default, env://)."""
    if not (math.isfinite(args.dist_timeout) and args.dist_timeout > 0):
        raise SharedUserError(f"--dist_timeout must be a positive number of seconds, got {args.dist_timeout}")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(seconds=args.dist_timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dict(store=dist.PrefixStore(f"attempt_{attempt}/", store), rank=int(os.environ["RANK"]),
                world_size=int(os.environ["WORLD_SIZE"]))


# -----------------------------------------------------------------------------
# 2. The command line


def build_parser(lecture_run):
    p = ArgumentParser(
        description="Reproduce GPT-2 (124M): train a GPT-2 model from scratch (or fine-tune one), on a CPU, one GPU, "
                    "or many with torchrun. With no flags it picks a run for this machine and says why.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # Flags whose default is None are filled from the chosen preset (or the lecture's run) and reported at start.
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
    g.add_argument("--block_size", type=int, default=None, help="longest sequence the model takes (GPT-2: 1024)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--total_batch_size", type=int, default=None, help="tokens per optimizer step")
    g.add_argument("--batch_size", "-B", type=int, default=None,
                   help="micro-batch size per process (a preset's is lowered if the processes cannot share the batch)")
    g.add_argument("--seq_len", "-T", type=int, default=None, help="sequence length")
    g.add_argument("--max_steps", type=int, default=None, help="optimizer steps")
    g.add_argument("--warmup_steps", type=int, default=None, help="linear warmup steps")
    g.add_argument("--max_lr", type=float, default=None, help="peak learning rate")
    g.add_argument("--min_lr", type=float, default=None, help="final learning rate (GPT-3: 10%% of max_lr)")
    g.add_argument("--weight_decay", type=float, default=None, help="AdamW weight decay (GPT-3: 0.1)")
    g.add_argument("--grad_clip", type=float, default=None, help="clip the gradient norm to this (GPT-3: 1.0)")
    g.add_argument("--seed", type=int, default=1337, help="seed of the weights and of the data order")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="where to train")
    g.add_argument("--dist_timeout", type=float, default=600,
                   help="with torchrun: seconds any process waits for the others in a collective before the run "
                        "stops with one line (a peer stopped, deadlocked, or its node gone)")
    g.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="autocast dtype; auto: bfloat16 on GPUs that have it, float16 with a gradient scaler on CUDA "
                        "GPUs without it (T4, V100, RTX 20xx), float32 on CPUs and MPS")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on with CUDA where Triton is installed, off elsewhere); "
                        "tried on a small function before training, and if that fails the run goes on without it")
    g.add_argument("--chunked_loss", action=argparse.BooleanOptionalAction, default=False,
                   help="opt-in: train through chunked_loss.ChunkedLossGPT, which computes the output layer and the "
                        "loss in chunks instead of GPT.forward's F.cross_entropy (the same numbers; faster on some "
                        "CPUs, see README 'How fast')")
    g = p.add_argument_group("evaluation, logging and checkpoints")
    g.add_argument("--eval_every", type=int, default=None, help="validation loss every N steps (0: never)")
    g.add_argument("--hellaswag_every", type=int, default=None, help="HellaSwag accuracy every N steps (0: never)")
    g.add_argument("--hellaswag_file", default=None, help="a local HellaSwag val jsonl (default: download it once)")
    g.add_argument("--hellaswag_batch_size", type=int, default=None,
                   help="HellaSwag examples per forward pass (default: 16; --eval: the run's)")
    g.add_argument("--hellaswag_examples", type=int, default=0,
                   help="score only the first N HellaSwag val examples (0: all 10,042), for quick runs")
    g.add_argument("--sample_every", type=int, default=None, help="print samples every N steps (0: never)")
    g.add_argument("--checkpoint_every", type=int, default=None, help="save a checkpoint every N steps (0: never)")
    g.add_argument("--keep_checkpoints", type=int, default=0, help="keep only the newest N checkpoints (0: all)")
    g.add_argument("--log_dir", default="log", help="where log.txt, config.json and checkpoints go")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in a --log_dir that holds another run: its log and checkpoints are deleted")
    g.add_argument("--resume", default=None,
                   help="continue from a checkpoint file, or 'auto': the newest one in --log_dir (fresh start if none)")
    g = p.add_argument_group("using a trained model (instead of training)")
    g.add_argument("--sample", metavar="MODEL", default=None,
                   help="print samples from a checkpoint of ours or a GPT-2 name/folder, then exit")
    g.add_argument("--prompt", default="Hello, I'm a language model,", help="with --sample: the text to continue")
    g.add_argument("--num_samples", type=int, default=4, help="with --sample: how many continuations")
    g.add_argument("--max_new_tokens", type=int, default=64, help="with --sample: tokens to add to the prompt")
    g.add_argument("--top_k", type=int, default=50, help="with --sample: sample from the k most likely tokens")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="with --sample: divide the logits by this before sampling (below 1: surer; near 0: greedy)")
    g.add_argument("--eval", metavar="MODEL", default=None,
                   help="validation loss on --data, and HellaSwag where its file is here, of a checkpoint of ours "
                        "(with its run's data, tokens and dtype unless flags say otherwise) or a GPT-2 name/folder; "
                        "no training")
    g.add_argument("--export_hf", nargs=2, metavar=("CHECKPOINT", "OUT_DIR"), default=None,
                   help="write a checkpoint as a Hugging Face GPT-2 folder (safetensors + tokenizer), then exit")
    return p


MODEL_COMMAND_FLAGS = ("sample", "prompt", "num_samples", "max_new_tokens", "top_k", "temperature", "export_hf", "eval")


# -----------------------------------------------------------------------------
# 3. Device


def pick_device(requested, ddp):
    """The device type to train on ('cuda', 'mps' or 'cpu'), and the reasons for an automatic choice."""
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


# -----------------------------------------------------------------------------
# 4. Settings: rank 0 decides, every process follows

# The runs `python train_gpt2.py` picks when it cannot run the lecture's (train_gpt2.GPT2_124M_FINEWEB): flags
# given on the command line win over all of them.
PRESETS = {
    # a GPU without FineWeb-Edu shards: the 124M model on Tiny Shakespeare, a quick look at learning at full size
    "gpt2-124M-shakespeare": dict(
        n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, total_batch_size=16 * 1024,
        batch_size=16, seq_len=1024, max_lr=6e-4, min_lr=6e-5, warmup_steps=10, max_steps=50,  # the lecture's
        weight_decay=0.1, grad_clip=1.0,                                                       # first check
        eval_every=25, hellaswag_every=0, sample_every=50, checkpoint_every=50, val_tokens=10**9,
    ),
    # CPU (or MPS): a small model that learns Tiny Shakespeare in minutes on a laptop
    "small": dict(
        n_layer=4, n_head=4, n_embd=128, block_size=1024, vocab_size=50304, total_batch_size=8 * 128, batch_size=8,
        seq_len=128,
        max_lr=2e-3, min_lr=2e-4,  # small models tolerate (and need) a larger learning rate than 124M
        # 290 x 1024 tokens: just under one pass over the 304K training tokens (a second pass overfits: the
        # validation loss went from 5.66 at step 300 up to 5.88 at step 400 in a 400-step run on a CPU)
        warmup_steps=20, max_steps=290, weight_decay=0.1, grad_clip=1.0,
        eval_every=100, hellaswag_every=0, sample_every=290, checkpoint_every=290, val_tokens=10**9,
    ),
}

# the settings that change the math of a run: a resumed run must use the same ones (the micro-batch may differ:
# a step reads the same tokens whatever it is, see train_gpt2.py's data section; so may the dtype, which only rounds)
# The data is compared by content (data_fingerprint), not by path: the same file given another way is the same data.
MATH_SETTINGS = ("total_batch_size", "seq_len", "max_steps", "warmup_steps", "max_lr", "min_lr", "weight_decay",
                 "grad_clip", "seed", "n_layer", "n_head", "n_embd", "vocab_size", "block_size", "init_from")


def decide_settings(args, lecture_run, device_type, world_size, reasons):
    """The settings of the run, decided on rank 0 and sent to every process: the flags left unset filled from the
    run chosen for this machine and data, every value checked, the micro-batch fitted to the processes. Returns
    (settings, the path of the checkpoint to resume or None); the reasons for each choice go to reasons."""
    decision = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            decision = ("ok", decide_settings_here(args, lecture_run, device_type, world_size))
        except Exception as e:  # whatever it is, the other processes must hear of it
            if not dist.is_initialized():
                raise
            decision = ("error", as_error(e))
    if dist.is_initialized():
        box = [decision]
        dist.broadcast_object_list(box, src=0)
        decision = box[0]
    if decision[0] == "error":
        kind, message = decision[1]
        raise SharedUserError(message) if kind == "user" else RuntimeError(message)
    s, more_reasons, resume_path = decision[1]
    reasons.extend(more_reasons)
    return s, resume_path


def decide_settings_here(args, lecture_run, device_type, world_size):
    """decide_settings's work, on one process: returns (settings, reasons, resume path or None)."""
    # the training settings: every flag but those of --sample and --export_hf, which never reach a training run
    s = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in MODEL_COMMAND_FLAGS})
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
    if "warmup_steps" in filled and "max_steps" not in filled and s.warmup_steps > s.max_steps > 0:
        reasons.append(f"warmup_steps: {s.max_steps} instead of the preset's {s.warmup_steps}, so that the learning "
                       f"rate reaches --max_lr within --max_steps {s.max_steps}")
        s.warmup_steps = s.max_steps
    s.dtype = pick_dtype(device_type, s.dtype, reasons)
    s.hellaswag_batch_size = s.hellaswag_batch_size or 16
    if s.compile is None:
        s.compile = compile_by_default(device_type, reasons)
    check_values(s)
    check_model_fits(s, device_type)
    if os.path.isdir(s.log_dir):
        lock_log_dir(s.log_dir)  # a run still going there: one line now (RunFolder takes it if the folder is new)
    check_log_dir_holds_no_other_run(s)
    fit_batch_to_processes(s, world_size, "batch_size" in filled, reasons)
    resume_path = s.resume
    if s.resume == "auto":
        found = list_checkpoints(s.log_dir)
        resume_path = found[-1] if found else None
        reasons.append(f"resume: {resume_path or f'no checkpoint in {s.log_dir}, starting fresh'}")
    return s, reasons, resume_path


def pick_dtype(device_type, requested, reasons):
    """The autocast dtype, 'bfloat16', 'float16' or 'float32' (no autocast), and the reason it was chosen."""
    has_bf16 = device_type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    if requested == "auto":
        if has_bf16:
            reasons.append("dtype: bfloat16 autocast (auto: this GPU has bf16)")
            return "bfloat16"
        if device_type == "cuda":  # T4, V100, RTX 20xx: fp16 tensor cores (a T4: 65 TFLOP/s fp16, 8 fp32)
            reasons.append("dtype: float16 autocast with a gradient scaler (auto: this GPU has no bf16; its fp16 "
                           "tensor cores are much faster than fp32)")
            return "float16"
        why = {"mps": "bf16 and fp16 autocast on MPS are not tested here",
               "cpu": "bf16 autocast measured 21x slower on one CPU, 1.6x faster on one with bf16 units: "
                      "docs/benchmarks.md"}[device_type]
        reasons.append(f"dtype: float32 (auto: {why})")
        return "float32"
    if requested == "bfloat16" and device_type == "cuda" and not has_bf16:
        raise UserError("--dtype bfloat16, but this GPU has no bf16 (NVIDIA's came with Ampere, compute capability "
                        "8.0); use --dtype float16 (with a gradient scaler) or float32")
    if requested != "float32" and device_type == "mps":
        raise UserError(f"--dtype {requested} on MPS is not supported by this script; use --dtype float32")
    reasons.append(f"dtype: {requested} (--dtype)")
    return requested


def compile_by_default(device_type, reasons):
    """torch.compile by default only with CUDA, and only where its GPU compiler, Triton, is installed."""
    if device_type != "cuda":
        why = "compiling on a CPU takes minutes, even for a small model; --compile tries it" \
            if device_type == "cpu" else "torch.compile does not support MPS well enough"
        reasons.append(f"compile: off ({why})")
        return False
    if importlib.util.find_spec("triton") is None:
        reasons.append("compile: off (torch.compile needs Triton on CUDA, and this PyTorch has none: on Windows "
                       "`pip install triton-windows`)")
        return False
    reasons.append("compile: on (CUDA with Triton)")
    return True


def check_values(s):
    for name in ("total_batch_size", "batch_size", "seq_len", "max_steps", "n_layer", "n_head", "n_embd",
                 "vocab_size", "block_size", "val_tokens", "hellaswag_batch_size"):
        if getattr(s, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(s, name)}")
    for name in ("warmup_steps", "eval_every", "hellaswag_every", "sample_every", "checkpoint_every",
                 "keep_checkpoints", "weight_decay", "hellaswag_examples"):
        if getattr(s, name) < 0:
            raise UserError(f"--{name} must be 0 or more, got {getattr(s, name)}")
    for name in ("max_lr", "min_lr", "weight_decay", "grad_clip"):
        if not math.isfinite(getattr(s, name)):
            raise UserError(f"--{name} must be a finite number, got {getattr(s, name)}")
    if not s.max_lr > 0 or not 0 <= s.min_lr <= s.max_lr or not s.grad_clip > 0:
        raise UserError(f"need 0 < --max_lr, 0 <= --min_lr <= --max_lr and --grad_clip > 0 "
                        f"(got {s.max_lr}, {s.min_lr}, {s.grad_clip})")
    if not (math.isfinite(s.dist_timeout) and s.dist_timeout > 0):
        raise UserError(f"--dist_timeout must be a positive number of seconds, got {s.dist_timeout}")
    if not 0 <= s.seed < 2**32:
        raise UserError(f"--seed must be a whole number from 0 to 2**32 - 1, got {s.seed}")
    if s.warmup_steps > s.max_steps:
        raise UserError(f"--warmup_steps {s.warmup_steps} is more than --max_steps {s.max_steps}: the learning rate "
                        f"would never reach --max_lr")
    if s.n_embd % s.n_head != 0:
        raise UserError(f"--n_embd {s.n_embd} must be a multiple of --n_head {s.n_head}")
    if s.seq_len > s.block_size:
        raise UserError(f"--seq_len {s.seq_len} is longer than the model's block size {s.block_size}")
    if s.chunked_loss and s.dtype == "float16":  # its gradients are made in the forward pass, before the scaling
        raise UserError("--chunked_loss does not go with float16: its gradients would underflow in fp16 before the "
                        "gradient scaler could scale them; use --no-chunked_loss, or --dtype bfloat16/float32")
    if s.hellaswag_every > 0 and s.hellaswag_file is not None and not os.path.isfile(s.hellaswag_file):
        raise UserError(f"--hellaswag_file {s.hellaswag_file} does not exist")
    check_log_dir(s.log_dir)


def run_files(log_dir):
    """The files of a run in log_dir: its log.txt, config.json and checkpoints (finished or being written)."""
    if not os.path.isdir(log_dir):
        return []
    names = [n for n in os.listdir(log_dir) if n in ("log.txt", "config.json")
             or n.startswith("model_") and (n.endswith(".pt") or n.endswith(".pt.tmp"))]
    return sorted(os.path.join(log_dir, n) for n in names)


def check_log_dir_holds_no_other_run(s):
    """A run writes into a --log_dir of its own. --resume auto, or --resume of a checkpoint in that folder, continues
    the run that is there; any other run (a fresh start, or a resume from a checkpoint elsewhere) stops here if
    the folder holds another run's files, unless --overwrite, which deletes them when the run starts."""
    inside = s.resume not in (None, "auto") and os.path.dirname(os.path.abspath(s.resume)) == os.path.abspath(s.log_dir)
    if s.overwrite and (s.resume == "auto" or inside):
        raise UserError(f"--overwrite deletes the run in --log_dir {s.log_dir}: it does not go with --resume auto or "
                        f"a checkpoint of that folder")
    if inside:
        newer = [p for p in list_checkpoints(s.log_dir) if checkpoint_step(p) > checkpoint_step(s.resume)]
        if newer:
            raise UserError(f"--resume {s.resume}: {s.log_dir} holds newer checkpoints of that run ("
                            f"{os.path.basename(newer[-1])}); --resume auto continues from the newest, or resume "
                            f"into another --log_dir to go back to an older one")
    if s.resume == "auto" or inside:
        return
    if run_files(s.log_dir) and not s.overwrite:
        raise UserError(f"--log_dir {s.log_dir} holds another run (log.txt or checkpoints): continue it with --resume "
                        f"auto, choose another --log_dir, or start over with --overwrite (deletes its log and "
                        f"checkpoints)")


def check_model_fits(s, device_type):
    """The model's weights, gradients and AdamW state (16 bytes a parameter, in fp32) must fit in the device's
    memory before anything is allocated: a --block_size of 10**9 alone would ask for terabytes."""
    n = s.vocab_size * s.n_embd + s.block_size * s.n_embd + s.n_layer * (12 * s.n_embd**2 + 13 * s.n_embd) \
        + 2 * s.n_embd
    have = device_memory(device_type)
    if have is not None and 16 * n > have:
        raise UserError(f"the model would have {n:,} parameters: {16 * n / 2**30:,.1f} GiB for its weights, gradients "
                        f"and AdamW state, more than the {have / 2**30:.1f} GiB of this {device_type.upper()}; lower "
                        f"--block_size, --n_layer, --n_embd or --vocab_size")


def device_memory(device_type):
    """The memory of the GPU (CUDA) or of the machine (CPU) in bytes, or None where it is not known."""
    if device_type == "cuda":
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory \
            if torch.cuda.is_available() else None
    if device_type == "cpu" and hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def check_log_dir(log_dir):
    """--log_dir must be a folder that exists or can be made, and be writable: found now, not at the first save."""
    path = os.path.abspath(log_dir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"--log_dir {log_dir}: {path} is not a folder this process can write to")


def fit_batch_to_processes(s, world_size, from_preset, reasons):
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
    from transformers import GPT2Config  # slow to import: only fine-tuning needs it

    if s.init_from not in GPT2_NAMES and not os.path.isdir(s.init_from):
        raise UserError(f"--init_from {s.init_from}: not 'scratch', a GPT-2 name ({', '.join(GPT2_NAMES)}) "
                        f"or a folder with a Hugging Face GPT-2 checkpoint")
    try:
        c = GPT2Config.from_pretrained(s.init_from)
    except (OSError, ValueError) as e:  # offline without a cached copy, or a folder without a config.json
        raise UserError(f"--init_from {s.init_from}: could not read its config ({one_line(e)}); check the network "
                        f"or the folder") from e
    shape = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, vocab_size=c.vocab_size, block_size=c.n_positions)
    for k, v in shape.items():
        given = getattr(s, k)
        if given is not None and given != v:
            raise UserError(f"--{k} {given}, but --init_from {s.init_from} has {k} {v}; leave it out when fine-tuning")
        setattr(s, k, v)


# -----------------------------------------------------------------------------
# 5. Every node: what each node reads from its own disk, its local rank 0 first


def as_error(e):
    return ("user", str(e)) if isinstance(e, UserError) else ("bug", f"{type(e).__name__}: {one_line(e)}")


def agree_on_errors(error):
    """Every process passes its error (None, or (kind, message)); if any process has one, all of them raise the
    first, naming that process's node: a node that cannot go on stops the whole job instead of leaving the others
    waiting in a collective until it times out."""
    node = os.environ.get("GROUP_RANK", "0")  # torchrun's number of this node
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, (node, socket.gethostname(), dist.get_rank(), error))
    for node, host, rank, error in errors:
        if error is not None:
            kind, message = error
            message = f"node {node} ({host}, rank {rank}): {message}"
            raise SharedUserError(message) if kind == "user" else RuntimeError(message)


def load_on_every_node(fn):
    """fn() on every process, each node's local rank 0 first (it does the node's downloads, and the others then
    find the files). If fn fails on any process, every process raises the same one-line error naming that node."""
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


def read_manifest(folder):
    """fineweb.py's record of the shards it wrote in folder, or None."""
    try:
        with open(os.path.join(folder, FINEWEB_MANIFEST)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def check_token_ids(s, train_loader, val_loader):
    """Every token id must have a row of the embedding (< vocab_size), or the first forward pass fails: checked
    before anything is written. A text file's ids are GPT-2's; a shard's largest id is in fineweb.py's manifest
    (its tokenizer's ids are GPT-2's too), and shards it did not write are read through once."""
    largest = 0
    for split, loader in (("train", train_loader), ("val", val_loader)):
        if not os.path.isdir(s.data):
            largest = max(largest, int(loader.shards[0].max()))
            continue
        listed = {shard["name"]: shard for shard in (read_manifest(s.data) or {}).get("shards", [])}
        for path, tokens in zip(find_shards(s.data, split), loader.shards):
            known = listed.get(os.path.basename(path))
            largest = max(largest, known.get("max_token", GPT2_VOCAB_SIZE - 1) if known else int(tokens.max()))
    if largest >= s.vocab_size:
        raise UserError(f"--data {s.data} holds token id {largest:,}, but the model's embedding has --vocab_size "
                        f"{s.vocab_size:,} rows (ids 0 to {s.vocab_size - 1:,}); use a larger --vocab_size")


def data_fingerprint(path):
    """What identifies the training data, for a resumed run to check that it trains on the same tokens: a text
    file's sha256; for a shard folder, each shard's name and size, with fineweb.py's sha256 of its tokens when
    its manifest has them (a shard edited in place without them goes unnoticed: the shards are too large to hash
    at every start)."""
    if not os.path.isdir(path):
        return {"sha256": sha256_of(path)}
    listed = {shard["name"]: shard.get("sha256") for shard in (read_manifest(path) or {}).get("shards", [])}
    return {"shards": [[n, os.path.getsize(os.path.join(path, n)), listed.get(n)]
                       for n in sorted(os.listdir(path)) if n.endswith(".npy")]}


def load_resume_checkpoint(s, resume_path, data_id):
    """The checkpoint rank 0 chose to resume from, read from this node's disk (None for a fresh start), after
    checking that it does the same math as this run, on the same data (data_id: data_fingerprint's)."""
    if s.data == TINY_SHAKESPEARE:
        ensure_tiny_shakespeare()
    if not os.path.exists(s.data):
        raise UserError(f"--data {s.data} does not exist here; every node needs the data at that path")
    if resume_path is None:
        return None
    ckpt = load_checkpoint(resume_path)
    saved = {**ckpt.get("config", {}), **ckpt.get("settings", {})}  # the model's shape, then the run's settings
    for k in MATH_SETTINGS:
        if k in saved and saved[k] != getattr(s, k):
            raise UserError(f"--resume {resume_path}: --{k} is {getattr(s, k)!r} but the checkpoint was trained with "
                            f"{saved[k]!r}; use the same value (or start a new run in another --log_dir)")
    if "data" in ckpt and ckpt["data"] != data_id:
        raise UserError(f"--resume {resume_path}: --data {s.data} is not the data the checkpoint was trained on (its "
                        f"content changed); resume with that data, or start a new run in another --log_dir")
    return ckpt


def load_hellaswag_examples(s):
    """The HellaSwag val examples the run scores (the first --hellaswag_examples of them), or None if it does not."""
    if s.hellaswag_every <= 0:
        return None
    examples = load_hellaswag_file("val", s.hellaswag_file)
    return examples[:s.hellaswag_examples] if s.hellaswag_examples > 0 else examples


# -----------------------------------------------------------------------------
# 6. Before the first step: a micro-batch that fits, and a torch.compile that works


def print_run(print0, reasons, s, model, train_loader, val_loader, val_chunks, hella_examples):
    """What the run does and why: the reasons for each choice, every setting, the data, the model."""
    for line in reasons:
        print0(line)
    print0("settings: " + " ".join(f"--{k} {v}" for k, v in vars(s).items()))
    print0(f"data: {s.data}: {train_loader.total:,} train tokens in {len(train_loader.shards)} shard(s), "
           f"{val_loader.total:,} val tokens; val loss over {val_chunks} micro-batches "
           f"({val_chunks * s.batch_size * s.seq_len:,} tokens)")
    if hella_examples:
        print0(f"hellaswag: {len(hella_examples):,} val examples every {s.hellaswag_every} steps")
    print0(f"model: {model.config} with {sum(p.numel() for p in model.parameters()):,} parameters")


def all_processes_agree(ok, device):
    """True if ok is True on every process (on one process: ok itself)."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor(int(ok), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def raise_on_every_process(problem):
    """Rank 0's outcome (None, or the exception to stop with) raised on every process at once, so that a failure
    on rank 0 stops the whole job with one line instead of leaving the others waiting in a collective."""
    if dist.is_initialized():
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem is not None:
        problem.shared = True
        raise problem


def memory_of(device):
    """What this process has to train in, in words: a GPU's free memory, or the machine's for a CPU."""
    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info(device)
        return f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB on {torch.cuda.get_device_name(device)}"
    have = device_memory(device)
    return f"{have / 2**30:.1f} GiB of memory" if have is not None else "this machine's memory"


def try_micro_batch(model, B, T, device, autocast, world_size):
    """One forward and backward pass at micro-batch B, with what the first step adds held in reserve: AdamW's state
    (two fp32 numbers per parameter) and, with DDP, its gradient buckets (one more): True if it all fits in
    memory. Leaves no gradients behind and draws no random numbers (zeros: memory does not depend on values)."""
    reserve = x = loss = None
    try:
        per_parameter = 12 if world_size > 1 else 8
        reserve = torch.empty(per_parameter * sum(p.numel() for p in model.parameters()), dtype=torch.uint8,
                              device=device)
        x = torch.zeros((B, T), dtype=torch.long, device=device)
        with autocast():
            _, loss = model(x, x)
        loss.backward()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        del reserve, x, loss
        model.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def fit_batch_to_memory(model, s, device, autocast, world_size, from_preset, reasons):
    """A micro-batch that fits in memory on every process and still divides total_batch_size: s.batch_size, or
    the largest divisor of it at most half as large, halving until one fits; each tried with one forward and
    backward pass before the first step, so that no process runs out of memory in the middle of a step while the
    others wait for it. A preset's micro-batch shrinks (gradient accumulation keeps the tokens of a step); a
    --batch_size that does not fit is an error naming one that does."""
    T = s.seq_len
    divisors = [b for b in range(s.batch_size, 0, -1) if s.total_batch_size % (b * T * world_size) == 0]
    B = s.batch_size
    while not all_processes_agree(try_micro_batch(model, B, T, device, autocast, world_size), device):
        smaller = [b for b in divisors if b <= B // 2]
        if not smaller:
            n = sum(p.numel() for p in model.parameters())
            raise SharedUserError(
                f"even a micro-batch of {B} x {T} tokens does not fit in memory on every process: the model has "
                f"{n:,} parameters ({16 * n / 2**30:.1f} GiB for its weights, gradients and AdamW state) and this "
                f"process has {memory_of(device)}; train a smaller model or use a larger GPU")
        B = smaller[0]
    if B != s.batch_size:
        if not from_preset:
            raise SharedUserError(f"--batch_size {s.batch_size} does not fit in memory ({memory_of(device)}) on "
                                  f"every process; --batch_size {B} fits")
        reasons.append(f"batch_size: {B} instead of {s.batch_size}, which ran out of memory "
                       f"({memory_of(device)}); gradient accumulation keeps {s.total_batch_size:,} tokens per step")
        s.batch_size = B
    return B


def compile_works(device, log):
    """Whether torch.compile works here: a small function (a matmul, GELU, LayerNorm), forward and backward, is
    compiled on the device first, which needs what compiling the model needs (a C++ compiler for a CPU, Triton for
    a GPU, a Python that dynamo supports). If it fails on any process, every process trains uncompiled, after one
    line. The model itself then compiles at its first step, inside DDP as in the lecture (DDP's compiled graph is
    split at its gradient buckets, so the all-reduces overlap the backward pass)."""
    def small(x, w):
        return F.layer_norm(F.gelu(x @ w, approximate="tanh"), (w.size(1),)).sum()

    error = None
    try:
        x = torch.linspace(-1, 1, 8 * 16, device=device).view(8, 16)  # no random numbers drawn
        w = torch.linspace(-1, 1, 16 * 16, device=device).view(16, 16).requires_grad_()
        torch.compile(small)(x, w).backward()
    except Exception as e:  # compiling raises many kinds of errors (InductorError, TritonMissing, ...)
        error = e
    finally:
        torch.compiler.reset()  # the model compiles afresh: nothing of this small function stays behind
    if all_processes_agree(error is None, device):
        return True
    why = f"{type(error).__name__}: {one_line(error)}" if error is not None else "it failed on another process"
    log(f"compile: failed ({why}); training without it (--no-compile skips the attempt)")
    return False


# -----------------------------------------------------------------------------
# 7. Resuming: a checkpoint holds all that the run needs to continue exactly as if it had never stopped


def load_weights(model, ckpt):
    """Put a checkpoint's weights into the model (nothing to do for a fresh start: ckpt None)."""
    if ckpt is None:
        return
    try:
        model.load_state_dict(ckpt["model"])
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise SharedUserError(f"the checkpoint's weights do not fit this model ({one_line(e)})") from e


def rng_state(device_type, device):
    state = {"cpu": torch.get_rng_state()}
    if device_type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_training_state(ckpt, optimizer, scaler, train_loader, device_type, device):
    """Continue where a checkpoint stopped: optimizer state, fp16's loss scale, data position, random generators.
    Returns the step to start from and the last validation loss (0 and None for a fresh start)."""
    if ckpt is None:
        return 0, None
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise SharedUserError(f"--resume: the checkpoint does not fit this model ({one_line(e)})") from e
    if scaler.is_enabled() and ckpt.get("scaler"):  # a run in another dtype saved no scale: fp16 starts afresh
        scaler.load_state_dict(ckpt["scaler"])
    train_loader.load_state_dict(ckpt["loader"])
    torch.set_rng_state(ckpt["rng"]["cpu"])
    if device_type == "cuda" and "cuda" in ckpt["rng"]:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    return ckpt["step"], ckpt["val_loss"]


# -----------------------------------------------------------------------------
# 8. The run's folder


def os_error_in(error):
    """The OSError behind an error (torch.save meeting a full disk raises a RuntimeError from its zip writer while
    handling the OSError), or None."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    return error


def write_atomically(path, text):
    """The file is whole or as it was: written under a temporary name, flushed to disk, then renamed."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def kept_on_resume(line, step):
    """A log.txt line a run resumed at `step` keeps: those before it, and the evaluations at it (made before its
    checkpoint was saved). Lines a failed run wrote after its checkpoint go: the resumed run writes them again."""
    parts = line.split()
    if len(parts) != 3 or not parts[0].isdigit():
        return False  # a line cut short by a killed process: always the last one written, after the checkpoint
    return int(parts[0]) < step or (int(parts[0]) == step and parts[1] != "train")


class FolderLock:
    """The lock of a --log_dir, held by rank 0 for the whole run, so that a second run into the same folder (a
    second terminal, a job submitted twice) stops with one line instead of mixing its log and checkpoints with
    the first's. It is an flock on the file .lock (LockFileEx on Windows): the operating system lets go of it
    when the process ends, however it ends, so a crashed run never blocks the next one. The file says who holds it."""

    NAME = ".lock"

    def __init__(self, log_dir):
        self.path = os.path.join(log_dir, self.NAME)
        self.file = None

    def acquire(self):
        while True:
            f = open(self.path, "a+")
            try:
                lock_file(f)
            except OSError:
                try:
                    f.seek(0)
                    holder = f.read().strip() or "another process"
                except OSError:  # Windows: the holder's lock keeps others from reading it too
                    holder = "another process"
                f.close()
                raise UserError(f"--log_dir {os.path.dirname(self.path)} is in use by a run that is still going "
                                f"({holder}); wait for it to end, or choose another --log_dir")
            if os.path.exists(self.path) and os.path.samestat(os.fstat(f.fileno()), os.stat(self.path)):
                break
            f.close()  # the file was deleted by the run that held it, between our open and our lock: again
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        self.file = f

    def release(self):
        if self.file is not None:
            try:
                os.remove(self.path)  # before letting go: a run that opens it now finds a new file, or none
            except OSError:  # the folder went away (or became unwritable) during the run
                pass
            self.file.close()
            self.file = None


if os.name == "nt":
    import msvcrt

    def lock_file(f):
        f.seek(0)
        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
else:
    import fcntl

    def lock_file(f):
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


held_locks = []  # released when the run ends (run_to_exit_status), however it ends


def lock_log_dir(log_dir):
    """Rank 0 takes the folder's lock: a UserError if a live run holds it."""
    if any(lock.path == os.path.join(log_dir, FolderLock.NAME) for lock in held_locks):
        return
    lock = FolderLock(log_dir)
    lock.acquire()
    held_locks.append(lock)


def release_log_dirs():
    while held_locks:
        held_locks.pop().release()


class RunFolder:
    """The files of a run in --log_dir, written by rank 0 only, which holds the folder's lock (FolderLock):
    config.json (the settings and why they were chosen), log.txt (the lecture's format: '{step} train|val|hella
    {value}'; a fresh run starts it anew, a resumed run keeps what came before the step it resumes at), and the
    checkpoints (model_NNNNN.pt, written atomically; --keep_checkpoints keeps the newest N)."""

    def __init__(self, s, master_process, start_step, resumed, config):
        self.s, self.master_process = s, master_process
        self.log_file = os.path.join(s.log_dir, "log.txt")
        problem = None
        if master_process:  # every process hears how it went: one that fails here stops them all
            try:
                self.start(start_step, resumed, config)
            except UserError as e:
                problem = SharedUserError(str(e))
            except OSError as e:  # a full disk, the folder gone, permission lost
                problem = RunFailed(f"could not write the run's files in {s.log_dir} ({e.strerror or e})")
        raise_on_every_process(problem)

    def start(self, start_step, resumed, config):
        s = self.s
        os.makedirs(s.log_dir, exist_ok=True)
        lock_log_dir(s.log_dir)
        check_log_dir_holds_no_other_run(s)  # again, now that the folder is locked: it may be new since
        if s.overwrite:  # allowed by decide_settings: delete the old run's files, now that this one starts
            for path in run_files(s.log_dir):
                os.remove(path)
        lines = []
        if resumed and os.path.isfile(self.log_file):
            with open(self.log_file) as f:
                lines = [line for line in f.read().splitlines() if kept_on_resume(line, start_step)]
        write_atomically(self.log_file, "".join(line + "\n" for line in lines))
        write_atomically(os.path.join(s.log_dir, "config.json"), json.dumps({"settings": vars(s), **config}, indent=2))

    def log(self, line):
        if not self.master_process:
            return
        try:
            with open(self.log_file, "a") as f:
                f.write(line + "\n")
        except OSError as e:
            raise RunFailed(f"could not write {self.log_file} ({e.strerror or e}); {self.newest_checkpoint()}: "
                            f"fix the folder, then --resume auto") from e

    def newest_checkpoint(self):
        """A phrase that names the newest checkpoint of the run, for the messages of a run that stops."""
        found = list_checkpoints(self.s.log_dir)
        return f"the newest checkpoint is {found[-1]}" if found else "no checkpoint was saved"

    def save_checkpoint(self, step, checkpoint):
        """Rank 0 saves (finite weights only); every process learns how that went, so that a save that fails
        (a full disk, the folder gone) stops them all at once with one line, the previous checkpoint intact."""
        path, problem = checkpoint_path(self.s.log_dir, step), None
        if self.master_process:
            if not all(torch.isfinite(v).all() for v in checkpoint["model"].values()):
                problem = TrainingDiverged(f"step {step}: the weights are not finite, so they were not saved; "
                                           f"stopping. Checkpoints hold finite weights only: {self.newest_checkpoint()}")
            else:
                try:
                    save_checkpoint(path, checkpoint)
                except (OSError, RuntimeError) as e:  # a full disk surfaces from torch.save as a RuntimeError too
                    e = os_error_in(e)
                    if e is None:
                        raise
                    problem = RunFailed(f"could not save checkpoint {path} ({e.strerror or e}); nothing of it was "
                                        f"left, {self.newest_checkpoint()}: free space or fix the folder, then "
                                        f"--resume auto")
        raise_on_every_process(problem)
        if self.master_process:
            print(f"saved checkpoint {path}", flush=True)
            if self.s.keep_checkpoints > 0:
                for p in list_checkpoints(self.s.log_dir)[:-self.s.keep_checkpoints]:
                    try:
                        os.remove(p)
                    except OSError as e:  # the run goes on: an old checkpoint left behind costs only disk
                        print(f"warning: --keep_checkpoints could not delete {p} ({e.strerror or e})", flush=True)


# -----------------------------------------------------------------------------
# 9. MFU: model FLOPs utilisation (PaLM paper, appendix B), the FLOPs the model needs per second as a fraction of
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
# 10. Stopping: Ctrl-C (SIGINT) or SIGTERM (a scheduler's preemption) only sets a flag; the current step finishes,
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
        if self.signum is None:
            self.signum = signum
        elif signum == signal.SIGINT:  # a second Ctrl-C: stop at once (one line, from run_to_exit_status)
            raise KeyboardInterrupt
        # a second SIGTERM changes nothing: a scheduler that signals every process of a job reaches each worker
        # twice, once itself and once through torchrun

    def flag(self, device):
        """1 if this process was asked to stop: summed over the processes with the step's loss, so that they all
        see the request at the same step (a signal may reach only some of them)."""
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
