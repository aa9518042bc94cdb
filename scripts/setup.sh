#!/usr/bin/env bash
# Create .venv with everything needed to build, serve and test. Safe to re-run: an up-to-date .venv is kept.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

if ! command -v java >/dev/null 2>&1; then
  cat >&2 <<'MSG'
setup: Java 17 or newer is required (TorchServe's frontend is a Java program) and none was found.
  Debian/Ubuntu: sudo apt-get update && sudo apt-get install -y openjdk-17-jre-headless
  Fedora/RHEL:   sudo dnf install -y java-17-openjdk-headless
  macOS:         brew install openjdk@17
MSG
  exit 1
fi
java_major=$(java -version 2>&1 | awk -F'"' '/version/ {split($2, v, "."); print (v[1] == "1" ? v[2] : v[1]); exit}')
if [ "${java_major:-0}" -lt 17 ]; then
  echo "setup: Java $java_major found, TorchServe 0.12 needs 17 or newer (see the install commands above in this script)" >&2
  exit 1
fi

python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "setup: Python 3.10 or newer is required ($python is $("$python" --version 2>&1))" >&2
  exit 1
fi

# nginx and its njs module: the load balancer and gateway of scripts/multinode.sh (one address for several models)
# and of their serving tests (which fail without them).
njs=/usr/lib/nginx/modules/ngx_http_js_module.so
if { ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; } || [ ! -f "$njs" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian's nginx and its njs module (the gateway of scripts/multinode.sh)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx \
      libnginx-mod-http-js
  else
    echo "setup: WARNING: nginx or its njs module is missing and cannot be installed here" \
         "(needs root and apt-get);" \
         "tests/test_serving_multinode.py and tests/test_serving_gateway.py will fail until they are installed" \
         "(Debian/Ubuntu: apt-get install nginx libnginx-mod-http-js)" >&2
  fi
fi

stamp=.venv/.installed
if [ -f "$stamp" ] && [ "$stamp" -nt constraints.txt ] && [ "$stamp" -nt setup.py ]; then
  echo "setup: .venv is up to date"
  exit 0
fi
echo "setup: creating .venv and installing the pinned dependencies (about 1.3 GB, a minute or two)"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --progress-bar on -c constraints.txt -e ".[test]"
touch "$stamp"
echo "setup: done"
