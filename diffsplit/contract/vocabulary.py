"""The words of the example datasets' prompts, shared by the datasets and the tiny models.

``make-example-dataset`` writes prompts from these words and every family's tiny tokenizer is trained on
them, so an example prompt encodes to ordinary tokens (not byte fallbacks) on every tiny model.
"""

COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "white", "black", "grey", "brown")
SHAPES = ("circle", "square", "triangle", "star", "ring", "stripe", "rectangle", "ellipse")
EXTRA_WORDS = (
    "a an the on in with and of photo picture painting drawing dog cat bird tree house car flower sky sea "
    "mountain city street person woman man child sunset night day small large big little bright dark soft "
    "light left right top bottom middle center near far two three four many one cute beautiful old new"
)
"""Words of ordinary prompts (the example datasets draw theirs from :data:`COLOURS` and :data:`SHAPES`)."""
