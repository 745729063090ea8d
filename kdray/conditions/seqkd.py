"""Sequence-level KD (Kim & Rush 2016): cross-entropy on the teacher's greedy continuations.

For a language model only.  Each non-overlapping ``block_size`` window of the training
tokens gives a context, its first ``prompt`` tokens; the frozen teacher extends it greedily
to ``block_size + 1`` tokens, once per teacher (cached in the teacher's trial folder,
kdray/generation.py), and the student trains with plain cross-entropy on those sequences,
on the teacher's generated tokens only (the context's own next tokens are ignored).  Batches
are drawn from the generated sequences with the student's data-order seed.

Tested against SIDDO (same width) and every RCD of the same width, as the token-level
objectives are (it has no alpha or temperature for RCD to match).  Trained alone, never
in a pack (a pack's students share one corpus batch).
"""
from kdray.conditions import TREATMENT, Condition, ControlRule, Param, register

PROMPT = Param("prompt", "prompts", 16, [16], int, 1, None, symbol="p", short="p")
SIDDO_SAME_WIDTH = ControlRule("siddo", ("width",))
RCD_SAME_WIDTH = ControlRule("rcd", ("width",))


def _objective(params: dict):
    from kdray.losses import cross_entropy
    return lambda b: cross_entropy(b.logits, b.y)     # targets IGNORE_INDEX (-100) add nothing


SEQKD = register(Condition(
    name="seqkd", title="SeqKD", params=(PROMPT,), objective=_objective, teacher="sequences",
    role=TREATMENT, sweep_key="seqkd", order=10,
    controls=(SIDDO_SAME_WIDTH, RCD_SAME_WIDTH), best_pool=(SIDDO_SAME_WIDTH, RCD_SAME_WIDTH),
    alone="sequence-level KD trains on its teacher's generations, not the pack's shared corpus batches",
    description="train on the teacher's greedy continuations of training contexts (sequence-level KD)"))
