"""Run the HTTP (and optionally gRPC) server with a graceful, deadline-respecting shutdown.

On SIGTERM or SIGINT: readiness turns 503 and new work is refused at once, accepted work finishes within
`shutdown_grace_s`, then uvicorn (and gRPC) stop and the process exits. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import sys

import uvicorn

from service import logs
from service.api import guards
from service.app import create_app
from service.runtime import Runtime
from service.settings import Settings

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first exit signal drains the runtime before stopping the server."""

    def __init__(self, config: uvicorn.Config, settings: Settings) -> None:
        super().__init__(config)
        self.settings = settings
        self.runtime: Runtime | None = None
        self._drain_task: asyncio.Task | None = None
        self.grpc_server = None

    def handle_exit(self, sig: int, frame) -> None:  # type: ignore[no-untyped-def]
        if self._drain_task is not None or self.runtime is None:
            return super().handle_exit(sig, frame)  # second signal, or nothing to drain: default path
        log.info("signal %s: draining before exit", sig)
        self._drain_task = asyncio.get_event_loop().create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        assert self.runtime is not None
        grace = self.settings.shutdown_grace_s
        if self.grpc_server is not None:
            self.grpc_server.begin_drain()
        await self.runtime.drain(grace)
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=1.0)
        self.should_exit = True


def build_runtime(settings: Settings) -> Runtime | None:
    """The runtime, or None after one clear line on stderr for a user error (config, checkpoint, model name).

    The traceback is logged only at debug level: a wrong path or name is not a crash.
    """
    from models.checkpoint import CheckpointError
    from service.repository import ConfigError

    try:
        return Runtime(settings)
    except (ConfigError, CheckpointError, KeyError, FileNotFoundError, ValueError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        log.debug("start-up failed", exc_info=True)
        print(f"segserve serve: error: {message}", file=sys.stderr)
        return None


def serve(settings: Settings) -> int:
    """Run until a signal; the exit code (2 for a start-up error the user can fix)."""
    logs.configure(settings)
    try:  # user errors in the access settings are found before the models load
        guards.Guard.from_settings(settings)
        sockets = guards.listen_sockets(settings)  # the API and ops ports with SEGSERVE_OPS_PORT, else None
    except guards.GuardConfigError as exc:
        print(f"segserve serve: error: {exc}", file=sys.stderr)
        return 2
    runtime = build_runtime(settings)
    if runtime is None:
        return 2
    app = create_app(settings, runtime=runtime)
    config = uvicorn.Config(logs.AccessLogMiddleware(app, log_probes=settings.log_probes), host=settings.host,
                            port=settings.port, log_level=settings.log_level.lower(),
                            timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_s)),
                            **logs.UVICORN_LOG_SETTINGS)
    server = DrainingServer(config, settings)
    server.runtime = runtime
    app.state.on_start_failure = lambda: setattr(server, "should_exit", True)

    async def main() -> None:
        if settings.grpc_port is not None:
            from service.grpc.server import GrpcServer

            server.grpc_server = GrpcServer(runtime, app, settings)
            await server.grpc_server.start()
        try:
            await server.serve(sockets=sockets)
        finally:
            # Also when uvicorn ends without draining (it could not bind, or a second signal): stop gRPC
            # while the loop still runs. After a drain this is a no-op.
            if server.grpc_server is not None:
                await server.grpc_server.stop(grace=0)

    asyncio.run(main())
    return 1 if getattr(app.state, "start_failed", None) is not None else 0
