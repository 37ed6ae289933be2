"""Running FedFMS on a real FLARE deployment: what the scripts in ``poc/`` and ``provisioning/`` do.

* :mod:`fedfms.deploy.site_setup`: one-time configuration of a startup kit's ``local/`` folder (allow-list,
  server storage and liveness, ``fedfms_site.json``, BYOC rights) and closing jobs a killed server left
  RUNNING (``provisioning/site_setup.py``).
* :mod:`fedfms.deploy.admin_api`: job commands through the FLARE API from an admin kit
  (``provisioning/admin_api.py``).
* :mod:`fedfms.deploy.poc`: a whole federation on one machine in FLARE's POC mode (``poc/fedfms_poc.py``).
* :mod:`fedfms.deploy.runtime`: starting kits, admin sessions, finding and stopping processes by PID
  (used by the POC CLI and the deploy tests).

The scripts are thin entry points into these modules (``python -m fedfms.deploy.<module>`` is the same
command), so they need the package installed (``make setup`` / ``pip install -e custom``), as every site
and the server have it anyway (provisioning/README.md, step 3). Nothing here is imported by a job.
"""
