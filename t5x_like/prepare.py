"""`python -m t5x_like.prepare`: writes a mixture's packed rows to an ArrayRecord store.

The code is t5x_like/data/prepare.py; this file only starts the process (t5x_like/process.py).
"""

if __name__ == "__main__":
    from t5x_like import process

    process.restart_with_huge_pages()
    from t5x_like.data import prepare

    prepare.main()
