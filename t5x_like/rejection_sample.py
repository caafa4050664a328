"""`python -m t5x_like.rejection_sample`: best-of-N samples scored by a reward model,
kept as a SeqIO task.

The code is t5x_like/recipes/rejection_sampling.py; this file only starts the process
(t5x_like/process.py).
"""

if __name__ == "__main__":
    from t5x_like import process

    process.restart_with_huge_pages()
    from t5x_like.recipes import rejection_sampling

    rejection_sampling.main()
