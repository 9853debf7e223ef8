"""A GPT-style decoder whose FFN blocks may be Mixture-of-Experts layers.

    x_0 = wte(idx) (+ wpe(pos) for learned positions)
    x_{i+1} = h_i + ffn_i(N(h_i)),   h_i = x_i + attn_i(N(x_i))        (pre-norm)
    logits = N(x_L) · wteᵀ                                             (tied embeddings)

N is LayerNorm or RMSNorm (`model.norm`); `model.bias = false` drops every bias (attention,
FFNs, experts, PR-MoE mixing, LayerNorm): with rmsnorm, rotary and swiglu that is the
LLaMA / Mixtral / Qwen2-MoE backbone, which hf/stock.py exports to those formats.

ffn_i is a dense FeedForward, or an MoEFeedForward in every `moe.every`-th block. With
sharing = "pool" the model owns SaMoE's global pool (P1 [K, E, d, h] ...) and each MoE layer
holds only its router and coefficient logits; with sharing = "shared" the model owns one bank
of M experts that every layer routes into.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from samoe.config import ModelConfig, expert_hidden, experts_per_layer, ffn_hidden, moe_layer_ids, residual_hidden
from samoe.ffn import FeedForward, make_norm
from samoe.moe.dispatch import LocalDispatcher
from samoe.moe.experts import ExpertWeights, PoolMixture, SharedBank
from samoe.moe.layer import MoEFeedForward
from samoe.moe.routers import BALANCE_TERMS, HashRouter, TopKRouter, build_router, pool_balance_loss


def rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos, sin [S, head_dim/2] for rotary position embeddings (RoFormer)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(seq_len).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[..., :h/2], x[..., h/2:]) of x [B, H, S, h] by position-dependent angles."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        nn.init.normal_(self.qkv.weight, std=0.02)
        nn.init.normal_(self.proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))
        if cfg.bias:
            nn.init.zeros_(self.qkv.bias)
            nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor] | None) -> Tensor:
        B, S, d = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        if rotary is not None:
            cos, sin = (t[:S] for t in rotary)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, S, d))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ffn: nn.Module):
        super().__init__()
        self.ln_1 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.ffn = ffn

    def forward(self, x: Tensor, token_ids: Tensor, rotary) -> tuple[Tensor, dict[str, Tensor]]:
        x = x + self.attn(self.ln_1(x), rotary)
        if isinstance(self.ffn, MoEFeedForward):
            y, aux = self.ffn(self.ln_2(x), token_ids)
            return x + y, aux
        return x + self.ffn(self.ln_2(x)), {}


@dataclass
class GPTOutput:
    logits: Tensor  # [B, S, V]
    loss: Tensor | None  # LM cross-entropy (mean over target tokens), when targets are given
    aux: dict[str, Tensor]  # auxiliary losses, each averaged over the MoE layers
    aux_loss: Tensor  # Σ weight · aux, to add to the LM loss in training


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        """The whole model, as one process holds it; parallelism is applied from outside
        (train/distributed.py, parallelize)."""
        super().__init__()
        self.cfg = cfg
        moe = cfg.moe
        d, L = cfg.d_model, cfg.n_layers
        self.wte = nn.Embedding(cfg.vocab_size, d)
        self.wpe = nn.Embedding(cfg.block_size, d) if cfg.positions == "learned" else None
        nn.init.normal_(self.wte.weight, std=0.02)
        if self.wpe is not None:
            nn.init.normal_(self.wpe.weight, std=0.02)
        self.drop = nn.Dropout(cfg.dropout)

        moe_ids, n_experts = moe_layer_ids(cfg), experts_per_layer(cfg)
        f_exp = expert_hidden(cfg)
        self.expert_pool = self.expert_bank = None
        if moe_ids and moe.sharing == "pool":
            self.expert_pool = ExpertWeights((moe.pool.size,), max(n_experts), d, f_exp, cfg.activation, L, cfg.bias)
        elif moe_ids and moe.sharing == "shared":
            self.expert_bank = ExpertWeights((), moe.shared_experts, d, f_exp, cfg.activation, L, cfg.bias)

        blocks = []
        for i in range(L):
            if i in moe_ids:
                pos = moe_ids.index(i)
                blocks.append(Block(cfg, self._moe_ffn(pos, len(moe_ids), n_experts[pos], f_exp)))
            else:
                blocks.append(Block(cfg, FeedForward(d, ffn_hidden(cfg), cfg.activation, L, cfg.dropout, cfg.bias)))
        self.blocks = nn.ModuleList(blocks)
        self.ln_f = make_norm(cfg.norm, d, cfg.norm_eps, cfg.bias)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=0.02)
        if cfg.positions == "rotary":
            cos, sin = rotary_tables(cfg.block_size, d // cfg.n_heads, cfg.rope_base)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)

    def _moe_ffn(self, pos: int, n_moe: int, num_experts: int, hidden: int) -> MoEFeedForward:
        cfg, moe = self.cfg, self.cfg.moe
        if moe.sharing == "pool":
            experts = PoolMixture(self.expert_pool, num_experts, moe.pool, pos, n_moe)
        elif moe.sharing == "shared":
            experts = SharedBank(self.expert_bank)
        else:
            experts = ExpertWeights((), num_experts, cfg.d_model, hidden, cfg.activation, cfg.n_layers, cfg.bias)
        router = build_router(moe, cfg.d_model, num_experts, cfg.vocab_size)
        residual = (FeedForward(cfg.d_model, residual_hidden(cfg), cfg.activation, cfg.n_layers, cfg.dropout, cfg.bias)
                    if moe.residual else None)
        # every expert local; parallelize swaps in the expert-parallel dispatcher
        return MoEFeedForward(router, experts, cfg.activation, residual, LocalDispatcher(), moe.residual_gate, cfg.bias,
                              depth_embedding_dim=cfg.d_model if moe.pool.depth_embedding else 0)

    def moe_layers(self) -> list[MoEFeedForward]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoEFeedForward)]

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> GPTOutput:
        """idx [B, S] token ids (S <= block_size); targets [B, S] (-100 = ignore) or None."""
        B, S = idx.shape
        if S > self.cfg.block_size:
            raise ValueError(f"sequence length {S} exceeds block_size {self.cfg.block_size}")
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(S, device=idx.device))
        x = self.drop(x)
        rotary = (self.rotary_cos, self.rotary_sin) if self.cfg.positions == "rotary" else None
        auxes = []
        for block in self.blocks:
            x, aux = block(x, idx, rotary)
            if aux:
                auxes.append(aux)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        terms = [a.pop(BALANCE_TERMS) for a in auxes if BALANCE_TERMS in a]
        aux = {name: torch.stack([a[name] for a in auxes]).mean() for name in (auxes[0] if auxes else {})}
        if terms:  # balance = "pool": the bank balanced over every layer at once
            aux["load_balance"] = pool_balance_loss(terms)
        moe = self.cfg.moe
        aux_loss = logits.new_zeros((), dtype=torch.float32)
        if aux:
            aux_loss = moe.load_balance_weight * aux["load_balance"] + moe.z_loss_weight * aux["z_loss"]
        return GPTOutput(logits, loss, aux, aux_loss)

    def routing_stats(self) -> dict[str, float]:
        """Routing statistics of the last forward, averaged over MoE layers."""
        stats = [s for s in (layer.routing_stats() for layer in self.moe_layers()) if s]
        if not stats:
            return {}
        return {k: float(torch.stack([s[k] for s in stats if k in s]).mean())
                for k in stats[0]}

    @torch.no_grad()
    def pool_coefficients(self) -> list | None:
        """Every MoE layer's SaMoE coefficients c_l ([K], or [E, K] per expert) as nested lists, or
        None unless sharing = "pool": what summary.json keeps of how the layers use the pool."""
        if self.expert_pool is None:
            return None
        coefficients = [layer.experts.coefficients() for layer in self.moe_layers()]
        # sharded by FSDP2: gathered, so every process must call this
        return [(c.full_tensor() if isinstance(c, DTensor) else c).tolist() for c in coefficients]

    def router_loads(self) -> list[Tensor]:
        """The loads (slots chosen per expert) each auxiliary-loss-free router counted since its
        last bias update: a data-parallel run sums them over processes before the update."""
        return [layer.router.recent_load for layer in self.moe_layers() if isinstance(layer.router, TopKRouter)]

    @torch.no_grad()
    def update_router_biases(self) -> None:
        """Apply the auxiliary-loss-free bias update (after each optimiser step)."""
        for layer in self.moe_layers():
            if isinstance(layer.router, TopKRouter) and self.cfg.moe.aux_free_bias:
                layer.router.update_bias()

    @torch.no_grad()
    def set_token_frequencies(self, counts: Tensor) -> None:
        """Build the frequency-balanced hash routing table from token counts [V]."""
        for layer in self.moe_layers():
            if isinstance(layer.router, HashRouter):
                layer.router.set_token_frequencies(counts)

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Sample continuations of idx [B, S]; temperature 0 means greedy."""
        for _ in range(max_new_tokens):
            context = idx[:, -self.cfg.block_size:]
            logits = self(context).logits[:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
