import math

import numpy as np
import pytest

from rayq.search.objectives import parse_objectives
from rayq.search.pareto import (
    crowding_distance,
    epsilon_net_order,
    nondominated_ranks,
    objective_matrix,
    pareto_front,
    priority_order,
    ranks_of,
    select_top,
)

OBJ = ["fp/acc:max", "ptq/s/kl:min"]


def rows(*pairs):
    return [{"fp/acc": a, "ptq/s/kl": k} for a, k in pairs]


def test_matrix_orientation_and_missing():
    Y = objective_matrix([{"fp/acc": 0.5, "ptq/s/kl": 0.1}, {"fp/acc": 0.4}], OBJ)
    assert Y[0].tolist() == [-0.5, 0.1] and math.isnan(Y[1, 1])


def test_ranks_fronts():
    r = rows((0.6, 0.1), (0.5, 0.05), (0.5, 0.2), (0.4, 0.3), (0.7, 0.5))
    assert ranks_of(r, OBJ) == [0, 0, 1, 2, 0]
    assert pareto_front(r, OBJ) == [0, 1, 4]


def test_ties_share_a_front_and_order_is_stable():
    r = rows((0.5, 0.1), (0.5, 0.1), (0.4, 0.2))
    assert ranks_of(r, OBJ) == [0, 0, 1]
    assert pareto_front(r, OBJ) == [0, 1]
    assert select_top(r, OBJ, 3) == [0, 1, 2]


def test_nan_and_missing_ranked_last_never_on_front():
    r = rows((0.5, 0.1), (float("nan"), 0.0), (0.4, 0.2)) + [{"fp/acc": 0.9}]
    ranks = ranks_of(r, OBJ)
    assert ranks[1] == ranks[3] == max(ranks) and ranks[1] > ranks[2]
    assert pareto_front(r, OBJ) == [0]
    assert select_top(r, OBJ, 4)[-2:] == [1, 3]
    assert pareto_front([{"fp/acc": None}], OBJ) == []
    assert nondominated_ranks(np.full((2, 2), np.nan)).tolist() == [0, 0]


def test_single_objective_is_a_sort():
    r = [{"fp/acc": v} for v in (0.3, 0.9, 0.5, 0.9)]
    assert ranks_of(r, ["fp/acc:max"]) == [2, 0, 1, 0]
    assert select_top(r, ["fp/acc:max"], 3) == [1, 3, 2]
    assert pareto_front(r, parse_objectives(["fp/acc:max"])) == [1, 3]


def test_epsilon_net_spreads_the_kept_points():
    # a front of 5 points along a line; the epsilon-net starts at the best first objective,
    # then takes the far end, then the middle
    r = rows((0.9, 0.5), (0.8, 0.4), (0.7, 0.3), (0.6, 0.2), (0.5, 0.1))
    assert pareto_front(r, OBJ) == [0, 1, 2, 3, 4]
    assert select_top(r, OBJ, 3) == [0, 4, 2]
    assert epsilon_net_order(np.array([[0.0], [0.0]])) == [0, 1]


def test_crowding_tie_break():
    r = rows((0.9, 0.5), (0.8, 0.4), (0.75, 0.35), (0.5, 0.1))
    d = crowding_distance(objective_matrix(r, OBJ))
    assert math.isinf(d[0]) and math.isinf(d[3]) and d[2] > d[1]  # 0.75 sits in the wider gap
    assert select_top(r, OBJ, 4, tie_break="crowding") == [0, 3, 2, 1]
    with pytest.raises(ValueError):
        priority_order(np.zeros((2, 2)), "random")


def test_dataframe_rows():
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame(rows((0.6, 0.1), (0.5, 0.2)))
    assert pareto_front(df, OBJ) == [0]


def test_random_fronts_are_nondominated():
    rng = np.random.default_rng(0)
    Y = rng.normal(size=(60, 3))
    ranks = nondominated_ranks(Y)
    for a in range(60):
        for b in range(60):
            if np.all(Y[a] <= Y[b]) and np.any(Y[a] < Y[b]):
                assert ranks[a] < ranks[b]
    order = priority_order(Y)
    assert sorted(order) == list(range(60))
    assert [ranks[i] for i in order] == sorted(ranks)
