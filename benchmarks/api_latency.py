"""API latency: NovaCron's list and create against a bare FastAPI app and a no-op Serve deployment.

The store holds 10,000 VM records (written straight into it); ``GET /api/v1/vms?limit=100`` is
served from the store and never fans out to actors. Baselines, in the same run: the same JSON from
memory under bare uvicorn, and from memory in a no-op Ray Serve deployment.

    python benchmarks/api_latency.py [--records 10000] [--requests 400] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from novacron.cli.cluster import wait_http
from novacron.ids import new_id
from novacron.model import VM, VMSpec
from novacron.states import PowerState, VMState
from novacron.store import Put, Store

TARGET_P50_MS = 10.0
TARGET_RATIO_TO_SERVE = 1.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def fill_store(path: Path, count: int) -> None:
    """``count`` stopped VM records, written in batches straight into the store."""
    store = Store(path)
    batch: list[Put] = []
    for i in range(count):
        spec = VMSpec(name=f"bench-{i:05d}", cpus=1 + i % 8, memory_mib=512 * (1 + i % 16),
                      disk_gib=10, labels={"team": f"t{i % 20}", "tier": "web"})
        vm = VM(id=new_id("vm"), name=spec.name, spec=spec, desired=PowerState.STOPPED,
                state=VMState.STOPPED)
        batch.append(Put("vm", vm.id, vm.model_dump(mode="json", exclude={"revision"}), 0))
        if len(batch) == 500:
            store.commit(batch)
            batch = []
    if batch:
        store.commit(batch)
    store.close()


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_ms": statistics.median(ordered) * 1000,
            "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000}


def measure_get(url: str, requests: int, headers: dict[str, str]) -> dict[str, float]:
    with httpx.Client(timeout=30, headers=headers) as client:
        for _ in range(20):  # warm up connections and caches
            client.get(url).raise_for_status()
        samples = []
        for _ in range(requests):
            start = time.perf_counter()
            client.get(url).raise_for_status()
            samples.append(time.perf_counter() - start)
    return percentiles(samples)


def measure_post(base: str, requests: int, headers: dict[str, str]) -> dict[str, float]:
    with httpx.Client(timeout=60, headers=headers) as client:
        samples = []
        for i in range(requests):
            body = {"name": f"post-{i:04d}", "cpus": 1, "memory_mib": 64, "start": False}
            start = time.perf_counter()
            r = client.post(f"{base}/api/v1/vms", json=body)
            samples.append(time.perf_counter() - start)
            if r.status_code != 202:
                raise RuntimeError(f"create failed: {r.status_code} {r.text}")
    return percentiles(samples)


BARE_APP = """
import json, sys
from fastapi import FastAPI
from fastapi.responses import JSONResponse
import uvicorn
payload = json.load(open(sys.argv[1]))
app = FastAPI()
@app.get("/api/v1/vms")
async def vms() -> JSONResponse:
    return JSONResponse(payload)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="error")
"""


def run(records: int, requests: int, posts: int) -> dict[str, Any]:
    import ray
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from ray import serve

    from actors.runtime import admin_token, start_control_plane, stop_control_plane
    from novacron.config import Settings
    from serve.deployment import deploy

    workdir = Path(tempfile.mkdtemp(prefix="nc-bench-api-"))
    settings = Settings(state_dir=workdir, namespace="nc-bench-api", sim_hosts=4,
                        api_port=free_port())
    fill_store(settings.store_path, records)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR,
             log_to_driver=False)
    logging.getLogger("ray.serve").setLevel(logging.ERROR)
    bare: subprocess.Popen[bytes] | None = None
    try:
        start_control_plane(settings)
        deploy(settings)
        base = f"http://127.0.0.1:{settings.api_port}"
        wait_http(f"{base}/readyz")
        auth = {"Authorization": f"Bearer {admin_token(settings)}"}
        list_url = f"{base}/api/v1/vms?limit=100"
        payload = httpx.get(list_url, headers=auth).json()
        payload_path = workdir / "payload.json"
        payload_path.write_text(json.dumps(payload))

        noop_app = FastAPI()

        @noop_app.get("/api/v1/vms")
        async def noop_vms() -> JSONResponse:
            return JSONResponse(payload)

        @serve.deployment(ray_actor_options={"num_cpus": 0})
        @serve.ingress(noop_app)
        class NoOp:
            pass

        serve.run(NoOp.bind(), name="noop", route_prefix="/noop",  # type: ignore[attr-defined]
                  blocking=False)
        wait_http(f"{base}/noop/api/v1/vms")

        bare_port = free_port()
        bare = subprocess.Popen([sys.executable, "-c", BARE_APP, str(payload_path),
                                 str(bare_port)])
        wait_http(f"http://127.0.0.1:{bare_port}/api/v1/vms")

        figures = {  # the baselines get the same header, and ignore it
            "novacron_list": measure_get(list_url, requests, auth),
            "serve_noop_list": measure_get(f"{base}/noop/api/v1/vms", requests, auth),
            "uvicorn_list": measure_get(f"http://127.0.0.1:{bare_port}/api/v1/vms", requests,
                                        auth),
            "novacron_create": measure_post(base, posts, auth),
        }
    finally:
        if bare is not None:
            bare.terminate()
            bare.wait()
        stop_control_plane(settings.namespace, stop_guests=True)
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
    nc_p50 = figures["novacron_list"]["p50_ms"]
    noop_p50 = figures["serve_noop_list"]["p50_ms"]
    ratio = nc_p50 / noop_p50
    return {
        "records": records, "requests": requests, "posts": posts,
        "figures": figures,
        "ratio_list_to_serve_noop": ratio,
        "ratio_list_to_uvicorn": nc_p50 / figures["uvicorn_list"]["p50_ms"],
        "targets": {
            "list_p50_ms": {"target": TARGET_P50_MS, "value": nc_p50,
                            "met": nc_p50 <= TARGET_P50_MS},
            "list_p50_vs_serve_noop": {"target": TARGET_RATIO_TO_SERVE, "value": ratio,
                                       "met": ratio <= TARGET_RATIO_TO_SERVE},
        },
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"API latency with {result['records']:,} VM records in the store "
          f"({result['requests']} GETs, {result['posts']} POSTs each)")
    print(f"{'endpoint':<34}{'p50 ms':>10}{'p99 ms':>10}")
    names = {"novacron_list": "NovaCron GET /api/v1/vms?limit=100",
             "serve_noop_list": "no-op Serve, same JSON",
             "uvicorn_list": "bare uvicorn, same JSON",
             "novacron_create": "NovaCron POST /api/v1/vms"}
    for key, label in names.items():
        f = result["figures"][key]
        print(f"{label:<34}{f['p50_ms']:>10.2f}{f['p99_ms']:>10.2f}")
    print(f"list p50 / no-op Serve p50: {result['ratio_list_to_serve_noop']:.2f}x; "
          f"/ bare uvicorn: {result['ratio_list_to_uvicorn']:.2f}x")
    for name, t in result["targets"].items():
        print(f"target {name}: {t['value']:.2f} (<= {t['target']}) "
              f"{'met' if t['met'] else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--posts", type=int, default=50)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    result = run(args.records, args.requests, args.posts)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
