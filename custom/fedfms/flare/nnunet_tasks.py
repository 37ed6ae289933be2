"""The FednnU-Net planning exchange, as both sides name it: the server's planning workflow
(``fedfms.flare.nnunet_planning``) sends these tasks and the sites' executor (``fedfms.flare.nnunet_executor``)
answers them, so the names live below both."""

FINGERPRINT_TASK = "nnunet_fingerprint"
PLAN_TASK = "nnunet_plan"
PLANNING_TASKS = [FINGERPRINT_TASK, PLAN_TASK]
PLAN_KEY = "plan"  # the plan task's data: the federation's plan
DIGEST_KEY = "plan_digest"  # the plan task's reply: the site's digest of the plan it built
