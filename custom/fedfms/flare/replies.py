"""How a FLARE component says no: an error reply whose headers carry a one-line reason (and, for a site that cannot
run at all, that it cannot). Site components (executors, site filters) and server components (contribution check,
monitor, planning) both use it, so it sits below both."""

from __future__ import annotations

from nvflare.apis.shareable import Shareable, make_reply
from nvflare.app_common.app_constant import AppConstants

# Reply header that carries the one-line reason of a rejection or of a site's failure to the server's logs
# and the run record (fedfms.flare.monitor).
REASON_HEADER = "fedfms_reason"
# Reply header a site sets when it cannot run at all (data or checkpoint unusable): the job stops.
FATAL_HEADER = "fedfms_site_cannot_start"


def error_reply(rc: str, reason: str, original: Shareable | None = None, fatal: bool = False) -> Shareable:
    reply = make_reply(rc)
    reply.set_header(REASON_HEADER, reason)
    if fatal:
        reply.set_header(FATAL_HEADER, True)
    if original is not None:
        reply.set_peer_props(original.get_peer_props() or {})
        contribution_round = original.get_cookie(AppConstants.CONTRIBUTION_ROUND)
        if contribution_round is not None:
            reply.add_cookie(AppConstants.CONTRIBUTION_ROUND, contribution_round)
    return reply
