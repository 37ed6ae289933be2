"""The server's global model: exactly the travel set, so FedMSA's global model never holds an encoder, and a
personalised job's global model never holds the sites' local part (``local_parts``)."""

from __future__ import annotations

from torch import nn

from fedfms.flare.site_config import expand
from fedfms.models import ModelConfig, build_model, frozen_fingerprint, travel_state_dict


class TravelSetModel(nn.Module):
    """A torch module for ``PTFileModelPersistor`` whose state dict is the travel set of the configured
    model. For a pretrained model the server needs the public SAM checkpoint (``checkpoint``, ``$VARS``
    expanded) to start the decoder (FedMSA) or everything (FedSAM) from SAM's weights."""

    def __init__(self, **model_config):
        super().__init__()
        if model_config.get("pretrained", True) and model_config.get("checkpoint"):
            model_config["checkpoint"] = expand(model_config["checkpoint"], "server")
        self.config = ModelConfig.from_dict(model_config, "persistor model config")
        self.sam = build_model(self.config)
        # what every site's frozen weights must hash to (checked by CheckedFedAvgAggregator)
        self.fingerprint = frozen_fingerprint(self.sam, self.config.mode)

    def state_dict(self, *args, **kwargs):
        return travel_state_dict(self.sam, self.config.mode, self.config.local_parts)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.sam.load_state_dict(state_dict, strict=False, assign=assign)
