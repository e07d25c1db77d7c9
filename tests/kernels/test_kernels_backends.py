"""The INT8 backend registry: every path available here is bit-exact, the probe picks an exact
path, the choice is cached per machine and a damaged cache is ignored and rewritten."""

from __future__ import annotations

import json

import pytest
import torch

from rayq.kernels import backends, gemm, machine, quantize_, set_backend
from rayq.kernels.backends import Int8Backend
from rayq.precision import EmulatedHalf

AWKWARD = [(1, 1, 1), (1, 7, 5), (3, 129, 65), (19, 67, 33), (33, 130, 17), (100, 1031, 3)]


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYQ_CACHE_DIR", str(tmp_path))
    backends.forget()
    yield tmp_path
    backends.forget()


def _entry(**fields):
    """A probe cache entry that weighed every path available here."""
    return {"candidates": backends._candidates(), "times_ms": {}, "excluded": {}, **fields}


def _codes(shape, gen, low=-128):
    return torch.randint(low, 128, shape, generator=gen, dtype=torch.int8)


@pytest.mark.parametrize("name", [b.name for b in backends.list_backends("cpu")] + ["fp64"])
def test_every_available_backend_is_bit_exact_on_awkward_shapes(name):
    backend = backends.get_backend(name)
    why = backends.check_exact(backend)
    if why is not None:
        # oneDNN's u8 x s8 kernel saturates its 16-bit pair sums on CPUs without VNNI (AVX2 only):
        # the probe excludes it there; no other path may ever be inexact
        assert name == "onednn_qlinear", why
        assert backends.inexact_reason("onednn") == why
        pytest.skip(f"{name}: {why} on this CPU (excluded by the probe)")
    gen = torch.Generator().manual_seed(7)
    for M, K, N in AWKWARD:
        a, w = _codes((M, K), gen, -127), _codes((N, K), gen, -127)
        got, ref = backend.gemm(a, w), gemm.int_mm_reference(a, w)
        assert got.shape == ref.shape
        assert torch.equal(got.double(), ref.double()), (name, M, K, N)  # |acc| < 2^24: fp32 out exact too
    assert backends.check_exact(backend) is None


@pytest.mark.parametrize("form", ["s8s8", "u8s8", "onednn", "f32"])
def test_every_w8a8_form_matches_the_fp64_reference(form):
    if backends.inexact_reason(form):
        pytest.skip(f"{form}: {backends.inexact_reason(form)}")
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(131, 45))
    x = torch.randn(37, 131)
    x[5] = 0.0  # an all-zero row: epsilon scale, output is exactly the bias
    q = quantize_(lin, "w8a8-vectorwise", inplace=False, backend="eager")
    before = gemm.cpu_kernel()
    try:
        gemm.set_cpu_kernel(form)
        y = q(x)
    finally:
        gemm.set_cpu_kernel(before)
    set_backend(q, "reference")
    ref = q(x)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(y[5], lin[0].bias.detach())
    x[2, 3] = float("nan")
    set_backend(q, "eager")
    gemm.set_cpu_kernel(form)
    try:
        with pytest.raises(ValueError, match="NaN or inf"):
            q(x)
    finally:
        gemm.set_cpu_kernel(before)


def test_inexact_backend_is_caught(monkeypatch):
    off_by_one = Int8Backend("broken", "cpu", lambda: True, lambda a, w: gemm.int8_mm(a, w) + 1, "test double")
    assert "not bit-exact" in backends.check_exact(off_by_one)
    raising = Int8Backend("raising", "cpu", lambda: True, lambda a, w: 1 / 0, "test double")
    assert "raised ZeroDivisionError" in backends.check_exact(raising)


def test_reference_kernel_is_excluded_by_timing():
    times = {"int_mm_s8s8": 2.0, "int_mm_u8s8": 2.5, "onednn_qlinear": 2000.0}
    out = backends.reference_kernels(times)
    assert set(out) == {"onednn_qlinear"} and "ref_int8" in out["onednn_qlinear"]


def test_probe_picks_an_exact_available_path_and_caches_it(cache):
    entry = backends.choice("m<=32")
    assert entry["backend"] in backends.CPU_FORMS and entry["backend"] not in entry["excluded"]
    assert backends.get_backend(entry["backend"]).available()
    assert entry["times_ms"][entry["backend"]] == min(v for k, v in entry["times_ms"].items() if k not in entry["excluded"])
    doc = json.loads(machine.cache_path().read_text())
    assert doc["key"] == machine.machine_key() and doc["torch"] == torch.__version__
    assert doc["entries"]["int8/m<=32"]["backend"] == entry["backend"]
    assert machine.cache_path().parent == cache


def test_cached_choice_is_reused_without_probing(cache, monkeypatch):
    machine.store("int8/m<=512", _entry(backend="int_mm_s8s8", backend_compiled="int_mm_s8s8"))
    monkeypatch.setattr(backends, "probe_cpu", lambda cls: pytest.fail("probed although a valid cache entry exists"))
    assert backends.choose(300) == "s8s8"


@pytest.mark.parametrize("damage", ["{not json", json.dumps([1, 2]), json.dumps({"format": "other"}), "WRONG_BACKEND", "WRONG_KEY"])
def test_damaged_cache_is_ignored_and_rewritten(cache, damage):
    path = machine.cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    if damage == "WRONG_BACKEND":
        machine.store("int8/m<=32", {"backend": "no-such-kernel"})
    elif damage == "WRONG_KEY":
        path.write_text(json.dumps({"format": machine.CACHE_FORMAT, "key": "another-machine",
                                    "entries": {"int8/m<=32": {"backend": "int_mm_u8s8"}}}))
    else:
        path.write_text(damage)
    form = backends.choose(4)
    assert form in backends.CPU_FORMS.values()
    doc = json.loads(path.read_text())  # rewritten: parses, belongs to this machine, holds a real choice
    assert doc["key"] == machine.machine_key()
    assert doc["entries"]["int8/m<=32"]["backend"] in backends.CPU_FORMS
    assert "times_ms" in doc["entries"]["int8/m<=32"]


def test_machine_key_depends_on_torch_version(monkeypatch):
    key = machine.machine_key()
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert machine.machine_key() != key


def test_choose_takes_the_probes_fastest_form_from_the_cache(cache, monkeypatch):
    """Eager calls take the fastest eager linear; compiled calls (one fused quantize pass for
    every form) the fastest GEMM with its dequant pass, as on AMX machines where they differ."""
    machine.store("int8/m>512", _entry(backend="int_mm_s8s8", backend_compiled="onednn_qlinear",
                                       times_ms={"int_mm_s8s8": 9.0, "int_mm_u8s8": 10.0, "onednn_qlinear": 11.0}))
    monkeypatch.setattr(backends, "probe_cpu", lambda key: pytest.fail("probed although a valid cache entry exists"))
    if not gemm.onednn_available():
        pytest.skip("no oneDNN qlinear in this torch build")
    assert backends.choose(4096) == "s8s8"
    assert backends.choose(4096, compiled=True) == "onednn"


def test_a_cache_entry_without_the_compiled_choice_is_probed_again(cache, monkeypatch):
    machine.store("int8/m>512", {"backend": "int_mm_s8s8", "candidates": backends._candidates(), "excluded": {},
                                 "times_ms": {"int_mm_s8s8": 9.0}})
    probed = []
    monkeypatch.setattr(backends, "probe_cpu", lambda key: probed.append(key) or
                        _entry(backend="int_mm_s8s8", backend_compiled="int_mm_s8s8"))
    assert backends.choose(4096, torch.bfloat16) == "s8s8" and probed == ["m>512/bf16"]
    assert backends.choose(4096) == "s8s8" and probed == ["m>512/bf16", "m>512"]


def test_an_entry_probed_before_a_path_existed_is_probed_again(cache, monkeypatch):
    """A cache written before `fp32_exact` joined the registry never weighed it: it is probed again
    (else a machine keeps a 80x slower choice it made without knowing the new path)."""
    machine.store("int8/m<=512", {"backend": "int_mm_s8s8", "backend_compiled": "int_mm_s8s8", "excluded": {},
                                  "times_ms": {"int_mm_s8s8": 9.0}})
    probed = []
    monkeypatch.setattr(backends, "probe_cpu", lambda key: probed.append(key) or _entry(
        backend="int_mm_s8s8", backend_compiled="int_mm_s8s8"))
    assert backends.choose(300) == "s8s8" and probed == ["m<=512"]


def test_f32_form_gives_the_int32_forms_bits_and_is_skipped_when_fp32_matmuls_are_not_ieee():
    """The exact fp32-GEMM form: same output bits as `_int_mm` s8 x s8 (K past one 1024-chunk,
    accumulators past 2^24 where fp32 must round once, as the int32 -> fp32 conversion does); with
    a lowered fp32 matmul precision it is not exact, so a forced f32 runs s8 x s8 instead."""
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(3000, 24))
    with torch.no_grad():
        lin[0].weight[:, :2500] = 1.0  # codes of 127 over most of K: |acc| ~ 3e7 > 2^24
    x = torch.randn(9, 3000)
    x[:, :2500] = 5.0
    q = quantize_(lin, "w8a8-vectorwise", inplace=False, backend="eager")
    before = gemm.cpu_kernel()
    try:
        gemm.set_cpu_kernel("s8s8")
        want = q(x)
        gemm.set_cpu_kernel("f32")
        assert torch.equal(q(x), want)
        with EmulatedHalf(torch.bfloat16, layernorm_fp32=True):  # a bf16 recipe's emulated numerics
            assert torch.equal(q(x), want)
        precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("medium")
        try:
            assert not gemm.fp32_gemm_is_ieee() and not backends.get_backend("fp32_exact").available()
            assert q[0]._cpu_form(x) == "s8s8" and torch.equal(q(x), want)
            with pytest.raises(ValueError, match="not be exact"):
                gemm.set_cpu_kernel("f32")
        finally:
            torch.set_float32_matmul_precision(precision)
    finally:
        gemm.set_cpu_kernel(before)
    a = torch.full((3, 3000), -128, dtype=torch.int8)
    assert torch.equal(gemm.f32_exact_mm(a.float(), a.float().t()).double(),
                       gemm.int_mm_reference(a, a).double().float().double())
