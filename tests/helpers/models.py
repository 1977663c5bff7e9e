"""Small models that tests build next to the tiny policy."""

from __future__ import annotations

from typing import Any


def save_tiny_reward_model(tok: Any, path: str) -> None:
    """A randomly initialised one-label Llama sequence classifier over ``tok``'s vocabulary,
    saved with ``tok`` under ``path`` (a ``reward.rewards[i].type: model`` folder)."""
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
