"""Sparse upcycling (`samoe train --init-from`): experts start as the dense FFN, routers fresh.

With no noise and gates that sum to 1 every MoE layer computes the dense FFN, so the upcycled
model's first forward equals the dense model's."""

import random
from pathlib import Path

import pytest
import torch

from helpers import assert_user_error, make_run, run_cli
from samoe.checkpoint import latest_checkpoint, load_checkpoint
from samoe.config_load import load_config
from samoe.data.tokenizer import load_tokenizer
from samoe.errors import UpcycleError
from samoe.model.gpt import GPT
from samoe.train.upcycle import load_dense_source, upcycle

X = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(3))
DENSE = ["model.moe.enabled=false"]


def _target(overrides: list[str]) -> GPT:
    cfg = load_config(preset="tiny", overrides=["model.vocab_size=257", "data.tokenizer=byte", *overrides])
    torch.manual_seed(1)
    return GPT(cfg.model)


@pytest.mark.parametrize("overrides", [
    ["model.moe.sharing=private", "model.moe.router=topk", "model.moe.top_k=2"],
    ["model.moe.sharing=private", "model.moe.router=gshard", "model.moe.residual=true"],  # p0 + p1 = 1
    ["model.moe.sharing=private", "model.moe.router=hash", "model.moe.experts_per_layer=[2,4]"],
    ["model.moe.router=gshard", "model.moe.pool.init=sequence", "model.moe.pool.freeze=true"],  # K = L_moe = 2
])
def test_upcycled_first_forward_equals_the_dense_model(tmp_path, overrides):
    run, dense = make_run(tmp_path / "dense", DENSE)
    model = _target(overrides)
    upcycle(model, load_dense_source(run))
    with torch.no_grad():
        assert (model.eval()(X).logits - dense(X).logits).abs().max().item() < 1e-5


def test_llama_backbone_and_samoe_hf_source(tmp_path):
    llama = ["model.norm=rmsnorm", "model.bias=false", "model.activation=swiglu", "model.positions=rotary"]
    run, dense = make_run(tmp_path / "dense", DENSE + llama)
    assert run_cli("export", run, "--out", tmp_path / "hf")[0] == 0
    model = _target(llama + ["model.moe.sharing=private", "model.moe.router=topk", "model.moe.top_k=2"])
    upcycle(model, load_dense_source(tmp_path / "hf"))  # from the export, not the run
    with torch.no_grad():
        assert (model.eval()(X).logits - dense(X).logits).abs().max().item() < 1e-5


def test_noise_makes_the_experts_differ(tmp_path):
    run, dense = make_run(tmp_path / "dense", DENSE)
    model = _target(["model.moe.sharing=private", "model.moe.router=topk", "model.moe.top_k=2"])
    upcycle(model, load_dense_source(run), noise=0.1, seed=0)
    w1 = model.blocks[0].ffn.experts.w1.detach()
    base = dense.blocks[0].ffn.fc1.weight.detach().t()
    assert not torch.equal(w1[0], w1[1])
    rel = ((w1 - base).std() / base.std()).item()
    assert 0.05 < rel < 0.2
    assert torch.equal(model.blocks[0].ffn.experts.b1[1], dense.blocks[0].ffn.fc1.bias.detach())  # biases: no noise


def _corpus(path: Path) -> Path:
    rng = random.Random(0)
    words = "the pool of experts routes every token through a small layer".split()
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(60)) for _ in range(40)), encoding="utf-8")
    return path


@pytest.mark.slow
def test_train_init_from_a_dense_run(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMOE_CACHE", str(tmp_path / "cache"))
    run, dense = make_run(tmp_path / "dense", DENSE)
    data = _corpus(tmp_path / "corpus.txt")
    code, out, err = run_cli("train", "--preset", "tiny", "--quiet", "--data", data, "--out", tmp_path / "moe",
                          "--init-from", run, "train.max_steps=1", "train.eval_every=1", "train.ckpt_every=1",
                          "train.eval_tokens=256", "train.batch_size=2", "model.moe.router=gshard")
    assert code == 0, err
    assert (tmp_path / "moe" / "tokenizer.json").read_text() == (run / "tokenizer.json").read_text()
    cfg = load_config(tmp_path / "moe" / "config.yaml")
    assert cfg.model.vocab_size == load_tokenizer(run / "tokenizer.json").vocab_size
    moe = GPT(cfg.model)
    load_checkpoint(latest_checkpoint(tmp_path / "moe"), moe)
    # one optimiser step away from the dense weights, not a fresh initialisation
    delta = (moe.wte.weight - dense.wte.weight).abs().max().item()
    assert 0 < delta < 0.05


@pytest.mark.parametrize("source, overrides, named", [
    (DENSE, ["model.d_model=32"], "model.d_model"),
    (DENSE, ["model.moe.ffn_hidden=128"], "model.moe.ffn_hidden"),
    (DENSE, ["model.moe.residual=true", "model.moe.residual_hidden=128"], "model.moe.residual_hidden"),
    ([], [], "MoE model"),  # an MoE source
])
def test_init_from_that_does_not_fit(tmp_path, monkeypatch, source, overrides, named):
    monkeypatch.setenv("SAMOE_CACHE", str(tmp_path / "cache"))
    run, _ = make_run(tmp_path / "src", source)
    data = _corpus(tmp_path / "corpus.txt")
    result = run_cli("train", "--preset", "tiny", "--quiet", "--data", data, "--out", tmp_path / "new",
                  "--init-from", run, *overrides)
    assert_user_error(result, named, str(run))
    assert not (tmp_path / "new").exists()


def test_init_from_a_directory_that_is_no_model(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli("train", "--preset", "tiny", "--out", tmp_path / "new", "--init-from", tmp_path / "empty")
    assert_user_error(result, "empty")
    assert not (tmp_path / "new").exists()


# ------------------------------------------------- a stock Hugging Face (Llama) dense checkpoint

LLAMA = ["model.norm=rmsnorm", "model.bias=false", "model.activation=swiglu", "model.positions=rotary",
         "model.tie_embeddings=false", "model.rope_base=500.0"]  # the tiny preset's shapes otherwise


def _llama_tokenizer():
    """A Llama-2-style tokenizer made with `tokenizers`: SentencePiece-like BPE with byte fallback,
    <unk> <s> </s>, a post-processor that prepends <s>."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors

    specials = ["<unk>", "<s>", "</s>"]
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("e", "r"), ("▁", "p")]
    chars = sorted(set("▁abcdefghijklmnopqrstuvwxyz.,"))
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)] + chars +
                                        ["".join(m) for m in merges])}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.add_special_tokens(specials)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tk


def _llama_checkpoint(path: Path, **config):
    """A tiny random LlamaForCausalLM (grouped-query attention: 1 key/value head for 2 query
    heads), weights scaled up so every part matters, saved with its tokenizer as
    save_pretrained writes them."""
    transformers = pytest.importorskip("transformers")
    tk = _llama_tokenizer()
    cfg = transformers.LlamaConfig(**{
        "vocab_size": tk.get_vocab_size(), "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, **config})
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in llama.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.15 * torch.randn_like(p))
    llama.save_pretrained(str(path))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(str(path))
    return path, llama


def _llama_ids(text: str, path: Path) -> list[int]:
    """Hugging Face's ids of text, without the BOS its post-processor adds."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path))(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("overrides", [
    ["model.moe.sharing=private", "model.moe.router=topk", "model.moe.top_k=2"],
    ["model.moe.router=gshard", "model.moe.pool.init=sequence", "model.moe.pool.freeze=true"],  # SaMoE, K = L_moe
    ["model.moe.enabled=false"],  # dense
])
def test_llama_checkpoint_first_forward_equals_the_llama_model(tmp_path, overrides):
    path, llama = _llama_checkpoint(tmp_path / "llama")
    src = load_dense_source(path)
    assert src.tokenizer.eot_id == 2 and src.tokenizer.vocab_size == llama.config.vocab_size
    assert src.tokenizer.encode("the pet") == _llama_ids("the pet", path)  # no <s>: documents end with eot
    model = _target(LLAMA + [f"model.vocab_size={src.tokenizer.vocab_size}", *overrides])
    upcycle(model, src)
    x = torch.randint(0, llama.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = model.eval()(x).logits, llama(input_ids=x).logits
    assert theirs.abs().max().item() > 1 and (ours - theirs).abs().max().item() < 1e-5


def test_llama_tokenizer_round_trips_through_a_run_directory(tmp_path):
    path, _ = _llama_checkpoint(tmp_path / "llama")
    tok = load_dense_source(path).tokenizer
    tok.save(tmp_path / "run" / "tokenizer.json")  # as training writes it: with tokenizer_config.json beside
    again = load_tokenizer(tmp_path / "run" / "tokenizer.json")
    text = "the pet, ok. Ü"  # Ü: byte fallback
    assert again.eot_id == tok.eot_id == 2 and again.encode(text) == tok.encode(text) == _llama_ids(text, path)
    assert again.decode(again.encode(text)) == text
    nbytes = again.token_bytes()
    assert nbytes[[0, 1, 2]].tolist() == [0, 0, 0] and nbytes[3 + 0xC3] == 1  # specials; <0xC3>
    # "▁" counts as a space, so a text counts the space the normalizer prepends to it
    assert sum(nbytes[i] for i in again.encode("the pet")) == len(" the pet")


@pytest.mark.parametrize("config, named", [
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}}, "rope_parameters"),
])
def test_llama_checkpoint_that_does_not_fit_the_backbone(tmp_path, config, named):
    path, _ = _llama_checkpoint(tmp_path / "llama", **config)
    with pytest.raises(UpcycleError, match=named):
        load_dense_source(path)


@pytest.mark.parametrize("overrides, named", [
    (LLAMA + ["model.d_model=32"], "model.d_model"),
    ([o for o in LLAMA if "rope_base" not in o], "model.rope_base"),
    (LLAMA + ["model.block_size=256"], "model.block_size"),  # longer than max_position_embeddings 128
])
def test_init_from_a_llama_checkpoint_that_does_not_fit(tmp_path, monkeypatch, overrides, named):
    monkeypatch.setenv("SAMOE_CACHE", str(tmp_path / "cache"))
    path, _ = _llama_checkpoint(tmp_path / "llama")
    result = run_cli("train", "--preset", "tiny", "--quiet", "--data", _corpus(tmp_path / "corpus.txt"),
                     "--out", tmp_path / "new", "--init-from", path, *overrides)
    assert_user_error(result, named, str(path))
    assert not (tmp_path / "new").exists()


def test_train_init_from_a_llama_checkpoint(tmp_path, monkeypatch):
    """The run uses the checkpoint's tokenizer (eos </s> as end of text) and starts from its weights."""
    monkeypatch.setenv("SAMOE_CACHE", str(tmp_path / "cache"))
    path, llama = _llama_checkpoint(tmp_path / "llama")
    code, out, err = run_cli("train", "--preset", "tiny", "--quiet", "--data", _corpus(tmp_path / "corpus.txt"),
                             "--out", tmp_path / "moe", "--init-from", path, *LLAMA, "model.moe.router=gshard",
                             "train.max_steps=1", "train.eval_every=1", "train.ckpt_every=1", "train.eval_tokens=256",
                             "train.batch_size=2")
    assert code == 0, err
    tok = load_tokenizer(tmp_path / "moe" / "tokenizer.json")
    assert tok.eot_id == 2 and tok.tk.get_vocab() == load_dense_source(path).tokenizer.tk.get_vocab()
    cfg = load_config(tmp_path / "moe" / "config.yaml")
    assert cfg.model.vocab_size == llama.config.vocab_size
    moe = GPT(cfg.model)
    load_checkpoint(latest_checkpoint(tmp_path / "moe"), moe)
    delta = (moe.wte.weight - llama.model.embed_tokens.weight).abs().max().item()
    assert 0 < delta < 0.05  # one optimiser step away from the checkpoint's weights
    # and back out as a stock Mixtral whose tokenizer is the checkpoint's, eos </s>
    code, _, err = run_cli("export", tmp_path / "moe", "--out", tmp_path / "mixtral", "--format", "mixtral")
    assert code == 0, err
    hf_tok = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(str(tmp_path / "mixtral"))
    assert hf_tok.eos_token == "</s>" and hf_tok("the pet")["input_ids"] == tok.encode("the pet")
