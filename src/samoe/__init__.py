"""samoe: parameter-efficient Mixture-of-Experts language models (SaMoE) and their baselines."""

__version__ = "0.1.0"
