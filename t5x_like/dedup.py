"""`python -m t5x_like.dedup`: finds exact and near-duplicate documents in a corpus.

The code is t5x_like/data/dedup.py; this file only starts the process (t5x_like/process.py).
"""

if __name__ == "__main__":
    from t5x_like import process

    process.restart_with_huge_pages()
    from t5x_like.data import dedup

    dedup.main()
