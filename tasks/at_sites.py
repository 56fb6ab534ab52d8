"""``federation.mode=sites`` stages at the coordinator (Prefect tasks): the sites' start-up
reports, the rounds over the federation endpoint, the audit from the sites' aggregates.

The bodies are in :mod:`adapters.site_reports`, :mod:`adapters.train` and :mod:`adapters.audit`;
the sessions themselves are started and stopped by the flow (:mod:`flows.site_dispatch`).
"""

from prefect import task

from adapters.audit import audit_at_sites
from adapters.site_reports import record_sites
from adapters.train import train_at_sites
from tasks.common import task_options

check_sites = task(**task_options("sites", retries=0))(record_sites)
# a retry would replay rounds the sites have already answered: the run fails instead
train_sites = task(**task_options("train", retries=0))(train_at_sites)
audit_sites = task(**task_options("audit", retries=0))(audit_at_sites)
