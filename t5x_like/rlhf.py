"""`python -m t5x_like.rlhf`: Llama 2's RLHF rounds (PPO against a helpfulness and a
safety reward model, or rejection sampling and fine-tuning).

The code is t5x_like/recipes/rlhf.py; this file only starts the process
(t5x_like/process.py).
"""

if __name__ == "__main__":
    from t5x_like import process

    process.restart_with_huge_pages()
    from t5x_like.recipes import rlhf

    rlhf.main()
