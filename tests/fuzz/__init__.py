"""Fuzzing: atheris harnesses of the Python parsers (``python``) and libFuzzer ones of the C fast path (``native``)."""
