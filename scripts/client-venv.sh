#!/usr/bin/env bash
# Installs the pinned client suites that cargo test runs against a live ember serve:
#   .client-venv            the official OpenAI Python SDK, langchain-openai, LiteLLM
#                           (tests/clients/requirements.txt; tests/openai_sdk.rs, client_ecosystem.rs)
#   tests/clients/node      the official OpenAI Node SDK (npm ci; tests/client_ecosystem.rs)
#   .guidellm-venv          guidellm (tests/clients/requirements-guidellm.txt; it pulls torch,
#                           ~6 GB: EMBER_SKIP_GUIDELLM=1 leaves it out on a workstation)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .client-venv/bin/python ]; then
    python3 -m venv .client-venv
fi
.client-venv/bin/pip install --quiet --disable-pip-version-check -r tests/clients/requirements.txt
.client-venv/bin/python -c "import openai; print('openai', openai.__version__, 'in .client-venv')"

(cd tests/clients/node && npm ci --no-audit --no-fund --silent)
echo "openai (Node) $(node -p 'require("./tests/clients/node/node_modules/openai/package.json").version') in tests/clients/node"

if [ -z "${EMBER_SKIP_GUIDELLM:-}" ]; then
    if [ ! -x .guidellm-venv/bin/python ]; then
        python3 -m venv .guidellm-venv
    fi
    .guidellm-venv/bin/pip install --quiet --disable-pip-version-check \
        -r tests/clients/requirements-guidellm.txt
    echo "$(.guidellm-venv/bin/guidellm --version) in .guidellm-venv"
fi
