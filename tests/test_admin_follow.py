"""Following a job from an admin kit (fedfms.deploy.admin_api.follow_job): a status poll the server leaves
unanswered (FLARE's admin commands give up after 5 s) is asked again instead of ending the wait. Seen in a CI run:
four federations starting at once kept one server from answering one poll, and the provisioned-kit test failed
with the job still running. FLARE-free: the session is a stand-in with FLARE's monitor loop semantics."""

from __future__ import annotations

import pytest
from nvflare.fuel.flare_api.api_spec import NoConnection

from fedfms.deploy import admin_api


class Session:
    """Answers the status polls from a script: a status, or None for a poll the server left unanswered."""

    def __init__(self, script):
        self.script = list(script)
        self.polls = 0

    def monitor_job_and_return_job_meta(self, job_id, timeout=0.0, poll_interval=2.0, cb=None):
        while True:  # FLARE's loop: poll, callback, stop at a terminal status; NoConnection escapes it
            self.polls += 1
            status = self.script.pop(0)
            if status is None:
                raise NoConnection("cannot connect to server: ERROR_SERVER_CONNECTION")
            meta = {"status": status, "job_id": job_id}
            cb(self, job_id, meta)
            if status.startswith("FINISHED"):
                return "JOB_FINISHED", meta


def test_unanswered_polls_are_asked_again_and_the_job_is_followed_to_its_end():
    lines = []
    sess = Session(["SUBMITTED", "RUNNING", None, None, "RUNNING", None, "FINISHED:COMPLETED"])
    meta = admin_api.monitor(sess, "j1", interval=0, echo=lines.append)
    assert meta["status"] == "FINISHED:COMPLETED" and sess.polls == 7
    assert [line.split("] ", 1)[1] for line in lines if "did not answer" not in line] == [
        "j1 SUBMITTED", "j1 RUNNING", "j1 FINISHED:COMPLETED"]  # each change once, across the retries
    assert sum("did not answer a status poll" in line for line in lines) == 3


def test_a_server_that_stops_answering_ends_the_wait():
    # without an observation of the server, UNANSWERED_POLLS in a row: it is taken to be gone
    sess = Session(["RUNNING", *[None] * admin_api.UNANSWERED_POLLS, "FINISHED:COMPLETED"])
    with pytest.raises(NoConnection):
        admin_api.follow_job(sess, "j2", interval=0, echo=lambda line: None)
    assert sess.polls == 1 + admin_api.UNANSWERED_POLLS
    # an answered poll in between starts the count again
    sess = Session(["RUNNING", *[None] * (admin_api.UNANSWERED_POLLS - 1), "RUNNING",
                    *[None] * (admin_api.UNANSWERED_POLLS - 1), "FINISHED:ABORTED"])
    assert admin_api.follow_job(sess, "j3", interval=0, echo=lambda line: None)["status"] == "FINISHED:ABORTED"


def test_with_the_server_process_in_view_its_liveness_decides():
    # POC: the server runs on this machine. Gone: the first unanswered poll ends the wait; alive: keep asking
    with pytest.raises(NoConnection):
        admin_api.follow_job(Session(["RUNNING", None, "FINISHED:COMPLETED"]), "j4", interval=0,
                             server_alive=lambda: False, echo=lambda line: None)
    many = admin_api.UNANSWERED_POLLS * 2
    sess = Session(["RUNNING", *[None] * many, "FINISHED:COMPLETED"])
    meta = admin_api.follow_job(sess, "j5", interval=0, server_alive=lambda: True, echo=lambda line: None)
    assert meta["status"] == "FINISHED:COMPLETED" and sess.polls == many + 2
