#!/usr/bin/env bash
# Quick start: set up .venv, build the tiny model's .mar, start TorchServe, generate one image at the
# design defaults (768x768, 50 steps, guidance 7.5) and save it as astronaut.png. TorchServe keeps running
# (logs and key_file.json in run/); stop it with: (cd run && ../.venv/bin/torchserve --stop)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export HF_HUB_OFFLINE=1
scripts/setup.sh
./build_mar.sh --tiny --force  # rebuilt on every run

mkdir -p run
cd run
../.venv/bin/torchserve --stop --foreground >/dev/null 2>&1 || true
echo "demo: starting TorchServe (logs in run/logs)"
../.venv/bin/torchserve --start --ncs --ts-config ../config.properties --model-store ../model_store \
  --models stable_diffusion=stable_diffusion.mar >/dev/null
for second in $(seq 1 180); do
  if [ -f key_file.json ]; then
    management_key=$(../.venv/bin/python -c 'import json; print(json.load(open("key_file.json"))["management"]["key"])')
    if curl -sf -H "Authorization: Bearer $management_key" http://127.0.0.1:8081/models/stable_diffusion \
        | grep -q '"status": "READY"'; then
      echo "demo: worker READY after ${second} s"
      break
    fi
  fi
  [ "$second" = 180 ] && { echo "demo: no READY worker after 180 s; see run/logs/model_log.log" >&2; exit 1; }
  sleep 1
done

TOKEN=$(../.venv/bin/python -c 'import json; print(json.load(open("key_file.json"))["inference"]["key"])')
echo "demo: generating 768x768, 50 steps with the tiny model (about 30 s on 2 idle CPU cores; minutes on a busy machine)"
curl -sf -o ../astronaut.png -D - -H "Authorization: Bearer $TOKEN" -H "Accept: image/png" \
  -H "Content-Type: text/plain" --data "a photo of an astronaut riding a horse on mars" \
  http://127.0.0.1:8080/predictions/stable_diffusion | grep -i '^x-seeds'
echo "demo: wrote astronaut.png ($(wc -c < ../astronaut.png) bytes). The tiny model has random weights, so it shows noise."
echo "demo: TorchServe is still running; stop it with: (cd run && ../.venv/bin/torchserve --stop)"
