"""The HTTP API's routes, one module per resource group; ``app.create_app`` includes them all."""

from . import attach, files, runs, sandboxes, server

ROUTERS = (server.router, runs.router, sandboxes.router, files.router, attach.router)
