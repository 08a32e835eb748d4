# shellcheck shell=bash
# Sourced by scripts/setup, scripts/demo and scripts/test (from the repository root): the
# project's Python environment. An active virtual environment ($VIRTUAL_ENV) is used as it is;
# otherwise the project's own .venv/ (ignored by git), created by scripts/setup from
# ${PYTHON:-python3}, which may be Debian's externally-managed system Python or a pyenv one.
INVARDIFF_VENV="${VIRTUAL_ENV:-$PWD/.venv}"

# Put the environment first on PATH, as `source .venv/bin/activate` would.
use_project_env() {
  export VIRTUAL_ENV="$INVARDIFF_VENV"
  export PATH="$INVARDIFF_VENV/bin:$PATH"
  hash -r
}
