"""
An opt-in speed-up: the output layer and the cross-entropy loss computed together, in chunks of rows, without
ever holding the whole (B*T, V) matrix of logits.

train_gpt2.py trains with GPT.forward, which computes the loss the lecture's way: logits = lm_head(x), then
F.cross_entropy. Only the --chunked_loss flag (off by default, on every device) wraps the model in ChunkedLossGPT
instead: the same blocks, then the same loss and gradients from LinearCrossEntropy (tested to fp32 rounding in
tests/test_model.py). README, "How fast", has what it measured against the default, side by side in one run.
"""

import torch
import torch.nn as nn

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
    Speed-up, measured on CPUs (4 layers, 256 wide, B=8, T=256, V=50304, fp32): 0.74x the training step time of
    GPT.forward's plain loss, side by side in one run on a 2-core Intel Xeon (README, "How fast"); 0.58x-0.74x
    the time of Hugging Face's GPT2LMHeadModel on a 2-core AMD EPYC (docs/benchmarks.md). Under bf16 autocast plus
    torch.compile that AMD CPU ran the plain loss faster (docs/benchmarks.md); GPUs: not yet measured.

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




class ChunkedLossGPT(nn.Module):
    """A GPT whose model(idx, targets) returns (None, loss) with the loss from LinearCrossEntropy: the same blocks
    as GPT.forward up to the final LayerNorm, then lm_head and the loss together, chunk by chunk. The wrapped GPT
    keeps its parameters (this module adds none), so the optimizer, DDP and state_dict see the same weights."""

    # logits held at once by the loss: at most 2**26 fp32 numbers = 256 MB; 1280 rows of V=50304
    LOSS_CHUNK_ELEMENTS = 2**26

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, idx, targets):
        gpt = self.gpt
        B, T = idx.size()
        assert T <= gpt.config.block_size, f"sequence of length {T}, longer than block_size {gpt.config.block_size}"
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)  # (T,)
        x = gpt.transformer.wte(idx) + gpt.transformer.wpe(pos)  # (B, T, C) + (T, C) -> (B, T, C)
        for block in gpt.transformer.h:
            x = block(x)  # (B, T, C)
        x = gpt.transformer.ln_f(x)  # (B, T, C)
        chunk_rows = max(128, self.LOSS_CHUNK_ELEMENTS // gpt.config.vocab_size // 128 * 128)  # tile-friendly
        x, targets = x.view(B * T, -1), targets.reshape(B * T)  # (B*T, C), (B*T,)
        loss = LinearCrossEntropy.apply(x, gpt.lm_head.weight, targets, chunk_rows, torch.is_grad_enabled())
        return None, loss
