"""Stored responses (/v1/responses with store: true): the response object and the conversation it ends.

With an SSD tier they are files next to its KV (`SSD_DIR/responses/TENANT/ID.json`, written whole then
renamed into place), so a follow-up by previous_response_id works after a restart, as the conversation's
KV does; without one they live in memory and end with the process. Each tenant sees only its own.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Any

RESPONSE_ID = re.compile(r"^resp_[0-9a-f]{32}$")


class ResponseStore:
    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._memory: dict[tuple[str, str], dict[str, Any]] = {}
        self._lock = threading.Lock()

    def _path(self, tenant: str, response_id: str) -> Path:
        assert self.directory is not None
        return self.directory / tenant / f"{response_id}.json"

    def put(self, tenant: str, response_id: str, record: dict[str, Any]) -> None:
        if self.directory is None:
            with self._lock:
                self._memory[(tenant, response_id)] = record
            return
        path = self._path(tenant, response_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{threading.get_ident()}")
        with open(tmp, "w") as f:
            json.dump(record, f, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def get(self, tenant: str, response_id: str) -> dict[str, Any] | None:
        if not RESPONSE_ID.match(response_id):
            return None
        if self.directory is None:
            with self._lock:
                return self._memory.get((tenant, response_id))
        try:
            return json.loads(self._path(tenant, response_id).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def delete(self, tenant: str, response_id: str) -> bool:
        if not RESPONSE_ID.match(response_id):
            return False
        if self.directory is None:
            with self._lock:
                return self._memory.pop((tenant, response_id), None) is not None
        try:
            self._path(tenant, response_id).unlink()
            return True
        except FileNotFoundError:
            return False
