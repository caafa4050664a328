"""`python -m t5x_like.hf`: Hugging Face Llama/Mistral weights in (`import`) and out (`export`).

The code is t5x_like/interop/hf.py; this file only starts the process (t5x_like/process.py).
"""

if __name__ == "__main__":
    from t5x_like import process

    process.restart_with_huge_pages()
    from t5x_like.interop import hf

    hf.main()
