"""`python -m t5x_like.train`: trains a model from gin files.

The code is t5x_like/training/train.py; this file only starts the process (t5x_like/process.py).
"""

if __name__ == "__main__":
    from t5x_like import process

    process.restart_with_huge_pages()
    from t5x_like.training import train

    train.main()
