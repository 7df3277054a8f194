"""Everything that is a network or part of one: the open_clip backbone, feature extraction
(:mod:`.encode`), the CLIP4CIR Combiner, the classification head and the frozen-prefix cache."""
