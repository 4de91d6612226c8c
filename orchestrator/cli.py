"""drainctl: the command line.

Exit codes (documented in the README):
  0  success (for `drain --wait`: every requested node is drained)
  1  the drain ended but not every node is drained (failed, incomplete or cancelled)
  2  bad input (unknown flag, malformed value, a kubeconfig that does not exist, a port in use)
  3  refused: the planner found the request infeasible (nothing was written)
  4  conflict: another drain owns some of the nodes
  5  cannot reach the cluster or Redis
  6  --wait timed out before the drain ended (the drain goes on in the workers)
  130  interrupted (Ctrl-C); a drain already submitted goes on in the workers

Promises:
- Global flags (--kubeconfig, --context, --redis-url, --time-scale, -o, --log-level) work before or after the
  subcommand, as kubectl's do.
- Set-up mistakes print one line naming the problem and the fix, with the exit code above; never a traceback.
- Starting is cheap: this module imports only the standard library, typer and the settings at import time.
  Everything heavy (the cluster client, arq, the API server, the simulator, rich) is imported by the command
  that needs it, so `--help` and the Redis-only commands (status, list, cancel) start in a fraction of a
  second (`python -m bench.startup` measures it).
- Nothing imports this module: the commands call into `service`, `progress`, `report`, `demo`, `api` and
  `simulator`, never the other way round.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from typer.core import TyperGroup

from orchestrator.settings import Settings, SettingsError

if TYPE_CHECKING:
    from arq.connections import ArqRedis
    from rich.console import Console

    from orchestrator.kube import Kube
    from orchestrator.model import DrainRequest
    from orchestrator.planner import PlanError
    from orchestrator.service import DrainService

EXIT_OK, EXIT_NOT_DRAINED, EXIT_USAGE, EXIT_REFUSED, EXIT_CONFLICT, EXIT_UNREACHABLE, EXIT_TIMEOUT = range(7)
EXIT_INTERRUPTED = 130
T = TypeVar("T")

# Global flags: the option strings, all of which take a value. They are accepted after the subcommand too
# (moved in front of it before parsing), unless the subcommand has an option of the same name.
GLOBAL_OPTIONS = ("--kubeconfig", "--context", "--redis-url", "--time-scale", "--output", "-o", "--log-level",
                  "--prometheus-url")
PLAN_RETRIES = 5
"""Attempts at reading the cluster for a plan when the API answers 5xx or times out."""


def fail(code: int, message: str) -> NoReturn:
    """One line on stderr and exit `code`."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    raise typer.Exit(code)


def note(message: str) -> None:
    sys.stderr.write(f"{message}\n")
    sys.stderr.flush()


# ================================================================================ flags after the subcommand
# typer carries its own copy of click; commands are duck-typed here (a group is what has `get_command`).
def _is_group(command: Any) -> bool:
    return hasattr(command, "get_command")


def _takes(command: Any, opt: str) -> bool:
    return any(opt in param.opts or opt in param.secondary_opts for param in command.params)


def hoist_global_options(group: Any, ctx: Any, args: list[str]) -> list[str]:
    """Move global flags that follow the subcommand in front of it: `drain N --kubeconfig K` parses as
    `--kubeconfig K drain N`. A flag the subcommand defines itself (demo's --redis-url) stays where it is."""
    command: Any = None
    i = 0
    # Walk to the leaf command: skip global flags (with their values) and descend through groups.
    while i < len(args):
        token = args[i]
        if token == "--":
            return args
        if token.startswith("-"):
            i += 2 if token in GLOBAL_OPTIONS else 1
            continue
        found = (command if command is not None else group).get_command(ctx, token)
        if found is None:
            return args
        command = found
        i += 1
        if not _is_group(found):
            break
    if command is None or _is_group(command):
        return args
    front: list[str] = []
    kept: list[str] = []
    tail = args[i:]
    j = 0
    while j < len(tail):
        token = tail[j]
        if token == "--":
            kept.extend(tail[j:])
            break
        name = token.split("=", 1)[0]
        if name in GLOBAL_OPTIONS and not _takes(command, name):
            width = 1 if "=" in token else 2
            front.extend(tail[j:j + width])
            j += width
            continue
        kept.append(token)
        j += 1
    return [*front, *args[:i], *kept]


class _Group(TyperGroup):
    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return list(super().parse_args(ctx, hoist_global_options(self, ctx, args)))


app = typer.Typer(cls=_Group, help="Drain orchestrator for KubeVirt / OKD Virtualization clusters.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
sim_app = typer.Typer(help="The simulated Kubernetes + KubeVirt cluster.", no_args_is_help=True)
app.add_typer(sim_app, name="sim")


# ============================================================================================== globals
@dataclass
class Globals:
    kubeconfig: str | None
    context: str | None
    redis_url: str | None
    time_scale: float | None
    output: str
    prometheus_url: str | None = None
    following: list[str] = field(default_factory=list)
    """Drains this invocation submitted or follows (for the Ctrl-C message)."""

    def settings(self) -> Settings:
        try:
            return Settings.from_env(os.environ, kubeconfig=self.kubeconfig, context=self.context,
                                     redis_url=self.redis_url, time_scale=self.time_scale,
                                     prometheus_url=self.prometheus_url)
        except SettingsError as exc:
            fail(EXIT_USAGE, str(exc))


OutputOpt = Annotated[str | None, typer.Option("--output", "-o", help="table (default) or json")]


@app.callback()
def main_callback(
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
    """Drain orchestrator for KubeVirt / OKD Virtualization clusters.

    Global flags may come before or after the command (`drainctl drain N --kubeconfig K`)."""
    from orchestrator.logging import configure_logging

    try:
        configure_logging(level=log_level)
    except ValueError as exc:
        fail(EXIT_USAGE, f"--log-level: {exc}")
    if output not in ("table", "json"):
        fail(EXIT_USAGE, f"--output: {output!r} is not one of table, json")
    ctx.obj = Globals(kubeconfig, context, redis_url, time_scale, output, prometheus_url)


def _output(ctx: typer.Context, local: str | None) -> str:
    out = local or ctx.obj.output
    if out not in ("table", "json"):
        fail(EXIT_USAGE, f"--output: {out!r} is not one of table, json")
    return str(out)


def stdout_console() -> Console:
    """Rich console for stdout. Off a terminal (a pipe, a hook's log, CI) it never cuts a line: tables are as
    wide as their content, so VM and node names stay whole."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=100_000, soft_wrap=True)


def _run(g: Globals, coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, with Ctrl-C turned into exit 130 and a word on what goes on."""
    try:
        return asyncio.run(coro)
    except KeyboardInterrupt:
        for drain_id in g.following:
            note(f"interrupted: drain {drain_id} goes on in the workers; follow it with "
                 f"`drainctl status {drain_id} --wait`, stop it with `drainctl cancel {drain_id}`")
        if not g.following:
            note("interrupted")
        raise typer.Exit(EXIT_INTERRUPTED) from None


# ============================================================================================ connections
def _redis_errors() -> tuple[type[BaseException], ...]:
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return (RedisConnectionError, RedisTimeoutError, OSError)


def _kube_errors(imported: bool) -> tuple[type[BaseException], ...]:
    if not imported:
        return ()
    from orchestrator.kube import KubeError

    return (KubeError,)


def _unreachable(imported: bool) -> tuple[type[BaseException], ...]:
    if not imported:
        return ()
    from orchestrator.kube import Unreachable

    return (Unreachable,)


def fail_unreachable(kube: Kube | None, exc: BaseException) -> NoReturn:
    """Nothing answers at the kubeconfig's server: say where we looked and what to check (exit 5)."""
    where = f" at {kube.api.configuration.host}" if kube is not None else ""
    fail(EXIT_UNREACHABLE, f"cannot reach the cluster{where}: "
                           f"{getattr(exc, 'message', exc)} (is the API server up? check the server of the "
                           f"kubeconfig's context: --kubeconfig / KUBECONFIG, --context)")


async def open_redis(settings: Settings) -> ArqRedis:
    """An arq pool, checked with one PING (no retries: a wrong URL is reported at once, exit 5)."""
    from arq.connections import ArqRedis, RedisSettings
    from redis.asyncio import ConnectionPool

    url = settings.connection.redis_url
    try:
        redis_settings = RedisSettings.from_dsn(url)
    except ValueError as exc:
        fail(EXIT_USAGE, f"--redis-url {url}: {exc}")
    pool = ArqRedis(ConnectionPool.from_url(url, socket_connect_timeout=redis_settings.conn_timeout),
                    default_queue_name=settings.connection.queue_name)
    try:
        await pool.ping()
    except _redis_errors() as exc:
        await pool.aclose()
        fail(EXIT_UNREACHABLE, f"cannot reach Redis at {url}: {exc} (start Redis, or point --redis-url / "
                               f"DRAIN_REDIS_URL at it)")
    return pool


async def connect_kube(settings: Settings) -> Kube:
    """The cluster connection; a kubeconfig that is missing or broken exits 2, no kubeconfig at all exits 5."""
    from orchestrator.kube import BadConfig, Kube, KubeError

    try:
        return await Kube.connect(kubeconfig=settings.connection.kubeconfig, context=settings.connection.context)
    except BadConfig as exc:
        fail(EXIT_USAGE, f"{exc.message}")
    except KubeError as exc:
        fail(EXIT_UNREACHABLE, f"cannot reach the cluster: {exc.message}")


async def with_service(g: Globals, fn: Callable[[DrainService], Awaitable[T]], *, need_kube: bool = True) -> T:
    """Run `fn(service)`. Reading drains (status, list, cancel) needs only Redis: `need_kube=False` skips the
    cluster connection, so a finished drain can be inspected without a kubeconfig (nor the cluster client's
    import time)."""
    from orchestrator.service import DrainService

    settings = g.settings()
    kube = await connect_kube(settings) if need_kube else None
    try:
        redis = await open_redis(settings)
    except typer.Exit:
        if kube is not None:
            await kube.close()
        raise
    try:
        return await fn(DrainService(redis=redis, settings=settings, kube=kube))
    except _unreachable(need_kube) as exc:
        fail_unreachable(kube, exc)
    except _kube_errors(need_kube) as exc:
        fail(EXIT_UNREACHABLE, f"cluster: {getattr(exc, 'message', exc)}")
    except _redis_errors() as exc:
        fail(EXIT_UNREACHABLE, f"Redis at {settings.connection.redis_url}: {exc}")
    finally:
        if kube is not None:
            await kube.close()
        await redis.aclose()


async def retry_cluster(what: str, call: Callable[[], Awaitable[T]]) -> T:
    """`call()`, again after a backoff while the cluster answers with a retryable error (5xx, timeout)."""
    from orchestrator.kube import KubeError, Unreachable

    delay = 0.5
    for attempt in range(1, PLAN_RETRIES + 1):
        try:
            return await call()
        except Unreachable:
            raise  # nothing answers: said at once, with the fix (a down server does not come up in seconds)
        except KubeError as exc:
            if not exc.retryable or attempt == PLAN_RETRIES:
                raise
            note(f"{what}: the cluster answered {exc.status or ''} {exc.message}; retrying in {delay:g} s "
                 f"({attempt}/{PLAN_RETRIES - 1})".replace("  ", " "))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 8.0)
    raise AssertionError("unreachable")


async def check_time_scale(settings: Settings, kube: Kube, *, who: str, redis: ArqRedis | None = None) -> None:
    """Refuse to go on when the cluster's clock runs at another rate than `settings.time_scale`.

    Sampling the clock takes a second (the `Date` header's resolution), which at time scale 10 is ten cluster
    seconds of a drain's window; so where a worker or an earlier command on the queue verified the time scale
    against this same API server recently (`keys.time_scale_key`), that verdict is compared instead, and a
    successful sample is recorded for the next command."""
    from orchestrator.clockcheck import measure_rate, mismatch
    from orchestrator.kube import KubeError

    server = str(kube.api.configuration.host)
    verified = await _verified_time_scale(redis, settings, server)
    if verified is not None:
        problem = mismatch((verified, 1e9), settings.time_scale, who=who,
                           source="as measured from its Date header by a worker on this queue")
        if problem:
            fail(EXIT_USAGE, problem)
        return
    try:
        rate = await measure_rate(kube)
    except (KubeError, ValueError, TypeError) as exc:  # no usable Date header: nothing to compare with
        note(f"warning: could not compare the cluster's clock with ours ({exc})")
        return
    problem = mismatch(rate, settings.time_scale, who=who)
    if problem:
        fail(EXIT_USAGE, problem)
    await remember_time_scale(redis, settings, server)


async def _verified_time_scale(redis: ArqRedis | None, settings: Settings, server: str) -> float | None:
    """The time scale verified against `server` by a process on our queue, if one is on record."""
    from redis.exceptions import RedisError

    from orchestrator import keys

    if redis is None:
        return None
    try:
        raw = await redis.get(keys.time_scale_key(settings.connection.queue_name))
        known = json.loads(raw) if raw else None
    except (RedisError, OSError, ValueError):
        return None
    if not isinstance(known, dict) or known.get("server") != server:
        return None
    scale = known.get("time_scale")
    return float(scale) if isinstance(scale, int | float) and scale > 0 else None


async def remember_time_scale(redis: ArqRedis | None, settings: Settings, server: str) -> None:
    """Record that `settings.time_scale` matched `server`'s clock (best effort: a Redis error only costs the
    next command a sample)."""
    from redis.exceptions import RedisError

    from orchestrator import keys

    if redis is None:
        return
    with contextlib.suppress(RedisError, OSError):
        await redis.set(keys.time_scale_key(settings.connection.queue_name),
                        json.dumps({"server": server, "time_scale": settings.time_scale}),
                        ex=keys.TIME_SCALE_VERIFIED_TTL_S)


# ================================================================================================ requests
def _request(nodes: list[str], max_parallel_nodes: int, order: str, non_migratable: str,
             max_attempts: int | None, tune: bool = False, allow_post_copy: bool = False,
             escalation: str | None = None) -> DrainRequest:
    """The drain request, checked by the same schema as the HTTP API's (bounds, duplicates)."""
    from pydantic import ValidationError

    from orchestrator.api import DrainRequestBody

    body: dict[str, Any] = {"nodes": nodes, "max_parallel_nodes": max_parallel_nodes, "order": order,
                            "non_migratable": non_migratable, "tune": tune}
    if allow_post_copy:
        body["allow_post_copy"] = True
    if escalation is not None:
        body["escalation"] = escalation
    if max_attempts is not None:
        body["max_attempts"] = max_attempts
    flags = {"nodes": "NODES", "max_parallel_nodes": "--max-parallel-nodes", "order": "--order",
             "non_migratable": "--non-migratable", "max_attempts": "--max-attempts", "escalation": "--escalation"}
    try:
        return DrainRequestBody.model_validate(body, strict=False).to_request()
    except ValidationError as exc:
        problems = "; ".join(f"{flags.get(str(e['loc'][0]), e['loc'][0]) if e['loc'] else 'request'}: "
                             f"{str(e['msg']).removeprefix('Value error, ')}" for e in exc.errors())
        fail(EXIT_USAGE, problems)
    except ValueError as exc:
        fail(EXIT_USAGE, str(exc))


def _refused(exc: PlanError, out: str, hint: str | None = None) -> NoReturn:
    if out == "json":
        print(json.dumps({"refused": True, "problems": list(exc.problems)}, indent=2))
    else:
        note("refused: the drain cannot be carried out as asked")
        for problem in exc.problems:
            note(f"  - {problem}")
        if hint:
            note(f"hint: {hint}")
    raise typer.Exit(EXIT_REFUSED)


NodesArg = Annotated[list[str], typer.Argument(help="nodes to drain")]
ParallelOpt = Annotated[int, typer.Option(help="nodes drained at the same time (spare-memory rule applies)")]
OrderOpt = Annotated[str, typer.Option(help="given: the order on the command line; planner: least work first")]
PolicyOpt = Annotated[str, typer.Option(help="block: refuse the drain if a VM cannot move; skip: leave it")]
TuneOpt = Annotated[bool, typer.Option("--tune", help="set KubeVirt's migration limits computed for this drain "
                                                      "while it runs, restore them when it ends")]
EscalationOpt = Annotated[str | None, typer.Option(
    "--escalation", help="rungs a VM that cannot converge may climb, in order: solo (alone on its NICs), "
                         "auto-converge (CPU throttling), post-copy; a comma list or none (default "
                         "solo,auto-converge; the drainctl.io/escalation annotation of a VMI or its namespace "
                         "narrows it)")]
AllowPostCopyOpt = Annotated[bool, typer.Option(
    "--allow-post-copy", help="a VM that cannot converge in pre-copy may try again in post-copy (not for "
                              "critical data or unstable networks); adds post-copy to --escalation")]


# ==================================================================================================== plan
@app.command()
def plan(ctx: typer.Context, nodes: NodesArg, max_parallel_nodes: ParallelOpt = 1, order: OrderOpt = "given",
         non_migratable: PolicyOpt = "block", tune: TuneOpt = False, allow_post_copy: AllowPostCopyOpt = False,
         escalation: EscalationOpt = None, output: OutputOpt = None) -> None:
    """Dry run: what a drain of NODES would do, and whether it can."""
    from orchestrator.planner import PlanError

    out = _output(ctx, output)
    request = _request(nodes, max_parallel_nodes, order, non_migratable, None, tune, allow_post_copy, escalation)

    async def go(service: DrainService) -> None:
        try:
            result = await retry_cluster("plan", lambda: service.plan(request))
        except PlanError as exc:
            _refused(exc, out)
        if out == "json":
            print(json.dumps(result.to_json(), indent=2))
            return
        _print_plan(result)

    _run(ctx.obj, with_service(ctx.obj, go))


def _print_plan(result: Any) -> None:
    from rich.table import Table

    from orchestrator.escalation import Rung
    from orchestrator.model import format_bytes

    console = stdout_console()
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
    hard = [job for node_plan in result.nodes for job in node_plan.jobs if job.expected_hard]
    if hard:
        # The VMs a plain pre-copy is not expected to move: the rung of the ladder expected to, and why.
        ladder = Table("expected hard", "dirty rate", "expected rung", "estimate", "why")
        for job in hard:
            ladder.add_row(job.vmi, f"{format_bytes(int(job.dirty_rate_bytes_per_s or 0))}/s",
                           Rung(job.expected_rung).option if job.expected_rung else "[red]none[/]",
                           f"{job.estimated_s:.0f} s", job.hard_reason or "")
        console.print(ladder)
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
                          f"(NIC {format_bytes(int(node['bandwidth_bytes_per_s']))}/s "
                          f"{node.get('bandwidth_source', 'setting')}, "
                          f"predicted {node['predicted_s']:.0f} s)"
                          + (f", limited by {node['limited_by']}" if node["limited_by"] else ""))
    console.print(f"estimate: {result.estimate.total_s:.0f} s ({result.estimate.model})")


# =================================================================================================== drain
@app.command()
def drain(ctx: typer.Context, nodes: NodesArg, max_parallel_nodes: ParallelOpt = 1, order: OrderOpt = "given",
          non_migratable: PolicyOpt = "block",
          max_attempts: Annotated[int | None, typer.Option(help="attempts per VM, 1..100 (default 3)")] = None,
          tune: TuneOpt = False,
          allow_post_copy: AllowPostCopyOpt = False,
          escalation: EscalationOpt = None,
          wait: Annotated[bool, typer.Option("--wait", help="wait until the drain ends; exit 0 only if every "
                                                             "node is drained")] = False,
          timeout: Annotated[float | None, typer.Option(help="with --wait: stop waiting after this many wall "
                                                             "seconds (exit 6; the drain goes on)")] = None,
          idempotency_key: Annotated[str | None, typer.Option(help="a retried call with the same key returns "
                                                                   "the first drain")] = None,
          output: OutputOpt = None) -> None:
    """Drain NODES: cordon them and migrate every VM off, through the queue and the workers."""
    from orchestrator.planner import PlanError
    from orchestrator.service import IdempotencyKeyReused, NodeConflict

    out = _output(ctx, output)
    _check_timeout(timeout, wait)
    request = _request(nodes, max_parallel_nodes, order, non_migratable, max_attempts, tune, allow_post_copy,
                       escalation)
    g: Globals = ctx.obj

    async def go(service: DrainService) -> int:
        await check_time_scale(service.settings, service.kube, who="drainctl", redis=service.redis)
        try:
            record, created = await retry_cluster("drain", lambda: service.submit(
                request, idempotency_key=idempotency_key, source="cli"))
        except PlanError as exc:
            _refused(exc, out)
        except NodeConflict as exc:
            fail(EXIT_CONFLICT, f"conflict: {exc}")
        except IdempotencyKeyReused as exc:
            fail(EXIT_USAGE, f"--idempotency-key: {exc}")
        drain_id = record.id
        g.following.append(drain_id)
        if not wait:
            if out == "json":
                print(json.dumps({"id": drain_id, "created": created, "phase": record.phase.value}))
            else:
                what = "submitted" if created else "already exists (same idempotency key)"
                stdout_console().print(
                    f"drain [bold]{drain_id}[/] {what}: {record.phase.value}, estimate "
                    f"{record.estimate_s or 0:.0f} cluster s; follow it with "
                    f"`drainctl status {drain_id} --wait`", highlight=False)
            return EXIT_OK
        return await _follow(service, drain_id, out=out, timeout_s=timeout)

    raise typer.Exit(_run(g, with_service(g, go)))


# ================================================================================================= rollout
@app.command()
def rollout(ctx: typer.Context, nodes: Annotated[list[str], typer.Argument(help="nodes to maintain, in order")],
            step_command: Annotated[str, typer.Option(help="the maintenance step, run through the shell once per "
                                                           "node with DRAIN_NODE set; exit 0 means done. It may "
                                                           "run again for a node after a crash: make it idempotent")],
            max_unavailable: Annotated[int, typer.Option(help="nodes under maintenance at once (the next "
                                                              "node is drained meanwhile)")] = 1,
            non_migratable: PolicyOpt = "block",
            max_attempts: Annotated[int | None, typer.Option(help="attempts per VM, 1..100 (default 3)")] = None,
            wait: Annotated[bool, typer.Option("--wait", help="run the rollout in this process until it ends "
                                                               "(required)")] = False,
            overlap: Annotated[bool, typer.Option(
                "--overlap", help="drain the next node during a maintenance step even when its VMs must then go "
                                  "to nodes maintained later (shorter, but those VMs move twice); by default it "
                                  "waits for the step to end")] = False,
            output: OutputOpt = None) -> None:
    """Rolling maintenance of NODES: drain each in turn, run the step, uncordon, go on; each VM moves once
    where room allows (nodes still waiting for maintenance are targets of last resort)."""
    from orchestrator.planner import PlanError
    from orchestrator.rollout import check_rollout
    from orchestrator.rollout import rollout as run_rollout
    from orchestrator.service import NodeConflict

    out = _output(ctx, output)
    problem = check_rollout(nodes, max_unavailable, step_command)
    if problem:
        fail(EXIT_USAGE, problem)
    if not wait:
        fail(EXIT_USAGE, "--wait: required: the rollout runs in this process (it is not kept by the workers)")
    base = _request(nodes, 1, "given", non_migratable, max_attempts)

    async def go(service: DrainService) -> int:
        await check_time_scale(service.settings, service.kube, who="drainctl", redis=service.redis)
        try:
            result = await run_rollout(service, nodes, max_unavailable=max_unavailable, step_command=step_command,
                                       base=base, notice=note, overlap=overlap)
        except PlanError as exc:
            _refused(exc, out)
        except NodeConflict as exc:
            fail(EXIT_CONFLICT, f"conflict: {exc}")
        if out == "json":
            print(json.dumps(result.to_json(), indent=2))
        else:
            console = stdout_console()
            for n in result.nodes:
                console.print(f"{n.node}: {'[green]maintained[/]' if n.done else '[red]not maintained[/]'}"
                              f" (drain {n.drain_id or '-'}, step exit {n.step_exit})"
                              + (f": {n.problem}" if n.problem else ""), highlight=False)
        return EXIT_OK if result.ok else EXIT_NOT_DRAINED

    raise typer.Exit(_run(ctx.obj, with_service(ctx.obj, go)))


def _check_timeout(timeout: float | None, wait: bool) -> None:
    import math

    if timeout is None:
        return
    if not wait:
        fail(EXIT_USAGE, "--timeout: only meaningful with --wait")
    if not (math.isfinite(timeout) and timeout > 0):
        fail(EXIT_USAGE, f"--timeout: {timeout:g} must be a positive number of seconds")


async def _follow(service: DrainService, drain_id: str, *, out: str, timeout_s: float | None) -> int:
    """Follow a drain to its end; print the summary; the exit code says how it ended."""
    from orchestrator.model import DrainPhase
    from orchestrator.progress import FollowError, follow, print_summary

    console = stdout_console()
    try:
        result = await follow(service, drain_id, console=None if out == "json" else console, timeout_s=timeout_s,
                              notice=note)
    except FollowError as exc:
        fail(EXIT_UNREACHABLE, str(exc))
    view = result.view
    if out == "json":
        print(json.dumps(view.to_json(), indent=2, default=str))
    else:
        print_summary(view, console)
    if not result.final:
        note(f"timed out after {timeout_s:g} s: drain {drain_id} is still {view.drain.phase.value} and goes on in "
             f"the workers; follow it with `drainctl status {drain_id} --wait`, stop it with "
             f"`drainctl cancel {drain_id}`")
        return EXIT_TIMEOUT
    return EXIT_OK if view.drain.phase is DrainPhase.SUCCEEDED else EXIT_NOT_DRAINED


# ================================================================================================== status
@app.command()
def status(ctx: typer.Context, drain_id: Annotated[str | None, typer.Argument(help="drain id; none: list")] = None,
           wait: Annotated[bool, typer.Option("--wait", help="follow the drain until it ends (exit codes as "
                                                             "drain --wait)")] = False,
           timeout: Annotated[float | None, typer.Option(help="with --wait: stop waiting after this many wall "
                                                             "seconds (exit 6)")] = None,
           output: OutputOpt = None) -> None:
    """Show one drain (nodes, VMs, attempts), or list the drains."""
    from orchestrator.store import DrainNotFound

    out = _output(ctx, output)
    _check_timeout(timeout, wait)
    if wait and drain_id is None:
        fail(EXIT_USAGE, "--wait: name the drain to follow (drainctl status ID --wait)")

    async def go(service: DrainService) -> int:
        if drain_id is None:
            _print_list(await service.list(), out)
            return EXIT_OK
        try:
            view = await service.get(drain_id)
        except DrainNotFound as exc:
            fail(EXIT_USAGE, f"{exc} (drainctl list shows the drains)")
        if wait:
            ctx.obj.following.append(drain_id)
            return await _follow(service, drain_id, out=out, timeout_s=timeout)
        if out == "json":
            print(json.dumps(view.to_json(), indent=2, default=str))
        else:
            _print_status(view)
        return EXIT_OK

    raise typer.Exit(_run(ctx.obj, with_service(ctx.obj, go, need_kube=False)))


@app.command("list")
def list_drains(ctx: typer.Context, output: OutputOpt = None) -> None:
    """List the drains, newest first."""
    out = _output(ctx, output)

    async def go(service: DrainService) -> None:
        _print_list(await service.list(), out)

    _run(ctx.obj, with_service(ctx.obj, go, need_kube=False))


def _print_list(drains: list[Any], out: str) -> None:
    if out == "json":
        print(json.dumps([d.to_json() for d in drains], indent=2, default=str))
        return
    from rich.table import Table

    table = Table("id", "phase", "nodes", "message")
    for d in drains:
        table.add_row(d.id, d.phase.value, ",".join(d.nodes), d.message or "")
    stdout_console().print(table)


def _print_status(view: Any) -> None:
    from rich.table import Table

    console = stdout_console()
    d = view.drain
    console.print(f"drain [bold]{d.id}[/]: [bold]{d.phase.value}[/] {d.message or ''}", highlight=False)
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

    async def go(service: DrainService) -> None:
        try:
            record = await service.cancel(drain_id, uncordon=uncordon, mode="finish" if let_finish else "abort")
        except DrainNotFound as exc:
            fail(EXIT_USAGE, f"{exc} (drainctl list shows the drains)")
        if out == "json":
            print(json.dumps({"id": drain_id, "phase": record.phase.value}))
        else:
            print(f"drain {drain_id}: {record.phase.value}")

    _run(ctx.obj, with_service(ctx.obj, go, need_kube=False))


# ================================================================================================== worker
@app.command()
def worker(ctx: typer.Context,
           burst: Annotated[bool, typer.Option(help="exit when the queue is empty")] = False) -> None:
    """Run a worker: it takes plan, migrate and finish jobs from the queue (scale out by running more)."""
    g: Globals = ctx.obj
    settings = g.settings()

    async def preflight() -> str:
        kube = await connect_kube(settings)
        try:
            from orchestrator.kube import NODES, KubeError, Unreachable

            try:
                await retry_cluster("worker", lambda: kube.list(NODES))
            except Unreachable as exc:
                fail_unreachable(kube, exc)
            except KubeError as exc:
                fail(EXIT_UNREACHABLE, f"cannot reach the cluster: {exc.message}")
            await check_time_scale(settings, kube, who="the worker")  # always sampled: a worker is the reference
            server = str(kube.api.configuration.host)
        finally:
            await kube.close()
        redis = await open_redis(settings)
        try:
            await remember_time_scale(redis, settings, server)
        finally:
            await redis.aclose()
        return server

    server = _run(g, preflight())
    from workers.worker import build_worker

    note(f"drainctl worker: cluster {server}, Redis {settings.connection.redis_url}, queue "
         f"{settings.connection.queue_name}, time scale {settings.time_scale:g}")
    w = build_worker(settings, burst=burst)
    try:
        w.run()
    except _redis_errors() as exc:
        fail(EXIT_UNREACHABLE, f"Redis at {settings.connection.redis_url}: {exc}")


# ================================================================================================= sim
def _check_port(host: str, port: int, flag: str = "--port") -> None:
    """Exit 2 when host:port cannot be bound (in use, or not an address of this machine)."""
    if port == 0:
        return
    if not 0 < port < 65536:
        fail(EXIT_USAGE, f"{flag}: {port} is not a TCP port (1..65535)")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            _port_error(exc, host, port, flag)


def _port_error(exc: OSError, host: str, port: int, flag: str = "--port") -> NoReturn:
    if exc.errno == errno.EADDRINUSE:
        fail(EXIT_USAGE, f"{flag} {port}: {host}:{port} is already in use; pick another {flag} (0: any free port)")
    fail(EXIT_USAGE, f"{flag} {port} on {host}: {exc.strerror or exc}")


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

    if not time_scale > 0:
        fail(EXIT_USAGE, f"--time-scale: {time_scale:g} must be a positive number")
    _check_port(host, port)
    try:
        loaded = scenarios.load(scenario, seed=seed)
    except (ValueError, OSError) as exc:
        fail(EXIT_USAGE, f"--scenario: {exc}")
    bearer = token or secrets.token_hex(16)

    async def serve() -> None:
        try:
            async with running_cluster(loaded, time_scale=time_scale, token=bearer, host=host, port=port,
                                       kubeconfig_out=kubeconfig_out, admin_kubeconfig_out=admin_kubeconfig_out,
                                       prometheus_port=prometheus_port) as rc:
                summary = loaded.summary()
                print(f"simulated cluster {loaded.name} (seed {loaded.seed}) at {rc.url}, time scale "
                      f"{time_scale:g}: {summary.get('nodes')} nodes, {summary.get('vms')} VMs", flush=True)
                if kubeconfig_out:
                    print(f"kubeconfig: {kubeconfig_out}  (kubectl --kubeconfig {kubeconfig_out} get nodes)",
                          flush=True)
                if admin_kubeconfig_out:
                    print(f"admin kubeconfig (ground truth, /sim/v1/*): {admin_kubeconfig_out}", flush=True)
                if rc.prometheus_url:
                    print(f"prometheus: {rc.prometheus_url}  (bearer: the kubeconfig's token)", flush=True)
                await asyncio.Event().wait()
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
                _port_error(exc, host, port)
            raise

    _run(Globals(None, None, None, None, "table"), serve())


# ===================================================================================================== api
@app.command("api")
def api(ctx: typer.Context,
        port: Annotated[int, typer.Option(help="TCP port")] = 8080,
        host: Annotated[str, typer.Option(help="address to bind (0.0.0.0 in a pod)")] = "127.0.0.1",
        token_file: Annotated[Path | None, typer.Option(help="file holding the bearer token (default: "
                                                             "$DRAIN_API_TOKEN)")] = None,
        controller: Annotated[bool, typer.Option(help="also run the DrainRequest controller (leader-elected "
                                                      "with a Lease)")] = True) -> None:
    """Serve the HTTP API (drains, plans, events, /metrics, /openapi.json) until interrupted."""
    g: Globals = ctx.obj
    settings = g.settings()
    _check_port(host, port)
    from aiohttp import web

    from orchestrator import api as http_api

    try:
        token = http_api.read_token(token_file, os.environ)
    except (ValueError, OSError) as exc:
        fail(EXIT_USAGE, str(exc))
    application = http_api.build_app(lambda: http_api.connect_service(settings), token=token,
                                     controller=controller)
    try:
        web.run_app(application, host=host, port=port, shutdown_timeout=5.0, access_log=None,
                    print=lambda _text: note(f"drainctl api on http://{host}:{port}"))
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            _port_error(exc, host, port)
        raise


# ==================================================================================================== demo
@app.command("demo")
def demo(
    ctx: typer.Context,
    scenario: Annotated[str, typer.Option(help="simulated cluster: small, enterprise, hostile, large or a "
                                               "YAML file")] = "small",
    seed: Annotated[int | None, typer.Option(help="scenario seed (default: the scenario's)")] = None,
    time_scale: Annotated[float | None, typer.Option(help="cluster seconds per wall second (default 30)")] = None,
    redis_url: Annotated[str | None, typer.Option(help="use this Redis instead of the embedded one")] = None,
    workers: Annotated[int, typer.Option(help="workers to run in-process")] = 2,
    non_migratable: Annotated[str | None, typer.Option(
        help="block (default): refuse the drain when a VM cannot move; skip: leave such VMs where they are "
             "(the hostile scenario has VMs that cannot move)")] = None,
    report: Annotated[Path, typer.Option(help="HTML report file")] = Path("drainctl-report.html"),
    timeout: Annotated[float, typer.Option(help="give up after this many wall seconds (exit 6)")] = 900.0,
    output: OutputOpt = None,
) -> None:
    """Drain a node of a simulated cluster with an embedded Redis and in-process workers (needs nothing)."""
    from orchestrator.demo import DEFAULT_TIME_SCALE, run_demo
    from orchestrator.planner import PlanError

    out = _output(ctx, output)
    g: Globals = ctx.obj
    scale = time_scale or g.time_scale or DEFAULT_TIME_SCALE
    if workers < 1:
        fail(EXIT_USAGE, "--workers: must be at least 1")
    if not scale > 0:
        fail(EXIT_USAGE, "--time-scale: must be a positive number")
    if non_migratable not in (None, "block", "skip"):
        fail(EXIT_USAGE, f"--non-migratable: {non_migratable!r} is not one of block, skip")
    try:
        result = _run(g, run_demo(
            scenario=scenario, seed=seed, time_scale=scale, redis_url=redis_url or g.redis_url,
            workers=workers, report=report, timeout_s=timeout, non_migratable=non_migratable or "block",
            console=None if out == "json" else stdout_console()))
    except PlanError as exc:
        _refused(exc, out, None if non_migratable else "to drain around VMs that cannot move, pass "
                                                        "--non-migratable skip")
    except (ValueError, OSError) as exc:
        fail(EXIT_USAGE, str(exc))
    if out == "json":
        print(json.dumps({"drain": result.view.to_json(), "ground_truth": result.truth,
                          "report": str(result.report) if result.report else None}, indent=2, default=str))
    raise typer.Exit(result.exit_code)


# ================================================================================================== report
@app.command("report")
def report(
    ctx: typer.Context,
    drain_id: Annotated[str, typer.Argument(help="the drain id (drainctl list shows them)")],
    html_file: Annotated[Path | None, typer.Option("--html", help="write the HTML report to this file")] = None,
    output: OutputOpt = None,
) -> None:
    """Report on one drain: a self-contained HTML page (--html FILE) and a summary on the terminal."""
    from orchestrator.store import DrainNotFound

    out = _output(ctx, output)

    async def go(service: DrainService) -> Any:
        try:
            return await service.get(drain_id)
        except DrainNotFound as exc:
            fail(EXIT_USAGE, f"{exc} (drainctl list shows the drains)")

    view = _run(ctx.obj, with_service(ctx.obj, go, need_kube=False))
    from orchestrator.progress import print_summary
    from orchestrator.report import render_html

    if html_file is not None:
        try:
            html_file.write_text(render_html(view), encoding="utf-8")
        except OSError as exc:
            fail(EXIT_USAGE, f"--html {html_file}: {exc.strerror or exc}")
    if out == "json":
        print(json.dumps({"drain": view.to_json(), "report": str(html_file) if html_file else None}, indent=2,
                         default=str))
        return
    console = stdout_console()
    print_summary(view, console)
    if html_file is not None:
        console.print(f"report written to {html_file}", highlight=False)


# ============================================================================================ entry points
def main() -> None:
    """The `drainctl` console script."""
    app(prog_name="drainctl")


def kubectl_plugin() -> None:
    """The `kubectl-drainctl` console script: `kubectl drainctl plan NODE` (krew's plugin convention).

    kubectl hands a plugin every argument after its name and its own environment (KUBECONFIG included), so
    kubectl's `--kubeconfig` and `--context` work wherever they are put."""
    app(prog_name="kubectl drainctl")


if __name__ == "__main__":
    main()
