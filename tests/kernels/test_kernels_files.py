"""Files the kernels write get the umask's permissions and appear whole (never 0600 regardless)."""

import os
import stat

import pytest
import torch.nn as nn

from rayq.kernels import W8A8Vectorwise, quantize_
from rayq.kernels.files import atomic_write
from rayq.kernels.quantize import save_quantized


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_respects_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "a.json", lambda f: f.write("{}"), binary=False)
        save_quantized(quantize_(nn.Sequential(nn.Linear(8, 8)), W8A8Vectorwise()), tmp_path / "q.pt")
    finally:
        os.umask(old)
    for name in ("a.json", "q.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    assert (tmp_path / "a.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "q.pt"]  # no temp file left behind


def test_a_failed_write_leaves_nothing(tmp_path):
    def boom(f):
        f.write(b"half")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "x.bin", boom)
    assert list(tmp_path.iterdir()) == []
