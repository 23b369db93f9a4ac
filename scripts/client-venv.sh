#!/usr/bin/env bash
# Makes .client-venv with the pinned official OpenAI Python SDK for tests/openai_sdk.rs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .client-venv/bin/python ]; then
    python3 -m venv .client-venv
fi
.client-venv/bin/pip install --quiet --disable-pip-version-check -r tests/clients/requirements.txt
.client-venv/bin/python -c "import openai; print('openai', openai.__version__, 'in .client-venv')"
