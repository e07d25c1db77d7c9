"""The rooms install as rayq.* subpackages, never as top-level `kernels`, `eval`, `search`, `cluster`."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROOMS = ("kernels", "eval", "search", "cluster")


def _probe(cwd: Path, path_entry: str | None = None) -> str:
    code = ("import importlib.util, sys\n"
            + (f"sys.path.insert(0, {path_entry!r})\n" if path_entry else "")
            + f"print([m for m in {ROOMS!r} if importlib.util.find_spec(m) is not None])\n"
            + "import rayq.kernels, rayq.eval, rayq.search, rayq.cluster\n"
            + "print(rayq.kernels.__name__, rayq.eval.__name__)\n")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True).stdout


def test_editable_install_has_no_top_level_rooms(tmp_path):
    out = _probe(tmp_path)  # outside the checkout, so only installed packages are visible
    assert out.splitlines()[0] == "[]"
    assert "rayq.kernels rayq.eval" in out


@pytest.mark.slow
def test_pip_install_dot_maps_the_rooms(tmp_path):
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(ROOT)], check=True, capture_output=True, text=True)
    assert "warning" not in (done.stdout + done.stderr).lower(), done.stderr  # the packaging installs silently
    installed = sorted(p.name for p in target.iterdir() if not p.name.endswith((".dist-info", ".egg-info")))
    assert not set(ROOMS) & set(installed), installed
    for room in ROOMS:
        assert (target / "rayq" / room / "__init__.py").exists()
    assert (target / "rayq" / "presets" / "tiny.yaml").exists()
    assert (target / "rayq" / "cluster" / "configs" / "gcp-tpu.rayq.yaml").exists()
    out = _probe(tmp_path, str(target))
    assert out.splitlines()[0] == "[]"


def test_help_lists_commands_and_imports_neither_torch_nor_ray():
    rayq = Path(sys.executable).with_name("rayq")
    out = subprocess.run([str(rayq), "--help"], capture_output=True, text=True, check=True).stdout
    for name in ("train", "search", "eval", "data", "ls", "validate", "bench", "export", "report"):
        assert f"  {name}" in out
    for argv in (["--help"], ["validate", "--help"], ["validate", "--explain", "recipe.lr"]):
        code = (f"import sys, rayq.cli; rayq.cli.main({argv!r}); "
                "print('torch' in sys.modules, 'ray' in sys.modules)")
        last = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split()[-2:]
        assert last == ["False", "False"], argv


def _tracked_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / name for name in listed.decode().split("\0") if name]


RESULT_FILES = {".png", ".parquet"}
RESULT_MAX_BYTES = 2 * 1024 * 1024


def test_repository_tracks_no_binaries_and_no_machine_paths():
    machine = "/" + "work/"  # the development machine's checkout root, spelled so this file is clean
    files = _tracked_files()
    assert any(p.name == "pyproject.toml" for p in files)
    for path in files:
        data = path.read_bytes()
        if path.suffix in RESULT_FILES:  # measured results (plots, tables): small, never code or weights
            assert len(data) <= RESULT_MAX_BYTES, f"{path.relative_to(ROOT)}: {len(data)} bytes is not a small result file"
            continue
        assert b"\0" not in data, f"{path.relative_to(ROOT)} is binary"
        assert machine.encode() not in data, f"{path.relative_to(ROOT)} names a machine path"
        assert path.suffix != ".whl"
