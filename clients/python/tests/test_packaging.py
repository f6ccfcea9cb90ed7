"""The sdist and the wheel are installable away from the repository: built here (the wheel
from the sdist), each is installed into a fresh venv, imported from there and makes real
calls. The fresh venvs take their dependencies from PyPI (or pip's cache, or whatever PIP_*
settings point at); the sdist is built by pip in its own isolated build environment."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent
STEP_TIMEOUT = 240  # seconds for one build or one install; an install fetches dependencies

pytestmark = pytest.mark.packaging

USE = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    import sessiond_client
    from sessiond_client import SessionClient, NotFound
    from sessiond_client.aio import SessionClient as AsyncClient

    where = Path(sessiond_client.__file__).resolve()
    assert where.is_relative_to(Path(sys.prefix).resolve()), where  # not the checkout
    assert (where.parent / "py.typed").is_file()
    assert (where.parent / "_proto" / "session_store_pb2.pyi").is_file()
    with SessionClient(sys.argv[1]) as c:
        s = c.create(attributes={"from": sys.argv[2]})
        assert c.get(s.id).attributes == {"from": sys.argv[2].encode()}

    async def main():
        async with AsyncClient(sys.argv[1]) as c:
            assert (await c.get(s.id)).id == s.id
            await c.destroy(s.id)
            try:
                await c.get(s.id)
            except NotFound:
                return
            raise AssertionError("destroyed, yet found")

    asyncio.run(main())
    print("ok", where)
    """
)


def run(args, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, timeout=STEP_TIMEOUT, **kw)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """The sdist, and the wheel built from it (with this venv's setuptools and grpcio-tools)."""
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(PACKAGE)])
    (sdist,) = out.glob("sessiond_client-*.tar.gz")
    (wheel,) = out.glob("sessiond_client-*.whl")
    return sdist, wheel


def test_both_carry_the_stubs_and_py_typed(artifacts):
    sdist, wheel = artifacts
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert "proto/sessiond/v1/session_store.proto" in names
    with zipfile.ZipFile(wheel) as whl:
        wheel_names = set(whl.namelist())
    for path in (
        "sessiond_client/py.typed",
        "sessiond_client/aio.py",
        "sessiond_client/_proto/session_store_pb2.py",
        "sessiond_client/_proto/session_store_pb2.pyi",
        "sessiond_client/_proto/session_store_pb2_grpc.py",
    ):
        assert path in names, f"sdist lacks {path}"
        assert path in wheel_names, f"wheel lacks {path}"


@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_installs_into_a_fresh_venv_and_works(kind, artifacts, sessiond, tmp_path):
    artifact = artifacts[1] if kind == "wheel" else artifacts[0]
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "--quiet", "--disable-pip-version-check", "--no-input"]
    run([*pip, "install", str(artifact)], cwd=tmp_path)
    # From outside the checkout, with nothing of it on the path.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = run([str(python), "-c", USE, sessiond.addr, kind], cwd=tmp_path, env=env)
    assert done.stdout.startswith("ok "), done.stdout
