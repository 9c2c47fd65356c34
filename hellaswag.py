"""
HellaSwag: how well does a GPT-2 pick the sensible ending of a sentence?

Each HellaSwag example is a context ("A man is sitting on a roof. he") and four endings, one of them right
("starts pulling up roofing on a roof.") and three written to fool a model but not a person. A language model
cannot answer multiple choice directly, so we ask it how likely each ending is after the context (a
"completion" evaluation, as in the GPT-3 paper) and pick the most likely one:

  acc       the ending with the lowest total cross-entropy (sum over its tokens)
  acc_norm  the ending with the lowest mean cross-entropy per token (longer endings are not penalised
            for being long); this is the number the "Let's reproduce GPT-2 (124M)" lecture reports

Precision: the command line scores in fp32 (on CUDA with TF32 matmuls, torch.set_float32_matmul_precision("high")),
the setting of the published numbers: over the 10,042 val examples, OpenAI's GPT-2 124M gets acc 0.2859 and
acc_norm 0.2955, GPT-2 XL acc 0.3842 and acc_norm 0.4893. --bf16 scores under bf16 autocast instead, as
train_gpt2.py's periodic HellaSwag score does on GPUs: faster there, but not the setting of those numbers.

The sections:

  1. Data        download hellaswag_{split}.jsonl once (checked, written atomically), or read --data_file
  2. Rendering   one example -> 4 rows of tokens, and a mask over the tokens of each ending
  3. Scoring     several examples per forward pass; the loss of the endings' tokens only
  4. Command line

Run it:
  python hellaswag.py -m gpt2 -d cuda               # OpenAI's GPT-2 124M, through Hugging Face transformers
  python hellaswag.py -m log/model_19072.pt         # a checkpoint written by train_gpt2.py
  python hellaswag.py -m gpt2 --data_file hellaswag_val.jsonl --limit 200   # offline, first 200 examples
  python hellaswag.py -m gpt2 -d cuda --bf16        # under bf16 autocast, as during training

From training (train_gpt2.py), with DDP each process takes every world_size-th example and the counts are summed:
  examples = load_examples("val")
  num_correct, num_correct_norm, num_total = evaluate(raw_model, examples[rank::world_size], device,
                                                      autocast_dtype=torch.bfloat16)
"""

import argparse
import json
import os
import sys

import torch
from torch.nn import functional as F
from tqdm import tqdm

from checkpoints import hf_model_from_file
from common import ArgumentParser, UserError, get_tokenizer, report_user_errors
from common import download as download_file

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# 1. Data

DATA_DIR = os.path.join(HERE, "hellaswag_data")  # the downloaded files are cached here, beside this script
DATA_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
# (size in bytes, sha256) of the official files we can check; val is the split whose accuracy we report
EXPECTED = {"val": (12_246_618, "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588")}


def download(url, path, size=None, sha256=None):
    """Download a HellaSwag file: checked, written to a temporary name, then renamed (common.download)."""
    download_file(url, path, size, sha256, hint="connect to the network, or use a local copy of the file "
                                                "(hellaswag.py --data_file PATH, train_gpt2.py --hellaswag_file PATH)")


def load_examples(split="val", data_file=None):
    """The labelled examples of a HellaSwag split, as dicts with at least 'ctx', 'endings' (4) and 'label'.
    With data_file, read that jsonl file; otherwise hellaswag_data/hellaswag_{split}.jsonl, downloaded first if
    needed. (The test split's labels are not public, so only train and val can be scored.)"""
    if data_file is None:
        if split not in ("train", "val", "test"):
            raise UserError(f"unknown split '{split}': use train, val or test")
        data_file = os.path.join(DATA_DIR, f"hellaswag_{split}.jsonl")
        if not os.path.isfile(data_file):
            os.makedirs(DATA_DIR, exist_ok=True)
            download(DATA_URL.format(split=split), data_file, *EXPECTED.get(split, (None, None)))
    elif not os.path.isfile(data_file):
        raise UserError(f"data file {data_file} does not exist")
    examples = []
    with open(data_file, encoding="utf-8", errors="replace") as f:  # a bad byte fails as a bad line, below
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError:
                ex = None
            if not (isinstance(ex, dict) and isinstance(ex.get("ctx"), str) and isinstance(ex.get("endings"), list)
                    and len(ex["endings"]) == 4 and all(isinstance(e, str) and e.strip() for e in ex["endings"])
                    and type(ex.get("label")) is int and 0 <= ex["label"] < 4):
                raise UserError(f"line {line_number} of {data_file} is not a labelled HellaSwag example (a JSON "
                                f"object with 'ctx', 4 non-empty 'endings' and a 'label' 0-3; the test split has no "
                                f"labels)")
            examples.append(ex)
    if not examples:
        raise UserError(f"{data_file} holds no examples")
    return examples


# -----------------------------------------------------------------------------
# 2. Rendering


def render_example(example, enc, max_len=None):
    """One example as the model's input: 4 rows (one per ending), each the context's tokens followed by the
    ending's tokens, right-padded with token 0 to the longest row. Returns
      tokens (4, L) LongTensor, mask (4, L) LongTensor that is 1 exactly on the ending's tokens, label (int).
    The ending is encoded with a leading space: in the text it follows the context after a space, and GPT-2's
    tokenizer folds a word's leading space into the word's token ("he" and " he" are different tokens).
    With max_len (the model's block size), a longer row keeps only the newest max_len tokens, as
    train_gpt2.generate does: it loses the oldest context. An ending that leaves no room for a context token
    (possible only with a small block size) also loses its last tokens: only the first max_len - 1 are scored."""
    # An empty context becomes <|endoftext|>, GPT-2's start of a document: every token of an ending is then
    # predicted from something, and scored (without it the first one could not be, and a one-token ending not at all)
    ctx_tokens = enc.encode_ordinary(example["ctx"]) or [enc.eot_token]
    rows, masks = [], []
    for ending in example["endings"]:
        ctx, end = ctx_tokens, enc.encode_ordinary(" " + ending)
        if max_len is not None and len(ctx) + len(end) > max_len:
            end = end[:max_len - 1]  # one context token must remain, to predict the ending's first token
            ctx = ctx[max(0, len(ctx) + len(end) - max_len):]  # the newest context tokens that fit
        rows.append(ctx + end)
        masks.append([0] * len(ctx) + [1] * len(end))
    L = max(len(row) for row in rows)
    tokens = torch.zeros((4, L), dtype=torch.long)  # pad token 0: masked out, and causal attention never
    mask = torch.zeros((4, L), dtype=torch.long)    # lets a real token see the padding after it
    for i, (row, m) in enumerate(zip(rows, masks)):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, :len(m)] = torch.tensor(m)
    return tokens, mask, example["label"]


def collate(rendered):
    """Stack rendered examples [(tokens, mask, label), ...] into one batch: tokens, mask (4*B, L) padded to the
    longest row of all, and labels (B,)."""
    L = max(tokens.size(1) for tokens, _, _ in rendered)
    tokens = torch.zeros((4 * len(rendered), L), dtype=torch.long)
    mask = torch.zeros((4 * len(rendered), L), dtype=torch.long)
    for i, (t, m, _) in enumerate(rendered):
        tokens[4 * i:4 * i + 4, :t.size(1)] = t
        mask[4 * i:4 * i + 4, :m.size(1)] = m
    labels = torch.tensor([label for _, _, label in rendered])
    return tokens, mask, labels


# -----------------------------------------------------------------------------
# 3. Scoring


def unwrap(model):
    return getattr(model, "module", model)  # a DDP-wrapped model keeps its config on .module


def max_positions(model):
    """The longest sequence the model accepts: block_size for our GPT, n_positions for a transformers GPT-2."""
    config = unwrap(model).config
    return getattr(config, "block_size", None) or config.n_positions


def per_ending_losses(model, tokens, mask):
    """Cross-entropy of the masked tokens of each row: tokens, mask (R, L) -> sum_loss (R,), mean_loss (R,)."""
    out = model(tokens)
    logits = out[0] if isinstance(out, tuple) else out.logits  # our GPT: (logits, loss); transformers: .logits
    # the logits at position t predict token t+1: score predictions 0..L-2 against tokens 1..L-1
    scored = mask[:, 1:].bool()  # (R, L-1)
    # Only the scored positions (the endings: a minority of all positions) go through the float32 cross-entropy,
    # instead of the whole (R, L-1, V) logits: less memory and time.
    losses = F.cross_entropy(logits[:, :-1][scored].float(), tokens[:, 1:][scored], reduction="none")  # (N,)
    row_of_loss = scored.nonzero()[:, 0]  # (N,) the row each scored position belongs to
    sum_loss = torch.zeros(tokens.size(0), device=losses.device).index_add_(0, row_of_loss, losses)  # (R,)
    return sum_loss, sum_loss / scored.sum(dim=1)


def evaluate(model, examples, device, batch_size=16, autocast_dtype=torch.float32, progress=False):
    """Score examples (dicts from load_examples) with a model: our train_gpt2.GPT or a transformers GPT-2.
    Returns (num_correct, num_correct_norm, num_total): acc = num_correct / num_total, acc_norm likewise.

    batch_size examples (4 rows each) share one forward pass, padded to their longest row. autocast_dtype
    torch.float32 (the default, on every device) scores in the model's own precision, without autocast;
    torch.bfloat16 scores under bf16 autocast (what train_gpt2.py passes on GPUs with bf16). The model's
    train/eval mode is restored afterwards. Contexts longer than the model's positions lose their oldest tokens.
    Examples are scored longest first (less padding), so the progress bar's running acc_norm is over those.
    Pass an uncompiled model: torch.compile would recompile for every new batch shape."""
    device_type = torch.device(device).type
    use_autocast = autocast_dtype not in (None, torch.float32)
    enc = get_tokenizer()
    max_len = max_positions(model)
    was_training = model.training
    model.eval()  # GPT-2 has no dropout in our model, but a transformers GPT-2 does: turn it off
    rendered = [render_example(ex, enc, max_len) for ex in examples]
    # Speed-up: a batch of examples of similar lengths wastes little on padding (over the val set, the padded
    # batches of 16 hold 1.1x the real tokens instead of 1.4x in file order). Longest first: the largest batch,
    # and any out-of-memory error, come at once, and the progress bar's time estimate errs on the long side.
    order = sorted(range(len(rendered)), key=lambda i: rendered[i][0].size(1), reverse=True)
    num_correct = num_correct_norm = num_total = 0
    bar = tqdm(total=len(examples), desc="hellaswag", unit="ex", disable=not progress)
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                batch = [rendered[i] for i in order[start:start + batch_size]]
                tokens, mask, labels = collate(batch)
                tokens, mask = tokens.to(device), mask.to(device)
                with torch.autocast(device_type=device_type, dtype=autocast_dtype, enabled=use_autocast):
                    sum_loss, mean_loss = per_ending_losses(model, tokens, mask)
                pred = sum_loss.view(-1, 4).argmin(dim=1).cpu()  # (B,) the most likely ending of each example
                pred_norm = mean_loss.view(-1, 4).argmin(dim=1).cpu()
                num_correct += int((pred == labels).sum())
                num_correct_norm += int((pred_norm == labels).sum())
                num_total += len(batch)
                bar.update(len(batch))
                bar.set_postfix(acc_norm=f"{num_correct_norm / num_total:.4f}")
    finally:
        bar.close()
        model.train(was_training)
    return num_correct, num_correct_norm, num_total


# -----------------------------------------------------------------------------
# 4. Command line


def get_model(name_or_path, device):
    """A checkpoint file written by train_gpt2.py (as a transformers GPT-2 holding its weights), or else a
    Hugging Face GPT-2: a hub name such as gpt2 or gpt2-xl, or a local folder written by save_pretrained."""
    if os.path.isfile(name_or_path):
        return hf_model_from_file(name_or_path).to(device)
    from transformers import GPT2LMHeadModel  # imported here: slow to import, and only this path needs it

    try:
        model = GPT2LMHeadModel.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:  # not on the hub, no network, a folder without a model, a malformed name
        raise UserError(f"could not load model '{name_or_path}': it is not a checkpoint file, nor a folder or "
                        f"Hugging Face name of a GPT-2 model that can be loaded here ({type(e).__name__})") from e
    return model.to(device)


def default_device():
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def check_device(device):
    try:
        device_type = torch.device(device).type
    except RuntimeError as e:
        raise UserError(f"unknown device '{device}': use cuda, cuda:N, mps or cpu") from e
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device_type, True):
        raise UserError(f"device '{device}' is not available on this machine")


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, not '{text}'")
    return value


def main(argv=None):
    parser = ArgumentParser(description="Evaluate a GPT-2 on HellaSwag: accuracy of picking the right ending "
                                        "by total loss (acc) and by loss per token (acc_norm). Scores in fp32 "
                                        "(with TF32 matmuls on CUDA), as the published numbers were, unless --bf16.")
    parser.add_argument("-m", "--model", default="gpt2",
                        help="a Hugging Face GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl), a folder written by "
                             "save_pretrained, or a checkpoint file written by train_gpt2.py (default: gpt2)")
    parser.add_argument("-d", "--device", default=default_device(), help="cuda, mps or cpu (default: the fastest here)")
    parser.add_argument("--split", default="val", choices=["train", "val"], help="which split to score (default: val)")
    parser.add_argument("--data_file", default=None, help="read the examples from this jsonl file instead of "
                                                          "downloading hellaswag_{split}.jsonl")
    parser.add_argument("--limit", type=positive_int, default=None, help="score only the first N examples")
    parser.add_argument("--batch_size", type=positive_int, default=16, help="examples per forward pass (default: 16)")
    parser.add_argument("--bf16", action="store_true",
                        help="score under bf16 autocast, as train_gpt2.py's periodic HellaSwag score does on GPUs. "
                             "Default: fp32, on CUDA with TF32 matmuls (torch.set_float32_matmul_precision('high')): "
                             "the precision of the published numbers (GPT-2 124M: acc 0.2859, acc_norm 0.2955)")
    args = parser.parse_args(argv)
    status = report_user_errors(score, args)
    if status:
        sys.exit(status)


def score(args):
    """The command line's work: load, score, print. Returns 0; a UserError is the caller's to report."""
    check_device(args.device)
    examples = load_examples(args.split, args.data_file)[:args.limit]
    model = get_model(args.model, args.device)
    n_params = sum(p.numel() for p in model.parameters())
    cuda = torch.device(args.device).type == "cuda"
    precision = "bf16 autocast" if args.bf16 else "fp32, TF32 matmuls" if cuda else "fp32"
    print(f"{args.model}: {n_params:,} parameters on {args.device}; {len(examples)} examples; {precision}")
    matmul_precision = torch.get_float32_matmul_precision()
    if cuda:  # TF32 for fp32 matmuls, as in training; process-wide, so put back afterwards for in-process callers
        torch.set_float32_matmul_precision("high")
    try:
        num_correct, num_correct_norm, num_total = evaluate(
            model, examples, args.device, batch_size=args.batch_size,
            autocast_dtype=torch.bfloat16 if args.bf16 else torch.float32, progress=True)
    finally:
        torch.set_float32_matmul_precision(matmul_precision)
    print(f"acc {num_correct / num_total:.4f} acc_norm {num_correct_norm / num_total:.4f} over {num_total} examples")
    return 0


if __name__ == "__main__":
    main()
