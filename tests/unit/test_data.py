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


# ---- formats: Parquet, save_to_disk folders -------------------------------------------
ROWS = [
    {"prompt": "1+2=", "answer": "3"},
    {"prompt": [{"role": "user", "content": "2+2="}], "answer": "4"},
]


def test_parquet_and_save_to_disk_read_like_jsonl(tmp_path):
    datasets = pytest.importorskip("datasets")
    plain = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "2+2=", "answer": "4"}]
    ds = datasets.Dataset.from_list(plain)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "folder"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    want = [(0, "1+2=", {"answer": "3"}), (1, "2+2=", {"answer": "4"})]
    for path in ("d.parquet", "folder", "dict", "dict/train"):
        items = load_prompts(str(tmp_path / path))
        assert [(i.index, i.prompt, i.columns) for i in items] == want, path
    assert items[1].source.endswith("dict/train row 2")
    # conversational rows survive the round trip
    chat = datasets.Dataset.from_list([ROWS[1], ROWS[1]])
    chat.to_parquet(str(tmp_path / "chat.parquet"))
    assert load_prompts(str(tmp_path / "chat.parquet"))[0].prompt == ROWS[1]["prompt"]


def test_format_errors_name_the_row_and_the_fix(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"prompt": "a"}, {"prompt": ""}]).to_parquet(
        str(tmp_path / "bad.parquet")
    )
    with pytest.raises(DataError, match="bad.parquet row 2: 'prompt' must be a non-empty"):
        load_prompts(str(tmp_path / "bad.parquet"))
    ds = datasets.Dataset.from_list([{"prompt": "a"}])
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(DataError, match="holds the splits \\['test', 'train'\\]; give one"):
        load_prompts(str(tmp_path / "two"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not one written by datasets' save_to_disk"):
        load_prompts(str(tmp_path / "empty"))
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="cannot read it as Parquet"):
        load_prompts(str(tmp_path / "junk.parquet"))


# ---- rendering: chat templates, one BOS, truncation -----------------------------------
@pytest.fixture(scope="module")
def tok(tiny_model):
    from rlalign_ray.models.loading import load_tokenizer

    return load_tokenizer(tiny_model)


def test_conversational_prompts_render_with_template_kwargs(tok):
    from rlalign_ray.data.render import PromptRenderer

    tok = type(tok).from_pretrained(tok.name_or_path)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% if not thinking %}[no-think] "
        "{% endif %}{% endif %}"
    )
    msgs = [{"role": "user", "content": "1+2="}]
    r = PromptRenderer(tok, chat_template_kwargs={"thinking": False})
    assert r.render(msgs) == "user: 1+2=\nassistant: [no-think] "
    assert PromptRenderer(tok, chat_template_kwargs={"thinking": True}).render(msgs) == (
        "user: 1+2=\nassistant: "
    )
    assert r.render("1+2=") == "1+2="  # plain text unless model.chat_template
    assert PromptRenderer(tok, chat_template=True).render("1+2=").startswith("user: 1+2=")


def test_system_prompt_goes_first_in_chat_prompts_without_one(tok):
    from rlalign_ray.data.render import PromptRenderer

    tok = type(tok).from_pretrained(tok.name_or_path)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    r = PromptRenderer(tok, chat_template=True, system_prompt="Answer in \\boxed{}.")
    assert r.render("1+2=") == "system: Answer in \\boxed{}.\nuser: 1+2=\n"
    own = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+2="}]
    assert r.render(own) == "system: Be brief.\nuser: 1+2=\n"  # its own system message
    tool = [{"role": "tool", "content": "3"}]
    assert r.render(tool, first=False) == "tool: 3\n"  # an environment's later observation
    assert PromptRenderer(tok, system_prompt="x").render("1+2=") == "1+2="  # plain text


def test_exactly_one_bos(tok):
    from rlalign_ray.data.render import PromptRenderer

    bos = tok.bos_token_id
    r = PromptRenderer(tok)
    for text in ("1+2=", tok.bos_token + "1+2=", tok.bos_token * 2 + "1+2="):
        ids = r.encode(text)
        assert ids[0] == bos and ids.count(bos) == 1, text
    # a template that writes BOS itself, and one that does not
    tok = type(tok).from_pretrained(tok.name_or_path)
    msgs = [{"role": "user", "content": "1+2="}]
    for template in ("{{ bos_token }}", ""):
        tok.chat_template = template + "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        r = PromptRenderer(tok)
        assert r.encode(r.render(msgs)).count(bos) == 1, template
    assert r.encode(r.render(msgs)) == tok("1+2=")["input_ids"]


def test_left_truncation_keeps_the_bos(tok):
    from rlalign_ray.data.render import PromptRenderer

    r = PromptRenderer(tok, max_tokens=4)
    ids = r.encode("12345678")
    assert len(ids) == 4 and ids[0] == tok.bos_token_id
    assert tok.decode(ids[1:]) == "678"


def test_truncation_modes(tmp_path, tok):
    from rlalign_ray.data.render import PromptRenderer, prepare_prompts

    path = _write(tmp_path, '{"prompt": "1+2="}\n{"prompt": "123456789+1="}\n{"prompt": "3="}\n')
    items = load_prompts(path)
    r = PromptRenderer(tok, max_tokens=6)  # BOS + 5 characters
    with pytest.raises(DataError) as err:
        prepare_prompts(items, r, "error")
    msg = str(err.value)
    assert f"data.train: {path}:2: the prompt is 13 tokens" in msg
    assert "data.max_prompt_tokens = 6" in msg and "data.truncation: left" in msg
    kept, stats = prepare_prompts(items, r, "left")
    assert len(kept) == 3 and stats == {"data/truncated": 1.0}
    kept, stats = prepare_prompts(items, r, "drop")
    assert [i.index for i in kept] == [0, 2] and stats == {"data/dropped": 1.0}
    kept, stats = prepare_prompts(items[:1], r, "drop")
    assert stats == {"data/dropped": 0.0}
    with pytest.raises(DataError, match="every prompt is longer"):
        prepare_prompts(items[1:2], r, "drop")
