"""`python -m t5x_like.doremi`: DoReMi: reference and proxy runs, then the learned mixture.

The code is t5x_like/recipes/doremi.py; this file only starts the process (t5x_like/process.py).
"""

if __name__ == "__main__":
    from t5x_like import process

    process.restart_with_huge_pages()
    from t5x_like.recipes import doremi

    doremi.main()
