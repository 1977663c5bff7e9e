"""rlalign-ray: align Hugging Face causal LMs with reinforcement learning on Ray."""

__version__ = "0.1.0"
