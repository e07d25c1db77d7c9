"""GPT-style decoder of the paper (§3.2): pre-LayerNorm, GeLU MLP, untied input/output embeddings.

Dropout sits on the attention and MLP outputs just before each residual add, never on the
embeddings. Linear layers are plain `nn.Linear` with stable names so the INT8 evaluator and the
diagnostics can find them: `blocks.{i}.attn.qkv`, `blocks.{i}.attn.out`, `blocks.{i}.mlp.fc_in`,
`blocks.{i}.mlp.fc_out`, and `lm_head`. Precision is not the model's business: the policy in
`rayq.precision` wraps the forward (autocast or emulated rounding).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from rayq.schema import ModelConfig

BLOCK_LINEARS = ("attn.qkv", "attn.out", "mlp.fc_in", "mlp.fc_out")


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, dropout: float):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.dropout(self.out(y))  # dropout on the attention output, before the residual add


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dropout: float):
        super().__init__()
        self.fc_in = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=cfg.bias)
        self.fc_out = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc_out(F.gelu(self.fc_in(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, dropout: float):
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = Attention(cfg, dropout)
        self.ln_mlp = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, dropout: float = 0.0):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, dropout) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)  # untied from tok_emb
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                # GPT-2: residual projections scaled so the residual stream's variance stays O(1)
                scale = 1 / math.sqrt(2 * self.cfg.n_layer) if name.endswith(("attn.out.weight", "mlp.fc_out.weight")) else 1.0
                nn.init.normal_(p, 0.0, std * scale)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:  # LayerNorm gains
                nn.init.ones_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab)."""
        T = idx.shape[1]
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence length {T} exceeds model.seq_len={self.cfg.seq_len}")
        pos = torch.arange(T, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)  # (B, T, C); no dropout on embeddings (paper §3.2)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def param_groups(model: nn.Module, weight_decay: float, decay_norm_gains: bool = False) -> list[dict]:
    """AdamW groups: weight decay on >=2-D weights (matrices, embeddings) and, with
    `decay_norm_gains`, on the LayerNorm gains too; never on biases."""
    gains = {id(m.weight) for m in model.modules() if isinstance(m, nn.LayerNorm) and m.weight is not None}
    params = [p for p in model.parameters() if p.requires_grad]
    decayed = [p for p in params if p.dim() >= 2 or (decay_norm_gains and id(p) in gains)]
    chosen = {id(p) for p in decayed}
    return [{"params": decayed, "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in chosen], "weight_decay": 0.0}]


def count_parameters(cfg: ModelConfig) -> int:
    """Parameter count without allocating memory (meta device), for presets up to 52B."""
    with torch.device("meta"):
        model = GPT(cfg)
    return sum(p.numel() for p in model.parameters())
