"""The steering rules (vas.decoding.rules): each rule once, each caller's words in its errors, against values
worked by hand."""

from types import SimpleNamespace

import pytest
import torch

from vas.decoding.rules import (
    ALL,
    CLI,
    LIBRARY,
    REQUEST,
    check_models,
    check_product,
    parse_beta,
    parse_soft,
    parse_top_k,
    parse_weighted,
    parse_weights,
    split_spec,
    steered_models,
)
from vas.errors import VasError


@pytest.mark.parametrize("names, flag", [(CLI, "--beta"), (LIBRARY, "beta"), (REQUEST, "vas_beta")])
def test_beta_is_a_finite_float32_named_as_each_caller_names_it(names, flag):
    assert parse_beta("-2.5", names) == -2.5 and parse_beta(3, names) == 3.0
    for bad in ("nan", float("inf"), 1e39, True, None, "abc"):
        with pytest.raises(VasError, match=f"^{flag} must be"):
            parse_beta(bad, names)


def test_k_as_written_and_as_a_typed_argument():
    assert parse_top_k("10", CLI) == 10 and parse_top_k(7.0, REQUEST) == 7 and parse_top_k(" ALL ", CLI) == ALL
    assert parse_top_k(3, LIBRARY, typed=True) == 3 and parse_top_k(ALL, LIBRARY, typed=True) == ALL
    for bad, names, typed in (("0", CLI, False), (2.5, REQUEST, False), ("every", REQUEST, False),
                              ("10", LIBRARY, True), (True, LIBRARY, True), ("ALL", LIBRARY, True)):
        with pytest.raises(VasError, match=f"^{names.top_k} must be an integer ≥ 1 or 'all'"):
            parse_top_k(bad, names, typed=typed)


def test_x_equals_y_specs_split_at_the_right_equals_sign():
    assert split_spec("a=runs/x=1", "--value", at_last=False) == ("a", "runs/x=1")  # NAME=DIR: the folder may hold '='
    assert split_spec("runs/x=1=0.5", "--value", at_last=True) == ("runs/x=1", "0.5")  # PATH=WEIGHT
    assert split_spec(" runs/x ", "--value", at_last=True) == ("runs/x", None)
    assert parse_weighted("runs/v=-0.5", CLI) == ("runs/v", -0.5) and parse_weighted("runs/v", CLI) == ("runs/v", 1.0)
    with pytest.raises(VasError, match="^the weight of 'runs/v' in --value must be a number, got 'x'"):
        parse_weighted("runs/v=x", CLI)  # used to become the path 'runs/v=x' with weight 1
    for bad in ("=1", "a=", " "):
        with pytest.raises(VasError, match="empty entry"):
            parse_weighted(bad, CLI)


def test_a_requests_weights_follow_the_served_names():
    known = ["a", "b", "c"]
    assert parse_weights(" b = -1 , a", known, REQUEST) == (1.0, -1.0, 0.0)
    assert parse_weights({"c": 2, "a": "0.5"}, known, REQUEST) == (0.5, 0.0, 2.0)  # the offline engine's parsed form
    for bad, message in (("d=1", "unknown value model 'd'"), ("a,a=2", "twice"), ({"a": float("nan")}, "weight of 'a'"),
                         ("", "non-empty"), ({}, "non-empty"), (3, "non-empty")):
        with pytest.raises(VasError, match=f"vas_values.*{message}|{message}.*vas_values"):
            parse_weights(bad, known, REQUEST)


def test_beta_times_each_weight_stays_within_float32_row_by_row():
    check_product(torch.tensor([1e38, 1.0]), torch.tensor([[1.0, 0.0], [0.0, 1e38]]), LIBRARY)  # 1e38 per row
    check_product(3.0, [1e38], CLI)  # 3e38 < 3.4028e38
    with pytest.raises(VasError, match=r"^--beta times a --value weight must stay within float32 .*got β = 4.0"):
        check_product(4.0, [1e38], CLI)
    with pytest.raises(VasError, match="^beta times a weights weight"):
        check_product(torch.tensor([1e38, 1.0]), torch.tensor([[0.0, 4.0], [1.0, 0.0]]), LIBRARY)


def test_soft_as_written():
    assert parse_soft(True, REQUEST) is True and parse_soft(1, REQUEST) is True and parse_soft("FALSE", CLI) is False
    for bad in (2, 1.0, "yes", None):
        with pytest.raises(VasError, match="^vas_soft must be true or false"):
            parse_soft(bad, REQUEST)


def test_k_and_soft_against_the_weighted_heads():
    heads = [("a", "last"), ("n", "next"), ("d", "distributional")]
    check_models(heads, [0, 1, 0], REQUEST, top_k=ALL)  # only the next head is weighted
    check_models(heads, [0, 1, 0], REQUEST, top_k=250, vocab_size=300, max_top_k=100)  # the cap is not the next head's
    check_models(heads, [1, 0, 1], CLI, top_k=5, soft=True)
    with pytest.raises(VasError, match="^--top-k all needs value models with the next head; 'a' has the last head"):
        check_models(heads, [1, 1, 0], CLI, top_k=ALL)
    with pytest.raises(VasError, match="^vas_top_k must be between 1 and 100 .*the server's --max-top-k 100 for value model 'd'"):
        check_models(heads, [0, 1, 1], REQUEST, top_k=101, vocab_size=300, max_top_k=100)
    with pytest.raises(VasError, match="^top_k must be between 1 and the vocabulary size 300, or 'all', got 301"):
        check_models(heads, [0, 1, 0], LIBRARY, top_k=301, vocab_size=300)
    with pytest.raises(VasError, match="^soft needs a distributional value model with a weight ≠ 0.*a has the last head"):
        check_models(heads, [1, 1, 0], LIBRARY, top_k=5, soft=True)
    with pytest.raises(VasError, match="^--soft needs .*no --value was given"):
        check_models([], [], CLI, top_k=5, soft=True)


def test_steered_models_skip_beta_zero_and_weight_zero():
    assert steered_models(torch.tensor([0.0, 2.0]), torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])) == [0, 2]
    assert steered_models(torch.tensor([0.0, 0.0]), torch.ones(2, 3)) == []


def test_the_library_names_its_arguments(tiny_model_dir):
    from helpers import random_value_model

    from vas.decoding.loop import Steering

    model = random_value_model(tiny_model_dir)
    for kwargs, message in (({"beta": float("inf")}, "^beta must be finite"),
                            ({"weights": [float("nan")]}, "^weights must be finite"),
                            ({"top_k": 0}, "^top_k must be an integer"), ({"soft": True}, "^soft needs")):
        with pytest.raises(ValueError, match=message):
            Steering([model], **kwargs)
    distributional = random_value_model(tiny_model_dir, head="distributional", support=(0.0, 1.0))
    rows = Steering([distributional, model], [[1.0, 0.0], [0.0, 2.0]], beta=torch.tensor([0.5, 0.0]), soft=True).rows(2)
    assert rows.steered_models() == [0, 1]  # some row has β ≠ 0, and each model is weighted in some row
    assert [b.tolist() for b in rows.soft_betas()] == [[0.5, 0.0], [0.0, 0.0]]  # β·w of each row where soft


def test_a_request_is_parsed_once_at_admission(monkeypatch, tmp_path):
    pytest.importorskip("vllm")
    import json

    from vas.serving import processor
    from vas.value.model import CONFIG_NAME

    (tmp_path / CONFIG_NAME).write_text(json.dumps({"head": "last"}))
    settings = processor.Settings({"a": str(tmp_path)}, vocab_size=300)
    params = SimpleNamespace(extra_args={"vas_beta": 2, "vas_top_k": 7, "vas_parsed": {"beta": 1e30}}, temperature=0.5)
    processor.admit(params, settings)  # a client's vas_parsed is replaced
    parsed = params.extra_args["vas_parsed"]
    assert {k: v for k, v in parsed.items() if k != "settings"} == {"beta": 2.0, "top_k": 7, "weights": (1.0,),
                                                                    "record_id": None, "soft": False}
    monkeypatch.setattr(processor, "parse_request", lambda *a: pytest.fail("the worker parsed the request again"))
    assert processor.steering_of(params, settings) == (processor.RequestSteering(2.0, 7, (1.0,)), 0.5)
    # the worker parses again what was admitted under other settings
    monkeypatch.undo()
    other = processor.Settings({"a": str(tmp_path)}, vocab_size=300, top_k=3)
    assert processor.steering_of(params, other) == (processor.RequestSteering(2.0, 7, (1.0,)), 0.5)
    with pytest.raises(ValueError, match="vas_top_k must be between 1 and the vocabulary size 5"):
        processor.steering_of(params, processor.Settings({"a": str(tmp_path)}, vocab_size=5))
