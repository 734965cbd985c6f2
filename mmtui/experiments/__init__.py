"""The paper's experiments and the analyses built on a run: they read the store, run the stack where they must,
and write their results back through the store."""
