"""Build hook: generate the protobuf/gRPC stubs from the .proto before packaging.

The stubs are written into sessiond_client/_proto/ (git-ignored), so both a regular install
and an editable install (`pip install -e`) end up with them. The proto is read from
SESSIOND_PROTO_DIR, else ./proto (an unpacked sdist), else ../../proto (a checkout).

The sdist carries both the proto (under proto/) and the stubs generated from it, so a wheel
built from it, or `pip install` of it, works away from the repository; the build regenerates
the stubs with the build's own grpcio-tools.
"""

import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
PROTO_FILE = "sessiond/v1/session_store.proto"
OUT_DIR = HERE / "sessiond_client" / "_proto"


def proto_root() -> Path:
    if os.environ.get("SESSIOND_PROTO_DIR"):
        return Path(os.environ["SESSIOND_PROTO_DIR"]).resolve()
    if (HERE / "proto" / PROTO_FILE).is_file():
        return HERE / "proto"
    return (HERE.parent.parent / "proto").resolve()


def generate_stubs() -> None:
    root = proto_root()
    source = root / PROTO_FILE
    if not source.is_file():
        if (OUT_DIR / "session_store_pb2.py").is_file():
            return  # building from a tree that already carries generated stubs
        raise SystemExit(f"sessiond-client: {source} not found (set SESSIOND_PROTO_DIR)")

    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    # Flatten the output: protoc writes sessiond/v1/*.py under a temp dir, we move the
    # two modules into _proto/ and point the grpc module's import at the package.
    tmp = OUT_DIR / "_gen"
    tmp.mkdir(exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{well_known}",
        f"--python_out={tmp}",
        f"--pyi_out={tmp}",
        f"--grpc_python_out={tmp}",
        str(source),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("sessiond-client: protoc failed on " + str(source))
    gen = tmp / "sessiond" / "v1"
    for name in ("session_store_pb2.py", "session_store_pb2.pyi", "session_store_pb2_grpc.py"):
        text = (gen / name).read_text()
        text = re.sub(
            r"^from sessiond\.v1 import session_store_pb2",
            "from sessiond_client._proto import session_store_pb2",
            text,
            flags=re.M,
        )
        (OUT_DIR / name).write_text(text)
    for path in sorted(tmp.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    tmp.rmdir()


class GenerateStubs(Command):
    description = "generate the gRPC stubs from the .proto files"
    user_options = []

    def initialize_options(self):
        pass

    def finalize_options(self):
        pass

    def run(self):
        generate_stubs()


class BuildPy(build_py):
    def run(self):
        generate_stubs()
        super().run()


class Sdist(sdist):
    """Generates the stubs first (so the package carries them) and adds the proto."""

    def run(self):
        generate_stubs()
        super().run()

    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        source = proto_root() / PROTO_FILE
        if source.is_file():
            target = Path(base_dir) / "proto" / PROTO_FILE
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "generate":
    generate_stubs()
    sys.exit(0)

setup(cmdclass={"build_py": BuildPy, "sdist": Sdist, "generate": GenerateStubs})
