"""Evaluation (docs chapter 6): how good is the model, and what did each step of shipping cost.

    metrics.py   held-out loss and perplexity, exact match / contains, the side-by-side report
    harness.py   `run.py eval`: multiple-choice log-likelihood and perplexity,
                 as lm-eval-harness scores
    ledger.py    the fidelity ledger: held-out loss and KL from the adapter to each GGUF type
"""
