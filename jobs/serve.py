"""Serve: a checkpoint behind OpenAI-compatible HTTP endpoints, as a Ray Serve deployment.

    python -m jobs.serve --config configs/posttrain-demo.yaml

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with `"stream": true` as
server-sent events), GET /v1/models, GET /health. The deployment is jobs.infer.serve.
"""

from __future__ import annotations

from jobs.config import main
from jobs.infer.config import ServeConfig

__all__ = ["ServeConfig", "run"]


def run(cfg: ServeConfig) -> None:
    import threading

    from ray import serve

    from cluster import storage
    from cluster.ray_utils import init_ray
    from jobs.infer.serve import build_app

    app = build_app(cfg)  # verifies the checkpoint before anything starts
    init_ray()
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(app, name="raylm", route_prefix="/")
    url = f"http://{cfg.host}:{cfg.port}"
    if cfg.output:
        storage.write_json(storage.join(cfg.output, "serve.json"), {"url": url, "config": cfg.resolved()})
    print(f"serving {cfg.checkpoint} at {url}/v1/completions and {url}/v1/chat/completions (Ctrl-C stops)", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main(ServeConfig, run)
