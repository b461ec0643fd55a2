"""Typed dependencies: resources live on `app.state.services`, created in the lifespan."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Path, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.adapter_cache import AdapterCache
from server.api.schemas import USER_ID_PATTERN
from server.bank.registry import BankRegistry
from server.engine import Engine
from server.errors import Forbidden, Unauthorized
from server.generation import Generator
from server.jobs import JobRunner, JobService
from server.metrics import Metrics
from server.personalize import Personalizer
from server.settings import Settings
from server.store import UserStore


@dataclass
class Services:
    settings: Settings
    store: UserStore
    banks: BankRegistry
    cache: AdapterCache
    engine: Engine
    personalizer: Personalizer
    generator: Generator
    jobs: JobService
    metrics: Metrics
    runner: JobRunner | None = None  # the embedded fine-tune runner (None: `mta worker`s run the jobs)


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


# Declared through FastAPI's security seam so the schema names the scheme; the errors are ours.
_admin_bearer = HTTPBearer(scheme_name="adminToken", description="MTA_ADMIN_TOKEN", auto_error=False)


def require_admin(
    services: ServicesDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_admin_bearer)]
) -> None:
    """Bearer admin token, compared in constant time; no token configured = admin disabled."""
    token = services.settings.admin_token
    if token is None:
        raise Forbidden("admin endpoints are disabled: set MTA_ADMIN_TOKEN")
    if credentials is None:
        raise Unauthorized("missing bearer token (Authorization: Bearer <MTA_ADMIN_TOKEN>)")
    if not hmac.compare_digest(credentials.credentials.encode(), token.get_secret_value().encode()):
        raise Forbidden("wrong admin token")


AdminDep = Depends(require_admin)

# The `{user_id}` of every per-user route.
UserIdPath = Path(pattern=USER_ID_PATTERN, description="Letters, digits and _.:@- (max 128).")
