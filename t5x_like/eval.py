"""`python -m t5x_like.eval --gin_file=...`: evaluates the newest checkpoint of a run.

The code lives in t5x_like/evaluation.py (this name would shadow the builtin `eval` for
code that imports it); this module only keeps the command that T5X users type.
"""

from t5x_like import evaluation

if __name__ == "__main__":
    evaluation.main()
