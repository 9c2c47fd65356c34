"""
Reproduce GPT-2 (124M) from scratch, in one file you can read top to bottom alongside the lecture "Let's
reproduce GPT-2 (124M)", in the order it builds things: 1. the model (GPTConfig, CausalSelfAttention, MLP, Block,
GPT with from_pretrained and configure_optimizers), 2. sampling, 3. DataLoaderLite, 4. get_lr, 5. the training
script: DDP and the device, the settings, gradient accumulation, the data, TF32, the model, bf16, torch.compile,
DDP, the optimizer, then the loop: validation, HellaSwag, samples, checkpoints, one optimizer step.

What runs is what you read: `python train_gpt2.py` trains with GPT.forward as written here, on every device.
Each deliberate difference from the lecture has a comment that starts with "lecture" and a colon: grep for it.
What a run needs beyond the lecture lives beside this file, called by name: run_support.py, model_commands.py
(--sample, --eval, --export_hf), checkpoints.py, common.py, and chunked_loss.py (an opt-in speed-up).

  python train_gpt2.py                                    # picks a run for this machine and says why
  torchrun --standalone --nproc_per_node=8 train_gpt2.py  # 8 GPUs on one node
"""

import datetime
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import hellaswag
import model_commands
import run_support as rs
from checkpoints import load_hf_gpt2
from chunked_loss import ChunkedLossGPT
from common import GPT2_VOCAB_SIZE, UserError, encode_prompt, find_shards, get_tokenizer, load_shard, text_file_tokens

# -----------------------------------------------------------------------------
# 1. The GPT-2 model
#
# Shapes in the comments:
#   B  batch size              T  sequence length (time)       C  n_embd (channels)
#   nh number of heads         hs head size = C // nh          V  vocab_size


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the model can see (GPT-2 paper: a context of 1024 tokens)
    vocab_size: int = 50257  # 50,000 BPE merges + 256 byte tokens + 1 <|endoftext|> token
    n_layer: int = 12  # number of transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # width of the residual stream


class CausalSelfAttention(nn.Module):
    """Multi-head attention in which each token looks only at itself and the tokens before it."""

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # one Linear computes query, key and value for all heads at once: C -> 3C
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        # output projection back into the residual stream: C -> C
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.NANOGPT_SCALE_INIT = 1  # it adds to the residual stream: GPT._init_weights draws it smaller
        self.n_head = config.n_head
        self.n_embd = config.n_embd

    def forward(self, x):
        B, T, C = x.size()
        nh, hs = self.n_head, C // self.n_head
        qkv = self.c_attn(x)  # (B, T, C) @ (C, 3C) -> (B, T, 3C)
        q, k, v = qkv.split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, T, C) -> (B, T, nh, hs) -> (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        # softmax(q @ k^T / sqrt(hs), causal mask) @ v: (B, nh, T, hs) @ (B, nh, hs, T) -> (B, nh, T, T), then
        # (B, nh, T, T) @ (B, nh, T, hs) -> (B, nh, T, hs).
        # Speed-up (flash attention): scaled_dot_product_attention runs a fused kernel where the hardware has
        # one, which never writes the (T, T) matrix to memory; is_causal=True needs no mask buffer.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, nh, hs) -> (B, T, C)
        return self.c_proj(y)  # (B, T, C) @ (C, C) -> (B, T, C)


class MLP(nn.Module):
    """The position-wise feed-forward network: widen 4x, GELU, project back."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)  # C -> 4C
        # GPT-2 used the tanh approximation of GELU (faster in TensorFlow at the time); we match it exactly
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)  # 4C -> C
        self.c_proj.NANOGPT_SCALE_INIT = 1  # it adds to the residual stream: GPT._init_weights draws it smaller

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


class GPT(nn.Module):

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

    def _init_weights(self, module):
        # GPT-2's initialisation, from OpenAI's released model code: weights N(0, 0.02), biases 0. 0.02 is close
        # to 1/sqrt(C) for C = 768..1600.
        if isinstance(module, nn.Linear):
            std = 0.02
            if hasattr(module, "NANOGPT_SCALE_INIT"):
                # The residual stream is a sum of 2 * n_layer contributions (one attention and one MLP per block),
                # so its variance grows with depth. GPT-2 paper, section 2.3: scale the weights of the residual
                # layers by 1/sqrt(N), N the number of residual layers.
                std *= (2 * self.config.n_layer) ** -0.5
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            # lecture: 0.02 for both embeddings; OpenAI's GPT-2 code draws the position embeddings with 0.01
            std = 0.01 if module is self.transformer.wpe else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def forward(self, idx, targets=None):
        B, T = idx.size()  # idx: token ids (B, T)
        assert T <= self.config.block_size, f"sequence of length {T}, longer than block_size {self.config.block_size}"
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)  # (T,)
        pos_emb = self.transformer.wpe(pos)  # (T, C)
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        x = tok_emb + pos_emb  # (B, T, C) + (T, C) broadcasts to (B, T, C)
        for block in self.transformer.h:
            x = block(x)  # (B, T, C)
        x = self.transformer.ln_f(x)  # (B, T, C)
        logits = self.lm_head(x)  # (B, T, C) @ (C, V) -> (B, T, V): a score for every possible next token
        loss = None
        if targets is not None:  # the mean cross-entropy over all B*T positions: (B*T, V) logits vs (B*T,) targets
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    @classmethod
    def from_pretrained(cls, model_type):
        """A GPT with the weights of OpenAI's GPT-2 from Hugging Face: model_type is gpt2 (124M: 12 layers, 12
        heads, 768 wide), gpt2-medium (350M: 24, 16, 1024), gpt2-large (774M: 36, 20, 1280) or gpt2-xl (1558M:
        48, 25, 1600), downloaded once, or a folder holding a transformers GPT-2 (save_pretrained)."""
        # lecture: asserts one of the four names and looks their shape up in a table; here the shape comes from
        # the checkpoint's own config, so a local folder works too, and no network is one line (load_hf_gpt2)
        model_hf = load_hf_gpt2(model_type)  # transformers' GPT2LMHeadModel
        c = model_hf.config
        model = cls(GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer,
                              n_head=c.n_head, n_embd=c.n_embd))
        sd = model.state_dict()
        # the causal masks of older transformers versions are buffers, not weights
        sd_hf = {k: v for k, v in model_hf.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        # OpenAI's checkpoints store these as "Conv1D" weights, the transpose of an nn.Linear's: (in, out)
        transposed = ["attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"]
        for missing, side in ((set(sd) - set(sd_hf), "no weight"), (set(sd_hf) - set(sd), "a weight GPT has no place for")):
            if missing:  # lecture: asserts; here one line naming the first key missing on either side
                raise UserError(f"{model_type} has {side}: '{sorted(missing)[0]}' ({len(missing)} in all)")
        with torch.no_grad():
            for k, v in sd_hf.items():
                if any(k.endswith(w) for w in transposed):
                    v = v.t()
                if v.shape != sd[k].shape:
                    raise UserError(f"{model_type}: '{k}' is {tuple(v.shape)}, its config makes it {tuple(sd[k].shape)}")
                sd[k].copy_(v)  # sd[k] shares its memory with the parameter; lm_head and wte are one tensor
        return model

    def configure_optimizers(self, weight_decay, learning_rate, device_type, log=print, fused=None):
        """AdamW with betas (0.9, 0.95) and eps 1e-8 (GPT-3 paper, appendix B). Weight decay (0.1 in GPT-3) applies
        to the matrices of matmuls and embeddings only, never to biases and LayerNorm gains (< 2 dims)."""
        params = [p for p in self.parameters() if p.requires_grad]  # tied weights appear once
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        # lecture: prints if master_process, a global of the script; the caller passes its print0 as log
        log(f"optimizer: weight decay on {len(decay)} tensors, {sum(p.numel() for p in decay):,} parameters; "
            f"none on {len(no_decay)} tensors, {sum(p.numel() for p in no_decay):,} parameters")
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # Speed-up: the fused kernel updates all parameters in a few launches instead of a loop over tensors (the
        # default CPU model, 2-core Intel Xeon: 9 ms instead of 49). lecture: on CUDA only, after checking that AdamW
        # has `fused` (every PyTorch since 2.0 has). On CPUs it also gives the same bits each run: the loop's sqrt
        # goes to MKL, which on that Xeon rounded it to ~4 digits on one thread in 13 of 30 runs (docs/benchmarks.md)
        if fused is None:
            fused = device_type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=fused)


# -----------------------------------------------------------------------------
# 2. Sampling
#
# lecture: writes this loop inline twice, after loading GPT-2 and in the training loop; one function serves both
# and the --sample command.


@torch.no_grad()
def generate(model, idx, max_new_tokens, top_k=50, generator=None, temperature=1.0):
    """Continue the token ids idx (B, T) by max_new_tokens tokens each, with top-k sampling: only the k most likely
    next tokens can be drawn (k=50 as in Hugging Face's pipeline), so samples stay out of the long tail of unlikely
    tokens. top_k=1 is greedy, and so is a temperature near 0 (below 1 sharpens, above 1 flattens)."""
    was_training = model.training
    model.eval()
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -model.config.block_size:]  # (B, <=block_size): the model sees at most block_size tokens
        logits, _ = model(idx_cond)  # (B, T, V)
        logits = logits[:, -1, :].float()  # (B, V): only the last position predicts the next token
        # lecture: draws from all V rows; the rows past GPT-2's 50257 tokens (a vocab_size padded to 50304) are
        # no token at all, and early in training one can win: masked, so no sample ever holds one
        logits[:, GPT2_VOCAB_SIZE:] = -float("inf")
        logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature  # lecture: none; the max is 0: safe
        probs = F.softmax(logits, dim=-1)  # (B, V)
        topk_probs, topk_idx = torch.topk(probs, min(top_k, probs.size(-1)), dim=-1)  # (B, k), (B, k)
        choice = torch.multinomial(topk_probs, 1, generator=generator)  # (B, 1), index into the top k
        next_token = torch.gather(topk_idx, -1, choice)  # (B, 1), the token id
        idx = torch.cat((idx, next_token), dim=1)  # (B, T+1)
    model.train(was_training)
    return idx


def sample(model, prompt, num_return_sequences=4, max_length=32, top_k=50, seed=42, device=None, enc=None,
           temperature=1.0):
    """Continue a prompt (a string, or token ids) into num_return_sequences sequences of at most max_length tokens
    (prompt included); the same seed gives the same tokens on the same device. Returns the token lists, and their
    texts when the prompt was text (or enc is given)."""
    device = device or next(model.parameters()).device
    if isinstance(prompt, str):
        enc = enc or get_tokenizer()
        prompt = encode_prompt(enc, prompt)  # "" is <|endoftext|> alone, as GPT-2 samples without a prompt
    tokens = torch.tensor(prompt, dtype=torch.long, device=device)
    idx = tokens.unsqueeze(0).repeat(num_return_sequences, 1)  # (num_return_sequences, len(prompt))
    # the generator lives on the model's device, so sampling never touches the global random state
    generator = torch.Generator(device=device).manual_seed(seed)
    out = generate(model, idx, max(0, max_length - len(prompt)), top_k, generator, temperature)
    token_lists = out.tolist()
    return token_lists, [enc.decode(t) for t in token_lists] if enc is not None else None


# -----------------------------------------------------------------------------
# 3. Data
#
# The training data is one long stream of token ids, cut into chunks of B*T+1 tokens: a chunk gives the inputs
# x (its first B*T tokens) and the targets y (the same tokens shifted by one). Chunk c starts at token c*B*T, so
# consecutive chunks share one token and no token is skipped. A step of K micro-batches (gradient accumulation)
# on W processes uses chunks step*K*W ... step*K*W+K*W-1: process r takes chunks r, r+W, r+2W, ...
# So the tokens a step sees, and the model it produces, do not depend on the number of processes.


def load_text_tokens(path, split):
    """Tokenize a text file with GPT-2's tokenizer; the first 90% of its tokens train, the last 10% validate."""
    tokens = text_file_tokens(path)  # (N,) uint16: GPT-2's ids fit (common.py; not UTF-8 text: one line)
    n_train = int(0.9 * len(tokens))
    return tokens[:n_train] if split == "train" else tokens[n_train:]


class DataLoaderLite:
    """Micro-batches (x, y) of shape (B, T) from a text file or a folder of fineweb.py's token shards.

    The stream of a split is its shards one after another (a text file is a single shard). After the stream
    ends it starts again; from the second pass on, the shard order is a permutation drawn from `seed` and the
    pass number, so that a multi-epoch loss curve does not repeat itself. The whole position in the data is
    one integer, `chunk`, which makes resuming exact."""
    # lecture: reads edu_fineweb10B's shards in name order on every pass, drops the tokens at the end of each
    # shard that do not fill a chunk, and keeps its place as (shard, position): here a text file works too, no
    # token is dropped, later passes reshuffle the shards, and one integer is the whole position

    def __init__(self, source, B, T, process_rank=0, num_processes=1, split="train", seed=1337, pin_memory=False):
        assert split in ("train", "val")
        self.B, self.T = B, T
        self.process_rank, self.num_processes = process_rank, num_processes
        self.seed, self.pin_memory = seed, pin_memory
        if os.path.isdir(source):
            self.shards = [load_shard(p) for p in find_shards(source, split)]  # memory maps: read lazily
        else:
            self.shards = [load_text_tokens(source, split)]
        self.lengths = [len(s) for s in self.shards]
        self.total = sum(self.lengths)  # tokens in one pass over the split
        if self.total < B * T + 1:
            raise UserError(f"the {split} data ({self.total:,} tokens in {source}) is smaller than one "
                               f"micro-batch of B*T+1 = {B * T + 1:,} tokens; lower --batch_size or --seq_len")
        self._order_cache = {}
        self.reset()

    def reset(self):
        self.chunk = self.process_rank  # this process's first chunk

    def state_dict(self):  # the tokens before this process group's next chunk: the same on every process
        return {"position": (self.chunk - self.process_rank) * self.B * self.T}

    def load_state_dict(self, state):  # also with another micro-batch: a step reads the same tokens whatever B is
        self.chunk = state["position"] // (self.B * self.T) + self.process_rank

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
        if self.pin_memory:  # lecture: none; only from page-locked memory can the copy overlap the GPU's work
            buf = buf.pin_memory()
        x = buf[:-1].view(B, T)  # inputs (B, T)
        y = buf[1:].view(B, T)  # targets (B, T): each position's next token
        self.chunk += self.num_processes  # skip the chunks of the other processes
        return x, y


# -----------------------------------------------------------------------------
# 4. Learning rate


def get_lr(step, max_lr, min_lr, warmup_steps, max_steps):
    """Linear warmup for warmup_steps, then a cosine decay down to min_lr at max_steps, then min_lr
    (GPT-3 paper, appendix B: warmup, then cosine decay to 10% of the peak)."""
    # lecture: get_lr(it) reads max_lr, min_lr, warmup_steps and max_steps as globals; here they are arguments
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps  # step 0 already gets a small nonzero lr
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)  # 0 -> 1 (lecture: no max, no warmup=max)
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return min_lr + coeff * (max_lr - min_lr)


# -----------------------------------------------------------------------------
# 5. The training script

# The lecture's run: GPT-2 124M trained like GPT-3 small (GPT-3 paper, table 2.1 and appendix B) on one pass over
# FineWeb-Edu's 10B-token sample. `python train_gpt2.py` runs it on a GPU when edu_fineweb10B/ holds shards;
# other machines or data get a smaller run (run_support.PRESETS), and a flag of the same name overrides any value.
# lecture: these are plain variables of the script; here flags can change them
GPT2_124M_FINEWEB = dict(
    n_layer=12, n_head=12, n_embd=768,  # GPT-2 124M
    block_size=1024,  # GPT-2's context length
    # 50257 padded to 50304 = 128 * 393: a "nice" number (many powers of 2) makes the output layer's matmuls
    # faster on GPUs (CUDA kernels work in tiles of powers of 2); the extra rows learn to be never used
    vocab_size=50304,
    total_batch_size=2**19,  # 524,288 tokens per step, ~0.5M: GPT-3 small's batch size
    batch_size=64, seq_len=1024,  # micro-batch per GPU: what fits in 80 GB; gradient accumulation does the rest
    max_lr=6e-4,  # GPT-3 small's learning rate
    min_lr=6e-5,  # GPT-3 decays the learning rate to 10% of its peak
    warmup_steps=715,  # GPT-3 warms up over 375M tokens: 375e6 / 2**19 = 715 steps
    max_steps=19073,  # 10e9 tokens / 2**19 tokens per step: one pass over the 10B sample
    weight_decay=0.1,  # GPT-3's AdamW weight decay
    grad_clip=1.0,  # GPT-3 clips the global gradient norm at 1.0
    eval_every=250, hellaswag_every=250, sample_every=250, checkpoint_every=5000,
    val_tokens=20 * 64 * 1024 * 8,  # the lecture's validation: 20 micro-batches of 64 x 1024 on 8 GPUs
)


def train(args):
    # --- DDP and the device ---
    # torchrun sets RANK, LOCAL_RANK and WORLD_SIZE: one process per GPU (or CPU process), all in one job
    ddp = int(os.environ.get("RANK", -1)) != -1
    ddp_rank = int(os.environ.get("RANK", 0))  # this process among all of them, on every node
    ddp_local_rank = int(os.environ.get("LOCAL_RANK", 0))  # this process on its node: which GPU it uses
    ddp_world_size = int(os.environ.get("WORLD_SIZE", 1))
    master_process = ddp_rank == 0  # rank 0 prints, logs and writes checkpoints

    def print0(*args):  # lecture: `if master_process: print(...)` at each print
        if master_process:
            print(*args, flush=True)  # flushed: a log file or a pipe gets each line as it happens

    # lecture: CUDA, else MPS, else the CPU, and DDP only with CUDA; here --device chooses, and DDP runs on CPUs
    device_type, reasons = rs.pick_device(args.device, ddp)  # "cuda", "mps" or "cpu"
    device = f"cuda:{ddp_local_rank}" if device_type == "cuda" else device_type
    if ddp:
        if device_type == "cuda":
            torch.cuda.set_device(device)
        # NCCL talks GPU to GPU (NVLink, InfiniBand); gloo runs on CPUs, so 2 processes also work on a laptop.
        # lecture: no timeout (NCCL waits 10 min for a peer, gloo 30) and torchrun's defaults; here --dist_timeout,
        # and a fresh store per torchrun restart (rs.restart_safe_store says why)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=args.dist_timeout), **rs.restart_safe_store(args))
        reasons.append(f"ddp: {ddp_world_size} processes, backend {dist.get_backend()}")
    # lecture: every process runs with the values written in the script; here rank 0 fills the flags left
    # unset (a preset for this machine and data, the dtype, the checkpoint to resume) and every process follows
    s, resume_path = rs.decide_settings(args, GPT2_124M_FINEWEB, device_type, ddp_world_size, reasons)
    torch.manual_seed(s.seed)  # the same initial weights on every process
    if device_type == "cuda":
        torch.cuda.manual_seed(s.seed)

    # --- the batch: 2**19 tokens per optimizer step in the lecture, far more than fits in a GPU at once ---
    total_batch_size = s.total_batch_size
    B, T = s.batch_size, s.seq_len  # micro-batch per process (B may shrink below, to what fits in memory)

    def load_data():  # on every node: a node that cannot read the data or the checkpoint stops the whole job
        get_tokenizer()  # lecture: tiktoken.get_encoding("gpt2"); here from the committed files, no network
        loaders = (DataLoaderLite(s.data, B, T, ddp_rank, ddp_world_size, "train", s.seed, pin_memory=device_type == "cuda"),
                   DataLoaderLite(s.data, B, T, ddp_rank, ddp_world_size, "val", s.seed))
        rs.check_token_ids(s, *loaders)  # now, not at the first forward: every id needs a row of the embedding
        data_id = rs.data_fingerprint(s.data)  # a resumed run checks that it trains on the same tokens
        return (*loaders, data_id, rs.load_hellaswag_examples(s), rs.load_resume_checkpoint(s, resume_path, data_id))

    train_loader, val_loader, data_id, hella_examples, checkpoint = rs.load_on_every_node(load_data)

    # Speed-up (TF32): fp32 matmuls may use the tensor cores' TF32 (10-bit mantissa; 8x the fp32 peak on the
    # A100 datasheet). Whatever bf16 autocast leaves in fp32 gets faster too.
    if device_type == "cuda":  # lecture: on every device; some CPUs would then round fp32 matmuls too
        torch.set_float32_matmul_precision("high")

    # --- the model ---
    if s.init_from == "scratch":
        model = GPT(GPTConfig(block_size=s.block_size, vocab_size=s.vocab_size, n_layer=s.n_layer,
                              n_head=s.n_head, n_embd=s.n_embd))
    else:  # lecture: always from scratch; --init_from fine-tunes OpenAI's GPT-2 (each node's local rank 0 first)
        model = rs.load_on_every_node(lambda: GPT.from_pretrained(s.init_from))
    rs.load_weights(model, checkpoint)  # when resuming: before the DDP wrap, so every process starts the same
    model.to(device)
    # lecture: raw_model = model.module after the DDP wrap, the compiled model; here the plain module, before
    # compile and DDP: sampling, evaluation and state_dict use it (no recompiles, no key prefixes)
    raw_model = model
    if s.chunked_loss:
        model = ChunkedLossGPT(model)  # opt-in speed-up: the same loss without the (B*T, V) logits (chunked_loss.py)
    # Speed-up (bf16): autocast runs matmuls in bfloat16 on the tensor cores (twice TF32's datasheet peak), while
    # weights, optimizer state and the reductions that need range (softmax, LayerNorm, loss) stay in fp32.
    # GPUs without bf16 (T4, V100) run the same in float16, with the gradient scaler of the step below.
    def autocast():  # lecture: `with torch.autocast(device_type=device_type, dtype=torch.bfloat16)` at each use
        return torch.autocast(device_type, dtype=getattr(torch, s.dtype), enabled=s.dtype != "float32")

    # lecture: B = 64, what fits in an 80 GB GPU; here the largest micro-batch that fits on every process, found
    # now with one forward and backward pass (a preset's shrinks; gradient accumulation keeps the step's tokens)
    B = rs.fit_batch_to_memory(model, s, device, autocast, ddp_world_size, args.batch_size is None, reasons)
    assert total_batch_size % (B * T * ddp_world_size) == 0  # decide_settings and fit_batch_to_memory see to it
    # gradient accumulation: each process adds up the gradients of grad_accum_steps micro-batches per step
    grad_accum_steps = total_batch_size // (B * T * ddp_world_size)
    train_loader.B = val_loader.B = B
    # micro-batches per validation: --val_tokens of them, at most the whole val split, at least one
    val_chunks = max(1, min(s.val_tokens // (B * T), (val_loader.total - 1) // (B * T)))
    rs.print_run(print0, reasons, s, raw_model, train_loader, val_loader, val_chunks, hella_examples)
    print0(f"batch: {total_batch_size:,} tokens per step = {B} x {T} tokens x {grad_accum_steps} accumulation "
           f"steps x {ddp_world_size} processes")
    if s.compile:
        # Speed-up: torch.compile fuses the elementwise work (GELU, LayerNorm, residual adds) into few kernels and
        # cuts Python overhead (2-core AMD EPYC, bf16: 1020 -> 633 ms per step, docs/benchmarks.md).
        # lecture: off (use_compile = False), as it broke HellaSwag and sampling (they use raw_model here). And
        # first a small function is compiled, where compiling can fail (no C++ compiler, no Triton): then no compile
        model = torch.compile(model) if rs.compile_works(device, print0) else model
    if ddp:
        # DDP all-reduces (averages) the gradients across processes during backward
        model = DDP(model, device_ids=[ddp_local_rank] if device_type == "cuda" else None)

    # --- the optimizer, and what a resumed run continues from ---
    optimizer = raw_model.configure_optimizers(weight_decay=s.weight_decay, learning_rate=s.max_lr,
                                               device_type=device_type, log=print0)
    # lecture: bf16, which needs no scaler. fp16 does: the loss is multiplied before backward so that small
    # gradients do not underflow to 0 in fp16's 5-bit exponent, the gradients are divided back before the clip,
    # and a step whose gradients overflowed is skipped (the scale then halves). Off for bf16 and fp32: no-ops.
    scaler = torch.amp.GradScaler(device_type, enabled=s.dtype == "float16")
    start_step, val_loss = rs.restore_training_state(checkpoint, optimizer, scaler, train_loader, device_type, device)
    resumed = checkpoint is not None
    del checkpoint  # its weights and optimizer state are in the model and optimizer now: free the copy
    if resumed:
        print0(f"resumed from step {start_step}")
    # lecture: makes log/ and empties log/log.txt; here log.txt, config.json and the checkpoints of --log_dir
    run_folder = rs.RunFolder(s, master_process, start_step, resumed,
                              config={"why": reasons, "world_size": ddp_world_size, "device": device,
                                      "grad_accum_steps": grad_accum_steps})
    peak_flops = rs.gpu_peak_flops(torch.cuda.get_device_name(device)) if device_type == "cuda" else None  # MFU
    flops_per_step = rs.flops_per_token(raw_model.config, T) * total_batch_size

    stop = rs.StopRequest()  # lecture: none; Ctrl-C or SIGTERM here finishes the step, saves, exits
    divergence = rs.DivergenceCheck(scaler, run_folder.newest_checkpoint)  # lecture: none; a NaN stops the run
    t_start = time.time()

    # --- the loop: each step first evaluates the model after `step` optimizer steps, then takes one step ---
    # lecture: range(max_steps), evaluating before the update of the last step: the final model went unevaluated.
    # Here the last iteration (step == max_steps) only evaluates and saves the final model. A resumed run's first
    # step was evaluated before its checkpoint was saved.
    for step in range(start_step, s.max_steps + 1):
        last_step = step == s.max_steps
        evaluate_now = step > start_step or not resumed

        # validation loss
        if evaluate_now and s.eval_every > 0 and (step % s.eval_every == 0 or last_step):
            raw_model.eval()
            val_loader.reset()
            val_loss_accum = torch.zeros((), device=device)
            with torch.no_grad():
                # lecture: 20 micro-batches on each process, averaged across processes; here --val_tokens in all,
                # shared out (process r takes chunks r, r+W, ...): the same tokens whatever the number of processes
                while val_loader.chunk < val_chunks:  # this process's chunks among the first val_chunks
                    x, y = val_loader.next_batch()
                    x, y = x.to(device), y.to(device)
                    with autocast():
                        logits, loss = raw_model(x, y)
                    val_loss_accum += loss.float() / val_chunks
            if ddp:
                dist.all_reduce(val_loss_accum)  # lecture: op=AVG; here the processes' shares add up to the mean
            val_loss = val_loss_accum.item()
            print0(f"validation loss: {val_loss:.4f}")
            run_folder.log(f"{step} val {val_loss:.6f}")  # lecture: 4 decimals; 6 let tests compare runs at 1e-5

        # HellaSwag acc_norm: process r scores examples r, r+W, ... and the counts are summed (exact under DDP)
        # lecture: one example per forward pass, and only uncompiled; here batches, with the uncompiled raw_model
        if evaluate_now and hella_examples and (step % s.hellaswag_every == 0 or last_step):
            _, num_correct_norm, num_total = hellaswag.evaluate(
                raw_model, hella_examples[ddp_rank::ddp_world_size], device, batch_size=s.hellaswag_batch_size,
                autocast_dtype=getattr(torch, s.dtype))
            counts = torch.tensor([num_correct_norm, num_total], device=device)
            if ddp:
                dist.all_reduce(counts)
            acc_norm = counts[0].item() / counts[1].item()
            print0(f"HellaSwag accuracy: {acc_norm:.4f}")
            run_folder.log(f"{step} hella {acc_norm:.4f}")

        # samples from the model as it is now; lecture: on every process, each with its own seed 42 + rank
        if evaluate_now and master_process and s.sample_every > 0 and (step > 0 and step % s.sample_every == 0 or last_step):
            with autocast():
                _, texts = sample(raw_model, "Hello, I'm a language model,", num_return_sequences=4, max_length=32,
                                  seed=42, device=device)
            for i, text in enumerate(texts):
                print0(f"sample {i}: {text}")

        # checkpoints: the lecture's four entries, then what resuming exactly needs
        if stop.agreed:
            print0(f"stopping at step {step} ({stop.name}): saving a checkpoint to resume from")
        if step > start_step and (stop.agreed or s.checkpoint_every > 0 and (step % s.checkpoint_every == 0 or last_step)):
            # lecture: saved inside the validation block; the config as the dataclass itself (weights_only=True
            # refuses to load classes, so a plain dict here); no optimizer, data position or random state
            run_folder.save_checkpoint(step, {
                "model": raw_model.state_dict(),
                "config": asdict(raw_model.config),
                "step": step,  # the number of optimizer steps done: a resumed run continues with this step
                "val_loss": val_loss,
                "optimizer": optimizer.state_dict(),  # AdamW's moments and step counts
                "scaler": scaler.state_dict(),  # fp16's loss scale (empty for bf16 and fp32)
                "loader": train_loader.state_dict(),  # where in the data the next step starts
                "rng": rs.rng_state(device_type, device),
                "settings": vars(s),  # a resumed run must do the same math; --eval reruns its validation
                "data": data_id,  # what identifies the data (a text file's sha256): a resumed run compares
            })
        if last_step:
            break
        if stop.agreed:
            return stop.exit_status

        # --- one optimizer step ---
        model.train()
        if device_type == "cuda":
            torch.cuda.synchronize()  # GPU work is queued asynchronously: wait for it before reading the clock
        t0 = time.perf_counter()  # lecture: time.time() at the top of the iteration, evaluations included
        optimizer.zero_grad()
        loss_accum = 0.0
        for micro_step in range(grad_accum_steps):
            x, y = train_loader.next_batch()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)  # lecture: blocking copies
            if ddp:
                # gradients are all-reduced in the last micro-step's backward only; the others add up locally
                model.require_backward_grad_sync = micro_step == grad_accum_steps - 1
            with autocast():
                logits, loss = model(x, y)
            # The loss is a mean over the micro-batch, and gradients add up over micro-steps: divide by the number
            # of micro-steps, so that the sum of the gradients is the gradient of the mean over the whole batch.
            loss = loss / grad_accum_steps
            loss_accum += loss.detach()
            scaler.scale(loss).backward()  # lecture: loss.backward(); the same unless fp16
        # lecture: all_reduce(loss_accum, op=AVG); here one all-reduce carries the loss (summed, divided below)
        # and whether any process was asked to stop, so that all of them stop at the same step
        loss_and_stop = torch.stack([loss_accum, stop.flag(device)])
        if ddp:
            dist.all_reduce(loss_and_stop)
        # Clip the global gradient norm at 1.0 (GPT-3 paper, appendix B): a rare bad batch cannot blow up the model
        scaler.unscale_(optimizer)  # fp16: the clip sees the true gradients
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        lr = get_lr(step, s.max_lr, s.min_lr, s.warmup_steps, s.max_steps)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        scaler.step(optimizer)  # optimizer.step(), unless fp16 gradients overflowed
        scaler.update()
        # lecture: torch.cuda.synchronize(), then .item() twice; here one read-back from the device, after all
        # the step's work was queued
        loss_sum, stop_votes, norm = torch.cat([loss_and_stop, norm[None]]).tolist()
        dt = time.perf_counter() - t0
        loss = loss_sum / ddp_world_size
        skipped = divergence.check(step, loss, norm)  # True: an fp16 step the scaler skipped
        stop.vote(stop_votes)
        mfu = rs.format_mfu(flops_per_step / dt / ddp_world_size, peak_flops)  # per GPU, against its peak
        print0(f"step {step:5d} | loss: {loss:.6f} | lr {lr:.4e} | norm: {norm:.4f} | dt: {dt * 1000:.2f}ms | "
               f"tok/sec: {total_batch_size / dt:.2f} | mfu: {mfu}"  # lecture: no MFU
               + (f" | skipped: fp16 gradients overflowed, loss scale now {scaler.get_scale():g}" if skipped else ""))
        run_folder.log(f"{step} train {loss:.6f}")

    peak_memory = torch.cuda.max_memory_allocated(device) if device_type == "cuda" else None
    print0(f"done: {s.max_steps - start_step} steps in {time.time() - t_start:.1f}s"
           + (f", final validation loss {val_loss:.4f}" if val_loss is not None else "")
           + (f", peak GPU memory {peak_memory / 2**30:.2f} GiB" if peak_memory is not None else ""))
    return 0  # lecture: destroy_process_group() here; run_support.run_to_exit_status does it on every exit


def main(argv=None):
    """Train (the default), or with --sample / --eval / --export_hf use a trained model. A user's mistake is one
    line 'error: ...' on stderr and exit status 2; a diverged run exits with 1."""
    args = rs.build_parser(GPT2_124M_FINEWEB).parse_args(argv)
    if args.sample is not None or args.eval is not None or args.export_hf is not None:
        return model_commands.run(args, GPT, GPTConfig, sample, DataLoaderLite, GPT2_124M_FINEWEB)
    return rs.run_to_exit_status(train, args)


if __name__ == "__main__":
    sys.exit(main())
