"""Typed configs with working defaults, the router table and the values derived from a config.

A run is described by one `Config`: `model` (the network, with its `moe` part and the SaMoE
`pool` inside that), `train` (optimisation and logging) and `data`. Every field has a default
that works; presets in `samoe/configs/*.yaml` change only what they need. Validation (a
ConfigError naming the field and the values it allows), YAML load/save, presets and
`key.path=value` overrides are in samoe.config_load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args


@dataclass(frozen=True)
class RouterKind:
    """What a router implies, read wherever it matters (validation, FLOPs, zero-shot, export); the
    classes are built from the same names by moe/routers.py's build_router (config sits below moe/,
    so the table of properties lives here)."""

    k: int | None  # slots per token, or None: model.moe.top_k
    token_choice: bool  # each token picks its experts (else each expert picks its tokens)
    learned: bool  # router weights x · W_r (FLOPs; upcycling starts them fresh)
    causal: bool  # a token's experts do not depend on later tokens (cached generation, batched scoring)
    softmax_top_k: bool  # top-k of a softmax (aux-loss-free bias, NormRouter, Mixtral/Qwen2-MoE export)
    balanced: bool  # balanced by construction: no load-balancing loss


ROUTER_KINDS: dict[str, RouterKind] = {  # BASE balances in training, routes greedily (causally) at inference
    #                            k     token_choice learned causal softmax_top_k balanced
    "switch": RouterKind(1, True, True, True, True, False),
    "gshard": RouterKind(2, True, True, True, True, False),
    "topk": RouterKind(None, True, True, True, True, False),
    "base": RouterKind(1, True, True, True, False, True),
    "hash": RouterKind(1, True, False, True, False, True),
    "expert_choice": RouterKind(None, False, True, False, False, True),
}
# The choice fields' types: their values, checked when a config is read (config_load) and validated.
RouterName = Literal["switch", "gshard", "topk", "base", "hash", "expert_choice"]
Sharing = Literal["private", "pool", "shared"]
PoolInit = Literal["uniform", "noisy", "cycle", "sequence"]
Granularity = Literal["layer", "expert"]
Activation = Literal["gelu", "swiglu"]
EvalWindows = Literal["first", "spread"]
Sampling = Literal["random", "epochs"]
Positions = Literal["learned", "rotary"]
Norm = Literal["layernorm", "rmsnorm"]
ResidualGate = Literal["softmax", "sigmoid"]
Balance = Literal["layer", "pool"]
HashMap = Literal["balanced", "random"]
TokenizerKind = Literal["bpe", "byte"]
DType = Literal["float32", "bfloat16"]
Device = Literal["auto", "cpu", "cuda"]
LoggerName = Literal["jsonl", "tensorboard", "wandb"]
Corpus = Literal["stdlib", "stdlib-docs"]  # samoe.data.corpus.BUILTIN_CORPORA

ROUTERS, SHARING, POOL_INITS, GRANULARITIES = (get_args(t) for t in (RouterName, Sharing, PoolInit, Granularity))
ACTIVATIONS, EVAL_WINDOWS, SAMPLINGS, POSITIONS = (get_args(t) for t in (Activation, EvalWindows, Sampling, Positions))
NORMS, RESIDUAL_GATES, BALANCES, HASH_MAPS = (get_args(t) for t in (Norm, ResidualGate, Balance, HashMap))
TOKENIZERS, DTYPES, DEVICES = (get_args(t) for t in (TokenizerKind, DType, Device))
LOGGERS, CORPORA = get_args(LoggerName), get_args(Corpus)
assert set(ROUTERS) == set(ROUTER_KINDS), "every router name has its properties in ROUTER_KINDS"



@dataclass
class PoolConfig:
    """SaMoE's global pool: K expert layers shared by every MoE layer (sharing = "pool")."""

    size: int = 2  # K, number of global expert layers
    granularity: Granularity = "layer"  # "layer": a_l [K]; "expert": a_l [E, K]
    temperature: float = 1.0  # τ in c_l = softmax(a_l / τ)
    init: PoolInit = "noisy"  # uniform | noisy | cycle | sequence (one-hot, see moe/experts.py)
    init_noise: float = 0.1  # std of the noise added to uniform logits by init = "noisy"
    freeze: bool = False  # keep the coefficients fixed (frozen one-hot = hard layer sharing)
    lr_scale: float = 1.0  # learning rate of the coefficient logits, as a multiple of train.lr's schedule
    # a learned vector e_l [d] per layer added to the pooled experts' input, x + e_l (MoRE's depth
    # embedding): layers that mix the same experts can still feed them differently; zeros at start
    depth_embedding: bool = False


@dataclass
class MoEConfig:
    """Mixture-of-Experts FFN layers. `enabled = false` gives the dense model."""

    enabled: bool = True
    every: int = 2  # an MoE FFN in every `every`-th block (blocks every-1, 2*every-1, ...)
    num_experts: int = 8  # E per MoE layer
    experts_per_layer: list[int] | None = None  # "pyramid": E for each MoE layer
    router: RouterName = "switch"  # switch | gshard | topk | base | hash | expert_choice
    top_k: int = 1  # used by topk and expert_choice; switch, base, hash use 1, gshard 2
    capacity_factor: float = 1.25  # C = max(min_capacity, ceil(cf * T * k / E))
    eval_capacity_factor: float = 2.0  # applies only when eval_dropless = false
    eval_dropless: bool = True  # evaluation (eval mode) routes every token: quality is judged without drops
    min_capacity: int = 4
    dropless: bool = False  # no capacity, no dropped tokens (token-choice routers)
    ffn_hidden: int | None = None  # expert hidden width f; default: model.ffn_hidden
    sharing: Sharing = "pool"  # private | pool | shared
    shared_experts: int = 16  # M, size of the bank for sharing = "shared"
    residual: bool = False  # PR-MoE: mix a dense FFN branch with the MoE branch
    residual_hidden: int | None = None  # the dense branch's hidden width; default: model.ffn_hidden
    # softmax: y = p0·moe + p1·ffn (PR-MoE); sigmoid: y = moe + σ(x·w)·ffn (Qwen2-MoE shared expert)
    residual_gate: ResidualGate = "softmax"
    load_balance_weight: float = 0.01
    # "layer": each layer balances its own experts, mean over layers of E·Σ_e f_e·P_e; "pool" (UniPool,
    # sharing = "shared"): f and P averaged over the layers first, so the bank is balanced as a whole
    balance: Balance = "layer"
    # UniPool's NormRouter (gshard, or topk with top_k > 1): s = relu(γ · cos(x, w_e)), top-k on s, gates
    # s / Σ_chosen s; γ a learned scale. Off: softmax router
    norm_router: bool = False
    z_loss_weight: float = 0.001
    aux_free_bias: bool = False  # per-expert selection bias updated from load (no aux loss)
    bias_update_rate: float = 0.001
    jitter: float = 0.0  # multiplicative router-input noise U(1-j, 1+j) in training
    random_routing: bool = False  # gshard: keep the 2nd expert with probability min(1, 2*g2)
    hash_map: HashMap = "balanced"  # hash router: balanced by token frequency, or seeded random
    pool: PoolConfig = field(default_factory=PoolConfig)


@dataclass
class ModelConfig:
    vocab_size: int = 2048
    block_size: int = 128  # context length
    n_layers: int = 4
    n_heads: int = 4
    d_model: int = 128
    ffn_hidden: int | None = None  # f; default 4 * d_model
    activation: Activation = "gelu"  # gelu | swiglu
    positions: Positions = "learned"  # learned | rotary
    rope_base: float = 10000.0  # rotary: θ_i = rope_base^(-2i/head_dim)
    norm: Norm = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5  # ε of the norms
    bias: bool = True  # biases in attention, FFNs, experts, PR-MoE mixing and LayerNorm
    dropout: float = 0.0
    tie_embeddings: bool = True
    moe: MoEConfig = field(default_factory=MoEConfig)


@dataclass
class TrainConfig:
    max_steps: int = 600
    batch_size: int = 16  # sequences per optimiser step (the global batch)
    # sequences per forward (and per routing group); null: the whole per-process batch
    micro_batch_size: int | None = None
    ep: int = 1  # expert-parallel group size: each process holds E/ep experts of every layer (divides process count)
    fsdp: bool = False  # shard every weight not left to expert parallelism over all processes (FSDP2)
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: DType = "float32"  # float32 | bfloat16 (autocast)
    device: Device = "auto"  # auto | cpu | cuda
    seed: int = 1337
    log_every: int = 10
    eval_every: int = 200
    eval_tokens: int = 65536  # validation tokens scored per evaluation
    # which windows of the validation split those tokens are: "first" (the split's first
    # eval_tokens: on a mixture, its first documents only) or "spread" (evenly spaced over the whole split)
    eval_windows: EvalWindows = "first"
    ckpt_every: int = 200
    # where the logged rows go besides metrics.jsonl (always written): tensorboard (RUN_DIR/tb),
    # wandb (WANDB_MODE=offline works without a network); both need `pip install -e ".[track]"`
    loggers: list[LoggerName] = field(default_factory=lambda: ["jsonl"])
    wandb_project: str = "samoe"
    wandb_group: str | None = None  # `samoe study run --loggers` sets it to the study's name


@dataclass
class DataConfig:
    path: str | None = None  # None: the built-in corpus named by `corpus`
    corpus: Corpus = "stdlib"  # built-in corpus: stdlib (source files, 31 MB) | stdlib-docs (docstrings, 2.1 MB)
    tokenizer: TokenizerKind = "bpe"  # bpe | byte
    val_fraction: float = 0.05
    # how training windows are drawn: "random" (a uniform random start for every window, so a run
    # reading a fraction r of its corpus meets again about 1 - (1 - e^-r) / r of its tokens) or
    # "epochs" (every epoch a shuffled set of non-overlapping windows: no text repeats within one)
    sampling: Sampling = "random"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


# --------------------------------------------------------------------------- derived values


def ffn_hidden(m: ModelConfig) -> int:
    return m.ffn_hidden or 4 * m.d_model


def expert_hidden(m: ModelConfig) -> int:
    return m.moe.ffn_hidden or ffn_hidden(m)


def residual_hidden(m: ModelConfig) -> int:
    """Hidden width of the dense branch beside the experts (model.moe.residual)."""
    return m.moe.residual_hidden or ffn_hidden(m)


def fc1_width(activation: str, hidden: int) -> int:
    """Output width of an FFN's first projection: swiglu's gate and value halves, else `hidden`."""
    return 2 * hidden if activation == "swiglu" else hidden


def micro_batch(t: TrainConfig, world: int = 1) -> int:
    """Sequences per forward on one of `world` processes: train.micro_batch_size, else the whole
    per-process batch."""
    return t.micro_batch_size or t.batch_size // world


def moe_layer_ids(m: ModelConfig) -> list[int]:
    """Block indices holding an MoE FFN: every `every`-th block, the first at every-1."""
    if not m.moe.enabled:
        return []
    return [i for i in range(m.n_layers) if (i + 1) % m.moe.every == 0]


def experts_per_layer(m: ModelConfig) -> list[int]:
    """E for each MoE layer, in order (the "pyramid" list, or num_experts everywhere)."""
    moe = m.moe
    if moe.sharing == "shared":
        return [moe.shared_experts] * len(moe_layer_ids(m))
    return list(moe.experts_per_layer or [moe.num_experts] * len(moe_layer_ids(m)))


def router_top_k(moe: MoEConfig) -> int:
    """Experts per token: switch/base/hash route to 1, gshard to 2, topk/expert_choice: top_k."""
    return ROUTER_KINDS[moe.router].k or moe.top_k
