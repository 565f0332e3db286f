"""Click → updated mask round trip of `fastsam3d serve`, one client and several concurrent ones.

A real uvicorn server on 127.0.0.1 (in this process, like the tests), a real HTTP client (httpx). One
"round trip" = POST the click, then GET the box of the labelmap the answer says changed (`labelmap.raw`, what
the browser page fetches to update its overlay): server time and transfer included. The first click of a session (the crop encode) is reported on its own.

    python benchmarks/serve_latency.py                                  # tiny + default model, example CT
    python benchmarks/serve_latency.py --models fastsam3d-tiny --clicks 40 --sessions 8
    python benchmarks/serve_latency.py --checkpoint FastSAM3D.pth       # real weights instead of seeded ones

Without --checkpoint each preset gets seeded random weights: the time per encode / decoder step does not
depend on the weight values, but the masks do (random weights give noisy masks, so with --max-crops > 1
objects grow extension crops that trained weights would not need; hence the default --max-crops 1).
Clicks: the first liver click of examples/abdomen_clicks.json, then points within ±`--spread` mm of it,
alternating include / exclude (seeded).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def click_points(first_ras: list[float], count: int, spread: float, seed: int) -> list[tuple[list[float], bool]]:
    rng = np.random.default_rng(seed)
    points = [(list(first_ras), True)]
    for n in range(1, count):
        offset = rng.uniform(-spread, spread, size=3)
        points.append(([float(v) for v in np.asarray(first_ras) + offset], n % 2 == 1 or n % 4 == 0))
    return points


def one_session(client, volume_name: str, points, record: dict) -> None:
    sid = client.post("/api/sessions", json={"path": volume_name}).json()["id"]
    client.post(f"/api/sessions/{sid}/objects", json={"name": "liver"})
    for n, (point, include) in enumerate(points):
        start = time.perf_counter()
        response = client.post(f"/api/sessions/{sid}/objects/liver/clicks",
                               json={"point": point, "include": include, "space": "ras"})
        if response.status_code != 200:
            raise SystemExit(f"click failed: {response.text}")
        changed = response.json()["changed"]
        if changed is not None:
            fetched = time.perf_counter()
            box = client.get(f"/api/sessions/{sid}/labelmap.raw",
                             params={"start": ",".join(map(str, changed["start"])),
                                     "shape": ",".join(map(str, changed["shape"]))})
            np.frombuffer(box.content, dtype=box.headers["X-Labelmap-Dtype"])
            record["box_bytes"].append(len(box.content))
            record["box_ms"].append((time.perf_counter() - fetched) * 1000.0)
        round_trip = (time.perf_counter() - start) * 1000.0
        timing = response.json()["timing"]
        record["first" if n == 0 else "next"].append(round_trip)
        if n:
            record["server"].append(timing["ms"])
            record["modes"].append(timing["mode"])
            record["encodes"] += int(timing["encode"] > 0)
    client.delete(f"/api/sessions/{sid}")


def run_model(preset: str, checkpoint: Path | None, volume: Path, points, args) -> dict:
    import httpx
    import torch

    from fastsam3d_cli.serve.app import ServeConfig
    from fastsam3d_cli.serve.server import BackgroundServer
    from fastsam3d_cli.weights.loading import load_inference_model

    with tempfile.TemporaryDirectory() as folder:
        if checkpoint is None:
            from fastsam3d_cli.model import build_model
            from fastsam3d_cli.model.checkpoint import save_checkpoint

            torch.manual_seed(0)
            model = build_model(preset)
            checkpoint = Path(folder) / f"{preset}.pth"
            save_checkpoint(checkpoint, model.state_dict(), config=model.config.to_dict())
            del model
        loaded = load_inference_model(checkpoint=checkpoint, device=args.device)
        config = ServeConfig(loaded, root=volume.parent, max_crops=args.max_crops, max_sessions=args.sessions + 1)
        result = {"model": loaded.preset, "device": str(loaded.device), "attention": loaded.attention}
        with BackgroundServer(config) as url:
            record = {"first": [], "next": [], "server": [], "modes": [], "encodes": 0, "box_bytes": [], "box_ms": []}
            with httpx.Client(base_url=url, timeout=600) as client:
                one_session(client, volume.name, points, record)
            result["single"] = summarise(record)
            if args.sessions > 1:
                records = [{"first": [], "next": [], "server": [], "modes": [], "encodes": 0, "box_bytes": [], "box_ms": []}
                           for _ in range(args.sessions)]
                per_session = points[: args.concurrent_clicks]

                def worker(n: int) -> None:
                    with httpx.Client(base_url=url, timeout=600) as client:
                        one_session(client, volume.name, per_session, records[n])

                start = time.perf_counter()
                threads = [threading.Thread(target=worker, args=(n,)) for n in range(args.sessions)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                wall = time.perf_counter() - start
                merged = {key: sum((r[key] for r in records), [] if key != "encodes" else 0) for key in records[0]}
                result["concurrent"] = {**summarise(merged), "sessions": args.sessions, "wall_s": round(wall, 2),
                                        "clicks_per_s": round(args.sessions * len(per_session) / wall, 2)}
    return result


def summarise(record: dict) -> dict:
    return {"first_click_ms_p50": round(percentile(record["first"], 50), 1),
            "round_trip_ms_p50": round(percentile(record["next"], 50), 1),
            "round_trip_ms_p95": round(percentile(record["next"], 95), 1),
            "server_ms_p50": round(percentile(record["server"], 50), 1),
            "server_ms_p95": round(percentile(record["server"], 95), 1),
            "box_ms_p50": round(percentile(record["box_ms"], 50), 1),
            "box_kb_p50": round(percentile(record["box_bytes"], 50) / 1024.0, 1),
            "clicks": len(record["next"]), "incremental": record["modes"].count("incremental"),
            "replayed": record["modes"].count("replay"), "encodes_after_first": record["encodes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--volume", type=Path, default=REPO / "examples" / "abdomen_ct.nii.gz")
    parser.add_argument("--models", default="fastsam3d-tiny,fastsam3d", help="comma-separated presets")
    parser.add_argument("--checkpoint", type=Path, default=None, help="real weights (replaces --models)")
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--spread", type=float, default=6.0, help="mm around the first click")
    parser.add_argument("--sessions", type=int, default=8, help="concurrent clients (1: skip that part)")
    parser.add_argument("--concurrent-clicks", type=int, default=5)
    parser.add_argument("--max-crops", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    first = json.loads((REPO / "examples" / "abdomen_clicks.json").read_text())["objects"][0]["points"][0]
    points = click_points(first, args.clicks, args.spread, args.seed)
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC · {platform.machine()} · "
          f"{os.cpu_count()} CPUs · torch {torch.__version__} · {torch.get_num_threads()} threads · "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"# {' '.join(sys.argv)}")
    runs = [(None, args.checkpoint)] if args.checkpoint else [(m.strip(), None) for m in args.models.split(",")]
    for preset, checkpoint in runs:
        result = run_model(preset, checkpoint, args.volume.resolve(), points, args)
        print(json.dumps(result))
        sys.stdout.flush()
    print(f"# load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
