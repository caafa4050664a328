"""`python -m t5x_like.infer`: decodes or scores a task's examples with a checkpoint.

The code is t5x_like/evaluation/infer.py; this file only starts the process (t5x_like/process.py).
"""

if __name__ == "__main__":
    from t5x_like import process

    process.restart_with_huge_pages()
    from t5x_like.evaluation import infer

    infer.main()
