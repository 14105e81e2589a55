"""The distribution installs one top-level name, and unsupported dependency versions are refused at import."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(ROOT)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"could not build a wheel here: {proc.stderr.strip().splitlines()[-1:]}")
    return next(out.glob("blockrag-*.whl"))


def test_wheel_installs_only_blockrag(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"blockrag"}
    for sub in ("retrievers", "graph", "rerankers", "attention_kv", "attention_kv/kernels", "eval"):
        assert f"blockrag/{sub}/__init__.py" in names
    assert "blockrag/py.typed" in names
    assert not any(n.startswith(("examples/", "tests/", "blockrag/examples")) for n in names)


def test_version_and_public_names():
    import blockrag

    assert blockrag.__version__
    out = subprocess.run([sys.executable, "-m", "blockrag", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"blockrag {blockrag.__version__}"
    from blockrag import Collection, Generator, Pipeline, load_path  # noqa: F401

    with pytest.raises(AttributeError):
        blockrag.NoSuchName  # noqa: B018


def test_unsupported_versions_are_refused(monkeypatch):
    from blockrag import _compat

    real = _compat.metadata.version
    monkeypatch.setattr(_compat.metadata, "version",
                        lambda name: "4.40.0" if name == "transformers" else real(name))
    with pytest.raises(_compat.UnsupportedDependency) as err:
        _compat.check_dependencies()
    msg = str(err.value)
    assert "\n" not in msg and "transformers>=5.0,<6" in msg and "4.40.0" in msg

    def missing(name):
        raise _compat.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(_compat.metadata, "version", missing)
    with pytest.raises(_compat.UnsupportedDependency, match="not installed"):
        _compat.check_dependencies()


def test_import_does_not_load_torch():
    code = "import sys, blockrag; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
