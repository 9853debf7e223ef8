"""How fast a preset's MoE layer could be on this machine: its parts, each at the cheapest this
machine runs it, against the layer as it runs; then what that means for training tokens/s
relative to the dense model (issue 16's targets: at least 0.85 on `default`, 0.7 on `tiny`).

    python scripts/layer_floor.py [--preset default] [--repeats 9]

Everything is one forward + backward at the preset's step (`default`: 16 x 128 = 2,048 tokens,
d = 128; `tiny`: 8 x 64 = 512 tokens, d = 64), fp32, interleaved medians (samoe.bench.timing) of
samples of about 20 ms (a short call repeated in a row: interleaved_medians' sample_s),
with the allocator setting of `samoe` verbs. The floor adds up:
- shared:  a shared expert's branch σ(x·w)·ffn(x), as the layer runs it (a dense FFN; 0 without one);
- router:  the router as it runs (logits, softmax, top-k, gates, load-balance and z losses, and
           capacity where the preset has one); printed beside it, and in a second floor, the
           router without its losses, capacity and statistics (logits, softmax, top-k and the
           gates' gather: router_min);
- gemms:   the experts' six GEMMs on equal shares of the T·k routed rows, each pass one
           torch.bmm over the experts (samoe.bench.layers.gemm_floor, batched): no padding, no
           routing; the per-expert GEMMs' time (as the layer runs them) is printed beside it;
- rows:    the least row traffic a top-k dispatch makes: gather x's rows, scale by the gates,
           add back (forward), and the backward's gather, two scalings with the gates' sum and
           add back, on preallocated tensors;
- act:     gelu and its backward over the [T·k, h] hidden rows.
The dense model's FFN is timed beside them, and the training steps of the dense and the MoE
model. With L MoE layers, a layer saved s ms saves L·s ms a step, so the step ratio at the floor
is dense_step / (dense_step + L·(floor − dense_ffn)), optimistic (the MoE model's larger
optimiser step is left out).
"""

import argparse
import json

import torch

from samoe.bench.layers import gemm_floor
from samoe.config import expert_hidden, ffn_hidden, router_top_k
from samoe.config_load import load_config
from samoe.ffn import FeedForward
from samoe.malloc import keep_freed_memory
from samoe.model.gpt import GPT
from samoe.timing import interleaved_medians
from samoe.train.synthetic import synthetic_step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="default")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    repeats, preset = args.repeats, args.preset
    keep_freed_memory()
    torch.manual_seed(0)
    cfg = load_config(preset=preset, overrides=["model.moe.sharing=private"])
    dense_cfg = load_config(preset=preset, overrides=["model.moe.enabled=false"])
    B, S, d = cfg.train.batch_size, cfg.model.block_size, cfg.model.d_model
    moe = cfg.model.moe
    T, E, k, h = B * S, moe.num_experts, router_top_k(moe), expert_hidden(cfg.model)
    N = T * k
    model = GPT(cfg.model)
    layer = model.moe_layers()[0]
    dense = FeedForward(d, ffn_hidden(dense_cfg.model), "gelu", cfg.model.n_layers)
    x = torch.randn(B, S, d, requires_grad=True)
    flat = torch.randn(T, d, requires_grad=True)
    ids = torch.zeros(B, S, dtype=torch.long)

    def clear(*modules):
        for p in (x, flat, *(q for m in modules for q in m.parameters())):
            p.grad = None

    def moe_layer():
        y, aux = layer(x, ids)
        (y.sum() + sum(aux.values())).backward()
        clear(model)

    def dense_ffn():
        dense(x).sum().backward()
        clear(dense)

    def shared():
        if layer.residual is not None:
            (torch.sigmoid(layer.residual_coef(x)) * layer.residual(x)).sum().backward()
            clear(model)

    def router():
        r = layer.router(flat)
        (r.gate.sum() + sum(r.aux.values())).backward()
        clear(model)

    w_router = layer.router.weight

    def router_min():
        probs = (flat @ w_router.t()).softmax(-1)
        probs.gather(1, probs.topk(k, dim=-1).indices).sum().backward()
        clear(model)

    token = torch.randint(0, T, (N,)).sort().values
    gate, rows_in = torch.rand(N), torch.randn(N, d)
    gy = torch.randn(T, d)

    def rows():
        xs = flat.detach().index_select(0, token)  # forward: gather, scale, add back
        torch.zeros(T, d).index_add_(0, token, rows_in * gate.unsqueeze(1))
        g = gy.index_select(0, token)  # backward: gather, scale (∂y), gate gradient, add back
        _ = g * gate.unsqueeze(1), (g * rows_in).sum(1)
        torch.zeros(T, d).index_add_(0, token, xs)

    hidden = torch.randn(N, h)

    def act():
        torch.ops.aten.gelu_backward(torch.nn.functional.gelu(hidden), hidden)

    cases = {"moe_layer": moe_layer, "dense_ffn": dense_ffn, "shared": shared, "router": router,
             "router_min": router_min,
             "gemms": gemm_floor(T, d, h, E, k, batched=True),
             "gemms_per_expert": gemm_floor(T, d, h, E, k), "rows": rows, "act": act,
             "dense_step": synthetic_step(dense_cfg), "moe_step": synthetic_step(cfg)}
    t = {name: s * 1e3 for name, s in interleaved_medians(cases, repeats, sample_s=0.02).items()}
    floor = t["shared"] + t["router"] + t["gemms"] + t["rows"] + t["act"]
    L = sum(1 for _ in model.moe_layers())
    out = {name: round(ms, 2) for name, ms in t.items()}
    def step_ratio(layer_ms: float) -> float:
        return round(t["dense_step"] / (t["dense_step"] + L * (layer_ms - t["dense_ffn"])), 3)
    out.update(floor_layer=round(floor, 2), layers=L, moe_vs_dense_measured=round(t["dense_step"] / t["moe_step"], 3),
               moe_vs_dense_from_layer=step_ratio(t["moe_layer"]), moe_vs_dense_at_floor=step_ratio(floor),
               moe_vs_dense_at_floor_router_min=step_ratio(floor - t["router"] + t["router_min"]))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
