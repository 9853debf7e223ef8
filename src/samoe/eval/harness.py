"""samoe runs inside lm-evaluation-harness (the `eval` extra installs it):

    import lm_eval
    from samoe.eval.harness import SamoeLM
    lm_eval.simple_evaluate(model=SamoeLM("runs/mine"), tasks=["piqa"])

SamoeLM implements lm-eval's `LM` interface on samoe's own Scorer, so `loglikelihood` here
and `samoe eval --task` share one code path (tokenisation, truncation, batching, dropless
routing: samoe.eval.zeroshot). Importing this module also registers the model name "samoe"
(`simple_evaluate(model="samoe", model_args="run_dir=runs/mine")`), and running it runs
lm-eval's command line with that name known: `python -m samoe.eval.harness --model samoe
--model_args run_dir=runs/mine --tasks ... --device cpu`.
"""

from __future__ import annotations

# lm-eval loads its own models (hf, ...) only into an empty registry: load them before "samoe"
# is registered below, or registering samoe would hide them (`--model hf` would be unknown).
import lm_eval.models  # noqa: F401
import torch
from lm_eval.__main__ import cli_evaluate
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from samoe.eval.zeroshot import load_scorer


@register_model("samoe")
class SamoeLM(LM):
    def __init__(self, run_dir: str, device: str = "auto", batch_size: int | str | None = None, **_):
        """run_dir: a samoe run directory (its latest checkpoint). batch_size: requests per
        forward pass (default, or "auto": the run's micro-batch size). Other keyword
        arguments lm-eval passes to every model (max_batch_size, ...) are ignored."""
        super().__init__()
        self.scorer = load_scorer(run_dir, device or "auto", None if batch_size in (None, "auto") else int(batch_size))

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log P(continuation | context), is_greedy) for each request's (context, continuation)."""
        return self.scorer.loglikelihood([r.args for r in requests], progress=not disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log P(text) of each request's (text,), in lm-eval's disjoint windows of block_size
        tokens after an end-of-text token."""
        windows, owners = [], []
        for i, request in enumerate(requests):
            tokens = self.scorer.tokenizer.encode(request.args[0])
            for window in get_rolling_token_windows(tokens, self.scorer.tokenizer.eot_id,
                                                    self.scorer.model.cfg.block_size, 1):
                windows.append(make_disjoint_window(window))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (ll, _) in zip(owners, self.scorer.score_tokens(windows, progress=not disable_tqdm)):
            totals[owner] += ll
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each request's (context, {"until": [...], "max_gen_toks": N}),
        cut before the first stop string; one request at a time."""
        tok, model = self.scorer.tokenizer, self.scorer.model
        out = []
        for request in tqdm(requests, disable=disable_tqdm):
            context, kwargs = request.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else until
            idx = torch.tensor([tok.encode(context) or [tok.eot_id]], device=self.scorer.device)
            new: list[int] = []
            text = ""
            for _ in range(kwargs.get("max_gen_toks", 256)):
                with self.scorer.autocast():
                    idx = model.generate(idx, 1, temperature=0)
                if int(idx[0, -1]) == tok.eot_id:
                    break
                new.append(int(idx[0, -1]))
                text = tok.decode(new)
                if any(stop in text for stop in until):
                    break
            out.append(min((text.split(stop)[0] for stop in until), key=len, default=text))
        return out


if __name__ == "__main__":  # lm-eval's own command line, with the model name "samoe" registered
    cli_evaluate()
