"""Type stubs for the native module ``cmz._cmz``."""

import os
from typing import Any, AsyncIterator, Dict, Iterator, List, Mapping, Optional, Union, final

__version__: str
ERROR_CODES: tuple[str, ...]
"""Every error code, in a stable order: each is the ``code`` of one :class:`CmzError` subclass."""
__all__ = [
    "Auth",
    "Client",
    "CmzError",
    "Conflict",
    "Conversations",
    "ERROR_CODES",
    "Forbidden",
    "InternalError",
    "NotFound",
    "Principal",
    "RateLimited",
    "Timeout",
    "TurnStream",
    "Unauthorized",
    "Unavailable",
    "ValidationError",
    "__version__",
    "_raise_error",
]

class CmzError(Exception):
    code: str
    message: str
    details: Dict[str, Any]
    retry_after: Optional[float]

class ValidationError(CmzError): ...
class NotFound(CmzError): ...
class Forbidden(CmzError): ...
class Unauthorized(CmzError): ...
class RateLimited(CmzError): ...
class Conflict(CmzError): ...
class Unavailable(CmzError): ...
class Timeout(CmzError): ...
class InternalError(CmzError): ...

def _raise_error(code: str, message: str = "test") -> None: ...

@final
class Principal:
    def __new__(cls, user_id: str, role: str = "user", family_id: Optional[str] = None) -> Principal: ...
    @property
    def user_id(self) -> str: ...
    @property
    def role(self) -> str: ...
    @property
    def family_id(self) -> Optional[str]: ...

@final
class TurnStream:
    @property
    def session_id(self) -> str: ...
    @property
    def session_created(self) -> bool: ...
    @property
    def stream_id(self) -> str: ...
    def __iter__(self) -> Iterator[Dict[str, Any]]: ...
    def __next__(self) -> Dict[str, Any]: ...
    def __aiter__(self) -> AsyncIterator[Dict[str, Any]]: ...
    def __anext__(self) -> Any: ...
    def close(self) -> None: ...

@final
class Conversations:
    def turn(
        self,
        principal: Principal,
        animal_id: str,
        message: str,
        *,
        session_id: Optional[str] = None,
        context_window: Optional[int] = None,
        turn_key: Optional[str] = None,
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        context_summary: Optional[str] = None,
        moderation_level: Optional[str] = None,
        priority: Optional[str] = None,
    ) -> Dict[str, Any]: ...
    def aturn(
        self,
        principal: Principal,
        animal_id: str,
        message: str,
        *,
        session_id: Optional[str] = None,
        context_window: Optional[int] = None,
        turn_key: Optional[str] = None,
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        context_summary: Optional[str] = None,
        moderation_level: Optional[str] = None,
        priority: Optional[str] = None,
    ) -> Any: ...
    def stream_turn(
        self,
        principal: Principal,
        animal_id: str,
        message: str,
        *,
        session_id: Optional[str] = None,
        context_window: Optional[int] = None,
        turn_key: Optional[str] = None,
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        context_summary: Optional[str] = None,
        moderation_level: Optional[str] = None,
        priority: Optional[str] = None,
    ) -> TurnStream: ...
    def store_turn(
        self,
        principal: Principal,
        animal_id: str,
        user_message: str,
        assistant_reply: str,
        *,
        session_id: Optional[str] = None,
        metadata: Optional[Mapping[str, Any]] = None,
    ) -> Dict[str, Any]: ...
    def create_session(self, principal: Principal, animal_id: str, *, animal_name: Optional[str] = None) -> Dict[str, Any]: ...
    def set_thread_id(self, principal: Principal, session_id: str, thread_id: str) -> None: ...
    def session(self, principal: Principal, session_id: str) -> Dict[str, Any]: ...
    def recent(self, principal: Principal, session_id: str, *, limit: int = 20) -> List[Dict[str, Any]]: ...
    def history(
        self, principal: Principal, session_id: str, *, limit: int = 50, cursor: Optional[str] = None
    ) -> Dict[str, Any]: ...
    def ahistory(
        self, principal: Principal, session_id: str, *, limit: int = 50, cursor: Optional[str] = None
    ) -> Any: ...
    def sessions(
        self, principal: Principal, *, user_id: Optional[str] = None, limit: int = 20, cursor: Optional[str] = None
    ) -> Dict[str, Any]: ...
    def asessions(
        self, principal: Principal, *, user_id: Optional[str] = None, limit: int = 20, cursor: Optional[str] = None
    ) -> Any: ...
    def delete(self, principal: Principal, session_id: str) -> Dict[str, Any]: ...
    def adelete(self, principal: Principal, session_id: str) -> Any: ...
    def summarize(self, principal: Principal, session_id: str) -> Dict[str, Any]: ...
    def resume_stream(self, principal: Principal, stream_id: str, *, after: int = 0) -> TurnStream: ...
    def feedback(
        self,
        principal: Principal,
        session_id: str,
        message_id: str,
        vote: str,
        *,
        note: Optional[str] = None,
    ) -> Dict[str, Any]: ...
    def my_feedback(self, principal: Principal, session_id: str, message_id: str) -> Optional[Dict[str, Any]]: ...
    def review_queue(
        self,
        principal: Principal,
        *,
        state: str = "open",
        limit: int = 20,
        cursor: Optional[str] = None,
    ) -> Dict[str, Any]: ...
    def review_item(self, principal: Principal, item_id: str, *, around: int = 3) -> Dict[str, Any]: ...
    def mark_reviewed(self, principal: Principal, item_id: str, *, note: Optional[str] = None) -> Dict[str, Any]: ...
    def usage(
        self,
        principal: Principal,
        *,
        start: Optional[str] = None,
        end: Optional[str] = None,
        group_by: str = "day",
        csv: bool = False,
    ) -> Any: ...
    def budgets(self, principal: Principal) -> List[Dict[str, Any]]: ...
    def export(
        self,
        principal: Principal,
        path: Union[str, "os.PathLike[str]"],
        *,
        parent_user_id: Optional[str] = None,
        user_id: Optional[str] = None,
        start: Optional[str] = None,
        end: Optional[str] = None,
        format: str = "json",
    ) -> Dict[str, Any]: ...
    def asummarize(self, principal: Principal, session_id: str) -> Any: ...

@final
class Auth:
    def login(self, email: str, password: str, *, client: Optional[str] = None) -> Dict[str, Any]: ...
    def alogin(self, email: str, password: str, *, client: Optional[str] = None) -> Any: ...
    def refresh(self, refresh_token: str) -> Dict[str, Any]: ...
    def arefresh(self, refresh_token: str) -> Any: ...
    def logout(self, token: str) -> None: ...
    def alogout(self, token: str) -> Any: ...
    def authenticate(self, token: str) -> Principal: ...
    def aauthenticate(self, token: str) -> Any: ...
    def verify_token(self, token: str) -> Dict[str, Any]: ...
    def averify_token(self, token: str) -> Any: ...
    def issue_token(
        self,
        user_id: str,
        email: str,
        role: str,
        *,
        family_id: Optional[str] = None,
        expires_in: Optional[int] = None,
        claims: Optional[Mapping[str, Any]] = None,
    ) -> str: ...
    def hash_password(self, password: str) -> str: ...
    def verify_password(self, password: str, stored_hash: str) -> bool: ...
    def set_family_retention(self, principal: Principal, family_id: str, days: Optional[int]) -> Dict[str, Any]: ...

@final
class Client:
    @staticmethod
    def from_env(env: Optional[Mapping[str, str]] = None) -> Client: ...
    @staticmethod
    def in_memory(*, jwt_secret: Optional[str] = None, dev_users: bool = True) -> Client: ...
    @staticmethod
    def dynamodb(
        *,
        endpoint_url: Optional[str] = None,
        region: Optional[str] = None,
        tables: Optional[Mapping[str, str]] = None,
        create_tables: bool = False,
        jwt_secret: Optional[str] = None,
        dev_users: bool = False,
    ) -> Client: ...
    @property
    def conversations(self) -> Conversations: ...
    @property
    def auth(self) -> Auth: ...
    def capacity(self) -> Optional[Dict[str, Any]]: ...
    def erase_user(self, principal: Principal, user_id: str, *, reason: Optional[str] = None) -> Dict[str, Any]: ...
    def apply_family_retention(self) -> Dict[str, Any]: ...
