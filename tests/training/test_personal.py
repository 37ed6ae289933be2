"""Personalised federation without FLARE: which tensors stay at a site, the personalise setting, the trainer's
local part, a site's personalisation step (fine-tune, site-alone comparison) and loading its models."""

from __future__ import annotations

import pytest
import torch

from fedfms.errors import CheckpointError, ConfigError
from fedfms.evaluation.baselines import model_predictor, score, site_split, train_alone
from fedfms.models import ModelConfig, build_model, build_model_on_meta
from fedfms.models.travel import (
    frozen_fingerprint,
    local_keys,
    norm_keys,
    trained_keys,
    travel_bytes,
    travel_keys,
    travel_spec,
)
from fedfms.training.personal import (
    MODEL_FILES,
    SITE_MODEL_KEY,
    Personalisation,
    personalise_site,
    read_local_part,
    save_local_part,
)
from fedfms.training.predict import load_model
from fedfms.training.trainer import LocalTrainer, TrainConfig, WeightsMismatch


def tiny(mode="fedmsa", parts=(), **kw) -> ModelConfig:
    return ModelConfig("tiny", mode, num_classes=1, pretrained=False, local_parts=parts, **kw)


# ------------------------------------------------------------------------------------------- the setting


@pytest.mark.parametrize("text,parts,epochs,alone,canonical", [
    ("norm", ("norm",), 0, False, "norm"),
    ("finetune:5,norm", ("norm",), 5, False, "norm,finetune:5"),
    ("head, decoder", ("decoder",), 0, False, "decoder"),  # the decoder holds the head
    ("decoder,norm,finetune:1,alone", ("norm", "decoder"), 1, True, "norm,decoder,finetune:1,alone"),
    ("finetune:3", (), 3, False, "finetune:3"),
])
def test_personalise_setting_parses_to_one_canonical_form(text, parts, epochs, alone, canonical):
    p = Personalisation.parse(text)
    assert (p.local_parts, p.finetune_epochs, p.alone, str(p)) == (parts, epochs, alone, canonical)
    assert Personalisation.parse(str(p)) == p


@pytest.mark.parametrize("text,message", [
    ("bn", "'bn' in 'bn'; expected some of norm, head, decoder, finetune:N"),
    ("finetune:0", "'finetune:0'"),
    ("finetune", "'finetune'"),
    ("alone", "personalises nothing"),
    ("norm,", "'' in 'norm,'"),
])
def test_personalise_setting_refuses_bad_input_in_one_line(text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        Personalisation.parse(text)
    assert Personalisation.parse(None) is None and Personalisation.parse("") is None


# ------------------------------------------------------------------------------------------- which tensors are local


def _norm_modules(model):
    from fedfms.models.travel import NORM_LAYERS

    return {name for name, m in model.named_modules() if isinstance(m, NORM_LAYERS)}


def test_fedmsa_norm_keeps_exactly_the_trained_normalisation_layers():
    model = build_model(tiny("fedmsa", ("norm",)))
    local = set(local_keys(model, "fedmsa", ("norm",)))
    # every trained norm layer (the decoder's: the encoder is frozen in FedMSA) and nothing else
    trained = set(trained_keys(model, "fedmsa"))
    assert local == norm_keys(model) & trained
    assert local and all(k.startswith("mask_decoder.") for k in local)
    assert {"mask_decoder.transformer.norm_final_attn.weight", "mask_decoder.output_upscaling.1.bias"} <= local
    assert not any(k.startswith("image_encoder.") for k in local)  # frozen encoder norms stay frozen, not local
    # what travels and what stays split what trains, no overlap
    shared = set(travel_keys(model, "fedmsa", ("norm",)))
    assert shared | local == trained and not shared & local
    # the frozen-weights fingerprint covers neither (it is the same with or without a local part)
    assert frozen_fingerprint(model, "fedmsa") == frozen_fingerprint(build_model(tiny("fedmsa")), "fedmsa")


def test_fedsam_norm_also_keeps_the_encoders_normalisation_layers():
    model = build_model(tiny("fedsam", ("norm",)))
    local = set(local_keys(model, "fedsam", ("norm",)))
    assert local == norm_keys(model)
    assert any(k.startswith("image_encoder.blocks.0.norm1.") for k in local)
    assert any(k.startswith("image_encoder.neck.") for k in local)


def test_head_and_decoder_parts():
    model = build_model(tiny("fedmsa", ("decoder",)))
    assert set(local_keys(model, "fedmsa", ("head",))) == {"head.weight", "head.bias"}
    decoder = set(local_keys(model, "fedmsa", ("decoder",)))
    assert decoder == {k for k in model.state_dict() if k.startswith(("mask_decoder.", "head."))}
    # FedMSA with a local decoder shares its adapters only
    assert all("adapter" in k for k in travel_keys(model, "fedmsa", ("decoder",)))


def test_unet_norm_and_head_but_no_decoder():
    unet = dict(variant="unet", mode="fedsam", num_classes=1, pretrained=False, image_size=128)
    model = build_model(ModelConfig(**unet, local_parts=("norm", "head")))
    local = set(local_keys(model, "fedsam", ("norm", "head")))
    assert {k for k in local if ".adn.N." in k} and {"unet.final_conv.weight", "unet.final_conv.bias"} <= local
    with pytest.raises(ConfigError, match="has no trained decoder"):
        build_model(ModelConfig(**unet, local_parts=("decoder",)))


def test_a_local_part_the_model_lacks_or_an_unknown_one_is_refused():
    with pytest.raises(ConfigError, match="has no trained head"):  # the paper code's head: none for one class
        build_model(tiny("fedmsa", ("head",), head="reference"))
    with pytest.raises(ConfigError, match=r"local_parts \['bn'\] has \['bn'\]"):
        tiny("fedmsa", ("bn",))


def test_what_travels_shrinks_with_a_local_part():
    """ViT-B on the meta device: the bytes a site sends per round with each local part."""
    full = travel_bytes(travel_spec(build_model_on_meta(ModelConfig("vit_b", "fedmsa")), "fedmsa"))
    sizes = {}
    for parts in (("norm",), ("head",), ("decoder",)):
        model = build_model_on_meta(ModelConfig("vit_b", "fedmsa", local_parts=parts))
        sizes[parts] = travel_bytes(travel_spec(model, "fedmsa", parts))
        assert sizes[parts] < full
    head = 4 * (3 * 1 + 1)  # Conv2d(3, 1, 1) in float32
    assert full - sizes[("head",)] == head
    assert sizes[("decoder",)] < sizes[("norm",)] < full - head


# ------------------------------------------------------------------------------------------- the trainer


def make_trainer(site, parts=("norm",), **kw) -> LocalTrainer:
    train = TrainConfig(lr=3e-3, loss="bce_dice", batch_size=6, progress=False, val_fraction=0.2, **kw)
    return LocalTrainer(tiny("fedmsa", parts), train, str(site))


def _changed(a: dict, b: dict) -> set[str]:
    return {k for k in a if not torch.equal(a[k], b[k])}


def test_the_trainer_sends_the_shared_part_and_keeps_its_local_part(disc_site):
    trainer = make_trainer(disc_site)
    local_before = trainer.local_weights()
    trainer.fit(epochs=1)
    sent = trainer.travel_weights()
    assert sent and not set(sent) & set(local_before)
    assert _changed(local_before, trainer.local_weights()), "the local part trains"
    # a global model is the shared part: loading it leaves the local part as it is
    local_after = trainer.local_weights()
    trainer.load_travel_weights({k: torch.zeros_like(v) for k, v in sent.items()})
    assert not _changed(local_after, trainer.local_weights())
    # a "global model" holding a local part is refused, as one missing a shared tensor
    with pytest.raises(WeightsMismatch, match="1 unexpected"):
        trainer.load_travel_weights({**sent, next(iter(local_after)): next(iter(local_after.values()))})
    with pytest.raises(WeightsMismatch, match="local weights do not match"):
        trainer.load_local_weights(sent)


def test_the_local_part_survives_on_disk(tmp_path, disc_site):
    trainer = make_trainer(disc_site)
    trainer.fit(epochs=1)
    assert save_local_part(tmp_path, trainer.local_weights()) is not None
    other = make_trainer(disc_site)  # a site process started again
    assert _changed(trainer.local_weights(), other.local_weights())
    other.load_local_weights(read_local_part(tmp_path))
    assert not _changed(trainer.local_weights(), other.local_weights())
    assert read_local_part(tmp_path / "nowhere") is None


# ------------------------------------------------------------------------------------------- the site's last step


def test_personalise_site_fine_tunes_keeps_both_models_and_leaves_the_trainer_as_it_was(tmp_path, disc_site):
    trainer = make_trainer(disc_site)
    initial = trainer.trained_weights()
    trainer.fit(epochs=2)  # the federation's rounds
    state = trainer.trained_weights()
    global_shared = {k: v + 0.01 for k, v in trainer.travel_weights().items()}  # "the final global model"
    setting = Personalisation.parse("norm,finetune:2,alone")
    out = tmp_path / "fedfms_personal"
    result = personalise_site(trainer, global_shared, setting, out, alone_epochs=3, initial_weights=initial, site="s1")

    assert set(result["files"]) == {"global", "personal", "alone"}
    saved = {kind: torch.load(path, weights_only=True) for kind, path in result["files"].items()}
    assert {p.name for p in out.iterdir()} == set(MODEL_FILES.values())
    # the global model, completed with this site's local part
    g = saved["global"]["model"]
    assert set(g) == set(state)
    assert not _changed({k: g[k] for k in global_shared}, global_shared)
    assert not _changed({k: g[k] for k in trainer.local_weights()}, trainer.local_weights())
    # the personalised model: the global model fine-tuned, every trained tensor (shared and local) moved on
    p = saved["personal"]["model"]
    assert _changed(p, g) and set(p) == set(g)
    assert saved["personal"][SITE_MODEL_KEY]["kind"] == "personal" and saved["personal"][SITE_MODEL_KEY]["site"] == "s1"
    for kind in ("global", "personal", "alone"):
        assert 0 <= result[kind]["dice"] <= 1 and result[kind]["num_samples"] == len(trainer.datasets["val"])
        assert saved[kind][SITE_MODEL_KEY]["val"]["dice"] == result[kind]["dice"]
    # the trainer is back where the federation left it (cross-site evaluation sees the site unchanged)
    assert not _changed(state, trainer.trained_weights())


def test_the_site_alone_comparison_is_the_site_alone_baseline(tmp_path, disc_site):
    """The alone model a site trains in the personalisation step is exactly train_alone's, scored on the same slices."""
    trainer = make_trainer(disc_site, parts=())
    initial = trainer.trained_weights()
    trainer.fit(epochs=1)
    result = personalise_site(trainer, trainer.travel_weights(), Personalisation.parse("finetune:1,alone"), tmp_path / "out",
                              alone_epochs=2, initial_weights=initial)
    baseline = train_alone(tiny("fedmsa"), trainer.cfg, str(disc_site), 2)
    dataset, _, val = site_split(disc_site, trainer.cfg, 128, 32)
    assert result["alone"]["dice"] == pytest.approx(score(model_predictor(baseline.model), dataset, val)["dice"], abs=1e-6)
    assert result["personal"]["dice"] != result["global"]["dice"]


# ------------------------------------------------------------------------------------------- loading the models


def test_a_personalised_jobs_global_file_needs_a_sites_local_part(tmp_path, disc_site):
    trainer = make_trainer(disc_site)
    trainer.fit(epochs=1)
    global_file = tmp_path / "FL_global_model.pt"
    torch.save({"model": trainer.travel_weights()}, global_file)  # what the server's persistor holds
    with pytest.raises(CheckpointError, match="holds the shared part of a personalised model only; the job keeps its norm"):
        load_model(tiny("fedmsa", ("norm",)), global_file)
    # a held-out site: the initial local part
    model = load_model(tiny("fedmsa", ("norm",)), global_file, initial_local=True)
    fresh = build_model(tiny("fedmsa", ("norm",)))
    assert not _changed({k: model.state_dict()[k] for k in trainer.local_weights()},
                        {k: fresh.state_dict()[k] for k in trainer.local_weights()})
    # a site's model file holds everything
    result = personalise_site(trainer, trainer.travel_weights(), Personalisation.parse("norm"), tmp_path / "site")
    site_model = load_model(tiny("fedmsa", ("norm",)), result["files"]["personal"])
    assert not _changed({k: site_model.state_dict()[k] for k in trainer.trained_weights()}, trainer.trained_weights())
    assert result["personal"] == result["global"]  # no fine-tune: the personalised model is the global one with its norms
