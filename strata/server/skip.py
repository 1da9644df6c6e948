"""AdaSkip per request: body `skip` or header `X-Skip-Sublayers` -> the engine's SkipRequest (the headers
that say what was skipped are in headers.py)."""

from __future__ import annotations

from starlette.datastructures import Headers

from strata.engine.request import SkipRequest
from strata.engine.skip_setup import SkipRejected
from strata.server.errors import bad_request
from strata.server.protocol import SkipField
from strata.server.state import ServerState

HEADER = "X-Skip-Sublayers"


def skip_request(state: ServerState, field: SkipField | None, headers: Headers) -> SkipRequest | None:
    """What the request asks (the body wins over the header); None: the server's default.

    Checked here, before anything runs, so that a refusal (e.g. no AdaSkip profile) is a plain 400."""
    default_mode = state.settings.engine.skip_mode
    raw = headers.get(HEADER)
    if field is not None:
        spec, param_of = SkipRequest(field.sublayers, field.mode or default_mode), None
    elif raw is not None:
        value = raw.strip()
        if not (value.isascii() and value.isdigit()):
            raise bad_request(f"{HEADER} must be a non-negative integer, got {raw!r}.", param=HEADER)
        spec, param_of = SkipRequest(int(value), default_mode), HEADER
    else:
        return None
    try:
        state.ready_engine().check_skip(spec)
    except SkipRejected as e:
        # A bad count from the header is the header's fault; anything else (mode, profile) the body's.
        param = param_of if param_of and e.param == "skip.sublayers" else e.param
        raise bad_request(str(e), param=param) from e
    return spec
