"""The fednnunet job as rendered from the project's renderer, and the server's plan-aware contribution check
(without running FLARE)."""

import pydoc

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants

from fedfms.data.synthetic import make_disc_site
from fedfms.errors import ConfigError
from fedfms.flare.contribution_filter import ContributionCheckFilter
from fedfms.flare.replies import REASON_HEADER
from fedfms.flare.jobs import RECIPE_KEY, component_paths
from fedfms.flare.fed_job import render_job
from fedfms.flare.nnunet_planning import NnUNetContributionCheckFilter, NnUNetGlobalModel
from fedfms.flare.update_check import FROZEN_FINGERPRINT
from fedfms.nnunet.config import MODEL_CONFIG, TINY_TRAIN
from fedfms.nnunet.fingerprint import merge_fingerprints, site_fingerprint
from fedfms.nnunet.plan import make_plan, plan_digest
from fedfms.nnunet.sitedata import NnUNetSiteData

STOCK_FEDAVG = "nvflare.app_common.aggregators.intime_accumulate_model_aggregator.InTimeAccumulateWeightedAggregator"


def test_the_job_is_the_fedunet_federation_with_planning_first():
    files = render_job("fednnunet", sites=["a", "b", "c"], num_rounds=50, site_samples={"a": 10})
    server, client = files["app/config/config_fed_server.json"], files["app/config/config_fed_client.json"]
    base = render_job("fedunet", sites=["a", "b", "c"], num_rounds=50, site_samples={"a": 10})["app/config/config_fed_server.json"]
    assert [w["id"] for w in server["workflows"]] == ["nnunet_planning", "scatter_and_gather", "cross_site_validate"]
    assert [w["path"] for w in server["workflows"][1:]] == [w["path"] for w in base["workflows"]]
    components = {c["id"]: c for c in server["components"]}
    assert components["aggregator"]["path"] == STOCK_FEDAVG and components["aggregator"]["args"]["weigh_by_local_iter"]
    assert {c["id"] for c in base["components"]} == set(components)  # monitor, selector, locator, TensorBoard, ...
    assert components["persistor"]["args"]["model"]["path"] == "fedfms.flare.nnunet_planning.NnUNetGlobalModel"
    check = server["task_result_filters"][0]["filters"][-1]
    assert check["path"] == "fedfms.flare.nnunet_planning.NnUNetContributionCheckFilter"
    assert check["args"]["site_samples"] == {"a": 10}
    assert issubclass(NnUNetContributionCheckFilter, ContributionCheckFilter)
    planning = server["workflows"][0]["args"]
    assert planning["expected_sites"] == ["a", "b", "c"] and planning["planning_config"]["total_epochs"] == 50
    executor = client["executors"][0]
    assert executor["executor"]["path"] == "fedfms.flare.nnunet_executor.NnUNetExecutor"
    assert set(executor["tasks"]) == {"train", "validate", "submit_model", "nnunet_fingerprint", "nnunet_plan"}
    args = executor["executor"]["args"]
    assert args["model_config"] == MODEL_CONFIG and args["train_config"]["iterations_per_epoch"] == 250
    assert args["train_config"]["total_epochs"] == 50  # nnU-Net's poly schedule over the 50 rounds
    assert files["meta.json"][RECIPE_KEY] == {"variant": "fednnunet",
                                              "settings": {"sites": ["a", "b", "c"], "num_rounds": 50, "site_samples": {"a": 10}}}
    for path in component_paths(files):  # every class the job names exists
        assert pydoc.locate(path) is not None, path


def test_overrides_and_refusals():
    files = render_job("fednnunet_tiny", num_classes=2, train={"iterations_per_epoch": 3, "total_epochs": 7})
    args = files["app/config/config_fed_client.json"]["executors"][0]["executor"]["args"]
    assert args["model_config"]["num_classes"] == 2 and args["train_config"]["total_epochs"] == 7
    assert args["train_config"]["base_num_features"] == TINY_TRAIN["base_num_features"]
    with pytest.raises(ConfigError, match="unknown field"):
        render_job("fednnunet", train={"lr_max": 1})
    with pytest.raises(ConfigError, match="no flavour 'reference'"):
        render_job("fednnunet", flavour="reference")
    with pytest.raises(ConfigError, match="do not apply to the nnU-Net baseline"):
        render_job("fednnunet", model={"head": "reference"})
    with pytest.raises(ConfigError, match="min_sites"):  # the federation settings go through the project's checks
        render_job("fednnunet", sites=["a"], min_sites=3)


class _Engine:
    def __init__(self, persistor):
        self.persistor = persistor

    def get_component(self, cid):
        return self.persistor if cid == "persistor" else None

    def fire_event(self, event_type, fl_ctx):  # the filter's error log fires one
        pass


class _Persistor:
    def __init__(self, model):
        self.model = model


def _ctx(engine, task="train"):
    ctx = FLContext()
    ctx.set_prop(FLContextKey.TASK_NAME, task, private=True, sticky=False)
    ctx.set_prop(ReservedKey.ENGINE, engine, private=True, sticky=False)
    return ctx


def _result(site, weights, digest, n=12):
    dxo = DXO(DataKind.WEIGHTS, weights, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: n, FROZEN_FINGERPRINT: digest,
                                               MetaKey.INITIAL_METRICS: {"val_dice": 0.5}})
    shareable = dxo.to_shareable()
    shareable.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    shareable.add_cookie(AppConstants.CONTRIBUTION_ROUND, 0)
    return shareable


def test_the_server_checks_updates_against_the_planned_network_and_the_plan_digest(tmp_path):
    site = make_disc_site(tmp_path / "s", site="s", num_volumes=2, slices_per_volume=2)
    merged = merge_fingerprints({"s": site_fingerprint(NnUNetSiteData(site))})
    plan, other = make_plan(merged, TINY_TRAIN), make_plan(merged, {**TINY_TRAIN, "base_num_features": 4})
    model = NnUNetGlobalModel(**MODEL_CONFIG)
    check = NnUNetContributionCheckFilter(MODEL_CONFIG)
    engine = _Engine(_Persistor(model))
    # before the plan: nothing can be checked, so nothing is accepted
    early = check.process(_result("s", {}, "x"), _ctx(engine))
    assert early.get_return_code() == ReturnCode.BAD_TASK_DATA and "no nnU-Net plan" in early.get_header(REASON_HEADER)
    with pytest.raises(Exception, match="no plan yet"):
        model.state_dict()

    model.set_plan(plan)
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    ok = check.process(_result("s", weights, plan_digest(plan)), _ctx(engine))
    assert ok.get_return_code(ReturnCode.OK) == ReturnCode.OK
    assert all(v.dtype == np.float64 for v in from_shareable(ok).data.values())  # for FLARE's weighted sum
    # another plan's network: wrong shapes; the right shapes with another plan's digest: another plan
    o = NnUNetGlobalModel(**MODEL_CONFIG)
    o.set_plan(other)
    other_weights = {k: v.numpy() for k, v in o.state_dict().items()}
    reason = check.process(_result("s", other_weights, plan_digest(other)), _ctx(engine)).get_header(REASON_HEADER)
    assert "shape" in reason
    reason = check.process(_result("s", weights, plan_digest(other)), _ctx(engine)).get_header(REASON_HEADER)
    assert "another nnU-Net plan than the server's" in reason
    nan = dict(weights)
    key = next(iter(nan))
    nan[key] = np.full_like(nan[key], np.nan)
    assert "NaN" in check.process(_result("s", nan, plan_digest(plan)), _ctx(engine, "submit_model")).get_header(REASON_HEADER)
