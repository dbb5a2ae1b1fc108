"""The `moeray` command line.

    moeray jobs run SPEC.yaml [--address ADDR] [--verbose]
    moeray jobs submit SPEC.yaml [--address URL [--retry-timeout S] | --k8s [--namespace NS] [--image IMAGE]]
    moeray jobs status|stop ID [--address URL | --k8s [--namespace NS]]
    moeray jobs logs ID [--follow] [--address URL | --k8s [--namespace NS]]
    moeray jobs list [--address URL | --k8s [--namespace NS]]
    moeray serve [MODEL] [--host H] [--port P] [--config FILE] [--api-key KEY ...] [--lora NAME=URI ...]
                 [--max-loras N] [--lora-prefix URI] [--admin-api-key KEY ...]
                 [--expert-shards N] [--redundant-experts K] [--transport ray|collective]
                 [--reasoning-parser deepseek_r1] [--chat-template FILE] [--verbose]

Settings resolve as `ServeSettings.load` describes: defaults < --config YAML < MOERAY_* env < flags.
Jobs go to a Ray cluster through the Ray Jobs API (`--address`, default $RAY_ADDRESS or
http://127.0.0.1:8265), or with `--k8s` to Kubernetes as KubeRay RayJobs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from moeray.jobs.tracking import TrackingError
from moeray.platform import kube, ray_jobs
from moeray.platform.kube import KubeError
from moeray.platform.preflight import check_serving
from moeray.platform.ray_jobs import JobsApiError
from moeray.platform.settings import ServeSettings, SettingsError
from moeray.storage import StorageError


def _lora_flags(values: list[str] | None) -> dict[str, str] | None:
    """--lora NAME=URI flags as the `lora_adapters` setting."""
    if not values:
        return None
    adapters = {}
    for value in values:
        name, sep, uri = value.partition("=")
        if not sep or not name or not uri:
            raise SettingsError(f"--lora {value!r}: expected NAME=PATH_OR_S3_URI")
        adapters[name] = uri
    return adapters


def _speculative_flag(value: str | None) -> dict | None:
    """--speculative as the `engine.speculative` setting: METHOD[:K] or a JSON object (vLLM's form)."""
    if value is None:
        return None
    if value.lstrip().startswith("{"):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as err:
            raise SettingsError(f"--speculative {value!r}: not valid JSON ({err.msg})") from None
        if not isinstance(parsed, dict):
            raise SettingsError(f"--speculative {value!r}: expected a JSON object")
        return parsed
    method, sep, count = value.partition(":")
    if sep and not count.isdigit():
        raise SettingsError(f"--speculative {value!r}: expected METHOD[:NUM_TOKENS], e.g. mtp:2 or ngram:3")
    return {"method": method, **({"num_speculative_tokens": int(count)} if sep else {})}


def _serve(opts: argparse.Namespace) -> int:
    overrides = {"model": opts.model, "host": opts.host, "port": opts.port, "served_model_name": opts.served_model_name,
                 "api_keys": opts.api_key or None, "admin_api_keys": opts.admin_api_key or None,
                 "lora_adapters": _lora_flags(opts.lora), "max_loras": opts.max_loras,
                 "lora_adapter_prefix": opts.lora_prefix,
                 "reasoning_parser": opts.reasoning_parser, "chat_template": opts.chat_template}
    if opts.max_replicas is not None:
        overrides["autoscaling"] = {"max_replicas": opts.max_replicas}
    if opts.speculative is not None:
        overrides["engine"] = {"speculative": _speculative_flag(opts.speculative)}
    expert_parallel = {"shards": opts.expert_shards, "redundant_experts": opts.redundant_experts,
                       "transport": opts.transport}
    if any(v is not None for v in expert_parallel.values()):
        overrides["expert_parallel"] = {k: v for k, v in expert_parallel.items() if v is not None}
    settings = ServeSettings.load(opts.config, overrides)
    check_serving(settings)  # a bad model or setting fails here, before Ray starts
    if opts.proxy == "haproxy":
        if opts.address:
            print("moeray: --proxy haproxy applies where moeray starts Ray; on an existing cluster set "
                  "RAY_SERVE_ENABLE_HA_PROXY=1 in its nodes' environment instead", file=sys.stderr, flush=True)
            return 2
        # Read by Serve's controller and replicas, which inherit this environment from ray.init.
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"

    import ray
    from ray import serve

    from moeray.platform import drain, launcher

    # Ray's and Serve's own logs (replica output, access lines, the full cause of every error
    # under its request id) stay in the session's log folder unless --verbose asks for them here.
    quiet = _ray_console(opts.verbose)
    logging.getLogger("ray.serve").setLevel(logging.INFO if opts.verbose else logging.WARNING)
    if opts.address:
        context = ray.init(address=opts.address, **quiet)
    else:
        # Logical CPUs: replicas are mostly waiting on each other's steps, not busy in parallel.
        context = ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 4), include_dashboard=False, **quiet)
    if not opts.verbose:
        logs = Path(context.address_info.get("session_dir", "/tmp/ray/session_latest")) / "logs" / "serve"
        print(f"moeray: server logs in {logs} (--verbose shows them here)", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    serve.start(http_options={"host": settings.host, "port": settings.port})
    coordinator = drain.start_coordinator(settings.app_name)  # before the replicas, which look for it
    try:
        launcher.deploy(settings)
    except launcher.ReplicaFailedError as err:
        serve.shutdown()
        print(f"moeray: the model replica failed to start: {err}", file=sys.stderr, flush=True)
        return 2 if err.permanent else 1
    print(f"moeray: serving '{settings.model_name}' at http://{settings.host}:{settings.port}/v1 "
          f"(OpenAI API; Ctrl-C or SIGTERM drains and stops)", flush=True)
    try:
        stop.wait()  # SIGTERM sets it; Ctrl-C interrupts it
    except KeyboardInterrupt:
        pass
    print(f"moeray: draining: new requests get 503 and open ones finish (at most "
          f"{settings.graceful_shutdown_timeout_s:.0f} s; Ctrl-C stops at once)", flush=True)
    try:
        seconds = drain.drain_app(settings.app_name, coordinator, settings.graceful_shutdown_timeout_s)
        print(f"moeray: drained in {seconds:.1f} s", flush=True)
    except KeyboardInterrupt:
        print("moeray: stopping without draining", flush=True)
    finally:
        serve.shutdown()
    return 0


def _ray_console(verbose: bool) -> dict[str, Any]:
    """`ray.init` keywords: Ray's own INFO lines and its workers' output (actors, tasks) reach
    this console only when verbose; otherwise they stay in the session's log files."""
    return {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}


def _eval(opts: argparse.Namespace) -> int:
    """Score a checkpoint or an endpoint on an eval spec's tasks; print the table (and the JSON)."""
    from moeray.jobs.eval.runner import run_eval
    from moeray.jobs.eval.spec import EvalJobSpec

    spec = EvalJobSpec.from_yaml(opts.spec)
    if opts.output:
        spec = spec.model_copy(update={"output": opts.output})
    report = run_eval(spec)
    if opts.json:
        print(json.dumps(report, indent=2))
    if spec.output:
        print(f"moeray: report in {spec.output}", flush=True)
    return 0


def _jobs_run(opts: argparse.Namespace) -> int:
    """Run a training job on a local Ray (development), then export its output; an eval spec
    (one with `tasks`) is run as `moeray eval` runs it."""
    from moeray.jobs.spec import JobSpec, load_spec

    spec = load_spec(opts.spec)
    if not isinstance(spec, JobSpec):
        from moeray.jobs.eval.runner import run_eval

        run_eval(spec)
        print(f"moeray: eval {spec.name} finished" + (f"; report in {spec.output}" if spec.output else ""), flush=True)
        return 0
    import ray

    from moeray.jobs.console import StepPrinter
    from moeray.jobs.export import export
    from moeray.jobs.tracking import JobTracking
    from moeray.jobs.trainer import prepare, run

    prepared = prepare(spec)  # every data, model and storage error surfaces here, before any worker starts
    if not ray.is_initialized():
        # Under the Ray Jobs API RAY_ADDRESS names the cluster the job was submitted to.
        address = opts.address or os.environ.get("RAY_ADDRESS") or "local"
        # A local Ray gets logical CPUs beyond the cores, so that Ray Data's tasks still run
        # beside training workers that reserve every core for their torch threads.
        local = {"include_dashboard": False, "num_cpus": max(os.cpu_count() or 1, 4)}
        ray.init(address=address, **(local if address == "local" else {}), **_ray_console(opts.verbose))
    tracking = JobTracking.start(spec)  # an unreachable tracker fails here, before training
    try:
        result = run(spec, prepared, verbose=opts.verbose, sinks=[StepPrinter(), tracking])
        with result.checkpoint.as_directory() as folder:
            out = export(spec, folder)
    except BaseException:
        tracking.fail()
        raise
    tracking.finish(out)
    print(f"moeray: job {spec.name} finished at step {result.metrics.get('step')}; output in {out}", flush=True)
    return 0


def _jobs_submit(opts: argparse.Namespace) -> int:
    if opts.k8s:
        options = {"image": opts.image} if opts.image else {}
        name = kube.submit(opts.spec, opts.namespace, **options)
        print(f"moeray: created RayJob {opts.namespace}/{name}; follow it with: moeray jobs logs {name} --k8s "
              f"--namespace {opts.namespace} --follow", flush=True)
        return 0
    submission_id = ray_jobs.submit(opts.spec, opts.address, retry_timeout_s=opts.retry_timeout)
    print(f"moeray: submitted {submission_id} to {ray_jobs.resolve_address(opts.address)}; follow it with: "
          f"moeray jobs logs {submission_id} --follow", flush=True)
    return 0


def _jobs_status(opts: argparse.Namespace) -> int:
    if opts.k8s:
        print(kube.status(opts.id, opts.namespace).summary())
        return 0
    info = ray_jobs.status(opts.id, opts.address, opts.retry_timeout)
    print(f"{info.submission_id}: {info.status}{'; ' + info.message if info.message else ''}")
    return 0


def _jobs_logs(opts: argparse.Namespace) -> int:
    if opts.k8s:
        chunks = kube.logs(opts.id, opts.namespace, follow=opts.follow)
    else:
        chunks = ray_jobs.logs(opts.id, opts.address, follow=opts.follow, retry_timeout_s=opts.retry_timeout)
    for chunk in chunks:
        sys.stdout.write(chunk if chunk.endswith("\n") or opts.follow else chunk + "\n")
        sys.stdout.flush()
    return 0


def _jobs_stop(opts: argparse.Namespace) -> int:
    if opts.k8s:
        kube.stop(opts.id, opts.namespace)
        print(f"moeray: deleted RayJob {opts.namespace}/{opts.id}")
        return 0
    stopped = ray_jobs.stop(opts.id, opts.address, opts.retry_timeout)
    print(f"moeray: {'stopping' if stopped else 'already ended:'} {opts.id}")
    return 0


def _jobs_list(opts: argparse.Namespace) -> int:
    if opts.k8s:
        for info in kube.list_jobs(opts.namespace):
            print(info.summary())
        return 0
    for info in ray_jobs.list_jobs(opts.address, opts.retry_timeout):
        print(info.line())
    return 0


def _add_cluster_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--address", help="Ray dashboard URL (default: $RAY_ADDRESS or http://127.0.0.1:8265)")
    command.add_argument("--k8s", action="store_true", help="use KubeRay RayJobs on the current Kubernetes context")
    command.add_argument("--namespace", default="default", help="Kubernetes namespace (with --k8s)")
    command.add_argument("--retry-timeout", type=float, default=ray_jobs.DEFAULT_RETRY_TIMEOUT_S, metavar="SECONDS",
                         help="keep retrying a cluster that is not ready yet (still starting, no node agent, "
                              "502/503/504) for this long (default %(default).0f)")


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
    serve_cmd.add_argument("--lora", action="append", metavar="NAME=URI",
                           help="serve a PEFT LoRA adapter (folder or s3:// URI) as model NAME (repeatable)")
    serve_cmd.add_argument("--max-loras", type=int, help="LoRA adapters a replica holds at once (LRU eviction)")
    serve_cmd.add_argument("--lora-prefix", metavar="URI",
                           help="folder or s3:// prefix: a request for model NAME loads <prefix>/NAME on first use")
    serve_cmd.add_argument("--admin-api-key", action="append",
                           help="key for /v1/load_lora_adapter and /v1/unload_lora_adapter (repeatable)")
    serve_cmd.add_argument("--max-replicas", type=int, help="autoscale the model deployment up to this many")
    serve_cmd.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    serve_cmd.add_argument("--proxy", choices=["python", "haproxy"], default="python",
                           help="HTTP in front of the replicas: Serve's Python proxy, or HAProxy forwarding "
                                "to replicas that serve HTTP themselves (Serve's RAY_SERVE_ENABLE_HA_PROXY; "
                                "the replicas then listen on all interfaces)")
    serve_cmd.add_argument("--speculative", metavar="METHOD[:K]|JSON",
                           help="speculative decoding: mtp or ngram, K drafts per step (e.g. mtp:2), or a JSON "
                                "object of engine.speculative settings")
    serve_cmd.add_argument("--expert-shards", type=int, help="routed experts in this many ExpertShard actors")
    serve_cmd.add_argument("--redundant-experts", type=int, help="extra replicas of the hottest experts per layer")
    serve_cmd.add_argument("--transport", choices=["ray", "collective"], help="replica-to-shard transport")
    serve_cmd.add_argument("--reasoning-parser", choices=["deepseek_r1"],
                           help="split <think>...</think> into reasoning_content")
    serve_cmd.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template replacing the checkpoint's")
    serve_cmd.add_argument("--verbose", action="store_true", help="print Ray's and Serve's logs here too")
    serve_cmd.set_defaults(run=_serve)
    eval_cmd = commands.add_parser("eval", help="score a checkpoint or an endpoint on benchmark tasks")
    eval_cmd.add_argument("spec", help="eval spec YAML (examples/eval/)")
    eval_cmd.add_argument("--output", help="write the JSON report here (a path or an s3:// URI)")
    eval_cmd.add_argument("--json", action="store_true", help="also print the whole report as JSON")
    eval_cmd.set_defaults(run=_eval)
    jobs = commands.add_parser("jobs", help="training and evaluation jobs").add_subparsers(dest="jobs_command", required=True)
    jobs_run = jobs.add_parser("run", help="run a job spec (training or eval) on a local Ray (development)")
    jobs_run.add_argument("spec", help="job spec YAML")
    jobs_run.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    jobs_run.add_argument("--verbose", action="store_true",
                          help="print Ray's output here too (its workers' logs, Ray Data's progress)")
    jobs_run.set_defaults(run=_jobs_run)
    jobs_submit = jobs.add_parser("submit", help="validate a job spec and submit it to a cluster")
    jobs_submit.add_argument("spec", help="job spec YAML")
    jobs_submit.add_argument("--image", help="container image of the RayJob's pods (with --k8s)")
    _add_cluster_options(jobs_submit)
    jobs_submit.set_defaults(run=_jobs_submit)
    for verb, handler, what in (("status", _jobs_status, "a job's state"), ("stop", _jobs_stop, "stop a job"),
                                ("logs", _jobs_logs, "a job's output")):
        command = jobs.add_parser(verb, help=what)
        command.add_argument("id", help="submission id (Ray) or RayJob name (--k8s)")
        if verb == "logs":
            command.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
        _add_cluster_options(command)
        command.set_defaults(run=handler)
    jobs_list = jobs.add_parser("list", help="the cluster's jobs")
    _add_cluster_options(jobs_list)
    jobs_list.set_defaults(run=_jobs_list)
    opts = parser.parse_args(argv)
    # moeray's own INFO lines; libraries' (botocore's credential notes and the like) only from WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("moeray").setLevel(logging.INFO)
    try:
        return opts.run(opts)
    except (SettingsError, FileNotFoundError, ValueError) as err:
        print(f"moeray: {err}", file=sys.stderr)
        return 2
    except (JobsApiError, KubeError, StorageError, TrackingError) as err:  # a cluster, storage or tracker said no
        print(f"moeray: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
