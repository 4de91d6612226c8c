"""drainctl: the command line.

Exit codes (documented in the README):
  0  success (for `drain --wait`: every requested node is drained)
  1  the drain ended but not every node is drained (failed, incomplete or cancelled)
  2  bad input (unknown flag, malformed value)
  3  refused: the planner found the request infeasible (nothing was written)
  4  conflict: another drain owns some of the nodes
  5  cannot reach the cluster or Redis
  6  --wait timed out before the drain ended
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from orchestrator.logging import configure_logging
from orchestrator.model import DrainRequest, format_bytes
from orchestrator.planner import PlanError
from orchestrator.settings import Settings, SettingsError

app = typer.Typer(help="Drain orchestrator for KubeVirt / OKD Virtualization clusters.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
sim_app = typer.Typer(help="The simulated Kubernetes + KubeVirt cluster.", no_args_is_help=True)
app.add_typer(sim_app, name="sim")

EXIT_OK, EXIT_NOT_DRAINED, EXIT_USAGE, EXIT_REFUSED, EXIT_CONFLICT, EXIT_UNREACHABLE, EXIT_TIMEOUT = range(7)
T = TypeVar("T")
console = Console()
err = Console(stderr=True)


@dataclass
class Globals:
    kubeconfig: str | None
    context: str | None
    redis_url: str | None
    time_scale: float | None
    output: str
    prometheus_url: str | None = None

    def settings(self) -> Settings:
        try:
            return Settings.from_env(os.environ, kubeconfig=self.kubeconfig, context=self.context,
                                     redis_url=self.redis_url, time_scale=self.time_scale,
                                     prometheus_url=self.prometheus_url)
        except SettingsError as exc:
            err.print(f"[red]error:[/] {exc}")
            raise typer.Exit(EXIT_USAGE) from exc


OutputOpt = Annotated[str | None, typer.Option("--output", "-o", help="table (default) or json")]


@app.callback()
def main(
    ctx: typer.Context,
    kubeconfig: Annotated[str | None, typer.Option(help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")]
    = None,
    context: Annotated[str | None, typer.Option(help="kubeconfig context")] = None,
    redis_url: Annotated[str | None, typer.Option(help="Redis URL (default: $DRAIN_REDIS_URL or "
                                                       "redis://127.0.0.1:6379/0)")] = None,
    time_scale: Annotated[float | None, typer.Option(help="cluster seconds per wall second "
                                                          "($DRAIN_TIME_SCALE, default 1)")] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="table or json")] = "table",
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "warning",
    prometheus_url: Annotated[str | None, typer.Option(help="Prometheus API with KubeVirt's migration metrics "
                                                            "($DRAIN_PROMETHEUS_URL; token: "
                                                            "$DRAIN_PROMETHEUS_TOKEN; default: none)")] = None,
) -> None:
    configure_logging(level=log_level)
    if output not in ("table", "json"):
        err.print(f"[red]error:[/] --output: {output!r} is not one of table, json")
        raise typer.Exit(EXIT_USAGE)
    ctx.obj = Globals(kubeconfig, context, redis_url, time_scale, output, prometheus_url)


def _output(ctx: typer.Context, local: str | None) -> str:
    out = local or ctx.obj.output
    if out not in ("table", "json"):
        err.print(f"[red]error:[/] --output: {out!r} is not one of table, json")
        raise typer.Exit(EXIT_USAGE)
    return str(out)


def _run(coro: Awaitable[T]) -> T:
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


async def _with_service(g: Globals, fn: Callable[[Any], Awaitable[T]], *, need_kube: bool = True) -> T:
    """Run `fn(service)`. Reading drains (status, list, cancel) needs only Redis: `need_kube=False` skips the
    cluster connection, so a finished drain can be inspected without a kubeconfig."""
    from arq.connections import RedisSettings, create_pool

    from orchestrator.kube import Kube, KubeError
    from orchestrator.service import DrainService

    settings = g.settings()
    try:
        redis = await create_pool(RedisSettings.from_dsn(settings.connection.redis_url))
    except Exception as exc:
        err.print(f"[red]error:[/] cannot reach Redis at {settings.connection.redis_url}: {exc}")
        raise typer.Exit(EXIT_UNREACHABLE) from exc
    try:
        kube = await Kube.connect(kubeconfig=settings.connection.kubeconfig, context=settings.connection.context) \
            if need_kube else None
    except KubeError as exc:
        await redis.aclose()
        err.print(f"[red]error:[/] cannot reach the cluster: {exc.message}")
        raise typer.Exit(EXIT_UNREACHABLE) from exc
    try:
        return await fn(DrainService(redis=redis, settings=settings, kube=kube))
    except KubeError as exc:
        err.print(f"[red]error:[/] cluster: {exc.message}")
        raise typer.Exit(EXIT_UNREACHABLE) from exc
    finally:
        if kube is not None:
            await kube.close()
        await redis.aclose()


def _request(nodes: list[str], max_parallel_nodes: int, order: str, non_migratable: str,
             max_attempts: int | None, tune: bool = False, allow_post_copy: bool = False) -> DrainRequest:
    body: dict[str, Any] = {"nodes": nodes, "max_parallel_nodes": max_parallel_nodes, "order": order,
                            "non_migratable": non_migratable, "tune": tune}
    if allow_post_copy:
        body["allow_post_copy"] = True
    if max_attempts is not None:
        body["max_attempts"] = max_attempts
    try:
        return DrainRequest.from_json(body)
    except ValueError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(EXIT_USAGE) from exc


NodesArg = Annotated[list[str], typer.Argument(help="nodes to drain")]
ParallelOpt = Annotated[int, typer.Option(help="nodes drained at the same time (spare-memory rule applies)")]
OrderOpt = Annotated[str, typer.Option(help="given: the order on the command line; planner: least work first")]
PolicyOpt = Annotated[str, typer.Option(help="block: refuse the drain if a VM cannot move; skip: leave it")]
TuneOpt = Annotated[bool, typer.Option("--tune", help="set KubeVirt's migration limits computed for this drain "
                                                      "while it runs, restore them when it ends")]


# ==================================================================================================== plan
@app.command()
def plan(ctx: typer.Context, nodes: NodesArg, max_parallel_nodes: ParallelOpt = 1, order: OrderOpt = "given",
         non_migratable: PolicyOpt = "block", tune: TuneOpt = False, output: OutputOpt = None) -> None:
    """Dry run: what a drain of NODES would do, and whether it can."""
    out = _output(ctx, output)
    request = _request(nodes, max_parallel_nodes, order, non_migratable, None, tune)

    async def go(service: Any) -> None:
        try:
            result = await service.plan(request)
        except PlanError as exc:
            _refused(exc, out)
        if out == "json":
            print(json.dumps(result.to_json(), indent=2))
            return
        _print_plan(result)

    _run(_with_service(ctx.obj, go))


def _refused(exc: PlanError, out: str) -> None:
    if out == "json":
        print(json.dumps({"refused": True, "problems": list(exc.problems)}, indent=2))
    else:
        err.print("[red]refused:[/] the drain cannot be carried out as asked")
        for problem in exc.problems:
            err.print(f"  - {problem}")
    raise typer.Exit(EXIT_REFUSED)


def _print_plan(result: Any) -> None:
    cap = result.capacity
    console.print(f"[bold]Plan[/] for {', '.join(result.drain_nodes)} "
                  f"({result.max_parallel_nodes} in parallel, waves: "
                  f"{' | '.join(','.join(w) for w in result.waves)})")
    console.print(f"capacity: {'[green]ok[/]' if cap.ok else '[red]insufficient[/]'}: {cap.message}")
    lim = result.limits
    console.print(f"limits: {int(lim.in_flight_cluster.effective)} in flight cluster-wide, "
                  f"{int(lim.outbound_per_node.effective)} per source node, {lim.max_attempts} attempts per VM")
    table = Table("node", "VM", "memory", "verdict", "target / reason")
    for node_plan in result.nodes:
        for job in node_plan.jobs:
            table.add_row(node_plan.node, job.vmi, format_bytes(job.memory_bytes), "migrate", job.proposed_target)
        for dec in (*node_plan.skipped, *node_plan.blocked):
            table.add_row(node_plan.node, dec.vmi, "", dec.verdict.value.lower(), dec.reason)
    console.print(table)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    tuning = result.tuning
    if tuning:
        bandwidth = tuning["bandwidth_per_migration_bytes"]
        console.print(f"tuned limits{' (applied with this drain)' if result.tuned else ' (with --tune)'}: "
                      f"{tuning['parallel_per_cluster']} in flight cluster-wide, "
                      f"{tuning['parallel_outbound_per_node']} per source node, bandwidthPerMigration "
                      f"{format_bytes(bandwidth) + '/s' if bandwidth else 'unlimited'}; predicted "
                      f"{tuning['predicted_makespan_s']:.0f} s")
        for node in tuning["nodes"]:
            console.print(f"  {node['node']}: {node['parallel']} at once "
                          f"(NIC {format_bytes(int(node['bandwidth_bytes_per_s']))}/s, "
                          f"predicted {node['predicted_s']:.0f} s)"
                          + (f", limited by {node['limited_by']}" if node["limited_by"] else ""))
    console.print(f"estimate: {result.estimate.total_s:.0f} s ({result.estimate.model})")


# =================================================================================================== drain
@app.command()
def drain(ctx: typer.Context, nodes: NodesArg, max_parallel_nodes: ParallelOpt = 1, order: OrderOpt = "given",
          non_migratable: PolicyOpt = "block",
          max_attempts: Annotated[int | None, typer.Option(help="attempts per VM (default 3)")] = None,
          tune: TuneOpt = False,
          allow_post_copy: Annotated[bool, typer.Option(
              "--allow-post-copy", help="a VM that cannot converge in pre-copy may try again in post-copy (not for "
                                        "critical data or unstable networks)")] = False,
          wait: Annotated[bool, typer.Option("--wait", help="wait until the drain ends; exit 0 only if every "
                                                             "node is drained")] = False,
          timeout: Annotated[float | None, typer.Option(help="with --wait: give up after this many wall "
                                                             "seconds (exit 6)")] = None,
          idempotency_key: Annotated[str | None, typer.Option(help="a retried call with the same key returns "
                                                                   "the first drain")] = None,
          output: OutputOpt = None) -> None:
    """Drain NODES: cordon them and migrate every VM off, through the queue and the workers."""
    from orchestrator.service import NodeConflict

    out = _output(ctx, output)
    request = _request(nodes, max_parallel_nodes, order, non_migratable, max_attempts, tune, allow_post_copy)

    async def go(service: Any) -> int:
        try:
            record, created = await service.submit(request, idempotency_key=idempotency_key, source="cli")
        except PlanError as exc:
            _refused(exc, out)
        except NodeConflict as exc:
            err.print(f"[red]conflict:[/] {exc}")
            raise typer.Exit(EXIT_CONFLICT) from exc
        drain_id = record.id
        if not wait:
            if out == "json":
                print(json.dumps({"id": drain_id, "created": created, "phase": record.phase.value}))
            else:
                console.print(f"drain [bold]{drain_id}[/] {'queued' if created else 'already exists'} "
                              f"(estimate {record.estimate_s or 0:.0f} cluster s)")
            return EXIT_OK
        if out == "json":
            view = await service.wait(drain_id, timeout_s=timeout)
            print(json.dumps(view.to_json(), indent=2, default=str))
        else:
            from orchestrator.progress import live_progress, print_summary

            console.print(f"drain [bold]{drain_id}[/] queued")
            view = await live_progress(service, drain_id, console=console, timeout_s=timeout)
            print_summary(view, console)
        phase = view.drain.phase
        if not phase.is_final:
            return EXIT_TIMEOUT
        return EXIT_OK if phase == "Succeeded" else EXIT_NOT_DRAINED

    raise typer.Exit(_run(_with_service(ctx.obj, go)))


# ================================================================================================== status
@app.command()
def status(ctx: typer.Context, drain_id: Annotated[str | None, typer.Argument(help="drain id; none: list")] = None,
           output: OutputOpt = None) -> None:
    """Show one drain (nodes, VMs, attempts), or list the drains."""
    from orchestrator.store import DrainNotFound

    out = _output(ctx, output)

    async def go(service: Any) -> None:
        if drain_id is None:
            drains = await service.list()
            _print_list(drains, out)
            return
        try:
            view = await service.get(drain_id)
        except DrainNotFound as exc:
            err.print(f"[red]error:[/] {exc}")
            raise typer.Exit(EXIT_USAGE) from exc
        if out == "json":
            print(json.dumps(view.to_json(), indent=2, default=str))
        else:
            _print_status(view)

    _run(_with_service(ctx.obj, go, need_kube=False))


@app.command("list")
def list_drains(ctx: typer.Context, output: OutputOpt = None) -> None:
    """List the drains, newest first."""
    out = _output(ctx, output)

    async def go(service: Any) -> None:
        _print_list(await service.list(), out)

    _run(_with_service(ctx.obj, go, need_kube=False))


def _print_list(drains: list[Any], out: str) -> None:
    if out == "json":
        print(json.dumps([d.to_json() for d in drains], indent=2, default=str))
        return
    table = Table("id", "phase", "nodes", "message")
    for d in drains:
        table.add_row(d.id, d.phase.value, ",".join(d.nodes), d.message or "")
    console.print(table)


def _print_status(view: Any) -> None:
    d = view.drain
    console.print(f"drain [bold]{d.id}[/]: [bold]{d.phase.value}[/] {d.message or ''}")
    nodes = Table("node", "phase", "message")
    for name, n in view.nodes.items():
        nodes.add_row(name, n.phase.value, n.message or "")
    console.print(nodes)
    vms = Table("VM", "node", "phase", "attempt", "target", "message")
    for key, vm in view.vms.items():
        vms.add_row(key, vm.node, vm.phase.value, str(vm.attempt or ""), vm.target or "", vm.message or "")
    console.print(vms)


# ================================================================================================== cancel
@app.command()
def cancel(ctx: typer.Context, drain_id: Annotated[str, typer.Argument(help="drain id")],
           uncordon: Annotated[bool | None, typer.Option("--uncordon/--no-uncordon",
                                                         help="uncordon the nodes (default: the request's "
                                                              "uncordon_on_cancel)")] = None,
           let_finish: Annotated[bool, typer.Option(help="let in-flight migrations finish instead of "
                                                         "aborting them")] = False,
           output: OutputOpt = None) -> None:
    """Cancel a drain: nothing new starts, in-flight migrations are aborted, slots are released."""
    from orchestrator.store import DrainNotFound

    out = _output(ctx, output)

    async def go(service: Any) -> None:
        try:
            record = await service.cancel(drain_id, uncordon=uncordon, mode="finish" if let_finish else "abort")
        except DrainNotFound as exc:
            err.print(f"[red]error:[/] {exc}")
            raise typer.Exit(EXIT_USAGE) from exc
        if out == "json":
            print(json.dumps({"id": drain_id, "phase": record.phase.value}))
        else:
            console.print(f"drain [bold]{drain_id}[/]: {record.phase.value}")

    _run(_with_service(ctx.obj, go, need_kube=False))


# ================================================================================================== worker
@app.command()
def worker(ctx: typer.Context,
           burst: Annotated[bool, typer.Option(help="exit when the queue is empty")] = False) -> None:
    """Run a worker: it takes plan, migrate and finish jobs from the queue (scale out by running more)."""
    from workers.worker import build_worker

    settings = ctx.obj.settings()
    w = build_worker(settings, burst=burst)
    w.run()


# ================================================================================================= sim
@sim_app.command("serve")
def sim_serve(
    scenario: Annotated[str, typer.Option(help="small, enterprise, hostile, large, or a YAML / JSON dump file")]
    = "small",
    seed: Annotated[int | None, typer.Option(help="random seed (default: the scenario's)")] = None,
    port: Annotated[int, typer.Option(help="TCP port (0: any free port)")] = 8001,
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    time_scale: Annotated[float, typer.Option(help="cluster seconds per wall second")] = 1.0,
    kubeconfig_out: Annotated[Path | None, typer.Option(help="write a kubeconfig for kubectl and drainctl")]
    = None,
    admin_kubeconfig_out: Annotated[Path | None, typer.Option(
        help="write a kubeconfig whose token alone may read the ground truth (/sim/v1/*)")] = None,
    token: Annotated[str | None, typer.Option(help="bearer token (default: a random one, written to the "
                                                   "kubeconfig)")] = None,
    prometheus_port: Annotated[int | None, typer.Option(
        help="also serve the Prometheus HTTP API (/api/v1/query) with KubeVirt's live migration metrics on this "
             "port (0: any free port); the cluster token reads it")] = None,
) -> None:
    """Serve a simulated cluster until interrupted."""
    import secrets

    from simulator import scenarios
    from simulator.cluster import running_cluster

    try:
        loaded = scenarios.load(scenario, seed=seed)
    except (ValueError, OSError) as exc:
        err.print(f"[red]error:[/] --scenario: {exc}")
        raise typer.Exit(EXIT_USAGE) from exc
    bearer = token or secrets.token_hex(16)

    async def serve() -> None:
        async with running_cluster(loaded, time_scale=time_scale, token=bearer, host=host, port=port,
                                   kubeconfig_out=kubeconfig_out, admin_kubeconfig_out=admin_kubeconfig_out,
                                   prometheus_port=prometheus_port) as rc:
            summary = loaded.summary()
            console.print(f"simulated cluster [bold]{loaded.name}[/] (seed {loaded.seed}) at {rc.url}, "
                          f"time scale {time_scale}: {summary.get('nodes')} nodes, {summary.get('vms')} VMs")
            if kubeconfig_out:
                console.print(f"kubeconfig: {kubeconfig_out}  (kubectl --kubeconfig {kubeconfig_out} get nodes)")
            if admin_kubeconfig_out:
                console.print(f"admin kubeconfig (ground truth, /sim/v1/*): {admin_kubeconfig_out}")
            if rc.prometheus_url:
                console.print(f"prometheus: {rc.prometheus_url}  (bearer: the kubeconfig's token)")
            sys.stdout.flush()
            await asyncio.Event().wait()

    _run(serve())


def _register_extensions() -> None:
    """Commands that live next to what they serve (api, demo, report) add themselves to the app."""
    import importlib

    for module in ("orchestrator.api", "orchestrator.demo", "orchestrator.report"):
        importlib.import_module(module).register(app)


_register_extensions()

if __name__ == "__main__":
    app()
