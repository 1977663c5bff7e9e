# ruff: noqa: E501  (the docs' lines, unmodified)
"""Reward functions from TRL's documentation, copied unmodified as test fixtures: they must
work here as they do in TRL's GRPOTrainer (called with keyword arguments).

Source: https://github.com/huggingface/trl/blob/main/docs/source/grpo_trainer.md, section
"Using a custom reward function" (Examples 1, 1.1, 2, 3 and 5; Apache-2.0). The docs name
every example ``reward_func``; only the names differ here, so that one module holds them.
Example 1 is the docs' version that takes ``completion_ids``, the keyword TRL passes.
"""

import asyncio
import re


# Example 1: Reward longer completions
def reward_len_tokens(completion_ids, **kwargs):
    """Reward function that assigns higher scores to longer completions (in terms of token count)."""
    return [float(len(ids)) for ids in completion_ids]


# Example 1.1: Reward longer completions (based on the number of characters)
def reward_len_chars(completions, **kwargs):
    """Reward function that assigns higher scores to longer completions (in terms of character count)."""
    return [float(len(completion)) for completion in completions]


# Example 2: Reward completions with a specific format (conversational format)
def format_reward_func(completions, **kwargs):
    """Reward function that checks if the completion has a specific format."""
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]


# Example 3: Reward completions based on a reference (a `ground_truth` column)
def reward_ground_truth(completions, ground_truth, **kwargs):
    # Regular expression to capture content inside \boxed{}
    matches = [re.search(r"\\boxed\{(.*?)\}", completion) for completion in completions]
    contents = [match.group(1) if match else "" for match in matches]
    # Reward 1 if the content is the same as the ground truth, 0 otherwise
    return [1.0 if c == gt else 0.0 for c, gt in zip(contents, ground_truth)]


# Example 5: Asynchronous reward functions
async def async_reward_func(prompts, completions, **kwargs):
    # Simulate an I/O-bound call (e.g., HTTP request, database lookup)
    await asyncio.sleep(0.01)
    # Simple toy reward: 1.0 if the completion is non-empty, else 0.0
    return [1.0 if completion else 0.0 for completion in completions]
