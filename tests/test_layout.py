"""House rules that keep the package importable next to the standard library."""

import importlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_platform_is_a_source_folder_not_a_package():
    assert not (ROOT / "platform" / "__init__.py").exists()
    assert (ROOT / "platform" / "tessera" / "__init__.py").exists()


def test_standard_platform_module_still_imports():
    # With platform/ on sys.path (pytest's pythonpath), `import platform` must still be the stdlib.
    mod = importlib.import_module("platform")
    assert hasattr(mod, "system") and callable(mod.python_version)
    assert "site-packages" not in (mod.__file__ or "") and not Path(mod.__file__).is_relative_to(ROOT)
    # And in a fresh interpreter that imports tessera, numpy and ray's dependencies first.
    out = subprocess.run([sys.executable, "-c", "import tessera, numpy, pyarrow, platform; print(platform.system())"],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip()


def test_models_and_sampling_import_torch_only():
    banned = ("import ray", "from ray", "import deepspeed", "from deepspeed", "torch.distributed")
    for folder in ("models", "sampling"):
        for f in (ROOT / "platform" / "tessera" / folder).glob("**/*.py"):
            text = f.read_text()
            assert not any(b in text for b in banned), f"{f} imports distribution code"
