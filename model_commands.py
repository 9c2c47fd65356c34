"""
Using a trained model instead of training: train_gpt2.py's --sample and --export_hf.

  python train_gpt2.py --sample log/model_00290.pt --prompt "To be, or not to be"
  python train_gpt2.py --export_hf log/model_00290.pt exported_gpt2

train_gpt2.py passes its GPT, GPTConfig and sample() in: this file does not import the training script (imports
flow one way: train_gpt2.py -> model_commands.py -> run_support.py, checkpoints.py, common.py).
"""

import json
import os
from dataclasses import asdict

from checkpoints import hf_model_from_checkpoint, load_checkpoint
from common import GPT2_VOCAB_SIZE, UserError, get_tokenizer, one_line, report_user_errors, tokenizer_file
from run_support import pick_device


def run(args, GPT, GPTConfig, sample):
    """--sample MODEL or --export_hf CHECKPOINT OUT_DIR; returns the exit status."""
    command = sample_command if args.sample is not None else export_hf
    return report_user_errors(command, args, GPT, GPTConfig, sample)


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
    if model.config.vocab_size < GPT2_VOCAB_SIZE:
        raise UserError(f"{checkpoint} has a vocabulary of {model.config.vocab_size}, smaller than GPT-2's "
                        f"{GPT2_VOCAB_SIZE}")
    hf = hf_model_from_checkpoint({"config": asdict(model.config), "model": model.state_dict()}, GPT2_VOCAB_SIZE)
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
