"""
Reproduce GPT-2 (124M) from scratch, in one file you can read top to bottom.

The sections follow the order in which the ideas come up when you build GPT-2 yourself:

  1. The GPT-2 model             GPTConfig, CausalSelfAttention, MLP, Block, GPT
  2. OpenAI's weights            GPT.from_pretrained("gpt2") through Hugging Face transformers
  3. Sampling                    top-k sampling with a seeded generator
  4. Data                        DataLoaderLite over Tiny Shakespeare or FineWeb-Edu shards
  5. Optimisation                cosine LR schedule with warmup, AdamW with weight-decay groups
  6. Checkpoints                 safe to load (weights_only), written atomically, resumable
  7. Setup                       device, precision, torch.compile, DDP: decided once, up front
  8. Training                    gradient accumulation, clipping, validation, HellaSwag, samples
  9. Command line                argparse flags and main()

Run it:
  python train_gpt2.py                                   # picks a sensible run for this machine
  torchrun --standalone --nproc_per_node=8 train_gpt2.py # 8 GPUs on one node

Importing this file does nothing but define things: all the work happens in main().
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

HERE = os.path.dirname(os.path.abspath(__file__))


class UserError(Exception):
    """A mistake in the input (a flag, a path, a file) that the user can fix: main() prints it on one line."""


# -----------------------------------------------------------------------------
# 1. The GPT-2 model
#
# Shapes used in the comments:
#   B  batch size              T  sequence length (time)       C  n_embd (channels)
#   nh number of heads         hs head size = C // nh          V  vocab_size


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the model can see (GPT-2 paper: context of 1024 tokens)
    vocab_size: int = 50257  # 50,000 BPE merges + 256 byte tokens + 1 <|endoftext|> token
    n_layer: int = 12  # number of transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # width of the residual stream


class CausalSelfAttention(nn.Module):
    """Multi-head attention in which each token looks only at itself and the tokens before it."""

    def __init__(self, config):
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise ValueError(f"n_embd ({config.n_embd}) must be a multiple of n_head ({config.n_head})")
        self.n_head = config.n_head
        # one Linear computes query, key and value for all heads at once: C -> 3C
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        # output projection back into the residual stream: C -> C
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x):
        B, T, C = x.size()
        nh = self.n_head
        hs = C // nh
        qkv = self.c_attn(x)  # (B, T, C) @ (C, 3C) -> (B, T, 3C)
        q, k, v = qkv.split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, T, C) -> (B, T, nh, hs) -> (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        # softmax(q @ k^T / sqrt(hs), causal mask) @ v, i.e. (B, nh, T, T) @ (B, nh, T, hs) -> (B, nh, T, hs).
        # Speed-up: scaled_dot_product_attention runs flash attention where the hardware has it, which never
        # writes the (T, T) attention matrix to memory; is_causal=True means no mask buffer is needed.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, nh, hs) -> (B, T, C)
        return self.c_proj(y)  # (B, T, C) @ (C, C) -> (B, T, C)


class MLP(nn.Module):
    """The position-wise feed-forward network: widen 4x, GELU, project back."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)  # C -> 4C
        # GPT-2 used the tanh approximation of GELU (it was faster in TensorFlow at the time); we match it exactly
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)  # 4C -> C

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """One transformer block. GPT-2 moved LayerNorm to the input of each sub-block ("pre-norm", GPT-2 paper,
    section 2.3), so the residual stream x itself is never normalised: gradients flow straight down it."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))  # tokens communicate
        x = x + self.mlp(self.ln_2(x))  # each token thinks on its own
        return x


def _matmul_into(out, a, b, accumulate=False):
    """out = a @ b, or out += a @ b. When a, b and out share a dtype the matmul writes into out itself: on a CPU a
    fresh (2048, 50304) result would cost ~90 ms of page faults. Under autocast a and b are bf16, out fp32."""
    if a.dtype == out.dtype:
        return out.addmm_(a, b) if accumulate else torch.mm(a, b, out=out)
    return out.add_(a @ b) if accumulate else out.copy_(a @ b)


class LinearCrossEntropy(torch.autograd.Function):
    """loss = cross_entropy(x @ W^T, targets), without ever holding the whole (N, V) matrix of logits.

    The plain way builds the (B*T, V) logits (412 MB in fp32 at B=8, T=256, V=50304; 3.3 GB at B=16, T=1024),
    log-softmaxes them into a second matrix of that size, and in the backward pass writes a third one, the
    gradient. The output layer is most of a small model's work, and those passes over memory cost more than
    its matmuls. Here the rows go through in chunks, all in one reused buffer, and each chunk's gradients are
    worked out during the forward pass while its logits are at hand: d loss / d logits = softmax(logits) -
    one_hot(target), divided by N for the mean. The backward pass only scales the saved gradients.
    Speed-up, measured on a 2-core CPU (4 layers, 256 wide, B=8, T=256, V=50304, fp32): the training step went
    from 1.00x to 0.58x-0.74x the time of Hugging Face's GPT2LMHeadModel (README, "How fast"). Under bf16 autocast
    plus torch.compile that CPU ran the lecture's plain loss faster (docs/benchmarks.md); GPUs: not yet measured.

    Under autocast the matmuls run in its dtype (bf16), as nn.Linear's would, and the softmax in fp32."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows, with_grads):
        # x (N, C), weight (V, C), targets (N,); with_grads: False for validation (torch.no_grad), which then
        # costs one matmul per chunk instead of three. (ctx.needs_input_grad cannot tell: it ignores no_grad.)
        N, V = x.size(0), weight.size(0)
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        grad_x = torch.empty_like(x) if with_grads else None  # (N, C)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if with_grads else None  # (V, C)
        loss = torch.zeros((), device=x.device, dtype=torch.float32)
        buffer = torch.empty(min(chunk_rows, N), V, device=x.device, dtype=torch.float32)  # every chunk's logits
        with torch.autocast(device_type, enabled=False):  # the dtypes are chosen by hand below
            w = weight.to(dtype)  # (V, C)
            for start in range(0, N, chunk_rows):
                xc = x[start:start + chunk_rows].to(dtype)  # (n, C)
                tc = targets[start:start + chunk_rows]  # (n,)
                logits = _matmul_into(buffer[:len(tc)], xc, w.t())  # (n, C) @ (C, V) -> (n, V)
                target_logit = logits.gather(1, tc[:, None])  # (n, 1)
                max_logit = logits.amax(dim=1, keepdim=True)  # (n, 1): subtracted first, so exp cannot overflow
                probs = logits.sub_(max_logit).exp_()  # (n, V), in place: exp(logit - max)
                sum_exp = probs.sum(dim=1, keepdim=True)  # (n, 1)
                # -log p(target) = log(sum over j of exp(logit_j)) - logit_target
                loss += (max_logit + sum_exp.log() - target_logit).sum()
                if with_grads:
                    probs.div_(sum_exp)  # softmax
                    probs[torch.arange(len(tc), device=x.device), tc] -= 1  # softmax - one_hot(target)
                    dlogits = probs.to(dtype)
                    _matmul_into(grad_x[start:start + chunk_rows], dlogits, w)  # (n, V) @ (V, C) -> (n, C)
                    _matmul_into(grad_weight, dlogits.t(), xc, accumulate=True)  # (V, n) @ (n, C) -> (V, C)
        ctx.save_for_backward(grad_x, grad_weight)
        ctx.N = N
        return loss / N

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_weight = ctx.saved_tensors
        scale = grad_loss / ctx.N  # the 1/N of the mean, times the gradient flowing in (1/grad_accum_steps)
        return grad_x * scale.to(grad_x.dtype), grad_weight * scale, None, None, None


class GPT(nn.Module):
    """model(idx) -> (logits (B, T, V), None); model(idx, targets) -> (None, mean loss): with targets the
    logits are not built (see LinearCrossEntropy)."""

    # logits held at once by the loss: at most 2**26 fp32 numbers = 256 MB; 1280 rows of V=50304
    LOSS_CHUNK_ELEMENTS = 2**26

    def __init__(self, config):
        super().__init__()
        self.config = config
        # the names (wte, wpe, h, ln_f) are those of Hugging Face's GPT-2, so OpenAI's weights load by name
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings (V, C)
            wpe=nn.Embedding(config.block_size, config.n_embd),  # position embeddings (block_size, C)
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),  # GPT-2 adds a final LayerNorm after the last block
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # C -> V
        # Weight tying (as in GPT-2, after Press & Wolf 2017): the output layer reuses the token embedding matrix.
        # Tokens that mean similar things get similar scores, and it saves 38.6M parameters (30% of the model).
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # The residual stream is a sum of 2 * n_layer contributions (one attention and one MLP per block), so
        # its variance grows with depth. GPT-2 paper, section 2.3: scale the weights of the residual layers by
        # 1/sqrt(N), N the number of residual layers. Those layers are the two c_proj projections.
        for name, p in self.named_parameters():
            if name.endswith("attn.c_proj.weight") or name.endswith("mlp.c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        # GPT-2's initialisation, from OpenAI's released model code: weights N(0, 0.02), biases 0,
        # position embeddings N(0, 0.01). 0.02 is close to 1/sqrt(C) for C = 768..1600.
        if module is self.lm_head:
            return  # its weight is wte.weight: initialised once, as an embedding
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            std = 0.01 if module is self.transformer.wpe else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def forward(self, idx, targets=None):
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} is longer than the model's block_size {self.config.block_size}")
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)  # (T,)
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(pos)  # (T, C)
        x = tok_emb + pos_emb  # (B, T, C) + (T, C) broadcasts to (B, T, C)
        for block in self.transformer.h:
            x = block(x)  # (B, T, C)
        x = self.transformer.ln_f(x)  # (B, T, C)
        if targets is None:  # sampling and HellaSwag: the scores of every next token
            return self.lm_head(x), None  # (B, T, C) @ (C, V) -> (B, T, V)
        # Training and validation need only the mean cross-entropy over the B*T positions, so the (B, T, V)
        # logits are never built: LinearCrossEntropy computes lm_head and the loss together, chunk by chunk.
        chunk_rows = max(128, self.LOSS_CHUNK_ELEMENTS // self.config.vocab_size // 128 * 128)  # tile-friendly
        x, targets = x.view(B * T, -1), targets.reshape(B * T)  # (B*T, C), (B*T,)
        loss = LinearCrossEntropy.apply(x, self.lm_head.weight, targets, chunk_rows, torch.is_grad_enabled())
        return None, loss

    # -------------------------------------------------------------------------
    # 2. OpenAI's weights, through Hugging Face transformers

    # the four released GPT-2 models: (n_layer, n_head, n_embd)
    PRETRAINED_SHAPES = {
        "gpt2": (12, 12, 768),  # 124M parameters
        "gpt2-medium": (24, 16, 1024),  # 350M
        "gpt2-large": (36, 20, 1280),  # 774M
        "gpt2-xl": (48, 25, 1600),  # 1558M
    }

    @classmethod
    def from_pretrained(cls, name_or_path):
        """A GPT with the weights of a Hugging Face GPT-2: one of the four names above (downloaded from the
        Hugging Face hub), or a local folder holding a transformers GPT-2 checkpoint (its config.json says the shape)."""
        if name_or_path not in cls.PRETRAINED_SHAPES and not os.path.isdir(name_or_path):
            names = ", ".join(cls.PRETRAINED_SHAPES)
            raise UserError(f"unknown model '{name_or_path}': use one of {names}, or a folder with a GPT-2 checkpoint")
        from transformers import GPT2LMHeadModel  # imported here: only this function needs transformers

        try:
            model_hf = GPT2LMHeadModel.from_pretrained(name_or_path)
        except OSError as e:  # transformers reports "can't reach the hub" and "no such files" as OSError
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"could not load '{name_or_path}' ({first_line}); check the network or the folder") from e
        hf = model_hf.config
        config = GPTConfig(block_size=hf.n_positions, vocab_size=hf.vocab_size,
                           n_layer=hf.n_layer, n_head=hf.n_head, n_embd=hf.n_embd)
        model = cls(config)
        copy_hf_weights(model_hf, model)
        return model


# OpenAI's checkpoints (and so Hugging Face's) store these four as Conv1D layers, whose weight is the
# transpose of an nn.Linear weight: (in, out) instead of (out, in).
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def copy_hf_weights(model_hf, model):
    """Copy a transformers GPT2LMHeadModel's weights into our GPT, by name. Buffers of the HF model (such as
    older versions' causal-mask `attn.bias`) are not weights and are skipped. Any key present on one side only,
    or with another shape, is an error that names it."""
    sd_hf = model_hf.state_dict()
    buffers_hf = {name for name, _ in model_hf.named_buffers()}
    keys_hf = [k for k in sd_hf if k not in buffers_hf]
    sd = model.state_dict()
    missing = sorted(set(sd) - set(keys_hf))
    unexpected = sorted(set(keys_hf) - set(sd))
    if missing:
        raise KeyError(f"the Hugging Face checkpoint has no weight for '{missing[0]}' ({len(missing)} missing)")
    if unexpected:
        raise KeyError(f"the Hugging Face checkpoint has a weight '{unexpected[0]}' that GPT does not ({len(unexpected)} unexpected)")
    with torch.no_grad():
        for k in keys_hf:
            src = sd_hf[k].t() if k.endswith(CONV1D_SUFFIXES) else sd_hf[k]
            if src.shape != sd[k].shape:
                raise ValueError(f"shape mismatch for '{k}': checkpoint {tuple(src.shape)}, model {tuple(sd[k].shape)}")
            sd[k].copy_(src)  # sd[k] shares storage with the parameter; lm_head and wte are one tensor


# -----------------------------------------------------------------------------
# 3. Sampling


@torch.no_grad()
def generate(model, idx, max_new_tokens, top_k=50, generator=None):
    """Continue the token ids idx (B, T) by max_new_tokens tokens each, with top-k sampling: at every step only
    the k most likely next tokens can be drawn (k=50 as in Hugging Face's default pipeline), which keeps samples
    from wandering into the long tail of unlikely tokens. top_k=1 is greedy decoding."""
    was_training = model.training
    model.eval()
    block_size = model.config.block_size
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -block_size:]  # (B, <=block_size): the model sees at most block_size tokens
        logits, _ = model(idx_cond)  # (B, T, V)
        logits = logits[:, -1, :].float()  # (B, V): only the last position predicts the next token
        probs = F.softmax(logits, dim=-1)  # (B, V)
        topk_probs, topk_idx = torch.topk(probs, min(top_k, probs.size(-1)), dim=-1)  # (B, k), (B, k)
        choice = torch.multinomial(topk_probs, 1, generator=generator)  # (B, 1), index into the top k
        next_token = torch.gather(topk_idx, -1, choice)  # (B, 1), the token id
        idx = torch.cat((idx, next_token), dim=1)  # (B, T+1)
    model.train(was_training)
    return idx


def sample(model, prompt, num_return_sequences=4, max_length=32, top_k=50, seed=42, device=None, enc=None):
    """Continue a prompt (a string, or a list of token ids) into num_return_sequences sequences of at most
    max_length tokens (prompt included). The same seed gives the same tokens on the same device.
    Returns the token lists, and their decoded texts when the prompt was text (or enc is given)."""
    if device is None:
        device = next(model.parameters()).device
    if isinstance(prompt, str):
        enc = enc or get_tokenizer()
        prompt = enc.encode(prompt)
    tokens = torch.tensor(prompt, dtype=torch.long, device=device)
    idx = tokens.unsqueeze(0).repeat(num_return_sequences, 1)  # (num_return_sequences, len(prompt))
    # the generator lives on the model's device, so sampling never touches the global random state
    generator = torch.Generator(device=device).manual_seed(seed)
    out = generate(model, idx, max(0, max_length - len(prompt)), top_k=top_k, generator=generator)
    token_lists = out.tolist()
    texts = [enc.decode(t) for t in token_lists] if enc is not None else None
    return token_lists, texts


def get_tokenizer():
    """GPT-2's BPE tokenizer from tiktoken (downloaded once, then cached; TIKTOKEN_CACHE_DIR moves the cache)."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # no network and no cache: tiktoken raises requests' errors
        raise UserError(f"could not load the GPT-2 tokenizer ({type(e).__name__}); it is downloaded once, "
                        f"so connect to the network or set TIKTOKEN_CACHE_DIR to a folder holding its files") from e


# -----------------------------------------------------------------------------
# 4. Data
#
# The training data is one long stream of token ids, cut into chunks of B*T+1 tokens: a chunk gives the inputs
# x (its first B*T tokens) and the targets y (the same tokens shifted by one). Chunk c starts at token c*B*T, so
# consecutive chunks share one token and no token is skipped. A step of K micro-batches (gradient accumulation)
# on W processes uses chunks step*K ... step*K+K-1 whatever W is: process r takes chunks r, r+W, r+2W, ...
# So the data a step sees, and the model it produces, do not depend on the number of processes.

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DEFAULT_TEXT = os.path.join(HERE, "input.txt")
DEFAULT_SHARDS = os.path.join(HERE, "edu_fineweb10B")  # where fineweb.py writes by default


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_tiny_shakespeare(path=DEFAULT_TEXT):
    """Download Tiny Shakespeare (1.1 MB) to path, check its sha256, and only then move it into place."""
    import urllib.request

    tmp = f"{path}.tmp{os.getpid()}"
    try:
        urllib.request.urlretrieve(TINY_SHAKESPEARE_URL, tmp)
        digest = sha256_of(tmp)
        if digest != TINY_SHAKESPEARE_SHA256:
            raise UserError(f"downloaded {TINY_SHAKESPEARE_URL} but its sha256 is {digest}, not the expected "
                            f"{TINY_SHAKESPEARE_SHA256}; try again later or put the file at {path} yourself")
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"{path} is missing and could not be downloaded from {TINY_SHAKESPEARE_URL} ({e}); "
                        f"connect to the network or pass --data PATH") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def find_shards(folder, split):
    """The .npy shards of a split ('train' or 'val') in a folder written by fineweb.py, in name order."""
    names = sorted(n for n in os.listdir(folder) if n.endswith(".npy") and split in n)
    return [os.path.join(folder, n) for n in names]


def load_shard(path):
    """A shard as a read-only memory map: a 1-D uint16 array of token ids. Anything else is a UserError naming
    the file (mapping the file reads only its header, so opening every shard up front is cheap)."""
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # truncated file, not numpy at all, a pickle: numpy raises several kinds of errors
        raise UserError(f"shard {path} is not a readable .npy file ({e}); rerun fineweb.py to rewrite it") from e
    if tokens.ndim != 1 or tokens.dtype != np.uint16:
        raise UserError(f"shard {path} holds a {tokens.ndim}-D {tokens.dtype} array; a shard must be a 1-D uint16 "
                        f"array of token ids (as fineweb.py writes it)")
    return tokens


def load_text_tokens(path, split):
    """Tokenize a text file with GPT-2's tokenizer; the first 90% of its tokens train, the last 10% validate."""
    with open(path, "r", encoding="utf-8") as f:
        text = f.read()
    tokens = np.array(get_tokenizer().encode_ordinary(text), dtype=np.uint16)  # GPT-2 ids < 65536 fit uint16
    n_train = int(0.9 * len(tokens))
    return tokens[:n_train] if split == "train" else tokens[n_train:]


class DataLoaderLite:
    """Micro-batches (x, y) of shape (B, T) from a text file or a folder of token shards.

    The stream of a split is its shards one after another (a text file is a single shard). After the stream
    ends it starts again; from the second pass on, the shard order is a permutation drawn from `seed` and the
    pass number, so that a multi-epoch loss curve does not repeat itself. The whole position in the data is
    one integer, `chunk`, which makes resuming exact."""

    def __init__(self, source, B, T, process_rank=0, num_processes=1, split="train", seed=1337):
        assert split in ("train", "val")
        self.B, self.T = B, T
        self.process_rank, self.num_processes = process_rank, num_processes
        self.seed = seed
        if os.path.isdir(source):
            paths = find_shards(source, split)
            if not paths:
                raise UserError(f"no {split} shards (*{split}*.npy) in {source}; write them with fineweb.py "
                                f"or pass --data with a text file")
            self.shards = [load_shard(p) for p in paths]
            self.names = paths
        else:
            self.shards = [load_text_tokens(source, split)]
            self.names = [f"{source} ({split} split)"]
        self.lengths = [len(s) for s in self.shards]
        self.total = sum(self.lengths)  # tokens in one pass over the split
        if self.total < B * T + 1:
            raise UserError(f"the {split} data ({self.total:,} tokens in {source}) is smaller than one micro-batch "
                            f"of B*T+1 = {B * T + 1:,} tokens; lower --batch_size or --seq_len")
        self._order_cache = {}
        self.reset()

    def reset(self):
        self.chunk = self.process_rank  # this process's first chunk

    def state_dict(self):
        return {"chunk": self.chunk - self.process_rank}  # the same number on every process

    def load_state_dict(self, state):
        self.chunk = state["chunk"] + self.process_rank

    def shard_order(self, epoch):
        """Pass 0 reads the shards in name order; later passes in a seeded random order."""
        if epoch == 0 or len(self.shards) == 1:
            return list(range(len(self.shards)))
        if epoch not in self._order_cache:
            g = np.random.default_rng([self.seed, epoch])
            self._order_cache = {epoch: [int(i) for i in g.permutation(len(self.shards))]}
        return self._order_cache[epoch]

    def read(self, start, n):
        """n tokens from position `start` of the endless stream, across shard and pass boundaries."""
        out = []
        while n > 0:
            epoch, pos = divmod(start, self.total)
            for i in self.shard_order(epoch):  # find the shard holding position pos of this pass
                if pos < self.lengths[i]:
                    piece = self.shards[i][pos:pos + n]
                    out.append(piece)
                    n -= len(piece)
                    start += len(piece)
                    break
                pos -= self.lengths[i]
        return np.concatenate(out) if len(out) > 1 else np.asarray(out[0])

    def next_batch(self):
        B, T = self.B, self.T
        buf = torch.from_numpy(self.read(self.chunk * B * T, B * T + 1).astype(np.int64))  # (B*T+1,)
        x = buf[:-1].view(B, T)  # inputs (B, T)
        y = buf[1:].view(B, T)  # targets (B, T): each position's next token
        self.chunk += self.num_processes  # skip the chunks of the other processes
        return x, y


# -----------------------------------------------------------------------------
# 5. Optimisation


def get_lr(step, max_lr, min_lr, warmup_steps, max_steps):
    """Linear warmup for warmup_steps, then a cosine decay down to min_lr at max_steps, then min_lr
    (GPT-3 paper, section B: warmup, cosine decay to 10% of the peak)."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps  # step 0 already gets a small nonzero lr
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)  # 0 -> 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return min_lr + coeff * (max_lr - min_lr)


def configure_optimizer(model, weight_decay, learning_rate, device_type, log=print, fused=None):
    """AdamW with betas (0.9, 0.95) and eps 1e-8 (GPT-3 paper, section B). Weight decay (0.1 in GPT-3) applies to
    the matrices of matmuls and embeddings only, never to biases and LayerNorm gains (parameters with < 2 dims).
    fused: None picks the fused kernel on CUDA (bench.py --ladder turns it on and off to measure it)."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    log(f"optimizer: weight decay on {len(decay)} tensors, {sum(p.numel() for p in decay):,} parameters; "
        f"none on {len(no_decay)} tensors, {sum(p.numel() for p in no_decay):,} parameters")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Speed-up: the fused CUDA kernel updates all parameters in a few launches instead of a loop over tensors.
    # (On a 2-core CPU the fused kernel took an optimizer step of 16M parameters from 43 to 7 ms. It was dropped
    # while we chased aborts at the exit of 2-process CPU runs; they were not its doing (most likely a teardown
    # race, see the barrier in main), so it can come back to CPUs, with its own measurements.)
    if fused is None:
        fused = device_type == "cuda"
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=fused)


# -----------------------------------------------------------------------------
# 6. Checkpoints
#
# A checkpoint is a dict of tensors and plain Python values (numbers, strings, lists, dicts), saved with
# torch.save and read back with torch.load(weights_only=True): that loader refuses pickled classes and code,
# so opening a checkpoint from anywhere can never run anything. It holds all that a resumed run needs to
# continue exactly as if it had never stopped: weights, optimizer state, the step, the data position, the
# random generators, and the settings that decide the math.

CHECKPOINT_FORMAT = "train_gpt2 checkpoint v1"


def checkpoint_path(log_dir, step):
    return os.path.join(log_dir, f"model_{step:05d}.pt")


def list_checkpoints(log_dir):
    """Complete checkpoints in log_dir, oldest first (a file being written has a .tmp name and is not listed)."""
    if not os.path.isdir(log_dir):
        return []
    names = sorted(n for n in os.listdir(log_dir) if n.startswith("model_") and n.endswith(".pt"))
    return [os.path.join(log_dir, n) for n in names]


def save_checkpoint(path, state):
    """Write to a temporary name, flush it to disk, then rename: a crash or kill -9 at any moment leaves either
    the old files or the complete new one under the final name, never half a checkpoint."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX and Windows


def load_checkpoint(path):
    """Read a checkpoint without trusting it: tensors and plain values only. Any problem is a one-line UserError."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, or a pickle that weights_only refuses to run
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a loadable checkpoint ({reason[:200]})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a checkpoint written by train_gpt2.py")
    return ckpt


def model_from_checkpoint(ckpt, path="checkpoint"):
    """Rebuild the GPT a checkpoint holds; a checkpoint of another shape or with other keys is a UserError."""
    names = {f.name for f in fields(GPTConfig)}
    config_dict = ckpt.get("config")
    if not isinstance(config_dict, dict) or set(config_dict) != names:
        raise UserError(f"{path} has no valid model config")
    model = GPT(GPTConfig(**config_dict))
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError, TypeError) as e:
        raise UserError(f"{path}: its weights do not fit the model it describes ({str(e).splitlines()[0][:200]})") from e
    return model


def load_model(name_or_path, device="cpu"):
    """A GPT from one of our checkpoint files, or from a Hugging Face GPT-2 name or folder."""
    if os.path.isfile(name_or_path):
        model = model_from_checkpoint(load_checkpoint(name_or_path), name_or_path)
    else:
        model = GPT.from_pretrained(name_or_path)
    return model.to(device)


# -----------------------------------------------------------------------------
# 7. Setup: device, precision, compile and DDP are decided once, here, so that the training loop has no
# branches on them. Everything the loop needs from this section lives in a Runtime.


@dataclass
class Runtime:
    device: str  # "cpu", "cuda:0", "mps"
    device_type: str  # "cpu", "cuda", "mps"
    dtype: str  # "bfloat16" or "float32": what the forward pass computes in
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    peak_flops: float = None  # the GPU's bf16 dense peak, FLOP/s, for MFU; None when unknown (and on CPUs)

    @property
    def master(self):
        return self.rank == 0  # rank 0 prints, logs and saves checkpoints

    def print0(self, *args, **kwargs):
        if self.master:
            print(*args, **kwargs, flush=True)

    def autocast(self):
        # Speed-up: bf16 autocast runs matmuls in bfloat16 on the GPU's tensor cores (twice TF32's peak rate on
        # A100/H100 datasheets), while weights, optimizer state and the reductions that need range (softmax,
        # LayerNorm, loss) stay in fp32.
        if self.dtype == "bfloat16":
            return torch.autocast(device_type=self.device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def synchronize(self):
        # GPU work is queued asynchronously: wait for it before reading a clock
        if self.device_type == "cuda":
            torch.cuda.synchronize()
        elif self.device_type == "mps":
            torch.mps.synchronize()

    def peak_memory(self):
        """The most GPU memory PyTorch's tensors held at once so far, in bytes; None off CUDA."""
        return torch.cuda.max_memory_allocated(self.device) if self.device_type == "cuda" else None

    def all_reduce_sum(self, t):
        if self.ddp:  # (gloo, the CPU backend, has no AVG: sum, then divide where a mean is needed)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t


def setup_runtime(requested_device, reasons):
    """Start DDP when launched by torchrun (it sets RANK, LOCAL_RANK, WORLD_SIZE), pick the device and the
    precision. `reasons` collects a line for each automatic choice, printed at start and kept in config.json."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    has_mps = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    if requested_device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but this machine has no CUDA GPU that PyTorch can use; use --device cpu")
    if requested_device == "mps" and not has_mps:
        raise UserError("--device mps, but this machine has no Apple GPU (MPS) that PyTorch can use; use --device cpu")
    device_type = requested_device
    if requested_device == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
        reasons.append(f"device: {device_type} (auto: the fastest one this machine has)")
    if ddp and device_type == "mps":
        raise UserError("DDP (torchrun) is not supported on MPS; run one process, or use --device cpu")
    device = f"cuda:{local_rank}" if device_type == "cuda" else device_type
    if ddp:
        # NCCL talks GPU to GPU (NVLink, InfiniBand); gloo runs on CPUs, so 2 processes also work on a laptop
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend=backend)
        reasons.append(f"ddp: {world_size} processes, backend {backend}")
    if device_type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):  # Ampere and newer
        dtype = "bfloat16"
        reasons.append("dtype: bfloat16 autocast (this GPU supports bf16)")
    else:
        dtype = "float32"
        why = {"cuda": "this GPU has no bf16 support", "mps": "bf16 autocast on MPS is not worth it",
               "cpu": "bf16 autocast measured 21x slower on one CPU, 1.6x faster on one with bf16 units: "
                      "docs/benchmarks.md"}[device_type]
        reasons.append(f"dtype: float32 ({why})")
    if device_type == "cuda":
        # Speed-up: let fp32 matmuls use TF32 tensor cores on Ampere and newer GPUs (10-bit mantissa; 8x the
        # fp32 peak on the A100 datasheet); whatever bf16 autocast leaves in fp32 gets faster too.
        torch.set_float32_matmul_precision("high")
    peak_flops = gpu_peak_flops(torch.cuda.get_device_name(device)) if device_type == "cuda" else None
    return Runtime(device=device, device_type=device_type, dtype=dtype, ddp=ddp, rank=rank,
                   local_rank=local_rank, world_size=world_size, peak_flops=peak_flops)


# Model FLOPs utilisation (MFU, PaLM paper, appendix B): the FLOPs the model needs per second, as a fraction of
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
    padded vocabulary count: 0.03% at V=50304). 12*L*C*T: attention's
    q @ k^T and att @ v, which have no weights. GPT-2 124M at T=1024: about 0.855 GFLOP per token."""
    N = config.vocab_size * config.n_embd + config.n_layer * (12 * config.n_embd**2 + 13 * config.n_embd) \
        + 2 * config.n_embd
    return 6 * N + 12 * config.n_layer * config.n_embd * T


def format_mfu(flops_per_second, peak_flops):
    return "-" if peak_flops is None else f"{100 * flops_per_second / peak_flops:.1f}%"


# -----------------------------------------------------------------------------
# 8. Training


class TrainingDiverged(Exception):
    """The loss became NaN or infinite: the run stops, and the last good checkpoint stays as it is."""


def train_step(model, optimizer, loader, grad_accum_steps, lr, grad_clip, rt, no_sync):
    """One optimizer step over grad_accum_steps micro-batches per process. Returns the mean loss over the whole
    batch (all micro-steps, all processes) and the gradient norm before clipping, both as floats."""
    optimizer.zero_grad(set_to_none=True)
    loss_accum = torch.zeros((), device=rt.device)
    for micro_step in range(grad_accum_steps):
        x, y = loader.next_batch()  # (B, T), (B, T)
        x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
        last = micro_step == grad_accum_steps - 1
        # DDP all-reduces gradients during backward; only the last micro-step needs it (the others just add up
        # gradients locally), so the earlier ones run under no_sync, which is decided before the forward pass.
        with contextlib.nullcontext() if last else no_sync():
            with rt.autocast():
                _, loss = model(x, y)
            # Gradients add up over micro-steps, but the loss is a mean: divide by the number of micro-steps so
            # the sum of the gradients is the gradient of the mean over the whole batch.
            loss = loss / grad_accum_steps
            loss_accum += loss.detach()
            loss.backward()
    rt.all_reduce_sum(loss_accum)  # the loss of the whole batch, for the log: mean over processes
    loss_value = loss_accum.item() / rt.world_size
    if not math.isfinite(loss_value):
        raise TrainingDiverged(f"the loss is {loss_value}")
    # Clip the global gradient norm at grad_clip (1.0 in GPT-3): a rare bad batch cannot blow up the model
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return loss_value, norm.item()


@torch.no_grad()
def evaluate_loss(model, loader, num_chunks, rt):
    """Mean loss over the first num_chunks micro-batches of the loader's split: the same tokens whatever the number
    of processes (process r takes chunks r, r+W, ...; the sums are added up across processes)."""
    model.eval()
    loader.reset()
    total = torch.zeros(2, device=rt.device)  # (sum of losses, number of chunks)
    while loader.chunk < num_chunks:
        x, y = loader.next_batch()
        x, y = x.to(rt.device), y.to(rt.device)
        with rt.autocast():
            _, loss = model(x, y)
        total[0] += loss.float()
        total[1] += 1
    rt.all_reduce_sum(total)
    model.train()
    return (total[0] / total[1]).item()


def hellaswag_accuracy(model, examples, rt, batch_size):
    """HellaSwag acc_norm over the examples; process r scores examples r, r+W, ... and the counts are summed, so
    the result equals the one-process result exactly."""
    import hellaswag

    dtype = torch.bfloat16 if rt.dtype == "bfloat16" else torch.float32
    _, correct_norm, total = hellaswag.evaluate(model, examples[rt.rank::rt.world_size], rt.device,
                                                batch_size=batch_size, autocast_dtype=dtype)
    counts = rt.all_reduce_sum(torch.tensor([correct_norm, total], dtype=torch.long, device=rt.device))
    return counts[0].item() / counts[1].item()


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM (a scheduler's preemption) only sets a flag: the current step finishes, a
    checkpoint is written, and the run exits cleanly. A second Ctrl-C stops at once."""

    def __init__(self):
        self.signum = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def rng_state(rt):
    state = {"cpu": torch.get_rng_state()}
    if rt.device_type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(rt.device)
    return state


def set_rng_state(state, rt):
    torch.set_rng_state(state["cpu"])
    if rt.device_type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], rt.device)


# the settings that change the math of a run: a resumed run must use the same ones
MATH_SETTINGS = ("data", "total_batch_size", "batch_size", "seq_len", "max_steps", "warmup_steps", "max_lr",
                 "min_lr", "weight_decay", "grad_clip", "seed", "n_layer", "n_head", "n_embd", "vocab_size",
                 "init_from")


def train(s, rt, resume_ckpt=None, reasons=()):
    """The training loop. `s` is the resolved settings (a Namespace), `rt` the Runtime, `resume_ckpt` a loaded
    checkpoint to continue from (or None), `reasons` the automatic choices made, for config.json.
    Everything that can fail on bad input (data, model, checkpoint) is checked before the first file is written."""
    log = rt.print0
    torch.manual_seed(s.seed)  # the same initial weights on every process
    if rt.device_type == "cuda":
        torch.cuda.manual_seed(s.seed)

    # --- data ---
    B, T = s.batch_size, s.seq_len
    grad_accum_steps = s.total_batch_size // (B * T * rt.world_size)
    train_loader = DataLoaderLite(s.data, B, T, rt.rank, rt.world_size, "train", s.seed)
    val_loader = DataLoaderLite(s.data, B, T, rt.rank, rt.world_size, "val", s.seed)
    val_chunks = min(s.val_tokens // (B * T), (val_loader.total - 1) // (B * T))
    log(f"data: {s.data}: {train_loader.total:,} train tokens in {len(train_loader.shards)} shard(s), "
        f"{val_loader.total:,} val tokens; val loss over {val_chunks} micro-batches ({val_chunks * B * T:,} tokens)")
    log(f"batch: {s.total_batch_size:,} tokens per step = {B} x {T} tokens x {grad_accum_steps} accumulation "
        f"steps x {rt.world_size} processes")
    hella_examples = None
    if s.hellaswag_every > 0:
        import hellaswag

        hella_examples = hellaswag.load_examples("val", s.hellaswag_file)
        if s.hellaswag_examples > 0:
            hella_examples = hella_examples[:s.hellaswag_examples]
        log(f"hellaswag: {len(hella_examples):,} val examples every {s.hellaswag_every} steps")

    # --- model ---
    if s.init_from == "scratch":
        model = GPT(GPTConfig(block_size=s.block_size, vocab_size=s.vocab_size, n_layer=s.n_layer,
                              n_head=s.n_head, n_embd=s.n_embd))
    else:
        model = GPT.from_pretrained(s.init_from)
    model.to(rt.device)
    raw_model = model  # the plain module: sampling, evaluation and state_dict use it (no _orig_mod. prefixes)
    n_params = sum(p.numel() for p in raw_model.parameters())
    log(f"model: {raw_model.config} with {n_params:,} parameters")
    if s.compile:
        # Speed-up: torch.compile fuses the elementwise work (GELU, LayerNorm, residual adds) into few kernels and
        # cuts Python overhead, at the price of compiling during the first step (2-core CPU, bf16: 1020 -> 633 ms per
        # step, docs/benchmarks.md; GPUs: not yet measured).
        model = torch.compile(model)
    no_sync = contextlib.nullcontext
    if rt.ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)
        no_sync = model.no_sync
    optimizer = configure_optimizer(raw_model, s.weight_decay, s.max_lr, rt.device_type, log=log)

    # --- resume ---
    start_step, val_loss = 0, None
    if resume_ckpt is not None:
        try:
            raw_model.load_state_dict(resume_ckpt["model"])
            optimizer.load_state_dict(resume_ckpt["optimizer"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise UserError(f"--resume: the checkpoint does not fit this model ({str(e).splitlines()[0][:200]})") from e
        train_loader.load_state_dict(resume_ckpt["loader"])
        set_rng_state(resume_ckpt["rng"], rt)
        start_step, val_loss = resume_ckpt["step"], resume_ckpt["val_loss"]
        log(f"resumed from step {start_step}")

    # --- logging ---
    log_file = os.path.join(s.log_dir, "log.txt")
    if rt.master:
        os.makedirs(s.log_dir, exist_ok=True)
        if resume_ckpt is None:
            open(log_file, "w").close()  # a fresh run starts a fresh log; a resumed run appends to it
        with open(os.path.join(s.log_dir, "config.json"), "w") as f:
            json.dump({"settings": vars(s), "why": list(reasons), "world_size": rt.world_size,
                       "device": rt.device, "dtype": rt.dtype, "grad_accum_steps": grad_accum_steps}, f, indent=2)

    def log_line(text):
        if rt.master:
            with open(log_file, "a") as f:
                f.write(text + "\n")

    def save(step):
        if not rt.master:
            return
        path = checkpoint_path(s.log_dir, step)
        save_checkpoint(path, {
            "format": CHECKPOINT_FORMAT,
            "step": step,  # the number of optimizer steps done: a resumed run continues with this step
            "model": raw_model.state_dict(),
            "config": asdict(raw_model.config),
            "optimizer": optimizer.state_dict(),
            "loader": train_loader.state_dict(),
            "rng": rng_state(rt),
            "settings": {k: getattr(s, k) for k in MATH_SETTINGS},
            "val_loss": val_loss,
        })
        log(f"saved checkpoint {path}")
        old = list_checkpoints(s.log_dir)
        if s.keep_checkpoints > 0:
            for p in old[:-s.keep_checkpoints]:
                os.remove(p)

    # --- the loop: at each step, first the evaluations of the model as it is after `step` optimizer steps,
    # then one optimizer step. The last iteration (step == max_steps) only evaluates. ---
    step = start_step
    t_start = time.time()
    tokens_per_step = s.total_batch_size
    flops_per_step = flops_per_token(raw_model.config, T) * tokens_per_step  # for MFU (all processes together)
    with StopRequest() as stop:
        while True:
            last = step == s.max_steps
            fresh = step != start_step or resume_ckpt is None  # a resumed step was evaluated before the save
            if fresh and s.eval_every > 0 and (step % s.eval_every == 0 or last):
                val_loss = evaluate_loss(raw_model, val_loader, val_chunks, rt)
                log(f"validation loss: {val_loss:.4f}")
                log_line(f"{step} val {val_loss:.6f}")  # 6 decimals like the train lines: tests compare runs at 1e-5
            if fresh and s.hellaswag_every > 0 and (step % s.hellaswag_every == 0 or last):
                acc_norm = hellaswag_accuracy(raw_model, hella_examples, rt, s.hellaswag_batch_size)
                log(f"HellaSwag accuracy: {acc_norm:.4f}")
                log_line(f"{step} hella {acc_norm:.4f}")
            if fresh and s.sample_every > 0 and ((step > 0 and step % s.sample_every == 0) or last) and rt.master:
                _, texts = sample(raw_model, "Hello, I'm a language model,", num_return_sequences=4,
                                  max_length=32, seed=42, device=rt.device)
                for i, text in enumerate(texts):
                    log(f"sample {i}: {text}")
            if step != start_step and s.checkpoint_every > 0 and (step % s.checkpoint_every == 0 or last):
                save(step)
            if last:
                break
            # every process must agree to stop (a signal may reach only some of them): a tiny all-reduce per step
            if rt.all_reduce_sum(torch.tensor([stop.signum or 0], device=rt.device)).item() > 0:
                stop.signum = stop.signum or signal.SIGTERM
                log(f"stopping at step {step} ({signal.Signals(stop.signum).name}): saving a checkpoint to resume from")
                if step != start_step:
                    save(step)
                return 128 + stop.signum

            rt.synchronize()
            t0 = time.perf_counter()
            lr = get_lr(step, s.max_lr, s.min_lr, s.warmup_steps, s.max_steps)
            try:
                loss, norm = train_step(model, optimizer, train_loader, grad_accum_steps, lr, s.grad_clip, rt, no_sync)
            except TrainingDiverged as e:
                raise TrainingDiverged(f"step {step}: {e}; stopping, the last good checkpoint is kept") from None
            rt.synchronize()
            dt = time.perf_counter() - t0
            mfu = format_mfu(flops_per_step / dt / rt.world_size, rt.peak_flops)  # per GPU, against its peak
            log(f"step {step:5d} | loss {loss:.6f} | lr {lr:.4e} | norm {norm:.4f} | dt {dt * 1000:.2f}ms | "
                f"tok/sec {tokens_per_step / dt:.0f} | mfu {mfu}")
            log_line(f"{step} train {loss:.6f}")
            step += 1
    elapsed = time.time() - t_start
    peak_memory = rt.peak_memory()
    log(f"done: {s.max_steps - start_step} steps in {elapsed:.1f}s" +
        (f", final validation loss {val_loss:.4f}" if val_loss is not None else "") +
        (f", peak GPU memory {peak_memory / 2**30:.2f} GiB" if peak_memory is not None else ""))
    return 0


# -----------------------------------------------------------------------------
# 9. Using a trained model: sampling from the command line, export to Hugging Face

# OpenAI's GPT-2 tokenizer files: tiktoken reads them (and caches them, checking their sha256), and they are
# exactly what Hugging Face calls vocab.json and merges.txt
GPT2_TOKENIZER_FILES = {
    "vocab.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                   "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "merges.txt": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                   "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}


def sample_command(s):
    """--sample: print samples from one of our checkpoints or a Hugging Face GPT-2 name/folder."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(s.sample, device)
    enc = get_tokenizer()
    max_length = len(enc.encode(s.prompt)) + s.max_new_tokens
    if max_length > model.config.block_size:
        raise UserError(f"prompt + --max_new_tokens = {max_length} tokens, more than the model's block size "
                        f"{model.config.block_size}; ask for fewer tokens")
    _, texts = sample(model, s.prompt, num_return_sequences=s.num_samples, max_length=max_length,
                      top_k=s.top_k, seed=s.seed, device=device, enc=enc)
    for i, text in enumerate(texts):
        print(f"sample {i}: {text}")
    return 0


def export_hf(checkpoint, out_dir):
    """Write one of our checkpoints as a standard transformers GPT-2 folder (config.json, model.safetensors and
    the tokenizer files), loadable by GPT2LMHeadModel.from_pretrained and pipeline("text-generation")."""
    from tiktoken.load import read_file_cached
    from transformers import GPT2Config, GPT2LMHeadModel

    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise UserError(f"{out_dir} exists and is not empty; choose a new folder")
    model = load_model(checkpoint, "cpu")
    c = model.config
    vocab_size = 50257  # GPT-2's real vocabulary
    if c.vocab_size < vocab_size:
        raise UserError(f"{checkpoint} has a vocabulary of {c.vocab_size}, smaller than GPT-2's {vocab_size}")
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                                    n_layer=c.n_layer, n_head=c.n_head, bos_token_id=50256, eos_token_id=50256))
    sd = model.state_dict()
    sd_hf = hf.state_dict()
    buffers_hf = {name for name, _ in hf.named_buffers()}
    with torch.no_grad():
        for k in sd_hf:
            if k in buffers_hf:
                continue
            src = sd[k].t() if k.endswith(CONV1D_SUFFIXES) else sd[k]
            if k in ("transformer.wte.weight", "lm_head.weight"):
                # Cut the padded vocabulary (50304) back to 50257 rows. The extra rows never win a prediction that
                # matters: no training target is ever one of them, so training only pushes their logits down.
                src = src[:vocab_size]
            sd_hf[k].copy_(src)
    tmp = out_dir.rstrip("/\\") + ".tmp"
    hf.save_pretrained(tmp)  # config.json + model.safetensors
    for name, (url, sha256) in GPT2_TOKENIZER_FILES.items():
        data = read_file_cached(url, sha256)  # from tiktoken's cache, or downloaded and checked
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(data)
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "GPT2Tokenizer", "model_max_length": c.block_size,
                   "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, f)
    if os.path.exists(out_dir):
        os.rmdir(out_dir)  # empty, checked above
    os.replace(tmp, out_dir)
    print(f"exported {checkpoint} to {out_dir}")
    return 0


# -----------------------------------------------------------------------------
# 10. Command line

# The runs `python train_gpt2.py` picks when no flag says otherwise. Flags given on the command line win.
PRESETS = {
    # The lecture's GPT-2 (124M) reproduction: one pass over FineWeb-Edu's 10B-token sample.
    "gpt2-124M-fineweb": dict(
        n_layer=12, n_head=12, n_embd=768,
        total_batch_size=524288,  # 2**19 tokens, ~0.5M: GPT-3 small's batch size (GPT-3 paper, table 2.1)
        batch_size=64, seq_len=1024,  # micro-batch: what fits on an 80 GB GPU; accumulation makes up the rest
        max_lr=6e-4,  # GPT-3 small's learning rate
        warmup_steps=715,  # GPT-3 warms up over 375M tokens: 375e6 / 2**19 = 715 steps
        max_steps=19073,  # 10e9 tokens / 2**19 tokens per step: one pass over the 10B sample
        eval_every=250, hellaswag_every=250, sample_every=250, checkpoint_every=5000,
        val_tokens=20 * 64 * 1024 * 8,  # the lecture's validation: 20 micro-batches of 64x1024 on 8 GPUs
    ),
    # GPU, no FineWeb-Edu shards: the 124M model on Tiny Shakespeare, a quick look at learning at full size.
    "gpt2-124M-shakespeare": dict(
        n_layer=12, n_head=12, n_embd=768, total_batch_size=16 * 1024, batch_size=16, seq_len=1024,
        max_lr=6e-4, warmup_steps=10, max_steps=50,  # the lecture's first learning check: loss ~6 at step 49
        eval_every=25, hellaswag_every=0, sample_every=50, checkpoint_every=50, val_tokens=10**9,
    ),
    # CPU (or MPS): a small model that learns Tiny Shakespeare in minutes on a laptop.
    "small": dict(
        n_layer=4, n_head=4, n_embd=128, total_batch_size=8 * 128, batch_size=8, seq_len=128,
        max_lr=2e-3,  # small models tolerate (and need) a larger learning rate than 124M
        # 290 x 1024 tokens: just under one pass over the 304K training tokens (a second pass overfits: the
        # validation loss went from 5.66 at step 300 up to 5.88 at step 400 in a 400-step run here)
        warmup_steps=20, max_steps=290,
        eval_every=100, hellaswag_every=0, sample_every=290, checkpoint_every=290, val_tokens=10**9,
    ),
}


def build_parser():
    p = argparse.ArgumentParser(
        description="Reproduce GPT-2 (124M): train a GPT-2 model from scratch (or fine-tune one), on a CPU, one GPU, "
                    "or many with torchrun. With no flags it picks a run for this machine and says why.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # Flags whose default is None are filled from the chosen preset (see PRESETS) and reported at start.
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help="a text file (90%% train, 10%% val) or a folder of fineweb.py shards; default: "
                        "edu_fineweb10B/ next to this file if it has shards, else input.txt (Tiny Shakespeare)")
    g.add_argument("--val_tokens", type=int, default=None, help="validation tokens per evaluation (capped at the split)")
    g = p.add_argument_group("model")
    g.add_argument("--init_from", default="scratch",
                   help="'scratch', or a GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or folder to fine-tune")
    g.add_argument("--n_layer", type=int, default=None, help="transformer blocks")
    g.add_argument("--n_head", type=int, default=None, help="attention heads")
    g.add_argument("--n_embd", type=int, default=None, help="model width")
    g.add_argument("--vocab_size", type=int, default=50304,
                   help="50257 padded to 50304 = 128 * 393: a 'nice' number (many powers of 2) makes the "
                        "matmuls of the output layer faster on GPUs; the extra rows learn to be never used")
    g.add_argument("--block_size", type=int, default=1024, help="longest sequence the model takes (GPT-2: 1024)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--total_batch_size", type=int, default=None, help="tokens per optimizer step")
    g.add_argument("--batch_size", "-B", type=int, default=None, help="micro-batch size per process")
    g.add_argument("--seq_len", "-T", type=int, default=None, help="sequence length")
    g.add_argument("--max_steps", type=int, default=None, help="optimizer steps")
    g.add_argument("--warmup_steps", type=int, default=None, help="linear warmup steps")
    g.add_argument("--max_lr", type=float, default=None, help="peak learning rate")
    g.add_argument("--min_lr", type=float, default=None, help="final learning rate (default: 10%% of max_lr)")
    g.add_argument("--weight_decay", type=float, default=0.1, help="AdamW weight decay (GPT-3: 0.1)")
    g.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm to this (GPT-3: 1.0)")
    g.add_argument("--seed", type=int, default=1337, help="seed of the weights and of the data order")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="where to train")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on with CUDA, off elsewhere)")
    g = p.add_argument_group("evaluation, logging and checkpoints")
    g.add_argument("--eval_every", type=int, default=None, help="validation loss every N steps (0: never)")
    g.add_argument("--hellaswag_every", type=int, default=None, help="HellaSwag accuracy every N steps (0: never)")
    g.add_argument("--hellaswag_file", default=None, help="a local HellaSwag val jsonl (default: download it once)")
    g.add_argument("--hellaswag_batch_size", type=int, default=16, help="HellaSwag examples per forward pass")
    g.add_argument("--hellaswag_examples", type=int, default=0,
                   help="score only the first N HellaSwag val examples (0: all 10,042), for quick runs")
    g.add_argument("--sample_every", type=int, default=None, help="print samples every N steps (0: never)")
    g.add_argument("--checkpoint_every", type=int, default=None, help="save a checkpoint every N steps (0: never)")
    g.add_argument("--keep_checkpoints", type=int, default=0, help="keep only the newest N checkpoints (0: all)")
    g.add_argument("--log_dir", default="log", help="where log.txt, config.json and checkpoints go")
    g.add_argument("--resume", default=None,
                   help="continue from a checkpoint file, or 'auto': the newest one in --log_dir (fresh start if none)")
    g = p.add_argument_group("using a trained model (instead of training)")
    g.add_argument("--sample", metavar="MODEL", default=None,
                   help="print samples from a checkpoint of ours or a GPT-2 name/folder, then exit")
    g.add_argument("--prompt", default="Hello, I'm a language model,", help="with --sample: the text to continue")
    g.add_argument("--num_samples", type=int, default=4, help="with --sample: how many continuations")
    g.add_argument("--max_new_tokens", type=int, default=64, help="with --sample: tokens to add to the prompt")
    g.add_argument("--top_k", type=int, default=50, help="with --sample: sample from the k most likely tokens")
    g.add_argument("--export_hf", nargs=2, metavar=("CHECKPOINT", "OUT_DIR"), default=None,
                   help="write a checkpoint as a Hugging Face GPT-2 folder (safetensors + tokenizer), then exit")
    return p


def resolve_settings(args, rt, reasons):
    """Fill the flags left unset from a preset chosen for this machine and data; check every value.
    Raises UserError for anything wrong, before any file is written."""
    s = argparse.Namespace(**vars(args))
    if s.data is None:
        if os.path.isdir(DEFAULT_SHARDS) and find_shards(DEFAULT_SHARDS, "train"):
            s.data = DEFAULT_SHARDS
            reasons.append(f"data: {DEFAULT_SHARDS} (FineWeb-Edu shards found there)")
        else:
            s.data = DEFAULT_TEXT
            reasons.append(f"data: {DEFAULT_TEXT} (no FineWeb-Edu shards in {DEFAULT_SHARDS}: run fineweb.py "
                           f"for the real thing)")
            if not os.path.exists(DEFAULT_TEXT) and rt.master:
                print(f"downloading Tiny Shakespeare to {DEFAULT_TEXT}", flush=True)
                download_tiny_shakespeare(DEFAULT_TEXT)
            if rt.ddp:
                torch.distributed.barrier()  # the other processes wait for the download
    if not os.path.exists(s.data):
        raise UserError(f"--data {s.data} does not exist; pass a text file or a folder of fineweb.py shards")
    if rt.device_type != "cuda":
        preset = "small"  # the 124M model would need weeks on a CPU: a small model shows learning in minutes
    else:
        preset = "gpt2-124M-fineweb" if os.path.isdir(s.data) else "gpt2-124M-shakespeare"
    filled = [k for k, v in PRESETS[preset].items() if getattr(s, k) is None]
    for k in filled:
        setattr(s, k, PRESETS[preset][k])
    if filled:
        reasons.append(f"preset: {preset} for {', '.join(filled)} (data is "
                       f"{'a shard folder' if os.path.isdir(s.data) else 'a text file'}, device {rt.device_type})")
    if s.min_lr is None:
        s.min_lr = 0.1 * s.max_lr  # GPT-3 decays to 10% of the peak
    if s.compile is None:
        s.compile = rt.device_type == "cuda"
        reasons.append(f"compile: {'on' if s.compile else 'off'} (default: on with CUDA only, where it pays off)")

    for name in ("total_batch_size", "batch_size", "seq_len", "max_steps", "n_layer", "n_head", "n_embd",
                 "vocab_size", "block_size", "val_tokens", "hellaswag_batch_size"):
        if getattr(s, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(s, name)}")
    for name in ("warmup_steps", "eval_every", "hellaswag_every", "sample_every", "checkpoint_every",
                 "keep_checkpoints", "weight_decay", "hellaswag_examples"):
        if getattr(s, name) < 0:
            raise UserError(f"--{name} must be 0 or more, got {getattr(s, name)}")
    if not s.max_lr > 0 or not 0 <= s.min_lr <= s.max_lr or not s.grad_clip > 0:
        raise UserError(f"need 0 < --max_lr, 0 <= --min_lr <= --max_lr and --grad_clip > 0 "
                        f"(got {s.max_lr}, {s.min_lr}, {s.grad_clip})")
    if s.n_embd % s.n_head != 0:
        raise UserError(f"--n_embd {s.n_embd} must be a multiple of --n_head {s.n_head}")
    if s.init_from != "scratch" and s.init_from not in GPT.PRETRAINED_SHAPES and not os.path.isdir(s.init_from):
        raise UserError(f"--init_from {s.init_from}: not 'scratch', a GPT-2 name "
                        f"({', '.join(GPT.PRETRAINED_SHAPES)}) or a folder with a Hugging Face GPT-2 checkpoint")
    block_size = s.block_size
    if s.init_from != "scratch":
        block_size = 1024 if s.init_from in GPT.PRETRAINED_SHAPES else _hf_block_size(s.init_from)
    if s.seq_len > block_size:
        raise UserError(f"--seq_len {s.seq_len} is longer than the model's block size {block_size}")
    per_micro_step = s.batch_size * s.seq_len * rt.world_size
    if s.total_batch_size % per_micro_step != 0:
        raise UserError(f"--total_batch_size {s.total_batch_size} must be divisible by batch_size x seq_len x "
                        f"processes = {s.batch_size} x {s.seq_len} x {rt.world_size} = {per_micro_step}")
    grad_accum = s.total_batch_size // per_micro_step
    reasons.append(f"gradient accumulation: {grad_accum} micro-steps per process "
                   f"({s.total_batch_size} / ({s.batch_size} x {s.seq_len} x {rt.world_size}))")
    if s.hellaswag_every > 0 and s.hellaswag_file is not None and not os.path.isfile(s.hellaswag_file):
        raise UserError(f"--hellaswag_file {s.hellaswag_file} does not exist")
    return s


def _hf_block_size(folder):
    try:
        with open(os.path.join(folder, "config.json")) as f:
            return int(json.load(f)["n_positions"])
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"--init_from {folder}: no readable GPT-2 config.json there ({e})") from e


def check_resume(s, ckpt, path):
    """A resumed run must do the same math as the run that wrote the checkpoint."""
    saved = ckpt.get("settings", {})
    for k in MATH_SETTINGS:
        if k in saved and saved[k] != getattr(s, k):
            raise UserError(f"--resume {path}: --{k} is {getattr(s, k)!r} but the checkpoint was trained with "
                            f"{saved[k]!r}; use the same value (or start a new run in another --log_dir)")


def main(argv=None):
    args = build_parser().parse_args(argv)
    rt = None
    try:
        if args.sample is not None:
            if min(args.num_samples, args.max_new_tokens, args.top_k) <= 0:
                raise UserError("--num_samples, --max_new_tokens and --top_k must be positive")
            return sample_command(args)
        if args.export_hf is not None:
            return export_hf(*args.export_hf)
        reasons = []
        rt = setup_runtime(args.device, reasons)
        s = resolve_settings(args, rt, reasons)
        resume_ckpt = None
        if s.resume is not None:
            path = s.resume
            if s.resume == "auto":
                found = list_checkpoints(s.log_dir)
                path = found[-1] if found else None
                reasons.append(f"resume: {path or f'no checkpoint in {s.log_dir}, starting fresh'}")
            if path is not None:
                resume_ckpt = load_checkpoint(path)
                check_resume(s, resume_ckpt, path)
        for r in reasons:
            rt.print0(r)
        rt.print0("settings: " + " ".join(f"--{k} {v}" for k, v in vars(s).items()))
        code = train(s, rt, resume_ckpt, reasons)
        if rt.ddp:  # leave together: no process tears its process group down while another one still uses it
            torch.distributed.barrier()
        return code
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if rt is not None and rt.ddp and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
