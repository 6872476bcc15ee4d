"""Seeded text continuation (top-k, temperature) that never touches the global RNG."""

import torch

from harness.data.tokenizer import gpt2_encoding
from harness.trial.model import GPTModel


@torch.no_grad()
def continue_text(model: GPTModel, prompt: str, new_tokens: int, top_k: int, temperature: float, seed: int) -> str:
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    encoding = gpt2_encoding()
    idx = torch.tensor([encoding.encode(prompt)], device=device)
    was_training = model.training
    model.eval()
    for _ in range(new_tokens):
        logits = model(idx[:, -model.cfg.context_length :])[:, -1, :].float()
        if not torch.isfinite(logits).all():  # weights on their way to diverging: the sample says so, the trial goes on
            model.train(was_training)
            return encoding.decode(idx[0].tolist()) + " [sampling stopped: the model's logits are non-finite]"
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits / temperature, dim=-1)
        idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)], dim=1)
    model.train(was_training)
    return encoding.decode(idx[0].tolist())
