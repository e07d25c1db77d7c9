"""rayq's live view of a search: the compact table, the stop decisions in it, the Optuna study in
DIR/optuna.db (what optuna-dashboard reads) and Ray's dashboard on loopback."""

import io
import json

import pytest

from rayq.search.dashboards import OPTUNA_STUDY, optuna_storage, optuna_storage_url
from rayq.search.progress import ProgressTable, TrialLine, fit_on_stderr, format_table

ACC, KL = "fp/acc", "ptq/w8a8-vectorwise/kl"


def test_format_table_columns():
    lines = [TrialLine(1, "a1", "wd0.1-bf16", 40, {ACC: (0.5, 0.01), KL: (0.02, 0.0)}, 3, "stopped@40", 40),
             TrialLine(2, "b2", "wd0.01-fp16")]
    text = format_table(lines, [ACC, KL])
    header, first, second = text.splitlines()
    assert header.split() == ["#", "trial", "recipe", "step", "fp/acc", "w8a8-vectorwise/kl", "@eval", "seeds",
                              "status"]
    assert first.split() == ["1", "a1", "wd0.1-bf16", "40", "0.5±0.01", "0.02", "40", "3", "stopped@40"]
    assert second.split()[-1] == "running" and "–" in second


def test_table_follows_results_and_reads_stop_decisions(tmp_path):
    from ray.tune.experiment import Trial

    (tmp_path / "scheduler_state.json").write_text(json.dumps({"version": 1, "decisions": [
        {"trial_id": "s", "action": "STOP", "kind": "milestone", "milestone": 20, "step": 20,
         "reason": "rank 2/2 at milestone 20"}]}))
    buf = io.StringIO()
    table = ProgressTable([ACC, KL], 40, tmp_path, lambda c: f"wd{c['recipe.weight_decay']:g}", stream=buf)
    done, stopped = (Trial("fn", config={"recipe.weight_decay": wd}, trial_id=t, stub=True)
                     for t, wd in (("c", 0.1), ("s", 0.01)))
    for trial in (done, stopped):
        table.on_trial_start(0, [], trial)
    evaluated = {ACC: 0.4, KL: 0.03, f"{ACC}_seed_se": 0.01, f"{KL}_seed_se": 0.002, "seeds": 2}
    table.on_trial_result(0, [], stopped, {"step": 20, **evaluated, "done": True})
    table.on_trial_result(0, [], done, {"step": 20, **evaluated})
    table.on_trial_result(0, [], done, {"step": 30, ACC: 0.4, KL: 0.03, "seeds": 2})  # carried forward
    table.on_trial_complete(0, [], stopped)
    table.on_trial_complete(0, [], done)
    assert table.lines["s"].status == "stopped@20" and table.lines["c"].status == "ended early"
    assert table.lines["c"].step == 30 and table.lines["c"].evaluated_at == 20  # a carried value is not news
    out = buf.getvalue()
    assert "#2 s wd0.01 step 20: stopped@20 (rank 2/2 at milestone 20)" in out
    assert "fp/acc 0.4±0.01, w8a8-vectorwise/kl 0.03±0.002 (2 seeds)" in out
    assert out.count("evaluated") == 2
    table.on_experiment_end([])
    assert buf.getvalue().splitlines()[-3].split()[0] == "#"
    table.interval = 0.0
    before = buf.getvalue()
    table.on_step_end(0, [])
    assert buf.getvalue() == before  # nothing happened since the last table: no new one
    table.on_trial_error(0, [], done)
    table.on_step_end(0, [])
    assert buf.getvalue().splitlines()[-2].split()[:2] == ["1", "c"]  # a fresh table, trial c's row first
    assert buf.getvalue().splitlines()[-2].split()[-1] == "error"


def test_optuna_study_lands_in_the_search_dir(tmp_path):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(space={"recipe.weight_decay": optuna.distributions.FloatDistribution(1e-3, 0.1, log=True)},
                            metric=[ACC, KL], mode=["max", "min"], storage=optuna_storage(tmp_path),
                            study_name=OPTUNA_STUDY, seed=0)
    config = searcher.suggest("t1")
    assert 1e-3 <= config["recipe.weight_decay"] <= 0.1
    searcher.on_trial_complete("t1", {ACC: 0.5, KL: 0.02})
    assert optuna_storage_url(tmp_path) == f"sqlite:///{tmp_path.resolve()}/optuna.db"
    study = optuna.load_study(study_name=OPTUNA_STUDY, storage=optuna_storage_url(tmp_path))  # as optuna-dashboard
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.values == [0.5, 0.02]
    buf = io.StringIO()
    ProgressTable([ACC, KL], 4, tmp_path, str, stream=buf).setup()  # what `rayq search` prints at the start
    assert f"optuna-dashboard {optuna_storage_url(tmp_path)}" in buf.getvalue()


@pytest.mark.ray
def test_tune_run_prints_rayq_table_not_rays(tmp_path, capfd):
    """A real Tune run (toy trainable, the real MilestoneScheduler): stop decisions reach the table,
    Ray's own table stays off stdout."""
    import ray
    import ray.tune

    from rayq.cluster.trainer import connect
    from rayq.search.objectives import parse_objectives
    from rayq.search.scheduler import MilestoneScheduler

    def trainable(config):
        for step in range(1, 5):
            q = config["q"]
            ray.tune.report({"step": step, ACC: q, KL: 1 - q, f"{ACC}_seed_se": 0.0, f"{KL}_seed_se": 0.0,
                             "train/loss": 1.0, "seeds": 1})

    buf = io.StringIO()
    objectives = parse_objectives([f"{ACC}:max", f"{KL}:min"])
    connect(None, num_cpus=1)  # the embedded Ray, on loopback
    try:
        tuner = ray.tune.Tuner(
            ray.tune.with_resources(trainable, {"CPU": 0.25}),
            param_space={"q": ray.tune.grid_search([0.9, 0.1])},
            tune_config=ray.tune.TuneConfig(
                scheduler=MilestoneScheduler(objectives, [2], eta=3, rule="moasha", state_path=str(tmp_path / "scheduler_state.json"),
                                             verbose=False),
                max_concurrent_trials=1),
            run_config=ray.tune.RunConfig(
                name="t", storage_path=str(tmp_path / "ray"), verbose=0,
                callbacks=[ProgressTable([ACC, KL], 4, tmp_path, lambda c: f"q{c['q']}", stream=buf)]))
        fit_on_stderr(tuner)
    finally:
        ray.shutdown()
    out = buf.getvalue()
    assert "q0.9 step 4: completed" in out and "q0.1 step 2: stopped@2" in out
    captured = capfd.readouterr()
    assert captured.out == ""  # stdout is for rayq's results only
    assert "Trial status" not in captured.err  # Ray's heartbeat table is off (verbose=0)
    # where `rayq search` says TensorBoard's files are: one events file per trial under the Tune dir
    assert len(list((tmp_path / "ray" / "t").glob("*/events.out.tfevents*"))) == 2


@pytest.mark.ray
def test_dashboard_on_loopback():
    pytest.importorskip("ray.dashboard.optional_deps", reason="needs ray[default]")
    import urllib.request

    import ray

    from rayq.cluster.trainer import connect

    url = connect(None, num_cpus=1, dashboard=True)
    try:
        assert url.startswith("http://127.0.0.1:")
        # a public endpoint: everything else wants Ray 2.60's auth token (`ray get-auth-token`)
        with urllib.request.urlopen(url + "/api/authentication_mode", timeout=30) as resp:
            assert resp.status == 200 and "authentication_mode" in json.loads(resp.read())
    finally:
        ray.shutdown()
