"""Evaluations beyond the loss: MQAR (in-context recall) and forgetting within a long stream, plus the helpers
they share (`common`). `hope-eval` (hope/eval.py) is their command line."""
