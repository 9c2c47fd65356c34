"""
Using a trained model instead of training: train_gpt2.py's --sample, --eval and --export_hf.

  python train_gpt2.py --sample log/model_00290.pt --prompt "To be, or not to be"
  python train_gpt2.py --eval log/model_00290.pt          # its run's validation loss at that step, again
  python train_gpt2.py --export_hf log/model_00290.pt exported_gpt2

train_gpt2.py passes in what these need of it (GPT, GPTConfig, sample, DataLoaderLite, the lecture's run): this
file does not import the training script (imports flow one way: train_gpt2.py -> model_commands.py ->
run_support.py, hellaswag.py, checkpoints.py, common.py).
"""

import json
import math
import os
import shutil
from dataclasses import asdict

import torch

import hellaswag
from checkpoints import hf_model_from_checkpoint, load_checkpoint
from common import (FINEWEB_SHARDS, GPT2_VOCAB_SIZE, TINY_SHAKESPEARE, UserError, encode_prompt,
                    ensure_tiny_shakespeare, get_tokenizer, one_line, report_user_errors, tokenizer_file)
from run_support import pick_device, pick_dtype


def run(args, GPT, GPTConfig, sample, DataLoaderLite, lecture_run):
    """--sample MODEL, --eval MODEL or --export_hf CHECKPOINT OUT_DIR; returns the exit status."""
    if args.sample is not None:
        return report_user_errors(sample_command, args, GPT, GPTConfig, sample)
    if args.eval is not None:
        return report_user_errors(eval_command, args, GPT, GPTConfig, DataLoaderLite, lecture_run)
    return report_user_errors(export_hf, args, GPT, GPTConfig)


def load_model(name_or_path, GPT, GPTConfig, device="cpu"):
    """Our GPT from one of our checkpoint files, or from a Hugging Face GPT-2 name or folder."""
    if not os.path.isfile(name_or_path):
        return GPT.from_pretrained(name_or_path).to(device)
    return model_from_checkpoint(load_checkpoint(name_or_path), name_or_path, GPT, GPTConfig).to(device)


def model_from_checkpoint(ckpt, name, GPT, GPTConfig):
    config = ckpt.get("config")
    if not isinstance(config, dict) or set(config) != set(GPTConfig.__dataclass_fields__):
        raise UserError(f"{name} has no valid model config")
    model = GPT(GPTConfig(**config))
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError, TypeError) as e:
        raise UserError(f"{name}: its weights do not fit the model it describes ({one_line(e)})") from e
    return model


def sample_command(args, GPT, GPTConfig, sample):
    """--sample: print samples from one of our checkpoints or a Hugging Face GPT-2 name/folder."""
    if min(args.num_samples, args.max_new_tokens, args.top_k) <= 0:
        raise UserError("--num_samples, --max_new_tokens and --top_k must be positive")
    if not (args.temperature > 0 and math.isfinite(args.temperature)):
        raise UserError(f"--temperature must be a number above 0 (near 0 samples greedily), got {args.temperature}")
    device, _ = pick_device(args.device, ddp=False)  # --device, or the fastest this machine has
    model = load_model(args.sample, GPT, GPTConfig, device)
    enc = get_tokenizer()
    max_length = len(encode_prompt(enc, args.prompt)) + args.max_new_tokens
    if max_length > model.config.block_size:
        raise UserError(f"prompt + --max_new_tokens = {max_length} tokens, more than the model's block size "
                        f"{model.config.block_size}; ask for fewer tokens")
    _, texts = sample(model, args.prompt, num_return_sequences=args.num_samples, max_length=max_length,
                      top_k=args.top_k, seed=args.seed, device=device, enc=enc, temperature=args.temperature)
    for i, text in enumerate(texts):
        print(f"sample {i}: {text}")
    return 0


def eval_command(args, GPT, GPTConfig, DataLoaderLite, lecture_run):
    """--eval: the validation loss, and HellaSwag accuracy where its file is here, of one of our checkpoints or a
    Hugging Face GPT-2, without training. For a checkpoint of ours every setting left unset comes from its run
    (data, micro-batch, sequence length, validation tokens, dtype): one process then computes exactly the
    validation loss that a one-process run logged at that step (the same chunks, in the same order)."""
    device_type, _ = pick_device(args.device, ddp=False)  # --device, or the fastest this machine has
    ckpt = load_checkpoint(args.eval) if os.path.isfile(args.eval) else None
    model = model_from_checkpoint(ckpt, args.eval, GPT, GPTConfig) if ckpt else GPT.from_pretrained(args.eval)
    model.to(device_type).eval()
    run = ckpt.get("settings", {}) if ckpt else {}

    def setting(name, default):  # a flag given on the command line, else the run's value, else the default
        value = getattr(args, name)
        return value if value is not None else run.get(name, default)

    data = setting("data", FINEWEB_SHARDS if os.path.isdir(FINEWEB_SHARDS) else TINY_SHAKESPEARE)
    if data == TINY_SHAKESPEARE:
        ensure_tiny_shakespeare()
    if not os.path.exists(data):
        raise UserError(f"--data {data} does not exist; pass a text file or a folder of fineweb.py shards")
    T = setting("seq_len", min(1024, model.config.block_size))
    B = setting("batch_size", 16 if device_type == "cuda" else 4)
    val_tokens = setting("val_tokens", lecture_run["val_tokens"] if os.path.isdir(data) else 10**9)
    dtype = run["dtype"] if args.dtype == "auto" and "dtype" in run else pick_dtype(device_type, args.dtype, [])
    if min(T, B, val_tokens) <= 0 or T > model.config.block_size:
        raise UserError(f"need positive --seq_len, --batch_size and --val_tokens, and --seq_len at most the model's "
                        f"block size {model.config.block_size}")

    if device_type == "cuda":  # TF32 for fp32 matmuls, as in training
        torch.set_float32_matmul_precision("high")
    loader = DataLoaderLite(data, B, T, split="val")
    val_chunks = max(1, min(val_tokens // (B * T), (loader.total - 1) // (B * T)))  # as train_gpt2.py counts them
    loss_accum = torch.zeros((), device=device_type)
    with torch.no_grad():
        while loader.chunk < val_chunks:
            x, y = (t.to(device_type) for t in loader.next_batch())
            with torch.autocast(device_type, dtype=getattr(torch, dtype), enabled=dtype != "float32"):
                _, loss = model(x, y)
            loss_accum += loss.float() / val_chunks
    print(f"{args.eval}: validation loss {loss_accum.item():.6f} over {val_chunks * B * T:,} tokens of {data} "
          f"({val_chunks} micro-batches of {B} x {T}, {dtype}, {device_type})")

    hella_file = setting("hellaswag_file", None) or os.path.join(hellaswag.DATA_DIR, "hellaswag_val.jsonl")
    if not os.path.isfile(hella_file):
        print(f"HellaSwag: not scored, no file at {hella_file} (pass --hellaswag_file, or let `python hellaswag.py` "
              f"download it once)")
        return 0
    examples = hellaswag.load_examples("val", hella_file)
    limit = args.hellaswag_examples or run.get("hellaswag_examples", 0)
    examples = examples[:limit] if limit > 0 else examples
    num_correct, num_correct_norm, n = hellaswag.evaluate(model, examples, device_type,
                                                          setting("hellaswag_batch_size", 16),
                                                          autocast_dtype=getattr(torch, dtype))
    print(f"{args.eval}: HellaSwag acc {num_correct / n:.4f} acc_norm {num_correct_norm / n:.4f} over {n} examples "
          f"of {hella_file}")
    return 0


def export_hf(args, GPT, GPTConfig):
    """--export_hf: write one of our checkpoints as a standard transformers GPT-2 folder (config.json,
    model.safetensors and the tokenizer files), loadable by GPT2LMHeadModel.from_pretrained and
    pipeline("text-generation")."""
    checkpoint, out_dir = args.export_hf
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"{out_dir} is a file; choose a new folder to export into")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise UserError(f"{out_dir} exists and is not empty; choose a new folder")
    parent = os.path.dirname(os.path.abspath(out_dir))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot export into {out_dir}: {parent} is not a folder this process can write to")
    model = load_model(checkpoint, GPT, GPTConfig, "cpu")  # checks the checkpoint
    if model.config.vocab_size < GPT2_VOCAB_SIZE:
        raise UserError(f"{checkpoint} has a vocabulary of {model.config.vocab_size}, smaller than GPT-2's "
                        f"{GPT2_VOCAB_SIZE}")
    hf = hf_model_from_checkpoint({"config": asdict(model.config), "model": model.state_dict()}, GPT2_VOCAB_SIZE)
    tmp = out_dir.rstrip("/\\") + ".tmp"  # the export appears under its name only when it is complete
    try:
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
    except OSError as e:  # a full disk, a folder that went away
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not export into {out_dir} ({e.strerror or e}); nothing was left there") from e
    print(f"exported {checkpoint} to {out_dir}")
    return 0
