"""`python -m t5x_like.eval`: evaluates a run's checkpoints (loss, BPC per domain, task metrics).

The code is t5x_like/evaluation/evaluate.py; this file only starts the process
(t5x_like/process.py).
"""

if __name__ == "__main__":
    from t5x_like import process

    process.restart_with_huge_pages()
    from t5x_like.evaluation import evaluate

    evaluate.main()
