"""Extra evaluations a setup can ask for by name (``evals: [tha_count]``).

Contract: ``fn(model, bundle, device) -> dict[str, float]``, run once on the
trained model in eval mode; the values are logged as MLflow metrics.
"""
from __future__ import annotations

from typing import Callable

from kdray.registry import PluginError, Registry, resolve, takes


def adopt_eval(path: str) -> Callable[..., dict]:
    fn = resolve(path)
    if callable(fn) and takes(fn, "model", "bundle", "device"):
        return fn
    raise PluginError(f"{path} is not an eval: give fn(model, bundle, device) -> dict[str, float]")


EVALS: Registry[Callable[..., dict]] = Registry("eval", adopt=adopt_eval)
register_eval = EVALS.register


@register_eval("tha_count")
def tha_count(model, bundle, device) -> dict[str, float]:
    """At each "the" of the clean test text (docs/protocol.md §6.6): top-1 after "th", "a" or "e"?"""
    import torch

    from kdray.data.tinyshakespeare import the_contexts

    contexts, n = the_contexts(bundle.extras["test_text"], bundle.block_size, bundle.vocab,
                               prefix=bundle.extras.get("test_prefix"))
    a, e = bundle.vocab.index("a"), bundle.vocab.index("e")
    top = []
    with torch.inference_mode():
        for i in range(0, len(contexts), 256):
            logits = model(contexts[i:i + 256].to(device))[:, -1, :]
            top.append(logits.argmax(-1).cpu())
    top1 = torch.cat(top) if top else torch.empty(0, dtype=torch.long)
    return {"tha_count_a": float((top1 == a).sum()), "tha_count_e": float((top1 == e).sum()),
            "tha_contexts": float(n)}
