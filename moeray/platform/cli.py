"""The `moeray` command line.

    moeray jobs run SPEC.yaml [--address ADDR]
    moeray serve [MODEL] [--host H] [--port P] [--config FILE] [--api-key KEY ...]
                 [--expert-shards N] [--redundant-experts K] [--transport ray|collective]

Settings resolve as `ServeSettings.load` describes: defaults < --config YAML < MOERAY_* env < flags.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from moeray.platform.settings import ServeSettings, SettingsError


def _serve(opts: argparse.Namespace) -> int:
    overrides = {"model": opts.model, "host": opts.host, "port": opts.port, "served_model_name": opts.served_model_name,
                 "api_keys": opts.api_key or None}
    if opts.max_replicas is not None:
        overrides["autoscaling"] = {"max_replicas": opts.max_replicas}
    expert_parallel = {"shards": opts.expert_shards, "redundant_experts": opts.redundant_experts,
                       "transport": opts.transport}
    if any(v is not None for v in expert_parallel.values()):
        overrides["expert_parallel"] = {k: v for k, v in expert_parallel.items() if v is not None}
    settings = ServeSettings.load(opts.config, overrides)

    import ray
    from ray import serve

    from moeray.platform.serve_app import build_app

    if opts.address:
        ray.init(address=opts.address)
    elif not ray.is_initialized():
        # Logical CPUs: replicas are mostly waiting on each other's steps, not busy in parallel.
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 4), include_dashboard=False)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_app(settings.model_dump(mode="json") | {"api_keys": settings.api_key_values()}),
              name=settings.app_name, route_prefix="/", blocking=False)
    print(f"moeray: serving '{settings.model_name}' at http://{settings.host}:{settings.port}/v1 "
          f"(OpenAI API; Ctrl-C stops)", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    serve.shutdown()
    return 0


def _jobs_run(opts: argparse.Namespace) -> int:
    """Run a fine-tuning job on a local Ray (development), then export its output."""
    import ray

    from moeray.jobs.export import export
    from moeray.jobs.spec import JobSpec
    from moeray.jobs.trainer import prepare, run

    spec = JobSpec.from_yaml(opts.spec)
    data = prepare(spec)  # every data, model and storage error surfaces here, before any worker starts
    if not ray.is_initialized():
        ray.init(address=opts.address or "local", include_dashboard=False)
    result = run(spec, data)
    with result.checkpoint.as_directory() as folder:
        out = export(spec, folder)
    print(f"moeray: job {spec.name} finished at step {result.metrics.get('step')}; output in {out}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moeray", description="Serve and fine-tune DeepSeek-style MoE models on Ray")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="start the OpenAI-compatible endpoint")
    serve_cmd.add_argument("model", nargs="?", help="checkpoint folder (default: the embedded default model)")
    serve_cmd.add_argument("--host")
    serve_cmd.add_argument("--port", type=int)
    serve_cmd.add_argument("--config", help="settings YAML file")
    serve_cmd.add_argument("--api-key", action="append", help="accepted API key (repeatable)")
    serve_cmd.add_argument("--served-model-name")
    serve_cmd.add_argument("--max-replicas", type=int, help="autoscale the model deployment up to this many")
    serve_cmd.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    serve_cmd.add_argument("--expert-shards", type=int, help="routed experts in this many ExpertShard actors")
    serve_cmd.add_argument("--redundant-experts", type=int, help="extra replicas of the hottest experts per layer")
    serve_cmd.add_argument("--transport", choices=["ray", "collective"], help="replica-to-shard transport")
    serve_cmd.set_defaults(run=_serve)
    jobs = commands.add_parser("jobs", help="fine-tuning jobs").add_subparsers(dest="jobs_command", required=True)
    jobs_run = jobs.add_parser("run", help="run a job spec on a local Ray (development)")
    jobs_run.add_argument("spec", help="job spec YAML")
    jobs_run.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    jobs_run.set_defaults(run=_jobs_run)
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return opts.run(opts)
    except (SettingsError, FileNotFoundError, ValueError) as err:
        print(f"moeray: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
