"""`python -m t5x_like.plan`: plans a run on a cluster's mesh from a CPU host.

The code is t5x_like/planning/planner.py; this file only starts the process (t5x_like/process.py).
"""

if __name__ == "__main__":
    from t5x_like import process

    process.restart_with_huge_pages()
    from t5x_like.planning import planner

    planner.main()
