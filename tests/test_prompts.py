"""Prompt sources: built-in sets, files, datasets, and the errors for empty or malformed input."""

import json

import datasets
import pytest

from vas.errors import VasError
from vas.models import load_tokenizer
from vas.prompts import PERSONALIZATION_PROMPT, encode_prompts, load_prompts


def test_builtin_sets():
    chitchat = load_prompts("chitchat")
    assert len(chitchat) > 1000 and chitchat[0] == "Hello How are you doing today?"
    assert len(set(chitchat)) == len(chitchat)
    topics = load_prompts("topics")
    assert len(topics) == 80 and topics[0] == f"{PERSONALIZATION_PROMPT}\nTopic: the water cycle"
    assert load_prompts("chitchat", start=2, limit=2) == chitchat[2:4]


def test_files_and_datasets(tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a"}) + "\n\n" + json.dumps({"prompt": "b", "x": 1}) + "\n")
    (tmp_path / "p.csv").write_text("id,prompt\n1,a\n2,\"b, c\"\n")
    (tmp_path / "p.txt").write_text("a\n\nb\n")
    datasets.Dataset.from_dict({"prompt": ["a", "b"]}).save_to_disk(str(tmp_path / "ds"))
    assert load_prompts(str(tmp_path / "p.jsonl")) == ["a", "b"]
    assert load_prompts(str(tmp_path / "p.csv")) == ["a", "b, c"]
    assert load_prompts(str(tmp_path / "p.txt")) == ["a", "b"]
    assert load_prompts(str(tmp_path / "ds")) == ["a", "b"]


def test_bad_sources(tmp_path):
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(VasError, match="has no prompts"):
        load_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(VasError, match=r"prompt file '.*missing.txt' does not exist"):
        load_prompts(str(tmp_path / "missing.txt"))
    with pytest.raises(VasError, match=r"'chitchatt' is not a file, a dataset or a built-in set \(chitchat, topics\)"):
        load_prompts("chitchatt")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(VasError, match="bad.jsonl:1: no 'prompt' field"):
        load_prompts(str(tmp_path / "bad.jsonl"))


def test_chat_template_applied(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    ids = encode_prompts(tokenizer, ["hello"])[0]
    assert tokenizer.decode(ids) == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
