"""The Home Search task (App. C.5.3): queries and their ground truth, prompts, the call parser, the reward."""

from __future__ import annotations

import pytest

from vas.errors import VasError
from vas.experiments.home_search import (
    EXAMPLE_LOCATIONS,
    LOCATIONS,
    HomeSearchReward,
    Query,
    example_for,
    field_f1,
    generate_queries,
    parse_calls,
    prompt,
    success,
    value_prompt,
)

QUERY = Query("I want to buy a condo in Boston, MA with 2 bedrooms and a price of at most $500,000.",
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
    example = example_for(QUERY)
    assert example.text not in zero and f"Task: {example.text}\nAction:\n{example.call_text()}\n\nTask: {QUERY.text}" in one
    assert value_prompt(zero) == f"Home Search API calls, zero-shot. Task: {QUERY.text}"
    assert value_prompt(one) == f"Home Search API calls, one-shot. Task: {QUERY.text}"
    assert zero.endswith(f"Task: {QUERY.text}\nReturn only the relevant API calls, not any other kind of response.\nAction:\n")
    reward = HomeSearchReward([QUERY])
    assert reward([zero, one], [RIGHT, "API.search()"]).tolist() == [1.0, 0.0]
    with pytest.raises(VasError, match="no known Home Search query"):
        reward(["Task: something else\nReturn only"], [RIGHT])


def test_one_shot_example_matches_the_query_in_size_not_in_answer():
    queries = generate_queries(200, criteria=1, seed=5)
    examples = [example_for(q) for q in queries]
    assert examples == [example_for(q) for q in queries]  # the same example for the same query, always
    assert all(len(e.calls) == len(q.calls) and e.calls[0][1] in EXAMPLE_LOCATIONS for q, e in zip(queries, examples))
    assert not set(EXAMPLE_LOCATIONS) & set(LOCATIONS)  # no query's city is ever shown in an example
    assert len({q.text for q in generate_queries(72, criteria=0, seed=1, locations=LOCATIONS[::4])}) == 72  # distinct
    # buy-or-rent is drawn independently of the query's: copying it is right about half of the time
    same_mode = sum(e.calls[1] == q.calls[1] for q, e in zip(queries, examples)) / len(queries)
    assert 0.4 < same_mode < 0.6


def test_query_text_grammar_by_hand():
    texts = {q.text for q in generate_queries(400, criteria=2, seed=0)}
    assert not any("with priced" in t or " 1 bedrooms" in t or " 1 balconies" in t for t in texts)
    assert any(" 1 bedroom " in t or t.endswith(" 1 bedroom.") for t in texts)
    boston = generate_queries(6, criteria=0, seed=3, locations=["Boston, MA"])  # every way to ask, once each
    assert len({q.text for q in boston}) == 6 and sorted(q.calls[1][1] for q in boston) == ["buy"] * 3 + ["rent"] * 3
    for q in boston:  # says buy or rent, as the truth
        wants = {"buy": ("buy ", "purchase ", "for sale "), "rent": ("rent ", "lease ", "for rent ")}[q.calls[1][1]]
        assert q.calls[0] == ("set_location", "Boston, MA") and any(w in q.text for w in wants)
    with pytest.raises(ValueError, match="only 6 distinct queries"):
        generate_queries(7, criteria=0, locations=["Boston, MA"])
