"""`python -m t5x_like.lm_eval`: lm-evaluation-harness's command line with our model.

`python -m t5x_like.lm_eval --model t5x_like --model_args checkpoint=...,gin_file=...
--tasks ...` takes every flag of `lm_eval`; lm-eval 0.4.x has no plugin entry points, so
its own `lm_eval` command cannot see the model. The code is
t5x_like/evaluation/lm_eval_adapter.py (docs/INFERENCE.md); this file only starts the
process (t5x_like/process.py).
"""

if __name__ == "__main__":
    from t5x_like import process

    process.restart_with_huge_pages()
    from t5x_like.evaluation import lm_eval_adapter

    lm_eval_adapter.main()
