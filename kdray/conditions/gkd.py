"""On-policy GKD (Agarwal et al. 2024): GJSD on the corpus, or on the student's own samples.

For a language model only.  At each step, with probability ``lmbda`` the corpus batch is
replaced by the student's own continuations of its contexts: each row's first ``prompt``
tokens, extended to ``block_size + 1`` tokens by sampling from the student (its current
weights, eval mode, no grad) at ``sample_temperature`` (kdray/generation.py).  The frozen
teacher scores those sequences and the loss is ``alpha T^2 JSD_beta(p_t || q_s)`` on the
generated tokens only (the context's positions are masked; every row has the same length,
so nothing is padded).  A sampled batch has no labels, so it has no cross-entropy term.
Otherwise the step is exactly ``gjsd``'s at the same alpha, T and beta: ``lmbda = 0`` trains
as ``gjsd`` does, bit for bit, and ``alpha = 1, T = 1`` is the GKD paper's (and TRL's) loss.

Which steps are on-policy and what is sampled come from a generator seeded by (the student's
data seed, step) alone, never the global one, so a trial's result is a function of its
trial key (reruns and checkpoint resumes draw the same).  The corpus batches are drawn as
for every other condition (the same data order), whether or not a step replaces them.

Tested against SIDDO (same width) and RCD at the same alpha and temperature (T=1 where the
sweep has none at T), as ``gjsd`` is.  Trained alone, never in a pack (a pack's students
share one corpus batch; these students each train on their own samples).
"""
from dataclasses import replace

from kdray.conditions import TREATMENT, Alpha, Condition, Param, Temperature, register
from kdray.conditions.gjsd import BETA, GJSD, RCD_SAME, RCD_SAME_T, SIDDO_SAME_WIDTH
from kdray.conditions.seqkd import PROMPT

ALPHA = replace(Alpha(), low_open=True)   # alpha 0 would leave a sampled step without any loss
LMBDA = Param("lmbda", "lmbdas", 0.0, [0.5], float, 0.0, 1.0, symbol="λ", short="lam")
SAMPLE_TEMPERATURE = Param("sample_temperature", "sample_temperatures", 1.0, [1.0], float, 0.0, None,
                           low_open=True, symbol="Ts", short="Ts", always=False)


def _objective(params: dict):
    from kdray.conditions.gjsd import jsd_rows
    from kdray.generation import IGNORE_INDEX
    from kdray.losses import flat
    on_corpus = GJSD.objective(params)
    a, t, beta = params["alpha"], params["temperature"], params["beta"]

    def loss(b):
        if not b.sampled:
            return on_corpus(b)
        keep = b.y.reshape(-1) != IGNORE_INDEX          # the generated tokens
        return a * t ** 2 * jsd_rows(flat(b.logits)[keep], flat(b.teacher_logits)[keep], t, beta).mean()
    return loss


def _on_policy(params: dict):
    """``f(model, x, seed, step)``: the student's samples from x's contexts on a lmbda fraction of
    steps (decided by the step's generator's first draw), else None."""
    import torch

    from kdray import generation
    lmbda, prompt, temperature = params["lmbda"], params["prompt"], params["sample_temperature"]

    def swap(model, x, seed: int, step: int):
        g = generation.step_generator(seed, step)
        if not float(torch.rand((), generator=g, dtype=torch.float64)) < lmbda:   # a draw is in [0, 1)
            return None
        seqs = generation.sample_continue(model, x[:, :prompt], x.shape[1] + 1, temperature, g)
        return generation.inputs_and_targets(seqs, prompt)
    return swap


GKD = register(Condition(
    name="gkd", title="GKD", params=(ALPHA, Temperature(), BETA, LMBDA, PROMPT, SAMPLE_TEMPERATURE),
    objective=_objective, on_policy=_on_policy, teacher="logits", role=TREATMENT, sweep_key="gkd", order=11,
    controls=(SIDDO_SAME_WIDTH, RCD_SAME), best_pool=(SIDDO_SAME_WIDTH, RCD_SAME_T),
    alone="on-policy GKD trains on the student's own samples, not the pack's shared corpus batches",
    description="distil through the generalized JSD on the student's own samples (on-policy GKD)"))
