"""Prompt files and the typed batch."""

from __future__ import annotations

import pytest
import torch

from rlalign_ray.data.batch import RolloutBatch, ScoredShard
from rlalign_ray.data.prompts import PromptSampler, load_prompts
from rlalign_ray.errors import DataError


def _write(tmp_path, text):
    p = tmp_path / "d.jsonl"
    p.write_text(text)
    return str(p)


def test_prompts_and_columns(tmp_path):
    path = _write(
        tmp_path, '{"prompt": "1+2=", "answer": "3"}\n\n{"prompt": "2+2=", "answer": "4"}\n'
    )
    items = load_prompts(path)
    assert [(i.index, i.prompt, i.columns) for i in items] == [
        (0, "1+2=", {"answer": "3"}),
        (1, "2+2=", {"answer": "4"}),
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"prompt": "a"}\n{"prompt": "b"\n', ":2: not valid JSON"),
        ('["x"]\n', ":1: each line must be a JSON object"),
        ('{"question": "a"}\n', ":1: no 'prompt' key (set data.prompt_key"),
        ('{"prompt": ""}\n', ":1: 'prompt' must be a non-empty string"),
        ('{"prompt": "a", "answer": 1}\n{"prompt": "b"}\n', ":2: columns [] differ"),
        ("\n", "has no prompts"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, text, message):
    with pytest.raises(DataError, match=None) as err:
        load_prompts(_write(tmp_path, text))
    assert message in str(err.value)


def test_missing_file():
    with pytest.raises(DataError, match="does not exist"):
        load_prompts("/nonexistent/x.jsonl")


def test_sampler_is_seeded_and_covers_each_epoch(tmp_path):
    path = _write(tmp_path, "".join(f'{{"prompt": "p{i}"}}\n' for i in range(5)))
    items = load_prompts(path)
    a, b = PromptSampler(items, seed=1), PromptSampler(items, seed=1)
    first = [x.index for x in a.next(5)]
    assert sorted(first) == [0, 1, 2, 3, 4] and first == [x.index for x in b.next(5)]
    state = a.state_dict()
    nxt = [x.index for x in a.next(3)]
    c = PromptSampler(items, seed=1)
    c.load_state_dict(state)
    assert [x.index for x in c.next(3)] == nxt


def _batch(p, t, n, pad=0, version=1):
    return RolloutBatch(
        prompt_ids=torch.arange(1, n * p + 1).view(n, p),
        prompt_mask=torch.ones(n, p, dtype=torch.long),
        response_ids=torch.full((n, t), 7),
        response_len=torch.full((n,), t),
        response_mask=torch.ones(n, t),
        logprobs=-torch.ones(n, t),
        version=version,
        group_ids=torch.arange(n),
        prompts=["x"] * n,
        completions=["y"] * n,
        columns={"answer": list(range(n))},
        pad_id=pad,
    )


def test_concat_repads_prompts_left_and_responses_right():
    joined = RolloutBatch.concat([_batch(2, 3, 1), _batch(3, 1, 2)])
    assert joined.prompt_ids.tolist() == [[0, 1, 2], [1, 2, 3], [4, 5, 6]]
    assert joined.prompt_mask.tolist() == [[0, 1, 1], [1, 1, 1], [1, 1, 1]]
    assert joined.response_ids.tolist() == [[7, 7, 7], [7, 0, 0], [7, 0, 0]]
    assert joined.response_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 0, 0]]
    assert joined.attention_mask().tolist() == [
        [0, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
    ]
    assert joined.columns == {"answer": [0, 0, 1]}
    assert joined.select([2, 0]).prompt_ids.tolist() == [[4, 5, 6], [0, 1, 2]]


def test_concat_of_shards_from_two_versions_carries_the_oldest():
    # pipelined training: a step's chunks may be sampled before and after a weight load
    joined = RolloutBatch.concat([_batch(2, 2, 1, version=2), _batch(2, 2, 1, version=1)])
    assert joined.version == 1 and len(joined) == 2


def test_scored_shards_concat():
    a = ScoredShard(
        torch.tensor([1.0]),
        {"r": torch.tensor([1.0])},
        torch.tensor([0]),
        torch.tensor([2]),
        torch.ones(1, 2),
        torch.zeros(1, 2),
    )
    b = ScoredShard(
        torch.tensor([0.0, 2.0]),
        {"r": torch.tensor([0.0, 2.0])},
        torch.tensor([1, 1]),
        torch.tensor([1, 3]),
        torch.ones(2, 3),
        torch.zeros(2, 3),
    )
    s = ScoredShard.concat([a, b])
    assert s.scores.tolist() == [1, 0, 2] and s.response_mask.tolist() == [
        [1, 1, 0],
        [1, 1, 1],
        [1, 1, 1],
    ]
