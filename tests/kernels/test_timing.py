import time

from rayq.kernels.timing import race, race_with_scout


def test_race_interleaves_candidates_and_reports_median_ms():
    calls: list[str] = []

    def runner(name: str, seconds: float):
        def f():
            calls.append(name)
            time.sleep(seconds)
        return f

    ms = race({"fast": runner("fast", 0.001), "slow": runner("slow", 0.02)}, rounds=3, warmup=1)
    assert calls == ["fast", "slow"] * 4  # one warm-up call each, then round-robin
    assert set(ms) == {"fast", "slow"} and ms["slow"] > ms["fast"] >= 1.0
    assert ms["slow"] >= 20.0


def test_race_rounds_only_when_asked():
    assert race({"a": lambda: time.sleep(0.001)}, rounds=1, warmup=0, digits=None)["a"] >= 1.0
    assert race({"a": lambda: None}, rounds=1, warmup=0, digits=1)["a"] == 0.0


def test_scout_times_a_hopeless_candidate_once_and_races_the_rest():
    calls = {"fast": 0, "hopeless": 0}

    def runner(name, seconds):
        def run():
            calls[name] += 1
            if seconds:  # sleep(0) yields the CPU: a scheduler tick on a loaded machine
                time.sleep(seconds)
        return run

    ms, once = race_with_scout({"fast": runner("fast", 0.0), "hopeless": runner("hopeless", 0.05)}, rounds=4, factor=20)
    assert once == ["hopeless"] and calls == {"fast": 5, "hopeless": 1}
    assert ms["hopeless"] >= 50 and ms["fast"] < 50
    ms, once = race_with_scout({"fast": runner("fast", 0.0), "hopeless": runner("hopeless", 0.05)}, rounds=2, factor=1e9)
    assert once == [] and calls["hopeless"] == 4
