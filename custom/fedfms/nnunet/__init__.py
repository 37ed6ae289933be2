"""FednnU-Net: nnU-Net v2 planned and trained the federated way (FLARE-free core). See docs/nnunet.md."""
