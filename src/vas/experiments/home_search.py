"""The Home Search tool-use task of Sec. 4.4 (paper App. C.5.3, after Xu et al., 2023): user queries, the
paper's prompt in zero-shot and one-shot form, a parser for the model's API calls, and the reward.

A query is generated from a random set of criteria (location and buy-or-rent always, then ``criteria``
more: home types, price, size, bedroom and bathroom bounds …) and rendered as one sentence. Its ground
truth is the call sequence the API description requires: ``set_location`` first, ``set_buy_or_rent``
second, the criteria (in any order), ``search()`` last.

The reward is 1 when the calls parsed from a response match the ground truth and 0 otherwise; values match
after normalisation (numbers as numbers, strings case-insensitively, home-type lists as sets). Field-level
F1 over the (function, value) pairs is kept as a diagnostic (:func:`field_f1`).
"""

from __future__ import annotations

import ast
import hashlib
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from vas.errors import VasError

API_DESCRIPTION = """I have the following set of API:

# To set home types for search. For home buying, home_types choices are: "House", "Townhouse", "Condo", "Land", "Multi-family", "Mobile", "Co-op"; for home renting, home_types choices are: "House", "Townhouse", "Condo", "Apartment".
API.select_home_type(home_types: List[str])
# To specify whether to search homes for buying or renting. 'value' can be chosen from ['buy', 'rent']. This function must be called after setting the location and before setting any other criteria.
API.set_buy_or_rent(value: str)
# To set the minimum home size in square feet
API.set_min_square_feet(value: int)
# To set the maximum home size in square feet
API.set_max_square_feet(value: int)
# To set the floor number
API.set_floor_number(value: int)
# To set the maximum home price in dollars
API.set_max_price(value: int)
# To set the minimum home price in dollars
API.set_min_price(value: int)
# To set the location for the search area. This function must be called before setting any criteria.
API.set_location(value: string)
# Submit criterion to get search results. This function should be called after setting all the criterion.
API.search()
# To set the maximum commute time in minute to your office location, assuming the office location is already defined
API.set_max_commute_time(value: int)
# To set the number of bathroom(s)
API.set_num_baths(value: float)
# To set the number of garage(s)
API.set_num_garages(value: int)
# To set the number of balconies
API.set_num_balconies(value: int)
# To set the number of bedroom(s)
API.set_num_beds(value: int)
# To set the number of swimming pool(s)
API.set_num_swimming_pools(value: int)
-------------
"""

LOCATIONS = ("Boston, MA", "Austin, TX", "Seattle, WA", "Denver, CO", "Miami, FL", "Chicago, IL", "Portland, OR",
             "San Diego, CA", "Atlanta, GA", "Phoenix, AZ", "Nashville, TN", "Raleigh, NC", "Tulsa, OK",
             "Columbus, OH", "Pittsburgh, PA", "Baltimore, MD", "Richmond, VA", "Charlotte, NC", "Tampa, FL",
             "Orlando, FL", "New Orleans, LA", "Houston, TX", "Dallas, TX", "San Antonio, TX", "Tucson, AZ",
             "Albuquerque, NM", "Salt Lake City, UT", "Boise, ID", "Spokane, WA", "Sacramento, CA", "Fresno, CA",
             "Oakland, CA", "Las Vegas, NV", "Reno, NV", "Omaha, NE", "Kansas City, MO", "St. Louis, MO",
             "Minneapolis, MN", "Milwaukee, WI", "Detroit, MI", "Indianapolis, IN", "Louisville, KY",
             "Memphis, TN", "Birmingham, AL", "Charleston, SC", "Providence, RI", "Hartford, CT", "Buffalo, NY")
# the one-shot examples' cities: never a query's, so no query's city shows up in another query's prompt
EXAMPLE_LOCATIONS = ("Madison, WI", "Ann Arbor, MI", "Burlington, VT", "Santa Fe, NM", "Savannah, GA", "Eugene, OR",
                     "Durham, NC", "Boulder, CO")
# how a query says buy or rent: "{kind}" is what is wanted, e.g. "a home", "a condo or townhouse", "land"
OPENINGS = {"buy": ("I want to buy {kind} in {location}", "I'm looking to purchase {kind} in {location}",
                    "Find me {kind} for sale in {location}"),
            "rent": ("I want to rent {kind} in {location}", "I'm looking to lease {kind} in {location}",
                     "Find me {kind} for rent in {location}")}
HOME_TYPES = {"buy": ("House", "Townhouse", "Condo", "Land", "Multi-family", "Mobile", "Co-op"),
              "rent": ("House", "Townhouse", "Condo", "Apartment")}
# criterion → (function, phrase template)
CRITERIA = {
    "home_types": ("select_home_type", "{v}"),
    "min_price": ("set_min_price", "a price of at least ${v:,}"),
    "max_price": ("set_max_price", "a price of at most ${v:,}"),
    "min_square_feet": ("set_min_square_feet", "at least {v:,} square feet"),
    "max_square_feet": ("set_max_square_feet", "at most {v:,} square feet"),
    "num_beds": ("set_num_beds", "{v} bedroom{s}"),
    "num_baths": ("set_num_baths", "{v:g} bathroom{s}"),
    "num_garages": ("set_num_garages", "{v} garage{s}"),
    "num_balconies": ("set_num_balconies", "{v} balcon{ies}"),
    "num_swimming_pools": ("set_num_swimming_pools", "{v} swimming pool{s}"),
    "floor_number": ("set_floor_number", "a floor number of {v}"),
    "max_commute_time": ("set_max_commute_time", "a commute of at most {v} minutes to my office"),
}


@dataclass(frozen=True)
class Query:
    """A user query and its ground-truth calls, as (function, value) pairs; ``value`` is None for ``search``."""

    text: str
    calls: tuple[tuple[str, object], ...]

    def call_text(self) -> str:
        """The ground truth as the model should write it, one call per line."""
        return "\n".join(f"API.{f}()" if v is None else f"API.{f}({v!r})" for f, v in self.calls)


def _value(name: str, rng: random.Random, mode: str):
    if name == "home_types":
        return sorted(rng.sample(HOME_TYPES[mode], rng.choice((1, 1, 2))))
    if name in ("min_price", "max_price"):  # dollars: a monthly rent, or a purchase price
        return 100 * rng.randint(5, 30) if mode == "rent" else 50_000 * rng.randint(4, 30)
    if name in ("min_square_feet", "max_square_feet"):
        return 100 * rng.randint(5, 40)
    if name == "num_baths":
        return rng.choice((1, 1.5, 2, 2.5, 3))
    if name == "max_commute_time":
        return 5 * rng.randint(2, 12)
    if name == "floor_number":
        return rng.randint(1, 20)
    return rng.randint(1, 4)


_NOUNS = {"Land": "land", "Multi-family": "multi-family home", "Mobile": "mobile home"}


def _phrase(name: str, value) -> str:
    one = value == 1
    return CRITERIA[name][1].format(v=value, s="" if one else "s", ies="y" if one else "ies")


def generate_queries(n: int, *, criteria: int = 2, seed: int = 0, locations: Sequence[str] = LOCATIONS) -> list[Query]:
    """``n`` distinct queries, each with a location (one of ``locations``), buy-or-rent (said one of three ways)
    and ``criteria`` more criteria (distinct, never both a minimum and a maximum of the same quantity with
    min > max).

    Raises:
        ValueError: if ``criteria`` is negative or larger than the number of criteria, or if ``n`` distinct
            queries cannot be drawn (with no extra criteria there are only 6 per location).
    """
    if not 0 <= criteria <= len(CRITERIA):
        raise ValueError(f"criteria must be between 0 and {len(CRITERIA)}, got {criteria}")
    if criteria == 0 and n > 6 * len(set(locations)):
        raise ValueError(f"only {6 * len(set(locations))} distinct queries have no extra criteria in "
                         f"{len(set(locations))} locations; {n} were asked for")
    rng = random.Random(seed)
    queries: list[Query] = []
    seen: set[str] = set()
    while len(queries) < n:
        mode = rng.choice(("buy", "rent"))
        location = rng.choice(locations)
        chosen = rng.sample(sorted(CRITERIA), criteria)
        values = {name: _value(name, rng, mode) for name in chosen}
        for low, high in (("min_price", "max_price"), ("min_square_feet", "max_square_feet")):
            if low in values and high in values and values[low] > values[high]:
                values[low], values[high] = values[high], values[low]
        kind = " or ".join(_NOUNS.get(t, t.lower()) for t in values.get("home_types", ["home"]))
        phrases = [_phrase(name, values[name]) for name in chosen if name != "home_types"]
        article = "" if kind.startswith("land") else "an " if kind[0] in "aeiou" else "a "
        text = rng.choice(OPENINGS[mode]).format(kind=article + kind, location=location)
        text += (" with " + ", ".join(phrases[:-1]) + (" and " if len(phrases) > 1 else "") + phrases[-1]) if phrases else ""
        calls = [("set_location", location), ("set_buy_or_rent", mode)]
        calls += [(CRITERIA[name][0], values[name]) for name in chosen]
        calls.append(("search", None))
        if text not in seen:
            seen.add(text)
            queries.append(Query(text + ".", tuple(calls)))
    return queries


def example_for(query: Query) -> Query:
    """The worked example that the one-shot prompt shows with ``query``: a generated query with as many criteria,
    in one of :data:`EXAMPLE_LOCATIONS` (never a query's city), from a generator seeded by the query's text
    (sha256), so a query always gets the same example. Its buy-or-rent and criteria are drawn independently of
    the query's: a model that copies the example rather than reading the query is right only by chance.

    The paper does not give its example (App. C.5.3). A fixed example with criteria the query lacks is copied
    whole by small models (measured: 0/20 one-shot successes for Gemma-3-270M, which copies its extra calls).
    """
    seed = int.from_bytes(hashlib.sha256(query.text.encode()).digest()[:8], "big")
    (example,) = generate_queries(1, criteria=len(query.calls) - 3, seed=seed, locations=EXAMPLE_LOCATIONS)
    return example


def prompt(query: Query, *, one_shot: bool) -> str:
    """The paper's prompt (App. C.5.3) for ``query``; ``one_shot`` puts :func:`example_for` ``query``, with its
    answer, before the task."""
    example = example_for(query) if one_shot else None
    shown = f"Task: {example.text}\nAction:\n{example.call_text()}\n\n" if example else ""
    return (f"{API_DESCRIPTION}{shown}Task: {query.text}\n"
            "Return only the relevant API calls, not any other kind of response.\nAction:\n")


def value_prompt(text: str) -> str:
    """What a value model reads of a :func:`prompt`: the query and whether the example was shown, without the
    long API description that every prompt shares (it tells the value model nothing, and costs it ~600 tokens)."""
    shots = "one-shot" if text.count("Task: ") > 1 else "zero-shot"
    return f"Home Search API calls, {shots}. Task: {task(text) or text}"


def task(text: str) -> str | None:
    """The query of a :func:`prompt` (None if ``text`` is not one)."""
    found = re.findall(r"^Task: (.*)\nReturn only", text, re.MULTILINE)
    return found[-1] if found else None


_CALL = re.compile(r"API\.(\w+)\s*\(([^()\n]*)\)")


def parse_calls(response: str) -> list[tuple[str, object]]:
    """The (function, value) calls in a response, in order, up to and including the first ``search()``.

    An argument that is not a Python literal is kept as its stripped text; ``search()`` has value None.
    """
    calls = []
    for name, argument in _CALL.findall(response):
        argument = argument.strip()
        if argument.startswith("value=") or argument.startswith("home_types="):
            argument = argument.split("=", 1)[1].strip()
        try:
            value = ast.literal_eval(argument) if argument else None
        except (ValueError, SyntaxError):
            value = argument.strip("'\"")
        calls.append((name, value))
        if name == "search":
            break
    return calls


def _normal(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.replace(",", ""))  # "2" is 2
        except ValueError:
            return value.strip().lower()
    if isinstance(value, (list, tuple)):
        return frozenset(_normal(v) for v in value)
    return value


def _pairs(calls) -> list[tuple[str, object]]:
    return [(f, _normal(v)) for f, v in calls]


def success(query: Query, response: str) -> bool:
    """True when the parsed calls are ``set_location``, then ``set_buy_or_rent``, then exactly the query's
    criteria in any order, then ``search()``, all with the right values."""
    got, want = _pairs(parse_calls(response)), _pairs(query.calls)
    if len(got) != len(want) or got[:2] != want[:2] or got[-1] != want[-1]:
        return False
    return Counter(got[2:-1]) == Counter(want[2:-1])


def field_f1(query: Query, response: str) -> float:
    """F1 of the parsed (function, value) pairs against the ground truth's, ignoring order (a diagnostic)."""
    got, want = Counter(_pairs(parse_calls(response))), Counter(_pairs(query.calls))
    hits = sum((got & want).values())
    if hits == 0:
        return 0.0
    precision, recall = hits / sum(got.values()), hits / sum(want.values())
    return 2 * precision * recall / (precision + recall)


class HomeSearchReward:
    """The task's reward: ``reward(prompts, responses)`` → (B,) float32, 1.0 where :func:`success`, else 0.

    Each prompt must be one made by :func:`prompt` for one of ``queries`` (its query is found by its text).

    Raises:
        VasError: for a prompt whose query is not among ``queries``.
    """

    def __init__(self, queries: list[Query]):
        self.by_text = {q.text: q for q in queries}

    def query(self, text: str) -> Query:
        found = task(text)
        if found not in self.by_text:
            raise VasError("a prompt holds no known Home Search query (build prompts with vas.experiments.home_search.prompt)")
        return self.by_text[found]

    def __call__(self, prompts, responses):
        import torch

        return torch.tensor([float(success(self.query(p), r)) for p, r in zip(prompts, responses)], dtype=torch.float32)
