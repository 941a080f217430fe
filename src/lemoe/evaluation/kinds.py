"""The optional probe kinds of the evaluator, by name (no heavy imports: the CLI lists them)."""

ALL_PROBES: tuple[str, ...] = ("locality_plus", "same_subject", "chat", "fluency")
