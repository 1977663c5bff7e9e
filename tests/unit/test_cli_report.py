"""rlalign-ray train --help lists every config key; rlalign-ray report plots metrics.jsonl."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing

import pytest

from rlalign_ray.cli import main
from rlalign_ray.config import Config
from rlalign_ray.config_doc import config_keys


def _leaves(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaves(hints[f.name], prefix + f.name + ".")
        else:
            yield prefix + f.name, f


def test_train_help_lists_every_key_with_type_default_and_doc(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    leaves = dict(_leaves(Config))
    assert len(leaves) > 100
    for key, f in leaves.items():
        assert f.metadata.get("doc"), f"{key} has no doc line"
        m = re.search(rf"^  {re.escape(key)} \((.+), default (.+)\)$", out, re.M)
        assert m, f"{key} missing from train --help"
        first_doc_word = f.metadata["doc"].split()[0]
        after = out[m.end() : m.end() + 400]
        assert first_doc_word in after, key
    assert re.search(r"^  rollout\.stop \(list\[str\], default \[\]\)$", out, re.M)
    assert re.search(r"^  learner\.lora\.rank \(int, default 0\)$", out, re.M)
    assert "reward.rewards[].path (str" in out  # items of a list of sections
    transports = "auto|collective|cuda_ipc|shared_memory|object_store"
    assert f'  sync.transport ({transports}, default "auto")\n' in out  # options: their values
    assert "  rollout.dtype (float32|bfloat16|float16|null, default null)\n" in out
    assert {k for k, *_ in config_keys()} >= set(leaves)


def _synthetic(path, steps=12):
    with open(path, "w") as f:
        for s in range(steps + 1):
            row = {"step": s, "eval/reward_mean": 0.1 + 0.02 * s} if s % 4 == 0 else {"step": s}
            if s:
                row.update(
                    {
                        "train/reward_mean": 0.2 + 0.03 * s,
                        "train/kl": 0.001 * s,
                        "train/response_len": 5 + math.sin(s),
                        "time/step_s": 1.5,
                        "time/generate_s": 0.7,
                        "time/train_s": 0.6,
                        "time/sync_s": 0.1,
                        "weights/version": s,
                    }
                )
            f.write(json.dumps(row) + "\n")


def test_report_writes_png_and_html(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _synthetic(tmp_path / "metrics.jsonl")
    assert main(["report", str(tmp_path)]) == 0
    png, page = tmp_path / "report.png", tmp_path / "report.html"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] >= 800 and im.size[1] >= 600
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 50  # lines drawn, not a blank canvas
    text = page.read_text()
    assert "data:image/png;base64," in text and 'alt="report.png"' in text
    for key in ("train/reward_mean", "eval/reward_mean", "train/kl", "time/generate_s"):
        assert f"<td>{key}</td>" in text
    assert "wrote" in capsys.readouterr().out


def test_report_names_a_missing_or_bad_file(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "metrics.jsonl: no such file" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\nnot json\n')
    assert main(["report", str(tmp_path)]) == 2
    assert "metrics.jsonl:2: not a JSON line" in capsys.readouterr().err
