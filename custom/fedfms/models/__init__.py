"""SAM variants, MSA adapters, prompt-free forward, checkpoint loading and the travel set."""

from fedfms.models.build import ModelConfig, build_model, build_model_on_meta
from fedfms.models.prompt_free import PromptFreeSAM
from fedfms.models.registry import VARIANTS, get_variant
from fedfms.models.travel import (
    LOCAL_PARTS,
    MODES,
    count_parameters,
    frozen_fingerprint,
    is_travel_key,
    local_keys,
    local_spec,
    local_state_dict,
    set_trainable,
    trained_keys,
    travel_bytes,
    travel_keys,
    travel_spec,
    travel_state_dict,
)

__all__ = [
    "LOCAL_PARTS", "MODES", "VARIANTS", "ModelConfig", "PromptFreeSAM", "build_model", "build_model_on_meta", "count_parameters",
    "frozen_fingerprint", "get_variant", "is_travel_key", "local_keys", "local_spec", "local_state_dict", "set_trainable",
    "trained_keys", "travel_bytes", "travel_keys", "travel_spec", "travel_state_dict",
]
