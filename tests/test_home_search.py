"""The Home Search task (App. C.5.3): queries and their ground truth, prompts, the call parser, the reward."""

from __future__ import annotations

import pytest

from vas.errors import VasError
from vas.home_search import (
    EXAMPLE,
    HomeSearchReward,
    Query,
    field_f1,
    generate_queries,
    parse_calls,
    prompt,
    success,
)

QUERY = Query("I want to buy a condo in Boston, MA with 2 bedrooms and priced at most $500,000.",
              (("set_location", "Boston, MA"), ("set_buy_or_rent", "buy"), ("select_home_type", ["Condo"]),
               ("set_num_beds", 2), ("set_max_price", 500000), ("search", None)))
RIGHT = """API.set_location("Boston, MA")
API.set_buy_or_rent("buy")
API.set_max_price(500000)
API.select_home_type(["condo"])
API.set_num_beds(value=2)
API.search()"""


def test_generated_queries_are_seeded_and_their_ground_truth_is_a_success():
    queries = generate_queries(50, criteria=3, seed=1)
    assert queries == generate_queries(50, criteria=3, seed=1) != generate_queries(50, criteria=3, seed=2)
    for q in queries:
        names = [f for f, _ in q.calls]
        assert names[:2] == ["set_location", "set_buy_or_rent"] and names[-1] == "search" and len(names) == 6
        assert q.calls[0][1] in q.text and success(q, q.call_text()) and field_f1(q, q.call_text()) == 1.0
        values = dict(q.calls)
        for low, high in (("set_min_price", "set_max_price"), ("set_min_square_feet", "set_max_square_feet")):
            assert values.get(low, 0) <= values.get(high, float("inf"))


def test_success_by_hand():
    assert success(QUERY, "Sure! Here are the calls:\n" + RIGHT + "\nAPI.set_num_beds(3)")  # after search() is ignored
    assert not success(QUERY, RIGHT.replace("API.search()", ""))  # no search
    swapped = RIGHT.split("\n")
    swapped[0], swapped[1] = swapped[1], swapped[0]
    assert not success(QUERY, "\n".join(swapped))  # location must come first
    assert not success(QUERY, RIGHT.replace("500000", "50000"))
    assert not success(QUERY, RIGHT.replace("API.search()", "API.set_num_baths(2)\nAPI.search()"))  # an extra criterion


def test_field_f1_by_hand():
    wrong_value = RIGHT.replace("value=2", "3")  # 5 of 6 pairs right, 6 parsed: P = R = 5/6
    assert field_f1(QUERY, wrong_value) == pytest.approx(5 / 6)
    assert field_f1(QUERY, "no calls") == 0.0
    assert parse_calls("API.set_location(Boston)\nAPI.search()") == [("set_location", "Boston"), ("search", None)]


def test_prompts_and_reward():
    zero, one = prompt(QUERY, one_shot=False), prompt(QUERY, one_shot=True)
    assert EXAMPLE.text not in zero and EXAMPLE.text in one and EXAMPLE.call_text() in one
    assert zero.endswith(f"Task: {QUERY.text}\nReturn only the relevant API calls, not any other kind of response.\nAction:\n")
    reward = HomeSearchReward([QUERY])
    assert reward([zero, one], [RIGHT, "API.search()"]).tolist() == [1.0, 0.0]
    with pytest.raises(VasError, match="no known Home Search query"):
        reward(["Task: something else\nReturn only"], [RIGHT])
