"""What the next-best-message routes depend on: the state the mounting app puts on `app.state.messages` when it
starts, and the key dependency. The routes do not know which service mounts them (today the recommend service,
whose `app.build_state` builds this state and shares its executor and keys)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from services.common.api import require_scope
from services.common.auth import ApiKeyAuth
from services.messages.service import MessageService


@dataclass
class MessagesState:
    service: MessageService  # replaced by `install_message_service` in tests with other settings
    auth: ApiKeyAuth
    executor: ThreadPoolExecutor  # the mounting service's ranking threads: decisions are CPU work off the loop
    max_body_bytes: int


def get_state(request: Request) -> MessagesState:
    state: MessagesState = request.app.state.messages
    return state


def get_auth(request: Request) -> ApiKeyAuth:
    return get_state(request).auth


State = Annotated[MessagesState, Depends(get_state)]
# Server-side only: a decision renders the visitor's name and cart, records sends and consumes caps.
MessagesKey = Annotated[str, Depends(require_scope(get_auth, "messages"))]
