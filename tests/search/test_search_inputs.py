"""Damaged or mismatched search files are one-line user errors, before Ray starts (issue: nothing lost, nothing mixed)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayq import config as config_io
from rayq.errors import UserError
from rayq.search import results as results_io
from rayq.search.tuner import run_search


def _demo(**overrides):
    return config_io.resolve(preset="demo", overrides=[f"{k}={v}" for k, v in overrides.items()])


def test_results_without_trial_id_is_refused(tmp_path):
    pq.write_table(pa.table({"step": [1, 2], "fp/acc": [0.1, 0.2]}), tmp_path / results_io.RESULTS)
    with pytest.raises(UserError, match="no 'trial_id' column"):
        results_io.read_rows(tmp_path)


@pytest.mark.parametrize("text", ["{not json", json.dumps({"decisions": "nope"}), json.dumps([1, 2])])
def test_damaged_scheduler_state_is_refused(tmp_path, text):
    (tmp_path / results_io.SCHEDULER_STATE).write_text(text)
    with pytest.raises(UserError, match="damaged scheduler state"):
        results_io.read_decisions(tmp_path)


def test_damaged_state_on_resume_is_one_line(tmp_path):
    cfg = _demo()
    config_io.save(cfg, tmp_path / "config.yaml")
    (tmp_path / results_io.SCHEDULER_STATE).write_text('{"version": 2, "evals": [')
    with pytest.raises(UserError, match=r"scheduler_state.json: damaged scheduler state"):
        run_search(cfg, tmp_path, resume=True)


def test_fresh_search_never_loads_a_stale_state(tmp_path):
    (tmp_path / results_io.SCHEDULER_STATE).write_text(json.dumps({"version": 2}))
    with pytest.raises(UserError, match="pass --resume"):
        run_search(_demo(), tmp_path, resume=False)


def test_resume_with_changed_config_names_what_differs(tmp_path):
    config_io.save(_demo(), tmp_path / "config.yaml")
    with pytest.raises(UserError, match=r"search.stop_confidence.*differ"):
        run_search(_demo(**{"search.stop_confidence": 0.7}), tmp_path, resume=True)
    assert config_io.resolve(config_file=tmp_path / "config.yaml").search.stop_confidence == _demo().search.stop_confidence
