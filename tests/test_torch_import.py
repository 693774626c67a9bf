"""torch stays optional: `import packds` never imports torch, and packds.torch imports without it."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_import_packds_does_not_import_torch():
    r = _run("""
        import sys
        import packds
        assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
        assert "packds.torch" not in sys.modules
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_packds_torch_imports_without_torch():
    # torch hidden: the module still imports and the map-style class is a plain Python class
    r = _run("""
        import sys
        sys.modules["torch"] = None  # import torch -> ImportError
        import packds.torch as pt
        assert pt.PackedDataset.__mro__[1] is object
        try:
            pt.StreamingLoader(None)
        except ImportError as e:
            assert "pip install torch" in str(e)
        else:
            raise AssertionError("StreamingLoader without torch must raise ImportError")
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
