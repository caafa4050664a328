"""`python -m t5x_like.gatt`: Ghost Attention dialogues (Llama 2 section 3.3) sampled by a
policy with an instruction in every user turn, written as training dialogues.

The code is t5x_like/recipes/gatt.py; this file only starts the process
(t5x_like/process.py).
"""

if __name__ == "__main__":
    from t5x_like import process

    process.restart_with_huge_pages()
    from t5x_like.recipes import gatt

    gatt.main()
