#!/usr/bin/env bash
# Creates (or refreshes) the Python venv at <repo>/target/python-venv with grpcio,
# grpcio-tools, flask, pytest and the test tools (flask-login for the login tests, django and
# pytest-django for the Django engine's tests, build for the packaging test), then installs
# sessiond-client from clients/python in editable mode; installing it generates the gRPC
# stubs from proto/ (see setup.py).
#
# Idempotent and quiet: a second run with nothing changed installs nothing. Prints the
# venv's python path as its last line:  PY="$(bash clients/python/setup-env.sh | tail -n1)"
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$root/target/python-venv"
py="$venv/bin/python"
python="${PYTHON:-python3}"

requirements=(
  "setuptools>=77,<90"
  "grpcio>=1.66,<2"
  "grpcio-tools>=1.66,<2"
  "flask>=3.1,<4"
  "flask-login>=0.6.3,<1"
  "django>=5.2,<5.3"
  "pytest-django>=4.9,<5"
  "pytest>=8,<10"
  "build>=1.2,<2"
)

if [ ! -x "$py" ]; then
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 9))' \
    || { echo "setup-env.sh: need Python >= 3.9 (set PYTHON=...)" >&2; exit 1; }
  mkdir -p "$root/target"
  "$python" -m venv "$venv"
fi

# Reinstall only when the requirements, the build files or the protos changed.
stamp="$venv/.sessiond-client.stamp"
want="$(
  {
    printf '%s\n' "${requirements[@]}"
    cat "$here/pyproject.toml" "$here/setup.py"
    find "$root/proto" -name '*.proto' -type f | LC_ALL=C sort | xargs cat
  } | sha256sum | cut -d' ' -f1
)"
have="$(cat "$stamp" 2>/dev/null || true)"

if [ "$have" != "$want" ] \
  || [ ! -f "$here/sessiond_client/_proto/session_store_pb2_grpc.py" ] \
  || ! "$py" -c 'import sessiond_client.client, flask, pytest' >/dev/null 2>&1; then
  pip=("$py" -m pip --quiet --disable-pip-version-check --no-input)
  "${pip[@]}" install "${requirements[@]}"
  # No build isolation: the build uses the venv's grpcio-tools, so the generated stubs
  # match the grpcio they run against.
  "${pip[@]}" install --no-build-isolation --editable "$here"
  echo "$want" >"$stamp"
fi

echo "$py"
