"""GPT-2 small as laid out in Raschka's book (the seeds' model), readable in one sitting.

Module construction order is part of the contract: PyTorch default initialisation draws weights from
the global RNG in that order, so it fixes which initial weights a seed produces.
"""

import torch
import torch.nn.functional as F
from torch import nn

from harness.config.schema import ModelConfig


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_query = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.qkv_bias)
        self.W_key = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.qkv_bias)
        self.W_value = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = (
            w(x).view(batch, tokens, self.n_head, width // self.n_head).transpose(1, 2)
            for w in (self.W_query, self.W_key, self.W_value)
        )
        dropout = self.dropout if self.training else 0.0
        context = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        return self.out_proj(context.transpose(1, 2).reshape(batch, tokens, width))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model),
            nn.GELU(approximate="tanh"),
            nn.Linear(4 * cfg.d_model, cfg.d_model),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.att = CausalSelfAttention(cfg)
        self.ff = FeedForward(cfg)
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.drop_shortcut = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.d_model)
        self.drop_emb = nn.Dropout(cfg.dropout)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg.n_layer)])
        self.final_norm = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.out_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            # Both matrices were drawn as in the untied model, so every other weight matches it exactly.
            if cfg.tied_init == "head":
                self.tok_emb.weight = self.out_head.weight  # U(±1/√d_model)
            else:
                self.out_head.weight = self.tok_emb.weight  # N(0, 1): initial loss ~460 at gpt2_small

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(positions))
        return self.out_head(self.final_norm(self.trf_blocks(x)))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once

    def flops_per_token(self) -> float:
        """Training matmul FLOPs per token: 6·M + 12·L·d·T (PaLM, appendix B), M = the weights that multiply an
        activation, each once: every Linear's weight, the output head included. The token and position
        embeddings are lookups, not matmuls; a tied matrix multiplies once, as the head. Biases, LayerNorms
        and the softmax are left out. 12·L·d·T is attention's QKᵀ and AV (2·2·T·d forward per layer, ×3 to
        train)."""
        cfg = self.cfg
        weights = {id(m.weight): m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear)}
        return 6 * sum(weights.values()) + 12 * cfg.n_layer * cfg.d_model * cfg.context_length


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
