"""A samoe model for Hugging Face transformers (remote code written by samoe, self-contained).

`samoe export` copies this file into the exported directory; it imports only torch and
transformers. It computes what samoe's GPT computes in evaluation mode (dropless routing):

    x_0 = wte(ids) (+ wpe(pos))                        learned or rotary positions
    h_i = x_i + attn_i(N(x_i)),  x_{i+1} = h_i + ffn_i(N(h_i))       N: LayerNorm or RMSNorm
    logits = N(x_L) · lm_headᵀ                          (lm_head tied to wte unless untied)

An MoE FFN routes each token t to slots (expert e, gate g) and sums g · FFN_e(x_t), with
FFN_e(x) = act(x·W1[e] + b1[e])·W2[e] + b2[e] (swiglu: act(u) = silu(u[:f]) · u[f:]).
Routers (fp32 logits x·W_rᵀ, probabilities p = softmax):
    switch / gshard / topk   the k best of p (+ selection bias), gates renormalised when k > 1
    base                     argmax of the logits, gate sigmoid(logit)
    hash                     the expert table[token id], gate 1
    expert_choice            each expert takes its C = min(T, max(min_capacity, ceil(cf·T·k/E)))
                             most probable tokens of the forward, gate p; not causal, so this
                             model runs without a KV cache and every forward sees the whole text
Experts are a layer's own (`private`), the shared bank (`shared`) or SaMoE's pool:
    W1_l[e] = Σ_k c_l[e, k] · P1[k, e],   c_l = softmax(a_l / τ)        (likewise b1, W2, b2)
PR-MoE residual: y = p0·moe + p1·ffn, (p0, p1) = softmax(x·W_c + b_c); or y = moe + σ(x·w_c)·ffn.
Tensor names are samoe's, under `model.`; `router_logits` holds each MoE layer's [T, E] logits.
"""

import math

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .configuration_samoe import SamoeConfig

try:  # transformers >= 5: initialisers that leave loaded tensors alone
    from transformers import initialization as init
except ImportError:  # pragma: no cover
    from torch.nn import init

_CACHE_FIELD = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
_TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
_TOPK_ROUTERS = ("switch", "gshard", "topk")


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + ε) · g in fp32, cast back."""

    def __init__(self, d, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(s):
    if s["norm"] == "rmsnorm":
        return RMSNorm(s["d_model"], s["norm_eps"])
    return nn.LayerNorm(s["d_model"], eps=s["norm_eps"], bias=s["bias"])


def activate(h, activation):
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)


def rotary(positions, head_dim, base):
    """cos, sin [B, 1, S, head_dim/2] for positions [B, S]."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float().unsqueeze(-1) * inv_freq
    return angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)


def apply_rotary(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, s, layer_idx):
        super().__init__()
        self.n_heads, self.layer_idx = s["n_heads"], layer_idx
        self.qkv = nn.Linear(s["d_model"], 3 * s["d_model"], bias=s["bias"])
        self.proj = nn.Linear(s["d_model"], s["d_model"], bias=s["bias"])

    def forward(self, x, rot, cache, mask):
        B, S, d = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        if rot is not None:
            q, k = apply_rotary(q, *rot), apply_rotary(k, *rot)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, S, d))


class FeedForward(nn.Module):
    def __init__(self, s, hidden):
        super().__init__()
        self.activation = s["activation"]
        self.fc1 = nn.Linear(s["d_model"], 2 * hidden if self.activation == "swiglu" else hidden, bias=s["bias"])
        self.fc2 = nn.Linear(hidden, s["d_model"], bias=s["bias"])

    def forward(self, x):
        return self.fc2(activate(self.fc1(x), self.activation))


class ExpertWeights(nn.Module):
    """W1 [*lead, E, d, h], b1 [*lead, E, h], W2 [*lead, E, f, d], b2 [*lead, E, d] (no biases when bias = false)."""

    def __init__(self, s, lead, num_experts):
        super().__init__()
        d, f = s["d_model"], s["expert_hidden"]
        h = 2 * f if s["activation"] == "swiglu" else f
        self.w1 = nn.Parameter(torch.empty(*lead, num_experts, d, h))
        self.w2 = nn.Parameter(torch.empty(*lead, num_experts, f, d))
        self.b1 = nn.Parameter(torch.zeros(*lead, num_experts, h)) if s["bias"] else None
        self.b2 = nn.Parameter(torch.zeros(*lead, num_experts, d)) if s["bias"] else None

    def tensors(self):
        return self.w1, self.b1, self.w2, self.b2


class PoolCoefficients(nn.Module):
    """A SaMoE layer's coefficient logits a_l ([K] or [E, K]); c_l = softmax(a_l / τ)."""

    def __init__(self, s, num_experts):
        super().__init__()
        pool = s["moe"]["pool"]
        self.temperature = pool["temperature"]
        shape = (pool["size"],) if pool["granularity"] == "layer" else (num_experts, pool["size"])
        if pool["freeze"]:
            self.register_buffer("coef_logits", torch.zeros(shape))
        else:
            self.coef_logits = nn.Parameter(torch.zeros(shape))

    def coefficients(self):
        return torch.softmax(self.coef_logits / self.temperature, dim=-1)


class Router(nn.Module):
    def __init__(self, s, num_experts):
        super().__init__()
        moe = s["moe"]
        self.kind, self.k, self.num_experts = moe["router"], moe["top_k"], num_experts
        self.aux_free_bias = moe["aux_free_bias"]
        self.capacity_factor, self.min_capacity = moe["capacity_factor"], moe["min_capacity"]
        if self.kind == "hash":
            self.register_buffer("table", torch.zeros(s["vocab_size"], dtype=torch.long))
        else:
            self.weight = nn.Parameter(torch.empty(num_experts, s["d_model"]))
        if self.kind in _TOPK_ROUTERS:
            self.register_buffer("selection_bias", torch.zeros(num_experts))

    def forward(self, x, token_ids):
        """x [T, d], token ids [T] -> (token [N], expert [N], gate [N] of the kept slots, logits [T, E])."""
        T, E = x.shape[0], self.num_experts
        if self.kind == "hash":
            expert = self.table[token_ids]
            logits = torch.full((T, E), float("-inf"), device=x.device).scatter_(1, expert[:, None], 0.0)
            return torch.arange(T, device=x.device), expert, torch.ones(T, device=x.device), logits
        with torch.autocast(x.device.type, enabled=False):
            logits = x.float() @ self.weight.float().t()
        if self.kind == "base":
            expert = logits.argmax(dim=-1)
            return torch.arange(T, device=x.device), expert, torch.sigmoid(logits.gather(1, expert[:, None]))[:, 0], logits
        probs = logits.softmax(dim=-1)
        if self.kind == "expert_choice":
            cap = min(T, max(self.min_capacity, math.ceil(self.capacity_factor * T * self.k / E)))
            taken = probs.t().topk(cap, dim=1).indices  # [E, C]
            keep = torch.zeros_like(probs, dtype=torch.bool)
            keep[taken, torch.arange(E, device=x.device).unsqueeze(1)] = True
            token, expert = keep.nonzero(as_tuple=True)
            return token, expert, probs[token, expert], logits
        scores = probs + self.selection_bias if self.aux_free_bias else probs
        expert = scores.topk(self.k, dim=-1).indices  # [T, k]
        gate = probs.gather(1, expert)
        if self.k > 1:
            gate = gate / gate.sum(dim=-1, keepdim=True)
        token = torch.arange(T, device=x.device).unsqueeze(1).expand(T, self.k)
        return token.reshape(-1), expert.reshape(-1), gate.reshape(-1), logits


class MoEFeedForward(nn.Module):
    def __init__(self, s, num_experts):
        super().__init__()
        moe = s["moe"]
        self.sharing, self.activation, self.num_experts = moe["sharing"], s["activation"], num_experts
        self.router = Router(s, num_experts)
        if self.sharing == "private":
            self.experts = ExpertWeights(s, (), num_experts)
        elif self.sharing == "pool":
            self.experts = PoolCoefficients(s, num_experts)
        self.residual = self.residual_coef = None
        self.residual_gate = moe["residual_gate"]
        if moe["residual"]:
            self.residual = FeedForward(s, moe.get("residual_hidden") or s["ffn_hidden"])  # older exports: model width
            self.residual_coef = nn.Linear(s["d_model"], 2 if self.residual_gate == "softmax" else 1, bias=s["bias"])

    def expert_tensors(self, shared, e):
        """(W1, b1, W2, b2) of expert e: the layer's own, the bank's, or combined from the pool."""
        if self.sharing == "private":
            return tuple(None if w is None else w[e] for w in self.experts.tensors())
        if self.sharing == "shared":
            return tuple(None if w is None else w[e] for w in shared.tensors())
        c = self.experts.coefficients()
        c = c if c.dim() == 1 else c[e]
        return tuple(None if w is None else torch.einsum("k,k...->...", c.to(w.dtype), w[:, e]) for w in shared.tensors())

    def forward(self, x, token_ids, shared):
        B, S, d = x.shape
        flat = x.reshape(B * S, d)
        token, expert, gate, logits = self.router(flat, token_ids.reshape(-1))
        y = torch.zeros_like(flat)
        for e in range(self.num_experts):
            sel = expert == e
            if not bool(sel.any()):
                continue
            rows = token[sel]
            w1, b1, w2, b2 = self.expert_tensors(shared, e)
            h = flat[rows] @ w1
            h = h + b1 if b1 is not None else h
            out = activate(h, self.activation) @ w2
            out = out + b2 if b2 is not None else out
            y.index_add_(0, rows, out * gate[sel].unsqueeze(1).to(out.dtype))
        y = y.view(B, S, d)
        if self.residual is not None and self.residual_gate == "sigmoid":
            y = y + torch.sigmoid(self.residual_coef(x)) * self.residual(x)
        elif self.residual is not None:
            p = self.residual_coef(x).softmax(dim=-1)
            y = y * p[..., :1] + self.residual(x) * p[..., 1:]
        return y, logits


class Block(nn.Module):
    def __init__(self, s, i):
        super().__init__()
        self.ln_1, self.ln_2 = make_norm(s), make_norm(s)
        self.attn = Attention(s, i)
        if i in s["moe_layers"]:
            self.ffn = MoEFeedForward(s, s["experts_per_layer"][s["moe_layers"].index(i)])
        else:
            self.ffn = FeedForward(s, s["ffn_hidden"])

    def forward(self, x, token_ids, rot, cache, mask, shared):
        x = x + self.attn(self.ln_1(x), rot, cache, mask)
        if isinstance(self.ffn, MoEFeedForward):
            y, logits = self.ffn(self.ln_2(x), token_ids, shared)
            return x + y, logits
        return x + self.ffn(self.ln_2(x)), None


class SamoePreTrainedModel(PreTrainedModel):
    config_class = SamoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _supports_cache_class = True
    _supports_static_cache = False

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, ExpertWeights):
            init.normal_(module.w1, mean=0.0, std=0.02)
            init.normal_(module.w2, mean=0.0, std=0.02)
        elif isinstance(module, Router) and module.kind != "hash":
            init.normal_(module.weight, mean=0.0, std=0.02)


class SamoeModel(SamoePreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        s = config.samoe
        self.s = s
        self.wte = nn.Embedding(s["vocab_size"], s["d_model"])
        self.wpe = nn.Embedding(s["block_size"], s["d_model"]) if s["positions"] == "learned" else None
        sharing = s["moe"]["sharing"]
        self.expert_pool = self.expert_bank = None
        if s["moe_layers"] and sharing == "pool":
            self.expert_pool = ExpertWeights(s, (s["moe"]["pool"]["size"],), max(s["experts_per_layer"]))
        elif s["moe_layers"] and sharing == "shared":
            self.expert_bank = ExpertWeights(s, (), s["moe"]["shared_experts"])
        self.blocks = nn.ModuleList([Block(s, i) for i in range(s["n_layers"])])
        self.ln_f = make_norm(s)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        """input_ids [B, S] -> (hidden states [B, S, d], router logits per MoE layer)."""
        B, S = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = (past + torch.arange(S, device=input_ids.device)).unsqueeze(0).expand(B, S)
        x = self.wte(input_ids)
        if self.wpe is not None:
            x = x + self.wpe(position_ids)
        rot = None
        if self.s["positions"] == "rotary":
            rot = rotary(position_ids, self.s["d_model"] // self.s["n_heads"], self.s["rope_base"])
        mask = None
        padded = attention_mask is not None and not bool(attention_mask.bool().all())
        if past or padded:
            qpos = past + torch.arange(S, device=x.device)
            kpos = torch.arange(past + S, device=x.device)
            allowed = (kpos[None, :] <= qpos[:, None]).unsqueeze(0)  # [1, S, past + S]
            if padded:
                allowed = allowed & attention_mask[:, None, : past + S].bool()
            allowed = allowed | (kpos[None, :] == qpos[:, None]).unsqueeze(0)  # a padded query sees itself
            mask = allowed.unsqueeze(1)
        shared = self.expert_pool if self.expert_pool is not None else self.expert_bank
        router_logits = []
        for block in self.blocks:
            x, logits = block(x, input_ids, rot, cache, mask, shared)
            if logits is not None:
                router_logits.append(logits)
        return self.ln_f(x), tuple(router_logits)


class SamoeForCausalLM(SamoePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.wte.weight"} if _TRANSFORMERS_5 else ["lm_head.weight"]

    def __init__(self, config):
        super().__init__(config)
        self.model = SamoeModel(config)
        self.lm_head = nn.Linear(config.samoe["d_model"], config.samoe["vocab_size"], bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.wte

    def set_input_embeddings(self, value):
        self.model.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_router_logits=None, return_dict=None,
                cache=None, logits_to_keep=0, **kwargs):
        if input_ids is None:
            raise ValueError("samoe models take input_ids (hash routing and the routers need the token ids)")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.config.samoe["moe"]["router"] == "expert_choice" and self.config.samoe["moe_layers"]:
            use_cache, cache = False, None  # not causal: every forward must see the whole text
        if use_cache and cache is None:
            cache = DynamicCache()
        elif isinstance(cache, (tuple, list)):
            cache = DynamicCache.from_legacy_cache(cache)
        elif not use_cache:
            cache = None
        hidden, router_logits = self.model(input_ids, attention_mask, position_ids, cache)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        aux_loss = None
        want_router = getattr(self.config, "output_router_logits", False) if output_router_logits is None else output_router_logits
        if want_router and router_logits:  # load balance E · Σ_e f_e · P_e, averaged over the MoE layers
            k = self.config.samoe["moe"]["top_k"]
            terms = []
            for lg in router_logits:
                p = lg.float().softmax(-1)
                f = torch.bincount(p.topk(k, -1).indices.reshape(-1), minlength=p.shape[-1]).float() / (p.shape[0] * k)
                terms.append(p.shape[-1] * (f * p.mean(0)).sum())
            aux_loss = torch.stack(terms).mean()
        out = MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=logits,
                                        router_logits=router_logits if want_router else None,
                                        **{_CACHE_FIELD: cache if use_cache else None})
        return out if return_dict is not False else out.to_tuple()
