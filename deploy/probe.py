#!/usr/bin/env python3
"""Kubernetes exec probe for TorchServe with token authorization on: ``probe.py live`` or ``probe.py ready``.

With token authorization on, every inference call, /ping included, needs the inference key, so an httpGet
probe cannot be used without turning authorization off. This probe runs inside the container instead:

- ``live``: the frontend answers HTTP on /ping. It asks *without* a key, so the answer is TorchServe's refusal
  (400): that proves the server is up and tells nothing. No key is read.
- ``ready``: reads the keys from ``key_file.json`` (which only the server's user can read, mode 0600), then
  asks /ping with the inference key (200 "Healthy": every model has its minWorkers started) and the management
  API for each ``--model`` (every registered model when none is named): at least one worker READY. TorchServe
  marks a worker READY only when the handler's initialize() has returned, after loading and the warm-up
  generation, so the pod takes traffic only then.
  The key file is read on every probe, so keys renewed through the token API are picked up.

Standard library only: it runs with whatever Python the serving image has. Exit 0 when healthy, 1 otherwise,
with one line saying why.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path


def fetch(url: str, key: str | None, timeout: float) -> tuple[int, str]:
    """(status, body) of a GET; raises OSError when nothing answers."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8", "replace")


def live(args) -> str:
    status, _ = fetch(f"{args.url}/ping", None, args.timeout)
    return f"frontend answered /ping ({status})"


def expiry_time(text: str) -> datetime:
    """A key's ``expiration time`` as TorchServe writes it, e.g. ``2026-12-06T03:50:37.324063284+00:00``.

    TorchServe writes nanoseconds, and Python 3.10's ``fromisoformat`` reads only 3 or 6 fraction digits (and no
    ``Z``): the fraction is cut or padded to microseconds first.
    """
    text = text.strip().replace("Z", "+00:00")
    return datetime.fromisoformat(re.sub(r"\.(\d+)", lambda digits: "." + digits.group(1)[:6].ljust(6, "0"), text,
                                         count=1))


def read_key(path: Path, kind: str) -> str:
    keys = json.loads(path.read_text())
    entry = keys[kind]
    expires = entry.get("expiration time")
    if expires and expiry_time(expires) <= datetime.now(timezone.utc):
        raise ProbeFailed(f"the {kind} key in {path} expired at {expires}: renew it through the token API "
                          "(or raise token_expiration_min)")
    return entry["key"]


def ready(args) -> str:
    if not args.key_file.is_file():
        raise ProbeFailed(f"no key file at {args.key_file}: TorchServe writes it into its working directory")
    status, body = fetch(f"{args.url}/ping", read_key(args.key_file, "inference"), args.timeout)
    if status != 200:
        raise ProbeFailed(f"/ping answered {status}: {body.strip()[:200]}")
    models = args.model or registered_models(args)
    if not models:
        raise ProbeFailed("no model is registered yet")
    for model in models:
        status, body = fetch(f"{args.management_url}/models/{model}", read_key(args.key_file, "management"),
                             args.timeout)
        if status != 200:
            raise ProbeFailed(f"model {model}: the management API answered {status}: {body.strip()[:200]}")
        workers = [worker for version in json.loads(body) for worker in version.get("workers", [])]
        if not any(worker.get("status") == "READY" for worker in workers):
            raise ProbeFailed(f"model {model} has no READY worker yet ({len(workers)} starting)")
    return f"ready: /ping is Healthy and {', '.join(models)} has a READY worker"


def registered_models(args) -> list[str]:
    status, body = fetch(f"{args.management_url}/models?limit=1000", read_key(args.key_file, "management"),
                         args.timeout)
    if status != 200:
        raise ProbeFailed(f"listing the models: the management API answered {status}: {body.strip()[:200]}")
    return [model["modelName"] for model in json.loads(body)["models"]]


class ProbeFailed(Exception):
    pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("check", choices=("live", "ready"))
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the inference address")
    parser.add_argument("--management-url", default="http://127.0.0.1:8081", help="the management address")
    parser.add_argument("--key-file", type=Path, default=Path("key_file.json"),
                        help="TorchServe's key_file.json (in the directory TorchServe was started from)")
    parser.add_argument("--model", action="append", default=[],
                        help="a model that must have a READY worker (default: every registered model)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each answer")
    args = parser.parse_args(argv)
    try:
        print(live(args) if args.check == "live" else ready(args))
        return 0
    except ProbeFailed as failure:
        print(f"not {args.check}: {failure}")
    except (OSError, ValueError, KeyError) as error:  # nothing listening, a half-written key file, a bad answer
        print(f"not {args.check}: {type(error).__name__}: {error}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
