"""OpenAPI models of ERA's storage proxy (``handlers/storage.py``): ERA's field names.
Re-exported by ``schemas`` (which ``openapi`` reads); never on the request path."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class StorageSuccess(_Open):
    success: bool


class KvPut(BaseModel):
    value: str = Field(description="the value (text; store JSON as a string)")
    metadata: Optional[dict[str, Any]] = None


class KvValue(BaseModel):
    value: str
    metadata: Optional[dict[str, Any]] = None


class KvKey(BaseModel):
    name: str
    metadata: Optional[dict[str, Any]] = None


class KvList(BaseModel):
    keys: list[KvKey]
    list_complete: bool
    cursor: Optional[str] = Field(None, description="present when more keys follow: pass it back as `cursor`")


class D1Body(BaseModel):
    sql: str = Field(description="one SQL statement; `?` placeholders")
    params: list[Any] = Field(default_factory=list, description="positional values: string, number, boolean, null")


class D1Meta(_Open):
    duration: float = Field(description="milliseconds")
    changes: int
    last_row_id: Optional[int] = None
    changed_db: bool
    rows_read: int
    rows_written: int
    size_after: int = Field(description="the database's size in bytes after the statement")


class D1Exec(BaseModel):
    success: bool
    meta: D1Meta


class D1Query(D1Exec):
    results: list[dict[str, Any]]


class R2Put(BaseModel):
    content: str = Field(description="the object's bytes, base64")
    metadata: Optional[dict[str, str]] = Field(None, description="custom metadata")
    httpMetadata: Optional[dict[str, str]] = None


class R2Stored(StorageSuccess):
    size: int


class R2Object(BaseModel):
    content: str = Field(description="base64")
    size: int
    httpMetadata: dict[str, str]
    customMetadata: dict[str, str]
    uploaded: str


class R2Entry(BaseModel):
    key: str
    size: int
    uploaded: str


class R2List(BaseModel):
    objects: list[R2Entry]
    truncated: bool
    cursor: Optional[str] = None


class Resource(BaseModel):
    type: Literal["kv", "d1", "r2", "do"]
    namespace: str = Field(description="KV namespace, R2 bucket or D1 database")
    key: str = Field(description="KV key, object key or D1 table")
    size: Optional[int] = None
    metadata: Optional[dict[str, Any]] = None
    created_at: str
    updated_at: str


class ResourceList(BaseModel):
    resources: list[Resource]
    total: int
    offset: int
    limit: int
    has_more: bool
