"""The feature terms of the loss, in their fixed order, and the `LossSpec` made of them.

The order is part of what a run is: the order of the config's sections, of the metrics and of
the sum, and of the projections' PRNG keys (a checkpoint's projections must restore as they were
initialised). A new term goes at the end.
"""

import dataclasses

from distil_flax.losses import attention_scores, hidden_states, relations, sentence
from distil_flax.losses.spec import CoreSpec

TERMS = (hidden_states.TERM, attention_scores.TERM, relations.TERM, sentence.TERM)

# One field per term, named as its config section and off by default: `LossSpec(relations=...)`,
# `spec.relations` and `dataclasses.replace` work for every term, and a new term needs no edit
# here. Frozen, so hashable: jit takes a spec as a static argument.
LossSpec = dataclasses.make_dataclass(
    "LossSpec", [(t.name, t.spec, dataclasses.field(default=t.spec())) for t in TERMS],
    bases=(CoreSpec,), frozen=True, namespace={"__module__": __name__, "__doc__": (
        "Every term of the distillation loss: the core's and one field per feature term "
        "(`TERMS`); a term with weight 0 is not computed at all.")})
